"""One Triton kernel launch as a value: built by a kernel module's `*_launch` function, run by
calling it, or compiled ahead of time for a GPU that is not there (scripts/compile_check.py
specializes the same arguments the way Triton's JIT does)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Launch:
    kernel: object  # the @triton.jit function
    grid: tuple[int, ...]  # programs per axis
    args: tuple  # positional arguments: tensors (pointers) and scalars
    meta: dict  # constexpr arguments by name and compile options (num_warps, ...)

    def __call__(self) -> None:
        with on_device_of(self.args):
            self.kernel[self.grid](*self.args, **self.meta)


def on_device_of(args: tuple | list) -> object:
    """A context making the first CUDA tensor in `args` its device's current one: Triton
    launches on the current device's context and stream, wherever the pointers are (a model
    on cuda:1 in a process whose current device is cuda:0)."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
    return nullcontext() if device is None else torch.cuda.device(device)
