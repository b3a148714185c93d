"""Compile every Triton kernel of fastsam_core, at the launch configurations it can pick, for a
GPU that is not here: ahead of time, for CUDA compute capability --arch (default 90, the H200),
with Triton's own ptxas. No GPU is needed; the interpreter must be off (the script clears
TRITON_INTERPRET before importing triton).

What it tells without a GPU: that each kernel compiles for that target with this Triton (the
lent H200 runs its own Triton, see ../shared/device/README.md), the shared memory each launch
asks for against the target's per-block limit (a candidate over it would fail at launch and
cost its compile time on every cold start), the registers per thread and the bytes spilled to
local memory (ptxas -v), whether tl.dot became Hopper's wgmma, and the compile time of each
(a fresh Triton cache: what a cold start's tuning compiles, on this CPU). What it cannot
tell: speed.

    python scripts/compile_check.py [--arch 90] [--json FILE] [--only TEXT ...]

Prints one line per compiled variant, then a summary; exits 1 if a variant failed to compile
or asked for more shared memory than the target has.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled kernels
# a fresh cache, so that the compile times reported are those of a cold start
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastsam-compile-check-")
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastsam_core.kernels import int8_matmul, layer_norm_quant, quantize_rows  # noqa: E402
from fastsam_core.kernels import rel_pos_attention as attention  # noqa: E402
from fastsam_core.ops.attention import candidates_for  # noqa: E402

# Largest dynamic shared memory one block may opt in to, by compute capability (CUDA
# programming guide, "Technical Specifications per Compute Capability").
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# (head dim, key grid width) of the encoders' attention: vit_b/l (64) and vit_h (80), global
# (64 x 64 grid at 1024 px) and windowed (14 x 14)
ATTENTION_SHAPES = ((80, 64), (64, 64), (80, 14))
DTYPES = ("bf16", "fp16", "fp32")
ROW_WIDTHS = (768, 1024, 1280, 3072, 4096, 5120)  # SAM / SAM 2 widths and MLP hidden widths


def signature(fn, pointers: dict[str, str], scalars: dict[str, str], constexprs: dict
              ) -> dict[str, str]:
    """Triton type of every argument of `fn`: pointers and scalars as given, the rest i32."""
    types = {}
    for name in fn.arg_names:
        types[name] = ("constexpr" if name in constexprs else pointers.get(name)
                       or scalars.get(name, "i32"))
    return types


def attention_variants():
    fn = attention._rel_pos_attention_fwd
    for dtype in DTYPES:
        for head_dim, key_w in ATTENTION_SHAPES:
            if dtype != "bf16" and key_w != 64:
                continue  # the window grid changes only the bias mode: bf16 shows it compiles
            grid = (key_w, key_w)
            configs = list(candidates_for(grid).values())  # what the tuner may pick
            if dtype == "bf16":  # the per-element gathers at the first, for comparison
                configs.append(dataclasses.replace(configs[0], bias="gather"))
            for config in configs:
                d0, d1 = attention.head_dim_split(head_dim)
                mode = attention.bias_mode(config, grid)
                constexprs = dict(
                    KEY_H=grid[0], KEY_W=key_w, HEAD_DIM=head_dim, D0=d0, D1=d1,
                    BLOCK_M=config.block_m, BLOCK_N=config.block_n, HAS_BIAS=True,
                    BIAS_MODE=attention.BIAS_MODES.index(mode), PAD_H=attention._pad(grid[0]),
                    PAD_W=attention._pad(grid[1]),
                    DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST_DOT=False)
                pointers = {name: f"*{dtype}" for name in ("Q", "K", "V", "RH", "RW", "Out")}
                yield (f"rel_pos_attention {dtype} d{head_dim} kw{key_w} "
                       f"{config.as_key().removesuffix('_' + mode)} {mode}",
                       fn, signature(fn, pointers, {"scale": "fp32"}, constexprs), constexprs,
                       dict(num_warps=config.num_warps, num_stages=config.num_stages))


def int8_matmul_variants():
    fn = int8_matmul._int8_matmul_fwd
    config = int8_matmul.LaunchConfig()
    for dtype in DTYPES:
        for gelu in (False, True):
            constexprs = dict(HAS_BIAS=True, GELU=gelu, BLOCK_N=config.block_n,
                              BLOCK_M=config.block_m, BLOCK_K=config.block_k)
            pointers = dict(XQ="*i8", XS="*fp32", WQ="*i8", WS="*fp32", Bias=f"*{dtype}",
                            Out=f"*{dtype}")
            name = (f"int8_matmul {dtype} gelu={gelu} n{config.block_n}_m{config.block_m}_"
                    f"k{config.block_k}_w{config.num_warps}_s{config.num_stages}")
            yield (name, fn, signature(fn, pointers, {}, constexprs), constexprs,
                   dict(num_warps=config.num_warps, num_stages=config.num_stages))


def row_variants():
    kernels = (("quantize_rows", quantize_rows._quantize_rows_fwd, {}),
               ("layer_norm_quant", layer_norm_quant._layer_norm_quant_fwd,
                {"W": "*fp32", "B": "*fp32"}))
    for label, fn, extra in kernels:
        for dtype in DTYPES:
            for width in ROW_WIDTHS:
                launch = quantize_rows.row_launch(width)
                constexprs = dict(BLOCK=launch["BLOCK"])
                pointers = dict(X=f"*{dtype}", Q="*i8", S="*fp32", **extra)
                yield (f"{label} {dtype} k{width} block{launch['BLOCK']}", fn,
                       signature(fn, pointers, {"eps": "fp32"}, constexprs), constexprs,
                       dict(num_warps=launch["num_warps"]))


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


def compile_all(arch: int, only: list[str] | None = None) -> list[dict]:
    """Compile the variants (those whose name contains every string of `only`, if given)."""
    target = GPUTarget("cuda", arch, 32)
    limit = SHARED_LIMIT.get(arch)
    results = []
    for name, fn, types, constexprs, options in (*attention_variants(), *int8_matmul_variants(),
                                                 *row_variants()):
        if only and not all(part in name for part in only):
            continue
        start = time.perf_counter()
        row = dict(name=name, options=options)
        try:
            compiled = triton.compile(ASTSource(fn, types, constexprs), target=target,
                                      options=options)
        except Exception as err:  # noqa: BLE001 - reported, and the exit status says so
            row.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0]}")
        else:
            shared = compiled.metadata.shared
            row.update(ok=limit is None or shared <= limit, shared=shared,
                       wgmma="wgmma" in compiled.asm["ptx"],
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
            f"spill {row['spill']:>4}  wgmma {'yes' if row['wgmma'] else 'no ':<3}  "
            f"{row['seconds']:5.1f} s{flag}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="compile only the variants whose name contains TEXT (repeatable)")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_{args.arch}, shared-memory limit "
          f"{SHARED_LIMIT.get(args.arch, 'unknown')} bytes", flush=True)
    results = compile_all(args.arch, args.only)
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
