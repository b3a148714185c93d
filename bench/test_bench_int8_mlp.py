"""pytest-benchmark: an encoder block's int8 MLP (LayerNorm, fc1, GELU, fc2), the fused
kernels against the separate passes against the float MLP (what int8 must beat).

Cases: "reference" `Int8MLP` path "separate" (LayerNorm, each int8 linear quantizing its
input, GELU apart; the linears' matmul backend as measured on CUDA), "fast" path "fused"
(LayerNorm + quantization in one kernel, GELU in fc1's epilogue, fc1's output quantized in
one pass; kernels/layer_norm_quant.py, int8_matmul.py, quantize_rows.py), and
"floor_float_mlp" the same MLP in the compute dtype without quantization. These numbers are
what `Int8MLP(path="auto")` decides by, per shape, on first use.

On CUDA: vit_b (32768 tokens x 768 -> 3072 -> 768) and vit_h (x 1280 -> 5120 -> 1280) at
batch 8 in bf16. On CPU: one small shape in fp32, the fused kernels through the Triton
interpreter (its time means nothing; the case keeps the suite alive).

    pytest bench/test_bench_int8_mlp.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.common import MLPBlock
from torch import nn

from bench.common import DEVICE, record, repeats
from fastsam_core.benchmark import synchronize
from fastsam_core.models.convert import dtype_name
from fastsam_core.models.quant import DeferredLayerNorm, Int8Linear, Int8MLP

if DEVICE.type == "cuda":
    SHAPES = {"vit_b-bs8": (32768, 768, 3072), "vit_h-bs8": (32768, 1280, 5120)}
    DTYPE, ROUNDS = torch.bfloat16, 20
else:
    SHAPES = {"small": (64, 64, 256)}
    DTYPE, ROUNDS = torch.float32, 2
IMPLS = ["reference", "fast", "floor_float_mlp"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_int8_mlp(benchmark, name, impl):
    tokens, k, hidden = SHAPES[name]
    torch.manual_seed(0)
    norm = nn.LayerNorm(k, eps=1e-6).to(DEVICE, DTYPE)
    mlp = MLPBlock(k, hidden).eval().to(DEVICE, DTYPE)
    x = torch.randn(tokens, k, device=DEVICE, dtype=DTYPE)
    if impl != "floor_float_mlp":
        int8 = Int8MLP(mlp, path="separate" if impl == "reference" else "fused")
        int8.lin1, int8.lin2 = Int8Linear(mlp.lin1), Int8Linear(mlp.lin2)
        norm, mlp = DeferredLayerNorm(norm), int8
    group = f"int8 mlp {name}"
    benchmark.group = group

    def run():
        with torch.inference_mode():
            for _ in range(repeats(impl)):
                mlp(norm(x))
        synchronize(DEVICE)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(benchmark, group, impl, flops=4.0 * tokens * k * hidden, tokens=tokens,
           features=k, hidden=hidden, dtype=dtype_name(DTYPE))
