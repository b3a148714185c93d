"""pytest-benchmark: LayerNorm + per-token int8 quantization (what an int8 linear after a
LayerNorm needs), the fused Triton kernel vs torch's three passes vs the LayerNorm alone.

On CUDA: the MLP inputs of the image encoders at batch 8 in bf16 (vit_b: 32768 tokens x 768,
vit_h: 32768 x 1280). On CPU: one small shape in fp32, the kernel through the Triton
interpreter (its time means nothing there; the case only keeps the suite from rotting).

Cases: "reference" F.layer_norm then quantize_per_row (what `FastConfig(quantize="int8")`
does today), "fast" the fused kernel, "floor_layer_norm" F.layer_norm alone (no codes).
The GPU numbers decide whether the encoders' blocks feed their int8 linears from the fused
kernel (issue: compression, per-layer decisions by measurement).

    pytest bench/test_bench_layer_norm_quant.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.common import DEVICE, record, repeats
from fastsam_core.benchmark import synchronize
from fastsam_core.ops.quant import layer_norm_quantize

if DEVICE.type == "cuda":
    SHAPES = {"vit_b-mlp-bs8": (32768, 768, torch.bfloat16),
              "vit_h-mlp-bs8": (32768, 1280, torch.bfloat16)}
    ROUNDS = 20
else:
    SHAPES = {"small": (64, 128, torch.float32)}
    ROUNDS = 2
IMPLS = ["reference", "fast", "floor_layer_norm"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_layer_norm_quant(benchmark, name, impl):
    rows, k, dtype = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(k, generator=gen) * 0.1 + 1).to(DEVICE, dtype)
    bias = (torch.randn(k, generator=gen) * 0.1).to(DEVICE, dtype)
    group = f"layer_norm_quant {name}"
    benchmark.group = group

    def run():
        with torch.inference_mode():
            for _ in range(repeats(impl)):
                if impl == "floor_layer_norm":
                    F.layer_norm(x, (k,), weight, bias, 1e-6)
                else:
                    backend = "triton" if impl == "fast" else "torch"
                    layer_norm_quantize(x, weight, bias, 1e-6, backend)
        synchronize(DEVICE)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(benchmark, group, impl, rows=rows, features=k, dtype=str(dtype).replace("torch.", ""))
