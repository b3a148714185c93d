"""pytest-benchmark: the int8 linear's matmul, the Triton kernel with the rescale and bias
fused in vs `torch._int_mm` followed by them vs a bf16 F.linear (what int8 must beat).

On CUDA: the encoders' MLP fc1 at batch 8 (vit_b: 32768 tokens x 768 -> 3072, vit_h: 32768 x
1280 -> 5120; the issue measured bf16 0.63 ms and torchao's int8 0.98 ms for vit_h), bf16
output. On CPU: one small shape, the reference through the "dequant" backend and the kernel
through the Triton interpreter (times mean nothing there; the case keeps the suite alive).
Activations arrive quantized (codes and scales): the quantization is
bench/test_bench_layer_norm_quant.py's subject.

    pytest bench/test_bench_int8_matmul.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.common import DEVICE, record, repeats
from fastsam_core.benchmark import synchronize
from fastsam_core.models.convert import dtype_name
from fastsam_core.ops.quant import int8_matmul, quantize_per_row

CUDA = DEVICE.type == "cuda"
if CUDA:
    SHAPES = {"vit_b-fc1-bs8": (32768, 768, 3072), "vit_h-fc1-bs8": (32768, 1280, 5120)}
    DTYPE, ROUNDS = torch.bfloat16, 20
else:
    SHAPES = {"small": (64, 64, 96)}
    DTYPE, ROUNDS = torch.float32, 2
IMPLS = ["reference", "fast", "floor_float_linear"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_int8_matmul(benchmark, name, impl):
    n, k, m = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, k, generator=gen).to(DEVICE, DTYPE)
    weight = (torch.randn(m, k, generator=gen) * 0.05).to(DEVICE, DTYPE)
    bias = torch.randn(m, generator=gen).to(DEVICE, DTYPE)
    x_q, x_scale = quantize_per_row(x)
    w_q, w_scale = quantize_per_row(weight)
    w_scale = w_scale[:, 0]
    backend = {"reference": "int_mm" if CUDA else "dequant", "fast": "triton"}.get(impl)
    group = f"int8 matmul {name}"
    benchmark.group = group

    def run():
        with torch.inference_mode():
            for _ in range(repeats(impl)):
                if backend is None:
                    F.linear(x, weight, bias)
                else:
                    int8_matmul(x_q, x_scale, w_q, w_scale, bias, DTYPE, backend)
        synchronize(DEVICE)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(benchmark, group, impl, flops=2.0 * n * k * m, tokens=n, in_features=k,
           out_features=m, dtype=dtype_name(DTYPE))
