"""pytest-benchmark: LayerNorm + per-token int8 quantization (what an int8 linear after a
LayerNorm needs), the fused Triton kernel vs torch's three passes vs the LayerNorm alone;
and the whole way from a block's norm1 into its int8 qkv (`test_norm1_qkv`, below).

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
from segment_anything.modeling.image_encoder import window_partition
from torch import nn

from bench.common import DEVICE, record, repeats
from fastsam_core.benchmark import synchronize
from fastsam_core.models.convert import dtype_name
from fastsam_core.models.quant import DeferredLayerNorm, Int8Linear
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
    record(benchmark, group, impl, rows=rows, features=k, dtype=dtype_name(dtype))


if DEVICE.type == "cuda":  # batch, grid, features, window (0: global), dtype
    QKV_SHAPES = {"vit_b-windowed-bs8": (8, 64, 768, 14, torch.bfloat16),
                  "vit_h-windowed-bs8": (8, 64, 1280, 14, torch.bfloat16),
                  "vit_h-global-bs8": (8, 64, 1280, 0, torch.bfloat16)}
else:
    QKV_SHAPES = {"small": (1, 6, 48, 4, torch.float32)}
QKV_IMPLS = ["reference", "fast", "floor_float_qkv"]


@pytest.mark.parametrize("impl", QKV_IMPLS)
@pytest.mark.parametrize("name", sorted(QKV_SHAPES))
def test_norm1_qkv(benchmark, name, impl):
    """norm1 -> window partition -> qkv of a ViT block: "reference" the separate path
    (LayerNorm, the activations partitioned, qkv quantizing them), "fast" the fused one
    (LayerNorm + codes in one kernel, the int8 codes partitioned, qkv from them), and
    "floor_float_qkv" the float layers. What `DeferredLayerNorm(path="auto")` decides by."""
    batch, grid, k, window, dtype = QKV_SHAPES[name]
    torch.manual_seed(0)
    norm = nn.LayerNorm(k, eps=1e-6).to(DEVICE, dtype)
    qkv = nn.Linear(k, 3 * k).to(DEVICE, dtype)
    x = torch.randn(batch, grid, grid, k, device=DEVICE, dtype=dtype)
    group = f"norm1 qkv {name}"
    benchmark.group = group
    if impl == "floor_float_qkv":
        def step():
            y = norm(x)
            return qkv(window_partition(y, window)[0] if window else y)
    else:
        path = "separate" if impl == "reference" else "fused"
        deferred, int8 = DeferredLayerNorm(norm, path), Int8Linear(qkv)

        def step():
            return int8(deferred(x).for_linear(int8, window))

    def run():
        with torch.inference_mode():
            for _ in range(repeats(impl)):
                step()
        synchronize(DEVICE)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(benchmark, group, impl, tokens=batch * grid * grid, features=k, window=window,
           dtype=dtype_name(dtype))
