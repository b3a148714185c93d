"""pytest-benchmark: end to end, `SamPredictor.set_image` + `predict` (one point, 3 masks) on
one image, the reference model against the same model optimized with the default config.

On CUDA: vit_h at 1024 px (reference fp32, fast bf16); on CPU: a small model at 256 px, fp32.
Conventions: bench/common.py.

    pytest bench/test_bench_end_to_end.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest
from segment_anything import SamPredictor

import fastsam_core
from bench.common import DEVICE, fail_on_fallbacks, record, repeats
from fastsam_core.benchmark import synchronize
from fastsam_core.models.convert import dtype_name
from fastsam_core.models.sam.reference import build_sam

CUDA = DEVICE.type == "cuda"
VARIANT, IMAGE_SIZE = ("vit_h", 1024) if CUDA else ("vit_b", 256)
OVERRIDES = {} if CUDA else dict(depth=4, embed_dim=128, num_heads=4, global_attn_indexes=(1, 3))


@pytest.fixture(scope="module")
def model():
    return build_sam(VARIANT, IMAGE_SIZE, seed=0, **OVERRIDES).to(DEVICE)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_predictor(benchmark, model, impl):
    group = f"predictor {VARIANT}-{IMAGE_SIZE}"
    benchmark.group = group
    gen = np.random.default_rng(0)
    image = gen.integers(0, 256, (IMAGE_SIZE * 3 // 4, IMAGE_SIZE, 3), dtype=np.uint8)
    point = dict(point_coords=np.array([[IMAGE_SIZE / 2, IMAGE_SIZE / 3]]),
                 point_labels=np.array([1]))
    if impl == "fast":
        fastsam_core.optimize(model)
    predictor = SamPredictor(model)

    def run():
        for _ in range(repeats(impl)):
            predictor.set_image(image)
            predictor.predict(**point, multimask_output=True)
        synchronize(DEVICE)

    try:
        benchmark.pedantic(run, rounds=5 if CUDA else 2, warmup_rounds=1, iterations=1)
        if impl == "fast":
            fail_on_fallbacks(model, impl)
        dtype = dtype_name(model.mask_decoder.iou_token.weight.dtype)
    finally:
        if impl == "fast":
            fastsam_core.restore(model)
    record(benchmark, group, impl, items=1, variant=VARIANT, image_size=IMAGE_SIZE, dtype=dtype)
