"""`fastsam amg`: COCO-RLE JSON and a PNG overlay per image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import fastsam_core.cli as cli
from fastsam_core.cli import main
from tests.conftest import small_sam
from tests.models.sam.test_predictor_parity import smooth_image


def test_amg_writes_json_and_overlay(tmp_path, monkeypatch, capsys):
    # a random small SAM in place of the shipped tiny one, with thresholds that keep masks
    monkeypatch.setattr(cli, "_tiny_sam", lambda parser: small_sam(seed=3))
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(smooth_image(160, 200, i)).save(paths[-1])
    out = tmp_path / "out"
    assert main(["amg", *map(str, paths), "--out", str(out), "--points-per-side", "4",
                 "--pred-iou-thresh", "-1", "--stability-score-thresh", "0",
                 "--box-nms-thresh", "1.0"]) == 0
    for path in paths:
        result = json.loads((out / f"{path.stem}.json").read_text())
        assert result["height"] == 160 and result["width"] == 200
        assert result["annotations"], "thresholds chosen to keep masks"
        ann = result["annotations"][0]
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        assert mask_utils.decode(rle).sum() == ann["area"]
        overlay = np.array(Image.open(out / f"{path.stem}.png"))
        assert overlay.shape == (160, 200, 3)
        assert not np.array_equal(overlay, np.array(Image.open(path)))
    assert "wrote 2 JSON and PNG file pairs" in capsys.readouterr().out


def test_amg_needs_a_checkpoint_for_real_models(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["amg", "x.png", "--out", str(tmp_path), "--model", "vit_h"])
    assert exc.value.code == 2 and "needs --checkpoint" in capsys.readouterr().err


def test_amg_images_of_the_same_name_get_their_own_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_tiny_sam", lambda parser: small_sam(seed=3))
    paths = []
    for i, folder in enumerate(("a", "b")):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "scene.png")
        Image.fromarray(smooth_image(64, 80, i)).save(paths[-1])
    out = tmp_path / "out"
    assert main(["amg", *map(str, paths), "--out", str(out), "--points-per-side", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scene.json", "scene.png", "scene_2.json",
                                                     "scene_2.png"]
    assert json.loads((out / "scene.json").read_text())["image"] == str(paths[0])
    assert json.loads((out / "scene_2.json").read_text())["image"] == str(paths[1])
    assert "(written as scene_2.json / .png)" in capsys.readouterr().out


def test_amg_passes_the_generator_options_on(tmp_path, monkeypatch):
    import fastsam_core.pipelines as pipelines

    seen = {}

    class FakeGenerator:  # only the argument handling is under test here
        def __init__(self, sam, **kwargs):
            seen.update(kwargs)

        def generate(self, image):
            return []

    monkeypatch.setattr(cli, "_tiny_sam", lambda parser: small_sam(seed=3))
    monkeypatch.setattr(pipelines, "FastAutomaticMaskGenerator", FakeGenerator)
    Image.fromarray(smooth_image(64, 80, 0)).save(tmp_path / "img.png")
    assert main(["amg", str(tmp_path / "img.png"), "--out", str(tmp_path / "out"),
                 "--points-per-side", "5", "--points-per-batch", "7", "--pred-iou-thresh", "0.5",
                 "--stability-score-thresh", "0.25", "--box-nms-thresh", "0.125",
                 "--crop-n-layers", "1", "--min-mask-region-area", "9"]) == 0
    assert seen == dict(points_per_side=5, points_per_batch=7, pred_iou_thresh=0.5,
                        stability_score_thresh=0.25, box_nms_thresh=0.125, crop_n_layers=1,
                        min_mask_region_area=9, output_mode="coco_rle")


def test_amg_output_stems_stay_apart_when_a_renamed_stem_is_taken():
    from pathlib import Path

    paths = [Path("a/scene.png"), Path("b/scene.png"), Path("c/scene.png"), Path("scene_2.png")]
    assert cli._output_stems(paths) == ["scene", "scene_2", "scene_3", "scene_2_2"]


def test_amg_refuses_to_overwrite_an_input_with_its_json(tmp_path, capsys):
    image = tmp_path / "img.json"  # a PNG by content: Pillow reads it whatever its name
    Image.fromarray(smooth_image(64, 80, 0)).save(image, format="PNG")
    with pytest.raises(SystemExit) as exc:
        main(["amg", str(image), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "the output img.json would overwrite an input" in err, err


def test_overlay_blends_the_largest_mask_first():
    """Colours drawn in order of area, largest first: a big mask given after a small one
    inside it still gets the first colour, and the small one blends over it."""
    big = np.ones((8, 10), bool)
    small = np.zeros((8, 10), bool)
    small[:2, :3] = True
    annotations = []
    for mask in (small, big):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append({"segmentation": rle, "area": int(mask.sum())})
    image = np.full((8, 10, 3), 100, np.uint8)
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    under = 0.5 * np.float32(100) + 0.5 * first
    expected = np.empty((8, 10, 3), np.float32)
    expected[:] = under
    expected[small] = 0.5 * expected[small] + 0.5 * second
    np.testing.assert_array_equal(cli.overlay(image, annotations), expected.astype(np.uint8))
