"""One Triton kernel launch as a value: built by a kernel module's `*_launch` function, run by
calling it, or compiled ahead of time for a GPU that is not there (scripts/compile_check.py
specializes the same arguments the way Triton's JIT does)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    kernel: object  # the @triton.jit function
    grid: tuple[int, ...]  # programs per axis
    args: tuple  # positional arguments: tensors (pointers) and scalars
    meta: dict  # constexpr arguments by name and compile options (num_warps, ...)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)
