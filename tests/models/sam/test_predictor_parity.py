"""The reference SamPredictor gives the same masks on an optimized model as on the original."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.fallback import fallbacks_of
from tests import tolerances as tol
from tests.conftest import DEVICES, small_sam
from tests.parity import assert_close_fp32, mask_iou_outside_margin

PROMPTS = {
    "one point": dict(point_coords=np.array([[70.0, 95.0]]), point_labels=np.array([1])),
    "two points": dict(point_coords=np.array([[70.0, 95.0], [150.0, 40.0]]),
                       point_labels=np.array([1, 0])),
    "box": dict(box=np.array([30.0, 40.0, 200.0, 150.0])),
    "point and box": dict(point_coords=np.array([[120.0, 90.0]]), point_labels=np.array([1]),
                          box=np.array([30.0, 40.0, 200.0, 150.0])),
}


def smooth_image(height: int = 180, width: int = 240, seed: int = 0) -> np.ndarray:
    """H x W x 3 uint8 RGB with blob-like structure (upsampled noise)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, height // 20, width // 20, generator=gen)
    img = F.interpolate(low, (height, width), mode="bicubic", align_corners=False)
    return (img[0].permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8).numpy()


def predict_all(predictor: SamPredictor, image: np.ndarray, multimask: bool) -> dict:
    predictor.set_image(image)
    return {
        name: predictor.predict(**prompt, multimask_output=multimask, return_logits=True)
        for name, prompt in PROMPTS.items()
    }


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_predictor_masks_match(dtype, multimask):
    sam = small_sam()
    predictor = SamPredictor(sam)
    image = smooth_image()
    expected = predict_all(predictor, image, multimask)
    fastsam_core.optimize(sam, FastConfig(dtype=dtype))
    got = predict_all(predictor, image, multimask)
    assert not fallbacks_of(sam), fallbacks_of(sam)
    for name in PROMPTS:
        logits, scores, low_res = (torch.from_numpy(a) for a in got[name])
        ref_logits, ref_scores, ref_low_res = (torch.from_numpy(a) for a in expected[name])
        assert logits.shape == ref_logits.shape == (3 if multimask else 1, *image.shape[:2])
        iou = mask_iou_outside_margin(logits, ref_logits)
        if dtype == torch.float32:
            assert_close_fp32(logits, ref_logits, tol.FP32_STAGE_REL_L2)
            assert_close_fp32(scores, ref_scores, tol.FP32_STAGE_REL_L2)
            assert iou >= tol.MASK_IOU_FP32, name
        else:
            assert iou >= tol.MASK_IOU_BF16, (name, iou)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_trained_tiny_sam_masks_match(dtype, device):
    """Masks of real objects: the tiny trained SAM, a point and a box on each object of
    generated scenes. Over every pixel bf16 does not reach MASK_IOU_BF16 on small masks (the
    64 x 64 logits of this 128 px model are shallow at object edges; the committed accuracy
    report, bench/results/accuracy-tiny-sam-cpu.json, has mean 0.993 and worst 0.910), so the
    masks are compared outside the logit margin (tests/tolerances.py)."""
    from fastsam_core.accuracy import logits_of, prompts_of
    from fastsam_core.models.tiny import tiny
    from fastsam_core.models.tiny_data import make_scenes

    sam = tiny("sam").to(device)
    scenes = make_scenes(3, seed=4242, height=128, width=160)
    prompts = prompts_of(scenes)  # a point and a box on each object
    expected = logits_of(sam, scenes, prompts)
    fastsam_core.optimize(sam, FastConfig(dtype=dtype))
    got = logits_of(sam, scenes, prompts)
    threshold = tol.MASK_IOU_FP32 if dtype == torch.float32 else tol.MASK_IOU_BF16
    for a, b in zip(got, expected, strict=True):
        assert mask_iou_outside_margin(a, b) >= threshold
        if dtype == torch.float32:
            assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)
