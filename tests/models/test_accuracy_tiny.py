"""The accuracy report on the tiny trained SAM (fastsam_core.accuracy): what int8 and 2:4
cost in mask IoU against the fp32 reference, and per-layer SQNR; run in CI."""

from __future__ import annotations

from fastsam_core.accuracy import CONFIGS, format_rows, run_accuracy
from fastsam_core.models.tiny import tiny
from fastsam_core.models.tiny_data import make_scenes
from tests import tolerances as tol


def test_accuracy_report(capsys):
    configs = {name: CONFIGS[name] for name in ("fp32", "int8", "2:4")}
    rows = {r.config: r for r in run_accuracy(tiny("sam"), make_scenes(2, seed=4242, height=128,
                                                                      width=160), configs)}
    assert rows["fp32"].mask_iou_min == 1.0  # the fast fp32 path: identical masks
    int8 = rows["int8"]
    assert int8.mask_iou_mean >= tol.MASK_IOU_INT8
    assert int8.mask_iou_margin_min >= tol.MASK_IOU_INT8
    assert len(int8.sqnr_db) == 16  # every linear of the 4 blocks
    assert min(int8.sqnr_db.values()) >= tol.INT8_LINEAR_MIN_SQNR_DB
    assert len(rows["2:4"].sqnr_db) == 16  # 2:4 is measured and reported, not gated
    with capsys.disabled():
        print("\n[accuracy, tiny SAM, 2 scenes]\n" + format_rows(list(rows.values())))
