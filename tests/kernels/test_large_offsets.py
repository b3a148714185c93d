"""The int8 kernels address rows past 2^31 elements (about 420k tokens of vit_h's 5120-wide
MLP hidden layer): 32-bit row offsets wrapped around and read or wrote out of bounds (a
segmentation fault in the interpreter). Rows spread far apart in a mostly untouched
allocation stand for that many tokens; the check runs in a subprocess, which a fault ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import torch
from fastsam_core.kernels import int8_matmul as im, quantize_rows as qr
from tests.kernels.test_layer_norm_quant import assert_matches_reference

device = "cuda" if torch.cuda.is_available() else "cpu"
k = 64


def spread(rows, stride, dtype):
    # rows x k, rows `stride` elements apart, in an allocation only these rows touch
    buf = torch.empty((rows - 1) * stride + k, dtype=dtype, device=device)
    return buf.as_strided((rows, k), (stride, 1))


# int8_matmul: two blocks of rows; the second block's first row at 2^31 elements (offsets
# within a block stay below that)
block = (im.INTERPRETER_CONFIG if im.INTERPRETER else im.LaunchConfig()).block_n
stride = 2**31 // block
x_q = spread(block + 1, stride, torch.int8)
x_q.copy_(torch.randint(-127, 128, (block + 1, k), dtype=torch.int8))
w = torch.randint(-127, 128, (k, k), dtype=torch.int8, device=device)
xs = torch.rand(block + 1, 1, device=device)
ws = torch.rand(k, device=device)
out = spread(block + 1, stride, torch.float16)
im.int8_matmul(x_q, xs, w, ws, None, torch.float16, out=out)
assert torch.equal(out, im.int8_matmul_ref(x_q, xs, w, ws, None, torch.float16)), "int8_matmul"

# the row kernels: one row per program, the third row at 2^31 elements
x = spread(3, 2**30, torch.float16)
x.copy_(torch.randn(3, k) * 3 + 0.5)
assert all(torch.equal(got, expected) for got, expected in
           zip(qr.quantize_rows(x), qr.quantize_rows_ref(x))), "quantize_rows"
assert_matches_reference(x, torch.randn(k, device=device) * 0.5 + 1,
                         torch.randn(k, device=device) * 0.1)  # layer_norm_quant's check
print("ok")
"""


def test_rows_past_two_to_the_31_elements():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", \
        f"exit {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
