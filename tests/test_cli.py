"""`fastsam bench` / `python -m fastsam_core bench`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastsam_core.cli import main
from tests import tolerances as tol


def test_bench_prints_times_speedup_and_parity(capsys, tmp_path):
    out_file = tmp_path / "result.json"
    args = ["bench", "--image-size", "64", "--warmup", "0", "--runs", "1", "--json", str(out_file)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "SAM vit_b image encoder, random weights, 64 px, batch 1, float32" in out
    assert "speedup:" in out and "reference" in out and "fast" in out
    result = json.loads(out_file.read_text())
    assert result["fast_error"] <= tol.FP32_STAGE_REL_L2 and result["reference_error"] == 0.0
    assert result["gflop_per_image"] > 0 and result["speedup"] > 0


def test_bench_cpu_default_size_is_announced(capsys, monkeypatch):
    import fastsam_core.benchmark as benchmark

    seen = {}

    def fake_bench(**kwargs):  # only the argument handling is under test here
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(benchmark, "bench_image_encoder", fake_bench)
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cpu"])
    assert seen["image_size"] == 512 and str(seen["dtype"]) == "torch.float32"
    assert "CPU default: 512 px" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--dtype", "int4"], "FastConfig.dtype"),
        (["bench", "--batch", "0"], "--batch must be at least 1"),
        (["bench", "--model", "vit_x"], "invalid choice"),
        (["bench", "--image-size", "8"], "--image-size must be at least 16"),
        (["bench", "--model", "tiny", "--image-size", "256"], "--image-size: the tiny"),
    ],
)
def test_bench_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "fastsam_core", "bench", "--help"],
                          capture_output=True, text=True, check=True)
    assert "--image-size" in done.stdout


def test_accuracy_on_the_tiny_sam_writes_its_rows(capsys, tmp_path):
    out_file = tmp_path / "accuracy.json"
    assert main(["accuracy", "--scenes", "1", "--device", "cpu", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "tiny trained SAM on cpu, 1 generated scenes" in out
    result = json.loads(out_file.read_text())
    rows = {row["config"]: row for row in result["rows"]}
    assert set(rows) == {"fp32", "bf16", "int8", "int8-mlp", "2:4", "2:4-mlp"}
    assert rows["fp32"]["mask_iou_margin_min"] == tol.MASK_IOU_FP32
    assert result["model"] == "tiny trained SAM" and "int8" in result["configs"]


def test_accuracy_at_real_size_builds_a_random_model(capsys, monkeypatch):
    """--model vit_*: a random-weight SAM at 1024 px (the argument handling only: its
    measurement is the GPU runner's), the configurations of the device."""
    import fastsam_core.accuracy as accuracy

    seen = {}

    def fake_run(model, scenes, configs, log):
        seen.update(size=model.image_encoder.img_size, depth=len(model.image_encoder.blocks),
                    scene=scenes[0].image.shape, configs=configs)
        return []

    monkeypatch.setattr(accuracy, "run_accuracy", fake_run)
    assert main(["accuracy", "--model", "vit_b", "--device", "cpu", "--scenes", "1"]) == 0
    assert seen["size"] == 1024 and seen["depth"] == 12 and seen["scene"] == (1024, 1280, 3)
    assert seen["configs"] is accuracy.CONFIGS
    assert "SAM vit_b with random weights (seed 0) on cpu" in capsys.readouterr().out
    cuda = accuracy.configs_for(torch.device("cuda"))
    assert cuda["int8"].dtype == torch.bfloat16 and cuda["fp32"].dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["accuracy", "--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err
