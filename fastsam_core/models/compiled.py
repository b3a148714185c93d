"""torch.compile applied lazily, with a fallback to eager when compilation fails."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes with CUDA graphs


class LazyCompiled:
    """`fn` through `torch.compile(mode=...)`, compiled on the first call.

    If that first call fails (no C++ compiler, an unsupported op, ...), `fn` runs eagerly from
    then on and the failure is reported once, by warning and in `status`. Under modes that
    use CUDA graphs, outputs are copied out of the graph's memory pool, which the next replay
    overwrites.

    Args:
        fn: the function to compile.
        mode: a torch.compile mode, or None for plain eager.
        what: names the function in messages.
        options: further torch.compile arguments (fullgraph, dynamic, backend).
    """

    def __init__(self, fn: Callable, mode: str | None, what: str, **options: object) -> None:
        self.fn = fn
        self.mode = mode
        self.what = what
        self.status = "pending first call" if mode else "eager"
        self.compiled = torch.compile(fn, mode=mode, **options) if mode else None
        self.cudagraphs = mode in CUDAGRAPH_MODES

    def __call__(self, *args: object, eager: bool = False) -> object:
        """`fn(*args)`, compiled; `eager`: `fn` itself this time (for forward hooks, which a
        compiled graph would trace into it, or recompile for)."""
        if self.compiled is None or eager:
            return self.fn(*args)
        if self.status != "pending first call":
            return self._own(self.compiled(*args))
        try:
            out = self._own(self.compiled(*args))
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            self.compiled = None
            self.status = f"failed, running eager ({type(err).__name__}: {err})"[:300]
            warnings.warn(f"fastsam_core: torch.compile of the {self.what} {self.status}",
                          stacklevel=3)
            return self.fn(*args)
        self.status = "compiled"
        return out

    def _own(self, out: object) -> object:
        if not self.cudagraphs:
            return out
        return torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: t.clone() if t.is_cuda else t, out)
