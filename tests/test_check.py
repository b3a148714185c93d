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
