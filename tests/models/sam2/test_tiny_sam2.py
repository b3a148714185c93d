"""The SAM 2 image path on real masks: the tiny trained SAM 2 (`fastsam_core.models.tiny`),
a point and a box on each object of generated scenes through `SAM2ImagePredictor`, and the
automatic mask generator at the reference's default thresholds, fast against reference."""

from __future__ import annotations

import pytest
import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.accuracy import logits_of, predictions_of, prompts_of
from fastsam_core.models.tiny import sam2_feature_sizes, tiny
from fastsam_core.models.tiny_data import make_scenes
from fastsam_core.pipelines import FastSam2AutomaticMaskGenerator
from tests import tolerances as tol
from tests.conftest import DEVICES
from tests.parity import assert_close_fp32, mask_iou_outside_margin
from tests.pipelines.test_amg import compare

SCENES = make_scenes(3, seed=4242, height=256, width=320)  # seeds training never used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_trained_tiny_sam2_masks_match(dtype, device):
    """Masks of real objects through the unchanged SAM2ImagePredictor (a point and a box per
    object, as `fastsam accuracy` prompts), before and after optimize(): fp32 logits within
    the stage tolerance and every mask outside the logit margin (tests/tolerances.py) equal;
    bf16: the mask each prompt's reference ranks first, at the bf16 IoU threshold.

    In bf16 the low-ranked outputs are not compared: the margin scales with each mask's own
    logit spread, bf16's logit error does not. On a machine with AVX512-BF16 matmuls (AMD
    EPYC, torch 2.14.1; scripts/runs/sam2_bf16_masks.txt) one such output (predicted IoU
    0.29, logit std 8.1 where the median ranked-first mask has 27.3) drops to IoU 0.974 on
    the fast path, while the reference itself under bf16 autocast drops to 0.989 on a
    ranked-first mask; on the ranked-first masks the fast path keeps IoU 1.000 there."""
    model = tiny("sam2").to(device)
    prompts = prompts_of(SCENES)
    expected = predictions_of(model, SCENES, prompts)
    fastsam_core.optimize(model, FastConfig(dtype=dtype))
    assert fastsam_core.report(model).path_of("sam_mask_decoder") == "fast"
    got = logits_of(model, SCENES, prompts)
    assert len(got) == len(expected) >= 10
    for a, (b, ref_scores) in zip(got, expected, strict=True):
        if dtype == torch.float32:
            assert mask_iou_outside_margin(a, b) >= tol.MASK_IOU_FP32
            assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)
        else:
            best = ref_scores.argmax()
            assert mask_iou_outside_margin(a[best], b[best]) >= tol.MASK_IOU_BF16


@pytest.mark.parametrize("settings", [
    dict(points_per_side=16),  # the reference's default thresholds and NMS
    dict(points_per_side=8, use_m2m=True),
], ids=["defaults", "m2m"])
@pytest.mark.parametrize("device", DEVICES)
def test_mask_generator_same_masks_on_trained_weights(settings, device, capsys):
    model = tiny("sam2").to(device)
    counts = []
    for scene in SCENES[:2]:
        generator = SAM2AutomaticMaskGenerator(model, **settings)
        generator.predictor._bb_feat_sizes = sam2_feature_sizes(model.image_size)
        ref = generator.generate(scene.image)
        got = FastSam2AutomaticMaskGenerator(model, **settings).generate(scene.image)
        borderline = compare(ref, got, {"pred_iou_thresh": 0.8, "stability_score_thresh": 0.95,
                                        **settings})
        counts.append((len(scene.kinds), len(ref), len(got), borderline))
    assert sum(c[1] for c in counts) >= 3, "trained weights keep masks"
    with capsys.disabled():
        print(f"\n[tiny sam2 amg {settings} {device}] (shapes, reference masks, fast masks, "
              f"borderline): {counts}")
