"""Compile every Triton kernel of fastsam_core, at the launch configurations it can pick, for a
GPU that is not here: ahead of time, for CUDA compute capability --arch (default 90, the
H200), with Triton's own ptxas, from the arguments a real launch passes (each kernel module's
`*_launch`, built on CPU tensors of the real shapes and specialized as Triton's JIT does: the
16-byte alignment of pointers and integers is what lets loads be pipelined). No GPU is
needed; the interpreter must be off (the script clears TRITON_INTERPRET before importing
triton).

What it tells without a GPU: that each kernel compiles for that target with this Triton (the
lent H200 runs its own Triton, see ../shared/device/README.md), the shared memory each launch
asks for against the target's per-block limit (a candidate over it would fail at launch and
cost its compile time on every cold start), the registers per thread and the bytes spilled to
local memory (ptxas -v), whether tl.dot became Hopper's wgmma, whether loads were
software-pipelined (asynchronous copies to shared memory), and the compile time of each
(a fresh Triton cache: what a cold start's tuning compiles, on this CPU). What it cannot
tell: speed.

    python scripts/compile_check.py [--arch 90] [--json FILE] [--only TEXT ...]
                                    [--launches FILE]

With --launches, it compiles instead the launches a test run made (recorded by the pytest
plugin scripts/record_launches.py, with the GPU's launch configurations): what the CUDA run
of those tests will compile. Prints one line per compiled variant, then a summary; exits 1 if
a variant failed to compile or asked for more shared memory than the target has.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled kernels
# a fresh cache, so that the compile times reported are those of a cold start
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastsam-compile-check-")
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402
import triton  # noqa: E402
from launch_spec import ast_source, specialization  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastsam_core.kernels import int8_matmul, layer_norm_quant, quantize_rows  # noqa: E402
from fastsam_core.kernels import rel_pos_attention as attention  # noqa: E402
from fastsam_core.kernels.quantize_rows import row_buffers  # noqa: E402
from fastsam_core.ops.attention import distinct_launches, rel_pos_terms  # noqa: E402

# Largest dynamic shared memory one block may opt in to, by compute capability (CUDA
# programming guide, "Technical Specifications per Compute Capability").
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# (name, heads, head dim, grid) of the encoders' attention at 1024 px: global and windowed
ATTENTION_SHAPES = (("d80 kw64", 16, 80, (64, 64)), ("d64 kw64", 12, 64, (64, 64)),
                    ("d80 kw14", 16, 80, (14, 14)))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROW_WIDTHS = (768, 1024, 1280, 3072, 4096, 5120)  # SAM / SAM 2 widths and MLP hidden widths
# (name, tokens, in, out, activation) of vit_h's MLP linears at batch 1
INT8_SHAPES = (("fc1", 4096, 1280, 5120, "gelu"), ("fc2", 4096, 5120, 1280, None))


def attention_launches():
    """The kernel's launches as the encoder makes them: q, k, v views into one qkv tensor
    (1 x N x 3 x heads x d), bias terms from `rel_pos_terms`, the op's output layout."""
    for label, dtype in DTYPES.items():
        for shape, heads, head_dim, grid in ATTENTION_SHAPES:
            if label != "bf16" and grid[1] != 64:
                continue  # the window grid changes only the bias mode: bf16 shows it compiles
            n = grid[0] * grid[1]
            qkv = torch.empty(1, n, 3, heads, head_dim, dtype=dtype)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 1 x heads x N x d each
            pos_h = torch.zeros(grid[0], grid[0], head_dim, dtype=dtype)
            pos_w = torch.zeros(grid[1], grid[1], head_dim, dtype=dtype)
            rel_h, rel_w = rel_pos_terms(q, pos_h, pos_w, grid)
            out = attention.empty_output(q)
            for config in distinct_launches(grid, dtype).values():  # what the tuner may pick
                mode = attention.bias_mode(config, grid)
                name = f"{config.as_key().removesuffix('_' + mode)} {mode}"
                yield (f"rel_pos_attention {label} {shape} {name}",
                       attention.rel_pos_attention_launch(q, k, v, rel_h, rel_w, grid[1],
                                                          head_dim**-0.5, config, out))


def int8_matmul_launches():
    for label, dtype in DTYPES.items():
        for layer, n, k, m, activation in INT8_SHAPES:
            x_q = torch.empty(n, k, dtype=torch.int8)
            weight_q = torch.empty(m, k, dtype=torch.int8)
            for tile in int8_matmul.TILE_CANDIDATES:  # what the tuner may pick
                yield (f"int8_matmul {label} {layer} {tile.as_key()}",
                       int8_matmul.int8_matmul_launch(
                           x_q, torch.empty(n, 1), weight_q, torch.empty(m),
                           torch.empty(m, dtype=dtype), torch.empty(n, m, dtype=dtype), tile,
                           activation))


def row_launches():
    for label, dtype in DTYPES.items():
        for width in ROW_WIDTHS:
            rows, q, s = row_buffers("compile_check", torch.empty(64, width, dtype=dtype), None)
            block = quantize_rows.row_launch(width)["BLOCK"]
            yield (f"quantize_rows {label} k{width} block{block}",
                   quantize_rows.quantize_rows_launch(rows, q, s))
            norm = torch.empty(width), torch.empty(width)
            yield (f"layer_norm_quant {label} k{width} block{block}",
                   layer_norm_quant.layer_norm_quant_launch(rows, *norm, 1e-6, q, s))


def resource_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers per thread and bytes spilled (stores) per thread of the kernel in `ptx`, from
    `ptxas -v` (Triton's own ptxas, for the PTX's target)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        log = subprocess.run([str(tool), f"-arch={target}", "-v", str(source), "-o",
                              str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True,
                             check=True).stderr
    return dict(reg=int(re.search(r"Used (\d+) registers", log).group(1)),
                spill=int(re.search(r"(\d+) bytes spill stores", log).group(1)))


def builtin_variants(only: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(name, specialization) of the launches above whose name contains every string of
    `only`, if given."""
    for name, launch in (*attention_launches(), *int8_matmul_launches(), *row_launches()):
        if not only or all(part in name for part in only):
            yield name, specialization(launch)


def recorded_variants(path: Path, only: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(name, specialization) of the launches scripts/record_launches.py recorded in `path`."""
    for record in json.loads(path.read_text())["launches"]:
        if not only or all(part in record["name"] for part in only):
            yield record["name"], record["spec"]


def compile_all(arch: int, variants: Iterable[tuple[str, dict]]) -> list[dict]:
    """Compile each (name, specialization) for sm_<arch>: one result row each."""
    target = GPUTarget("cuda", arch, 32)
    limit = SHARED_LIMIT.get(arch)
    results = []
    for name, spec in variants:
        start = time.perf_counter()
        row = dict(name=name)
        try:
            source, options = ast_source(spec)
            row["options"] = options
            compiled = triton.compile(source, target=target, options=options)
        except Exception as err:  # noqa: BLE001 - reported, and the exit status says so
            row.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0]}")
        else:
            shared = compiled.metadata.shared
            ttgir = compiled.asm["ttgir"]
            row.update(ok=limit is None or shared <= limit, shared=shared,
                       wgmma="wgmma" in compiled.asm["ptx"],
                       async_loads=ttgir.count("async_copy_global_to_local")
                       + ttgir.count("async_tma_copy_global_to_local"),
                       **resource_usage(compiled.asm["ptx"], arch))
            if not row["ok"]:
                row["error"] = f"shared memory {shared} > {limit} bytes"
        row["seconds"] = round(time.perf_counter() - start, 2)
        results.append(row)
        print(line(row), flush=True)
    return results


def line(row: dict) -> str:
    if "shared" not in row:
        return f"{row['name']:<58} FAILED {row['error']}"
    flag = "" if row["ok"] else f"  FAILED {row['error']}"
    return (f"{row['name']:<58} shared {row['shared']:>6}  reg {row['reg']:>3}  "
            f"spill {row['spill']:>5}  wgmma {'yes' if row['wgmma'] else 'no ':<3}  "
            f"async loads {row['async_loads']:>2}  {row['seconds']:5.1f} s{flag}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="compile only the variants whose name contains TEXT (repeatable)")
    parser.add_argument("--launches", type=Path, metavar="FILE",
                        help="compile the launches scripts/record_launches.py recorded in FILE "
                             "instead of the built-in ones")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_{args.arch}, shared-memory limit "
          f"{SHARED_LIMIT.get(args.arch, 'unknown')} bytes", flush=True)
    variants = (recorded_variants(args.launches, args.only) if args.launches
                else builtin_variants(args.only))
    results = compile_all(args.arch, variants)
    failed = [r for r in results if not r["ok"]]
    spilled = [r for r in results if r.get("spill")]
    print(f"{len(results)} variants, {len(failed)} failed, {len(spilled)} spilling registers, "
          f"{sum(r['seconds'] for r in results):.0f} s compiling")
    if args.json:
        args.json.write_text(json.dumps(dict(triton=triton.__version__, arch=args.arch,
                                             results=results), indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
