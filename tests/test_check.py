"""`fastsam check`: fast vs reference on the user's weights and images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import sam_model_registry

import fastsam_core
from fastsam_core import check
from fastsam_core.cli import main
from tests import tolerances as tol
from tests.conftest import small_sam
from tests.models.sam.test_predictor_parity import smooth_image


def test_run_check_fp32_and_bf16_agree_and_restore_the_model():
    sam = small_sam()
    images = [smooth_image(180, 240, 0), smooth_image(120, 100, 1)]
    rows = check.run_check(sam, images, [torch.float32, torch.bfloat16], grid=2)
    assert [r.dtype for r in rows] == [torch.float32, torch.bfloat16]
    fp32, bf16 = rows
    assert fp32.mean_iou >= check.MIN_MEAN_IOU[torch.float32] and fp32.passed
    assert fp32.max_score_diff < tol.CHECK_FP32_SCORE_ABS
    assert bf16.passed, bf16  # the documented threshold (check.MIN_MEAN_IOU)
    assert not fastsam_core.is_optimized(sam)
    text = check.format_rows(rows)
    assert "float32" in text and "bfloat16" in text and "speedup" in text


def test_failing_agreement_is_reported():
    row = check.CheckRow(torch.bfloat16, mean_iou=0.95, min_iou=0.5, max_score_diff=0.1,
                         reference_ms=10.0, fast_ms=5.0)
    assert not row.passed
    assert "FAIL" in check.format_rows([row])


def test_prompts_cover_grid_points_and_boxes():
    prompts = check.prompts_for((100, 200), grid=3)
    assert len(prompts) == 9 + 3
    assert all(0 <= p["point_coords"][0, 0] < 200 for p in prompts[:9])
    assert prompts[-1]["box"].tolist() == [20.0, 10.0, 180.0, 90.0]


def test_cli_loads_checkpoint_and_images(tmp_path, monkeypatch, capsys):
    """The CLI end to end; the registry's vit_b builder stands in for a small model (the real
    one is 1024 px: minutes on this CPU)."""
    torch.save(small_sam(seed=4).state_dict(), tmp_path / "weights.pth")
    for i in range(2):
        Image.fromarray(smooth_image(150, 200, i)).save(tmp_path / f"img{i}.png")

    def build(checkpoint):
        sam = small_sam()
        sam.load_state_dict(torch.load(checkpoint))
        return sam

    monkeypatch.setitem(sam_model_registry, "vit_b", build)
    status = main(["check", "--model", "vit_b", "--checkpoint", str(tmp_path / "weights.pth"),
                   "--grid", "2", "--device", "cpu", str(tmp_path / "img0.png"),
                   str(tmp_path / "img1.png")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "2 image(s), 4 point prompts" in out and "float32" in out and " ok " in out


@pytest.mark.parametrize("mean_iou, status", [(1.0, 0), (0.5, 1)])
def test_cli_passes_grid_and_dtypes_on_and_exits_1_on_a_failed_check(tmp_path, monkeypatch,
                                                                      capsys, mean_iou,
                                                                      status):
    torch.save(small_sam(seed=4).state_dict(), tmp_path / "weights.pth")
    Image.fromarray(smooth_image(64, 80, 0)).save(tmp_path / "img.png")

    def build(checkpoint):
        sam = small_sam()
        sam.load_state_dict(torch.load(checkpoint))
        return sam

    seen = {}

    def fake_run_check(sam, images, dtypes, grid, log):  # stand-in agreement
        seen.update(dtypes=dtypes, grid=grid, images=len(images))
        return [check.CheckRow(d, mean_iou, mean_iou, 0.0, 2.0, 1.0) for d in dtypes]

    monkeypatch.setitem(sam_model_registry, "vit_b", build)
    monkeypatch.setattr(check, "run_check", fake_run_check)
    assert main(["check", "--model", "vit_b", "--checkpoint", str(tmp_path / "weights.pth"),
                 "--grid", "3", "--dtype", "float16", "--dtype", "bfloat16", "--device", "cpu",
                 str(tmp_path / "img.png")]) == status
    assert seen == dict(dtypes=[torch.float16, torch.bfloat16], grid=3, images=1)
    assert ("FAIL" in capsys.readouterr().out) == (status == 1)


def test_cli_rejects_unreadable_image(tmp_path, capsys):
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "x.pth").write_bytes(b"")  # read only after the images
    with pytest.raises(SystemExit) as exc:
        main(["check", "--checkpoint", str(tmp_path / "x.pth"), str(tmp_path / "bad.png")])
    assert exc.value.code == 2
    assert "cannot read image" in capsys.readouterr().err


def test_mask_iou():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert check.mask_iou(a, b) == pytest.approx(4 / 12)
    assert check.mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_run_check_on_sam2(monkeypatch, tmp_path, capsys):
    """SAM 2 through SAM2ImagePredictor, from the CLI with sam2's checkpoint format (the real
    build_sam2 makes a 1024 px model: this stands in a 256 px hiera_t)."""
    import sam2.build_sam

    from tests.models.sam2.test_image_encoder import small_sam2

    torch.save({"model": small_sam2(seed=2).state_dict()}, tmp_path / "sam2.pt")
    Image.fromarray(smooth_image(150, 200, 0)).save(tmp_path / "img.png")

    def build(config, ckpt_path, device="cuda", **kwargs):
        assert config == "configs/sam2.1/sam2.1_hiera_t.yaml" and device == "cpu"
        model = small_sam2()
        model.load_state_dict(torch.load(ckpt_path)["model"])
        return model

    monkeypatch.setattr(sam2.build_sam, "build_sam2", build)
    real_init = check.SAM2ImagePredictor.__init__

    def predictor_256(self, model, **kwargs):  # the 1024 px feature sizes (design.md, sec. 8)
        real_init(self, model, **kwargs)
        self._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]

    monkeypatch.setattr(check.SAM2ImagePredictor, "__init__", predictor_256)
    status = main(["check", "--model", "sam2.1_hiera_t", "--checkpoint", str(tmp_path / "sam2.pt"),
                   "--grid", "2", "--device", "cpu", str(tmp_path / "img.png")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "float32" in out and " ok " in out


def test_prompts_are_the_lattice_centres_and_three_centred_boxes():
    """grid x grid points at the centres of the lattice's cells, row by row, 3 masks each;
    boxes a quarter, half and 0.8 of the image around its centre, 1 mask each."""
    prompts = check.prompts_for((100, 200), grid=2)
    points = [p["point_coords"].tolist() for p in prompts[:4]]
    assert points == [[[50.0, 25.0]], [[150.0, 25.0]], [[50.0, 75.0]], [[150.0, 75.0]]]
    assert all(p["point_labels"].tolist() == [1] and p["multimask_output"] for p in prompts[:4])
    assert [p["box"].tolist() for p in prompts[4:]] == [
        [75.0, 37.5, 125.0, 62.5], [50.0, 25.0, 150.0, 75.0], [20.0, 10.0, 180.0, 90.0]]
    assert not any(p["multimask_output"] for p in prompts[4:])


def test_agreement_at_the_threshold_passes():
    """`fastsam check` fails a dtype whose mean IoU falls below MIN_MEAN_IOU: at it, it
    passes."""
    for dtype, threshold in check.MIN_MEAN_IOU.items():
        row = check.CheckRow(dtype, mean_iou=threshold, min_iou=threshold, max_score_diff=0.0,
                             reference_ms=1.0, fast_ms=1.0)
        assert row.passed, dtype
        assert "FAIL" not in check.format_rows([row])


def test_run_check_rows_from_every_mask_and_the_median_times(monkeypatch):
    """A row's figures from stand-in answers (the predictor's masks, scores and encoder
    times; the real ones are tested above), 3 images of 4 prompts (grid 1) with 2 masks
    each: the mean and the minimum IoU over every mask, the largest score difference over
    every mask of every prompt, the median encoder time of each path."""
    full = np.ones((2, 2), bool)
    quarter = np.array([[True, False], [False, False]])
    ref_seconds, fast_seconds = iter([1 / 64, 1 / 16, 1 / 32]), iter([1 / 256, 1 / 1024, 1 / 128])
    calls = []

    def answers(predictor, image, prompts, device):  # reference first, image by image
        calls.append(len(calls))
        if len(calls) <= 3:
            return [(np.stack([full, full]), np.array([0.5, 0.5])) for _ in prompts], \
                next(ref_seconds)
        out = [(np.stack([full, quarter]), np.array([0.75, 0.625])) for _ in prompts]
        if len(calls) == 5:  # the second image's last prompt: one score 0.5 off, one exact
            out[-1] = (np.stack([full, quarter]), np.array([1.0, 0.5]))
        return out, next(fast_seconds)

    class Predictor:  # set_image only runs the warm-ups here
        def __init__(self, sam):
            pass

        def set_image(self, image):
            pass

    monkeypatch.setattr(check, "answers", answers)
    monkeypatch.setattr(check, "SamPredictor", Predictor)
    sam = small_sam()
    images = [np.zeros((8, 8, 3), np.uint8)] * 3
    row, = check.run_check(sam, images, [torch.float32], grid=1)
    assert len(calls) == 6
    assert row == check.CheckRow(torch.float32, mean_iou=(1 + 0.25) / 2, min_iou=0.25,
                                 max_score_diff=0.5, reference_ms=1e3 / 32,
                                 fast_ms=1e3 / 256)
    assert not fastsam_core.is_optimized(sam)
