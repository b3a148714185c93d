"""pytest-benchmark: SAM's prompt path, reference vs fast.

- decoder latency: prompt encoder + mask decoder for K box prompts on one image (K = 1, 16,
  64, 256), as `SamPredictor.predict_torch` runs them (without the final upsampling). The
  decoder is the same for vit_b/l/h; at 1024 px its image embedding is 64 x 64.
- predict_batch: 8 images with 1-64 prompts each, the reference looping
  `set_image` + `predict_torch` per image against one `fastsam_core.pipelines.predict_batch`.

On CUDA: 1024 px, the fast path in its default dtype (bf16), the reference in fp32 (as users
run it); predict_batch with vit_h. On CPU: 256 px and a small encoder, fp32, fewer prompts.

    pytest bench/test_bench_prompt.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

import fastsam_core
from bench.common import DEVICE, fail_on_fallbacks, record, repeats
from fastsam_core.benchmark import synchronize
from fastsam_core.models.convert import dtype_name
from fastsam_core.models.sam.reference import build_sam
from fastsam_core.pipelines import predict_batch

CUDA = DEVICE.type == "cuda"
IMAGE_SIZE = 1024 if CUDA else 256
PROMPT_COUNTS = [1, 16, 64, 256] if CUDA else [1, 16, 64]
BATCH_IMAGES = 8 if CUDA else 2
MAX_PROMPTS = 64 if CUDA else 8
SMALL_ENCODER = dict(depth=2, embed_dim=64, num_heads=4, global_attn_indexes=(1,))


@pytest.fixture(scope="module")
def decoder_model():
    """A SAM whose encoder is tiny: only the prompt encoder and the decoder are timed."""
    return build_sam("vit_b", IMAGE_SIZE, seed=0, **SMALL_ENCODER).to(DEVICE)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("prompts", PROMPT_COUNTS)
def test_decoder_latency(benchmark, decoder_model, prompts, impl):
    sam = decoder_model
    group = f"decoder {prompts} boxes"
    benchmark.group = group
    gen = torch.Generator().manual_seed(prompts)
    corners = torch.sort(torch.rand(prompts, 2, 2, generator=gen) * IMAGE_SIZE, dim=1).values
    boxes = corners.reshape(prompts, 4).to(DEVICE)
    h = IMAGE_SIZE // 16
    embedding = torch.randn(1, 256, h, h, generator=gen).to(DEVICE)
    if impl == "fast":
        fastsam_core.optimize(sam)

    def run():
        with torch.inference_mode():
            for _ in range(repeats(impl)):
                sparse, dense = sam.prompt_encoder(None, boxes, None)
                sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense,
                                 True)
        synchronize(DEVICE)

    try:
        benchmark.pedantic(run, rounds=20 if CUDA else 3, warmup_rounds=2, iterations=1)
        if impl == "fast":
            fail_on_fallbacks(sam, impl)
    finally:
        if impl == "fast":
            fastsam_core.restore(sam)
    dtype = dtype_name(sam.mask_decoder.iou_token.weight.dtype if impl == "reference"
                       else fastsam_core.FastConfig().resolve_dtype(DEVICE, torch.float32))
    record(benchmark, group, impl, prompts=prompts, image_size=IMAGE_SIZE,
            dtype=dtype)


@pytest.fixture(scope="module")
def batch_model():
    if CUDA:
        return build_sam("vit_h", IMAGE_SIZE, seed=0).to(DEVICE)
    return build_sam("vit_b", IMAGE_SIZE, seed=0, **SMALL_ENCODER).to(DEVICE)


def _batch():
    gen = np.random.default_rng(0)
    images, prompts = [], []
    for _ in range(BATCH_IMAGES):
        height, width = gen.integers(IMAGE_SIZE // 2, IMAGE_SIZE, size=2)
        images.append(gen.integers(0, 256, (height, width, 3), dtype=np.uint8))
        k = int(gen.integers(1, MAX_PROMPTS + 1))
        x0, y0 = gen.uniform(0, width / 2, k), gen.uniform(0, height / 2, k)
        boxes = np.stack([x0, y0, x0 + width / 3, y0 + height / 3], axis=1)
        prompts.append({"point_coords": gen.uniform(0, min(height, width), (k, 1, 2)),
                        "point_labels": np.ones((k, 1)), "boxes": boxes})
    return images, prompts


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_predict_batch(benchmark, batch_model, impl):
    sam = batch_model
    group = f"predict_batch {BATCH_IMAGES} images"
    benchmark.group = group
    images, prompts = _batch()
    predictor = SamPredictor(sam)

    def reference():
        for image, p in zip(images, prompts, strict=True):
            predictor.set_image(image)
            size = image.shape[:2]
            predictor.predict_torch(
                predictor.transform.apply_coords_torch(
                    torch.as_tensor(p["point_coords"], device=DEVICE), size),
                torch.as_tensor(p["point_labels"], device=DEVICE, dtype=torch.int),
                predictor.transform.apply_boxes_torch(
                    torch.as_tensor(p["boxes"], device=DEVICE), size))
        synchronize(DEVICE)

    def fast():
        for _ in range(repeats(impl)):
            predict_batch(sam, images, prompts)
        synchronize(DEVICE)

    if impl == "fast":
        fastsam_core.optimize(sam)
    try:
        benchmark.pedantic(fast if impl == "fast" else reference, rounds=5 if CUDA else 1,
                           warmup_rounds=1, iterations=1)
        if impl == "fast":
            fail_on_fallbacks(sam, impl)
    finally:
        if impl == "fast":
            fastsam_core.restore(sam)
    record(benchmark, group, impl, items=BATCH_IMAGES, images=BATCH_IMAGES,
            prompts=sum(len(p["boxes"]) for p in prompts), image_size=IMAGE_SIZE)
