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


def test_rows_aggregate_the_ious_of_every_mask(monkeypatch):
    """A row's IoUs are over every mask of every prompt: the mean and the minimum on all
    pixels, the minimum outside the logit margin (MASK_LOGIT_MARGIN x the std of the
    reference logits); two masks both empty agree (IoU 1). Stand-in 4 x 4 logits, prompt
    by prompt, for the reference (first call) and the configuration (second call):
    - agreeing masks: 1 on all pixels and outside the margin;
    - a mask whose reference is 12 pixels just above zero (inside the margin) and the
      configuration's 4 of 16 pixels: 0.25 on all pixels, 1 outside the margin;
    - a mask with twice the reference's pixels: 0.5 either way;
    - two empty masks: 1 either way."""
    import fastsam_core.accuracy as accuracy
    from fastsam_core import is_optimized

    assert accuracy.MARGIN == tol.MASK_LOGIT_MARGIN

    def logits(*values_and_counts):
        flat = [v for value, count in values_and_counts for v in [value] * count]
        return torch.tensor(flat).reshape(4, 4)

    agree = logits((1.0, 8), (-1.0, 8))
    near_zero = logits((1.0, 4), (0.001, 12))
    quarter = logits((1.0, 4), (-1.0, 12))
    everything = logits((1.0, 16))
    empty = logits((-1.0, 16))
    expected = [torch.stack([agree, near_zero]), torch.stack([agree, empty])]
    got = [torch.stack([agree, quarter]), torch.stack([everything, empty])]
    answers = iter([expected, got])
    monkeypatch.setattr(accuracy, "logits_of", lambda sam, scenes, prompts: next(answers))
    sam = tiny("sam")
    scenes = make_scenes(1, seed=4242, height=128, width=160)
    row, = run_accuracy(sam, scenes, {"fp32": configs_for(torch.device("cpu"))["fp32"]})
    assert row == accuracy.AccuracyRow("fp32", mask_iou_mean=(1 + 0.25 + 0.5 + 1) / 4,
                                       mask_iou_min=0.25, mask_iou_margin_min=0.5)
    assert not is_optimized(sam)  # restored


def test_layer_sqnr_is_the_mean_over_the_scenes(monkeypatch):
    """Each quantized linear's SQNR is the mean over its calls, one per scene: stand-in
    SQNRs of 10 dB for every layer on the first scene and 30 dB on the second give 20 dB
    for each of the tiny SAM's quantizable linears."""
    import fastsam_core.accuracy as accuracy
    from fastsam_core import optimize, restore

    size, linears = MODELS["sam"]
    calls = []

    def sqnr_db(exact, output):
        calls.append(exact.shape)
        return 10.0 if len(calls) <= linears else 30.0

    monkeypatch.setattr(accuracy, "sqnr_db", sqnr_db)
    sam = tiny("sam")
    reference_encoder = sam.image_encoder
    scenes = make_scenes(2, seed=4242, height=size, width=size * 5 // 4)
    optimize(sam, configs_for(torch.device("cpu"))["int8"])
    try:
        sqnr = accuracy.layer_sqnr(sam, reference_encoder, scenes)
    finally:
        restore(sam)
    assert len(calls) == 2 * linears
    assert sqnr == {path: 20.0 for path in sqnr} and len(sqnr) == linears


def test_prompts_are_a_foreground_point_and_the_box_of_every_object():
    """Per scene, per object mask: a point inside the mask (label 1, foreground) and the
    mask's tight box, in that order."""
    from fastsam_core.accuracy import prompts_of
    from fastsam_core.models.tiny_data import mask_to_box

    scenes = make_scenes(2, seed=4242, height=64, width=80)
    prompts = prompts_of(scenes)
    assert len(prompts) == len(scenes)
    for scene, scene_prompts in zip(scenes, prompts, strict=True):
        assert len(scene_prompts) == 2 * len(scene.masks) > 0
        for mask, point, box in zip(scene.masks, scene_prompts[::2], scene_prompts[1::2],
                                    strict=True):
            (x, y), = point["point_coords"]
            assert mask[int(y), int(x)] and point["point_labels"].tolist() == [1]
            assert box.keys() == {"box"} and box["box"].tolist() == mask_to_box(mask).tolist()


@pytest.mark.parametrize("before", [True, False])
def test_the_fp32_reference_leaves_the_cudnn_setting_as_it_was(before):
    """cuDNN's TF32 is off while the reference runs, and back to the caller's setting after
    (also after an error)."""
    from fastsam_core.accuracy import cudnn_without_tf32

    saved = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = before
        with cudnn_without_tf32():
            assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is before
        with pytest.raises(RuntimeError), cudnn_without_tf32():
            raise RuntimeError("a failing reference")
        assert torch.backends.cudnn.allow_tf32 is before
    finally:
        torch.backends.cudnn.allow_tf32 = saved
