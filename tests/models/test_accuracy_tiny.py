"""The accuracy report on the tiny trained SAM and SAM 2 (fastsam_core.accuracy): what int8
and 2:4 cost in mask IoU against the fp32 reference, and per-layer SQNR; run in CI."""

from __future__ import annotations

import pytest
import torch

from fastsam_core.accuracy import configs_for, format_rows, run_accuracy
from fastsam_core.models.tiny import tiny
from fastsam_core.models.tiny_data import make_scenes
from tests import tolerances as tol
from tests.conftest import DEVICES

# (input size, quantizable linears: SAM 4 blocks x 4; SAM 2 6 Hiera blocks x 4 + 3 stage
# changes' projections)
MODELS = {"sam": (128, 16), "sam2": (256, 27)}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("device", DEVICES)
def test_accuracy_report(kind, device, capsys):
    """On CUDA the int8 and 2:4 configurations compute in bf16, as `fastsam accuracy` runs
    them there (`configs_for`), and the fp32 masks are compared outside the logit margin
    (other attention kernels than the reference's: a pixel at a zero logit may flip)."""
    size, linears = MODELS[kind]
    configs = {name: configs_for(torch.device(device))[name] for name in ("fp32", "int8", "2:4")}
    scenes = make_scenes(2, seed=4242, height=size, width=size * 5 // 4)
    rows = {r.config: r for r in run_accuracy(tiny(kind).to(device), scenes, configs)}
    fp32 = rows["fp32"]  # the fast fp32 path: identical masks
    assert (fp32.mask_iou_min if device == "cpu" else fp32.mask_iou_margin_min) == 1.0
    int8 = rows["int8"]
    assert int8.mask_iou_mean >= tol.MASK_IOU_INT8
    assert int8.mask_iou_margin_min >= tol.MASK_IOU_INT8
    assert len(int8.sqnr_db) == linears  # every linear of the encoder's blocks
    assert min(int8.sqnr_db.values()) >= tol.INT8_LINEAR_MIN_SQNR_DB
    assert len(rows["2:4"].sqnr_db) == linears  # 2:4 is measured and reported, not gated
    with capsys.disabled():
        print(f"\n[accuracy, tiny {kind}, 2 scenes, {device}]\n" + format_rows(list(rows.values())))
