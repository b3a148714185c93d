"""For comparison with compile_check-sm90-triton*.txt: the rel-pos kernel as it was at commit
f3a00d3 (head dim padded to a power of two, bias gathered per element), bf16, compiled for
sm_90 the way scripts/compile_check.py compiles today's, from the arguments its
rel_pos_attention_fwd passed at the encoder's shapes. Output committed as
compile_check_f3a00d3-sm90-triton<version>.txt beside this file:

    PYTHONPATH=. python scripts/runs/compile_check_f3a00d3.py            # this machine's Triton
    scripts/device_stack.sh python scripts/runs/compile_check_f3a00d3.py  # the H200's 3.6
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import compile_check  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from fastsam_core.kernels.launch import Launch  # noqa: E402
from fastsam_core.ops.attention import rel_pos_terms  # noqa: E402


def old_kernel_module():
    source = subprocess.run(["git", "show", "f3a00d3:fastsam_core/kernels/rel_pos_attention.py"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "rel_pos_attention_f3a00d3.py"
    path.write_text(source)  # @triton.jit reads the source file, so it must exist on disk
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def main():
    old = old_kernel_module()
    tiles = [old.LaunchConfig(64, 64, 4, 2), old.LaunchConfig(128, 64, 8, 2),
             old.LaunchConfig(128, 32, 8, 3)]
    variants = []
    for shape, heads, d, grid in compile_check.ATTENTION_SHAPES:
        n = grid[0] * grid[1]
        qkv = torch.empty(1, n, 3, heads, d, dtype=torch.bfloat16)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        tables = (torch.zeros(size, size, d, dtype=torch.bfloat16) for size in grid)
        rh, rw = rel_pos_terms(q, *tables, grid)
        out = old.empty_output(q)
        for config in tiles:
            args = (q, k, v, rh, rw, out, *q.stride(), *k.stride(), *v.stride(), *rh.stride(),
                    *rw.stride(), *out.stride(), heads, n, d**-0.5)
            meta = dict(KEY_W=grid[1], HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                        BLOCK_M=config.block_m, BLOCK_N=config.block_n, HAS_BIAS=True,
                        DOT_PRECISION="tf32", UPCAST_DOT=False, num_warps=config.num_warps,
                        num_stages=config.num_stages)
            launch = Launch(old._rel_pos_attention_fwd, (1,), args, meta)
            variants.append((f"rel_pos_attention (f3a00d3) bf16 {shape} {config.as_key()}",
                             compile_check.specialization(launch)))
    print(f"# triton {triton.__version__}, sm_90", flush=True)
    compile_check.compile_all(90, variants)


if __name__ == "__main__":
    main()
