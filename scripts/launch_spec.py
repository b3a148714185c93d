"""A kernel launch (`fastsam_core.kernels.launch.Launch`) as Triton's JIT specializes it, as
plain data, and the source Triton compiles from that data (scripts/compile_check.py,
scripts/record_launches.py).

The specialization is what a real call on a GPU would get: pointers and integers divisible by
16 marked so (what lets loads be pipelined), integers equal to 1 made constants, through
Triton's own (private) `native_specialize_impl`. It needs no GPU and works under the
interpreter too (CPU tensors' addresses are as aligned as CUDA's for these checks).
"""

from __future__ import annotations

import importlib

from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.compiler import ASTSource

# Constexprs that depend on running under the interpreter: their value on a GPU.
GPU_CONSTEXPRS = {"UPCAST_DOT": False}
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")  # launch keywords that are options


def specialization(launch) -> dict:
    """The launch as JSON-ready data: kernel (module and name), types (per argument, constexprs
    "constexpr"), constexprs, attrs ([argument index, attributes] pairs) and options
    (OPTIONS), with the GPU's value of GPU_CONSTEXPRS."""
    fn = launch.kernel
    constexprs = {name: value for name, value in launch.meta.items() if name not in OPTIONS}
    options = {name: launch.meta[name] for name in OPTIONS if name in launch.meta}
    runtime = fn.arg_names[:len(launch.args)]  # positional: the runtime arguments come first
    if set(fn.arg_names[len(launch.args):]) - set(constexprs):
        raise ValueError(f"{fn.__name__}: arguments neither passed nor constexpr")
    types, attrs = {}, []
    for index, (name, value) in enumerate(zip(runtime, launch.args)):
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            constexprs[name] = key
            continue
        types[name] = kind
        if isinstance(key, str):
            attrs.append([index, BaseBackend.parse_attr(key)])
    constexprs.update({k: v for k, v in GPU_CONSTEXPRS.items() if k in constexprs})
    types.update({name: "constexpr" for name in constexprs})
    return dict(kernel=[fn.fn.__module__, fn.__name__],
                types={name: types[name] for name in fn.arg_names},
                constexprs=constexprs, attrs=attrs, options=options)


def ast_source(spec: dict) -> tuple[ASTSource, dict]:
    """The source Triton's JIT would compile for `spec`, and the compile options. The kernel
    is imported compiled: TRITON_INTERPRET must have been off when its module was."""
    module, name = spec["kernel"]
    fn = getattr(importlib.import_module(module), name)
    attrs = {(index,): attr for index, attr in spec["attrs"]}
    return ASTSource(fn, dict(spec["types"]), dict(spec["constexprs"]), attrs), spec["options"]
