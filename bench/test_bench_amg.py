"""pytest-benchmark: automatic mask generation ("segment everything") on one image, the
reference `SamAutomaticMaskGenerator` on the plain model against `FastAutomaticMaskGenerator`
on the same model optimized with the default config.

Random weights give predicted IoUs near zero and masks spanning the image, so the reference's
default thresholds would keep nothing: both run with pred_iou_thresh=0 and
stability_score_thresh=0 (recorded in extra_info with the surviving mask count), default
NMS. On CUDA: vit_h at 1024 px, 32 x 32 grid, a 1500 x 1000 image; on CPU: a small model at
256 px, 6 x 6 grid. Conventions: bench/common.py.

    pytest bench/test_bench_amg.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest
from segment_anything import SamAutomaticMaskGenerator

import fastsam_core
from bench.common import DEVICE, fail_on_fallbacks, record, repeats
from fastsam_core.benchmark import synchronize
from fastsam_core.models.sam.reference import build_sam
from fastsam_core.pipelines import FastAutomaticMaskGenerator

CUDA = DEVICE.type == "cuda"
if CUDA:
    VARIANT, IMAGE_SIZE, GRID, SHAPE, OVERRIDES = "vit_h", 1024, 32, (1000, 1500), {}
else:
    VARIANT, IMAGE_SIZE, GRID, SHAPE = "vit_b", 256, 6, (160, 200)
    OVERRIDES = dict(depth=4, embed_dim=128, num_heads=4, global_attn_indexes=(1, 3))
SETTINGS = dict(points_per_side=GRID, pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def model():
    return build_sam(VARIANT, IMAGE_SIZE, seed=0, **OVERRIDES).to(DEVICE)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_amg(benchmark, model, impl):
    group = f"amg {VARIANT} {GRID}x{GRID}"
    benchmark.group = group
    image = np.random.default_rng(0).integers(0, 256, (*SHAPE, 3), dtype=np.uint8)
    if impl == "fast":
        fastsam_core.optimize(model)
        generator = FastAutomaticMaskGenerator(model, **SETTINGS)
    else:
        generator = SamAutomaticMaskGenerator(model, **SETTINGS)
    masks = []

    def run():
        for _ in range(repeats(impl)):
            masks[:] = generator.generate(image)
        synchronize(DEVICE)

    try:
        benchmark.pedantic(run, rounds=3 if CUDA else 1, warmup_rounds=1, iterations=1)
        if impl == "fast":
            fail_on_fallbacks(model, impl)
    finally:
        if impl == "fast":
            fastsam_core.restore(model)
    record(benchmark, group, impl, items=1, variant=VARIANT, image=list(SHAPE), grid=GRID,
           masks=len(masks), **SETTINGS)
