"""Automatic mask generation on the tiny trained SAM: real masks (confident logits, boxes that
differ, predicted IoUs that pass the reference's default thresholds), so the filters and NMS
act as they do on real weights. Fast vs reference generator, fp32 (tests/tolerances.py)."""

from __future__ import annotations

import copy

import pytest
from segment_anything import SamAutomaticMaskGenerator

from fastsam_core.models.tiny import tiny
from fastsam_core.models.tiny_data import make_scenes
from fastsam_core.pipelines import FastAutomaticMaskGenerator
from tests.conftest import DEVICES
from tests.pipelines.test_amg import compare

SCENES = make_scenes(2, seed=777, height=128, width=160)  # a seed training never used


@pytest.fixture(scope="module")
def sam():
    return tiny("sam")


@pytest.mark.parametrize("settings", [
    dict(points_per_side=16),  # the reference's default thresholds and NMS
    dict(points_per_side=8, pred_iou_thresh=0.7, stability_score_thresh=0.85,
         crop_n_layers=1, output_mode="coco_rle"),
], ids=["defaults", "crops"])
@pytest.mark.parametrize("device", DEVICES)
def test_same_masks_as_the_reference_on_trained_weights(sam, settings, device, capsys):
    sam = copy.deepcopy(sam).to(device)
    counts = []
    for scene in SCENES:
        ref = SamAutomaticMaskGenerator(sam, **settings).generate(scene.image)
        got = FastAutomaticMaskGenerator(sam, **settings).generate(scene.image)
        borderline = compare(ref, got, {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95,
                                        **settings})
        counts.append((len(scene.kinds), len(ref), len(got), borderline))
    assert sum(c[1] for c in counts) >= 3, "trained weights keep masks"
    with capsys.disabled():
        print(f"\n[tiny amg {settings} {device}] (shapes, reference masks, fast masks, "
              f"borderline): {counts}")
