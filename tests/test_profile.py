"""`fastsam profile`: trace and summary of a stage (tiny sizes on the CPU)."""

from __future__ import annotations

import gzip
import json

import pytest

from fastsam_core.cli import main
from fastsam_core.profiling import ceiling_tflop_s, profile_stage


@pytest.mark.parametrize("stage, parts", [
    ("image_encoder", ["windowed_block", "global_block", "neck", "patch_embed"]),
    ("prompt", ["prompt_encoder", "mask_decoder"]),
])
def test_profile_writes_trace_and_summary(tmp_path, stage, parts):
    result = profile_stage(stage, "vit_b", 64, batch=2, device="cpu", out_dir=tmp_path,
                           active=2)
    text = result.summary.read_text()
    assert f"# Profile: {stage}, SAM vit_b, 64 px, batch 2" in text
    assert "TFLOP/s" in text and "commit" in text and "image_encoder" in text
    for part in parts:
        assert f"| {part} |" in text
    assert "## Top ops and kernels by self CPU time" in text
    with gzip.open(result.trace) as f:
        assert "traceEvents" in json.load(f)
    assert result.step_ms > 0
    shares = [int(line.rsplit("|", 2)[1].strip(" %")) for line in text.splitlines()
              if any(line.startswith(f"| {p} |") for p in parts)]
    assert sum(shares) <= 100 + len(shares), shares  # of the profiled steps (rounded)
    assert (f"--stage {stage} --batch 2 --image-size 64 --device cpu --active 2 "
            "--attention auto --out") in text


def test_profile_of_the_compiled_encoder(tmp_path):
    """The parts' record_function hooks would break the compiled graph: not marked, said so."""
    from fastsam_core import FastConfig

    result = profile_stage("image_encoder", "vit_b", 64, device="cpu", out_dir=tmp_path,
                           active=1, config=FastConfig(compile="default"))
    text = result.summary.read_text()
    assert "no parts marked: the encoder is compiled" in text and "--compile default" in text
    assert "ViT, 12 blocks, float32, compile: compiled" in text, text  # it ran compiled


def test_predictor_stage_takes_no_batch(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--stage", "predictor", "--batch", "4"])
    assert exc.value.code == 2
    assert "--batch: the predictor stage runs one image per step" in capsys.readouterr().err


def test_ceiling_is_known_for_the_h200_only():
    assert ceiling_tflop_s("NVIDIA H200") == 790.0
    assert ceiling_tflop_s("cpu x86_64 (2 threads)") is None


def test_cli_profile(tmp_path, capsys):
    assert main(["profile", "--stage", "predictor", "--image-size", "64", "--active", "1",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "# Profile: predictor" in out and "wrote" in out


def test_profile_summary_rates_from_the_median_step(tmp_path, monkeypatch):
    """img/s and TFLOP/s of the median step (a stand-in 0.5 s), the FLOPs of the stage; the
    command line that reproduces it names the dtype."""
    import torch

    import fastsam_core.profiling as profiling
    from fastsam_core import FastConfig
    from fastsam_core.benchmark import encoder_flops

    monkeypatch.setattr(profiling, "time_call", lambda fn, device, warmup, runs: [0.5] * runs)
    result = profile_stage("image_encoder", "vit_b", 64, batch=2, device="cpu",
                           out_dir=tmp_path, active=1, config=FastConfig(dtype=torch.float32))
    text = result.summary.read_text()
    flops = encoder_flops("vit_b", 64, 2)
    assert (f"- step: 500.00 ms (median of 1); 4.00 images/s; {flops / 1e9:.1f} GFLOP per "
            f"step (torch.utils.flop_counter, reference); {flops / 0.5 / 1e12:.2f} TFLOP/s"
            ) in text
    assert "--dtype float32" in text and result.step_ms == 500.0


def test_cli_profile_passes_its_options_on(tmp_path, monkeypatch):
    import torch

    import fastsam_core.profiling as profiling

    seen = {}

    def fake_profile(*args, **kwargs):  # only the argument handling is under test here
        seen.update(args=args)
        raise SystemExit(0)

    monkeypatch.setattr(profiling, "profile_stage", fake_profile)
    with pytest.raises(SystemExit):
        main(["profile", "--model", "vit_l", "--stage", "prompt", "--batch", "5",
              "--image-size", "128", "--dtype", "bfloat16", "--device", "cpu", "--attention",
              "math", "--active", "2", "--out", str(tmp_path)])
    stage, model, size, batch, device, config, out, active = seen["args"]
    assert (stage, model, size, batch, device, out, active) == (
        "prompt", "vit_l", 128, 5, torch.device("cpu"), str(tmp_path), 2)
    assert config.dtype == torch.bfloat16 and config.attention == "math"


def test_summary_tables_per_step():
    """The parts' and ops' tables from the profiler's events (stand-ins, 2 active steps of
    4 ms each): calls and ms per step, and the share of the profiled step; without step
    events the share is of the unprofiled step time."""
    from types import SimpleNamespace

    import torch

    from fastsam_core.profiling import summary_lines

    def event(key, count, total_us, self_us):
        return SimpleNamespace(key=key, count=count, cpu_time_total=total_us,
                               self_cpu_time_total=self_us)

    events = [event("ProfilerStep#2", 1, 4000.0, 0.0), event("ProfilerStep#3", 1, 4000.0, 0.0),
              event("fastsam::neck", 2, 1200.0, 0.0),
              event("fastsam::windowed_block", 16, 6000.0, 0.0),
              event("aten::addmm", 8, 2500.0, 2000.0), event("aten::gelu", 4, 700.0, 600.0)]
    prof = SimpleNamespace(key_averages=lambda: events)
    lines = summary_lines(prof, torch.device("cpu"), active=2, step_s=1.0)
    assert lines[4:6] == ["| windowed_block | 8 | 3.00 | 75% |", "| neck | 1 | 0.60 | 15% |"]
    assert lines[-2:] == ["| `aten::addmm` | 4 | 1.000 | 25.0% |",
                          "| `aten::gelu` | 2 | 0.300 | 7.5% |"]
    without_steps = summary_lines(SimpleNamespace(key_averages=lambda: events[2:]),
                                  torch.device("cpu"), active=2, step_s=0.01)
    assert without_steps[4:6] == ["| windowed_block | 8 | 3.00 | 30% |",
                                  "| neck | 1 | 0.60 | 6% |"]


def test_profile_writes_only_its_two_files_and_the_median_step(tmp_path, monkeypatch):
    """Under --out: the summary and the gzipped trace, nothing else (the plain JSON trace is
    removed); the step time is the median of the timed steps (stand-ins 0.5, 0.1, 0.2 s)."""
    import fastsam_core.profiling as profiling

    monkeypatch.setattr(profiling, "time_call",
                        lambda fn, device, warmup, runs: [0.5, 0.1, 0.2][:runs])
    result = profile_stage("prompt", "vit_b", 64, batch=2, device="cpu", out_dir=tmp_path,
                           active=3)
    name = "prompt-vit_b-64px-bs2-cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.md", f"{name}.trace.json.gz"]
    assert (result.summary, result.trace) == (tmp_path / f"{name}.md",
                                              tmp_path / f"{name}.trace.json.gz")
    assert result.step_ms == 200.0
    assert "- step: 200.00 ms (median of 3); 10.00 prompts/s;" in result.summary.read_text()
