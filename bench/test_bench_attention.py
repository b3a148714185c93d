"""pytest-benchmark: SAM's rel-pos attention, fused Triton kernel vs SDPA with the bias
materialized vs SDPA without bias (the floor a fused kernel can approach).

On CUDA: the four real shapes (vit_b / vit_h, global at batch 8, windowed at batch 8 x 25
windows), bf16. On CPU: one small shape in fp32, the kernel through the Triton interpreter
(its time means nothing there; the case only keeps the suite from rotting).

Cases: "reference" is SDPA with the bias materialized, "fast" the fused kernel,
"floor_sdpa_nobias" SDPA without bias. Every case starts from q, k, v and the gathered
position tables, so the bias terms' cost is included where a backend needs them; but
"fast_terms_given", the kernel alone on bias terms computed beforehand: "fast" minus it is
what computing the terms (two small matmuls) costs, so the most a kernel computing them from
q and the tables itself could save (the issue's decision between the two, by measurement);
"fast_gather_bias", the kernel at the launch configuration the tuner chose for "triton" but
with the bias gathered per element (the kernel's first way; kernels/rel_pos_attention.py's
bias modes): where the tuner chose a tiled form ("row", "onehot"), "fast_gather_bias" minus
"fast_terms_given" is what the tiled form gains at that launch.

    pytest bench/test_bench_attention.py --benchmark-only
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from bench.common import DEVICE, record, repeats
from fastsam_core.benchmark import synchronize
from fastsam_core.kernels import rel_pos_attention as kernel
from fastsam_core.kernels.rel_pos_attention import flops
from fastsam_core.models.convert import dtype_name
from fastsam_core.ops import attention as attention_ops
from fastsam_core.ops.attention import rel_pos_attention, rel_pos_terms, tuned_config


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int  # images x windows
    heads: int
    grid: tuple[int, int]
    dim: int
    dtype: torch.dtype
    rounds: int


if DEVICE.type == "cuda":
    SHAPES = [
        Shape("vit_b-global-bs8", 8, 12, (64, 64), 64, torch.bfloat16, 20),
        Shape("vit_b-window-bs8x25", 200, 12, (14, 14), 64, torch.bfloat16, 20),
        Shape("vit_h-global-bs8", 8, 16, (64, 64), 80, torch.bfloat16, 20),
        Shape("vit_h-window-bs8x25", 200, 16, (14, 14), 80, torch.bfloat16, 20),
    ]
else:
    SHAPES = [Shape("small-window-7x7", 4, 2, (7, 7), 32, torch.float32, 2)]

# "reference": SDPA with the bias materialized (what the fast encoder's sdpa path does);
# "fast": the fused kernel; "floor_sdpa_nobias": SDPA without any bias, the floor;
# "fast_terms_given": the kernel on precomputed bias terms.
# "fast_gather_bias": the kernel at that launch, the bias gathered per element.
IMPLS = ["reference", "fast", "fast_terms_given", "fast_gather_bias", "floor_sdpa_nobias"]


def inputs(shape: Shape):
    gen = torch.Generator().manual_seed(0)
    n = shape.grid[0] * shape.grid[1]
    q, k, v = (torch.randn(shape.batch, shape.heads, n, shape.dim, generator=gen)
               for _ in range(3))
    pos_h = torch.randn(shape.grid[0], shape.grid[0], shape.dim, generator=gen) * 0.1
    pos_w = torch.randn(shape.grid[1], shape.grid[1], shape.dim, generator=gen) * 0.1
    return [t.to(DEVICE, shape.dtype) for t in (q, k, v, pos_h, pos_w)]


def gather_config(q, k, v, rel_h, rel_w, key_grid_w, scale):
    """The launch the tuner chose for the "triton" backend, with the bias gathered."""
    config = (kernel.INTERPRETER_CONFIG if kernel.INTERPRETER else
              tuned_config(q, k, v, rel_h, rel_w, key_grid_w, scale, False))
    if config is None:
        pytest.skip("no launch configuration matched the reference: the op runs SDPA")
    return replace(config, bias="gather")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_attention(benchmark, shape, impl):
    q, k, v, pos_h, pos_w = inputs(shape)
    scale = shape.dim**-0.5
    benchmark.group = f"attention {shape.name}"
    with torch.inference_mode():
        rel_h, rel_w = rel_pos_terms(q, pos_h, pos_w, shape.grid)
        if impl == "fast_gather_bias":
            gathering = gather_config(q, k, v, rel_h, rel_w, shape.grid[1], scale)

    def run():
        with torch.inference_mode():
            for _ in range(repeats(impl)):
                if impl == "floor_sdpa_nobias":
                    F.scaled_dot_product_attention(q, k, v, scale=scale)
                elif impl == "fast_terms_given":  # what the "triton" backend calls
                    torch.ops.fastsam.rel_pos_attention(q, k, v, rel_h, rel_w, shape.grid[1],
                                                        scale, False)
                elif impl == "fast_gather_bias":
                    kernel.rel_pos_attention_fwd(q, k, v, rel_h, rel_w, shape.grid[1], scale,
                                                 gathering)
                else:
                    backend = "triton" if impl == "fast" else "sdpa"
                    rel_pos_attention(q, k, v, pos_h, pos_w, shape.grid, scale, backend)
        synchronize(DEVICE)

    fallbacks = dict(attention_ops.KERNEL_FALLBACKS)
    run()  # first use: the kernel's launch configuration is measured and cached here
    if impl.startswith("fast") and attention_ops.KERNEL_FALLBACKS != fallbacks:
        pytest.fail(f"{impl} ran SDPA, not the kernel: {list(attention_ops.KERNEL_FALLBACKS)}")
    benchmark.pedantic(run, rounds=shape.rounds, warmup_rounds=1, iterations=1)
    n = shape.grid[0] * shape.grid[1]
    record(benchmark, benchmark.group, impl, flops=flops(shape.batch * shape.heads, n, shape.dim),
           dtype=dtype_name(shape.dtype), batch=shape.batch, heads=shape.heads,
           tokens=n, head_dim=shape.dim)
