"""pytest-benchmark: SAM 2 image path, reference vs fast.

- image encoder (Hiera + FPN neck) img/s: on CUDA sam2.1 hiera_b+ and hiera_l at 1024 px,
  batch 8, bf16 (the reference converted with `.to(bfloat16)`); on CPU hiera_t at 256 px,
  batch 2, fp32.
- single-image `SAM2ImagePredictor.set_image` + `predict` (one point) latency: on CUDA
  hiera_b+ (reference fp32, fast default config), on CPU hiera_t at 256 px.
FLOPs from torch.utils.flop_counter on the meta device. Conventions: bench/common.py.

    pytest bench/test_bench_sam2_image.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor

import fastsam_core
from bench.common import DEVICE, fail_on_fallbacks, record, repeats
from fastsam_core import FastConfig
from fastsam_core.benchmark import meta_flops, synchronize
from fastsam_core.models.convert import adopt_module, dtype_name

CUDA = DEVICE.type == "cuda"
if CUDA:
    ENCODER_CASES = [("b+", 1024, 8, torch.bfloat16), ("l", 1024, 8, torch.bfloat16)]
    PREDICT_CASE = ("b+", 1024)
else:
    ENCODER_CASES = [("t", 256, 2, torch.float32)]
    PREDICT_CASE = ("t", 256)
CONFIGS = {"t": "hiera_t", "s": "hiera_s", "b+": "hiera_b+", "l": "hiera_l"}


def build(size: str, image_size: int):
    overrides = [] if image_size == 1024 else [f"++model.image_size={image_size}"]
    model = build_sam2(f"configs/sam2.1/sam2.1_{CONFIGS[size]}.yaml", None, device="cpu",
                       hydra_overrides_extra=overrides)
    return model.to(DEVICE)


@pytest.fixture(scope="module", params=ENCODER_CASES, ids=[f"{c[0]}-{c[1]}-bs{c[2]}"
                                                           for c in ENCODER_CASES])
def encoder_case(request):
    size, image_size, batch, dtype = request.param
    model = build(size, image_size)
    x = torch.randn(batch, 3, image_size, image_size, device=DEVICE)
    return request.param, model, x, meta_flops(model.image_encoder, batch, 3, image_size,
                                               image_size)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_sam2_image_encoder(benchmark, encoder_case, impl):
    (size, image_size, batch, dtype), model, x, n_flops = encoder_case
    group = f"sam2 image_encoder {size}-{image_size}-bs{batch}"
    benchmark.group = group
    if impl == "reference":
        encoder, inputs = adopt_module(model.image_encoder, dtype), x.to(dtype)
    else:
        fastsam_core.optimize(model, FastConfig(dtype=dtype))
        encoder, inputs = model.image_encoder, x

    def run():
        with torch.inference_mode():
            for _ in range(repeats(impl)):
                encoder(inputs)
        synchronize(DEVICE)

    try:
        benchmark.pedantic(run, rounds=5 if CUDA else 1, warmup_rounds=1, iterations=1)
        if impl == "fast":
            fail_on_fallbacks(model, impl)
    finally:
        if impl == "fast":
            fastsam_core.restore(model)
    record(benchmark, group, impl, items=batch, flops=n_flops, model=f"sam2.1 {size}",
           image_size=image_size, batch=batch, dtype=dtype_name(dtype))


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_sam2_predict(benchmark, impl):
    size, image_size = PREDICT_CASE
    group = f"sam2 predictor {size}-{image_size}"
    benchmark.group = group
    model = build(size, image_size)
    if impl == "fast":
        fastsam_core.optimize(model)
    predictor = SAM2ImagePredictor(model)
    grid = image_size // 16
    predictor._bb_feat_sizes = [(grid * 4, grid * 4), (grid * 2, grid * 2), (grid, grid)]
    image = np.random.default_rng(0).integers(0, 256, (image_size * 3 // 4, image_size, 3),
                                              dtype=np.uint8)
    point = dict(point_coords=np.array([[image_size / 2, image_size / 3]]),
                 point_labels=np.array([1]))

    def run():
        for _ in range(repeats(impl)):
            predictor.set_image(image)
            predictor.predict(**point, multimask_output=True)
        synchronize(DEVICE)

    benchmark.pedantic(run, rounds=5 if CUDA else 1, warmup_rounds=1, iterations=1)
    if impl == "fast":
        fail_on_fallbacks(model, impl)
    record(benchmark, group, impl, items=1, model=f"sam2.1 {size}", image_size=image_size)
