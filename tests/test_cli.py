"""`fastsam bench` / `python -m fastsam_core bench`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
