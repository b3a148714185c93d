"""torch.compile applied lazily, with a fallback to eager when compilation fails."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

from fastsam_core.progress import note

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes with CUDA graphs


class LazyCompiled:
    """`fn` through `torch.compile(mode=...)`, compiled on the first call.

    The first call says on stderr that it compiles, and how long it took
    (`fastsam_core.progress`; `first_call_s`). If that first call fails (no C++ compiler, an
    unsupported op, ...), `fn` runs eagerly from then on and the failure is reported once, by
    warning and in `status`. Under modes that use CUDA graphs, outputs are copied out of the
    graph's memory pool, which the next replay overwrites. A copy (`copy.deepcopy`, pickle)
    compiles again on its first call (one whose compilation failed stays eager): a compiled
    function is bound to the `fn` it was made from, a method of the original object.

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
        self.options = options
        self.status = "pending first call" if mode else "eager"
        self.compiled = torch.compile(fn, mode=mode, **options) if mode else None
        self.cudagraphs = mode in CUDAGRAPH_MODES
        self.first_call_s: float | None = None  # seconds of the compiling call, once made

    def __getstate__(self) -> dict:
        return {**self.__dict__, "compiled": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)  # `fn` is the copy's own method
        if self.mode and not self.status.startswith("failed"):
            self.compiled = torch.compile(self.fn, mode=self.mode, **self.options)
            self.status, self.first_call_s = "pending first call", None

    def __call__(self, *args: object, eager: bool = False) -> object:
        """`fn(*args)`, compiled; `eager`: `fn` itself this time (for forward hooks, which a
        compiled graph would trace into it, or recompile for)."""
        if self.compiled is None or eager:
            return self.fn(*args)
        if self.status != "pending first call":
            return self._own(self.compiled(*args))
        note(f"compiling the {self.what} (torch.compile mode={self.mode!r}) on its first call")
        start = time.perf_counter()
        try:
            out = self._own(self.compiled(*args))
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            self.compiled = None
            self.status = f"failed, running eager ({type(err).__name__}: {err})"[:300]
            warnings.warn(f"fastsam_core: torch.compile of the {self.what} {self.status}",
                          stacklevel=3)
            return self.fn(*args)
        self.first_call_s = time.perf_counter() - start
        self.status = "compiled"
        note(f"compiled the {self.what}: first call {self.first_call_s:.1f} s")
        return out

    @property
    def summary(self) -> str:
        """`status`, with the compiling call's seconds once made (for `report()`)."""
        if self.first_call_s is None:
            return self.status
        return f"{self.status} (first call {self.first_call_s:.1f} s)"

    def _own(self, out: object) -> object:
        if not self.cudagraphs:
            return out
        return torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: t.clone() if t.is_cuda else t, out)
