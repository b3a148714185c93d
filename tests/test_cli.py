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


def bench_arguments(monkeypatch, argv):
    """What `fastsam bench ARGV` hands to bench_image_encoder (which is not run)."""
    import fastsam_core.benchmark as benchmark

    seen = {}

    def fake_bench(**kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(benchmark, "bench_image_encoder", fake_bench)
    with pytest.raises(SystemExit):
        main(["bench", *argv])
    return seen


def test_bench_cpu_default_size_is_announced(capsys, monkeypatch):
    seen = bench_arguments(monkeypatch, ["--device", "cpu"])
    assert seen["image_size"] == 512 and str(seen["dtype"]) == "torch.float32"
    assert "CPU default: 512 px" in capsys.readouterr().out


def test_bench_passes_every_option_on(monkeypatch):
    seen = bench_arguments(monkeypatch, [
        "--device", "cpu", "--model", "vit_l", "--image-size", "128", "--batch", "3", "--dtype",
        "bfloat16", "--attention", "math", "--compile", "default", "--warmup", "2", "--runs",
        "5", "--seed", "7"])
    config = seen.pop("config")
    assert config.attention == "math" and config.compile == "default"
    assert config.dtype == torch.bfloat16
    seen.pop("log")
    assert seen == dict(variant="vit_l", image_size=128, batch=3, dtype=torch.bfloat16,
                        device=torch.device("cpu"), warmup=2, runs=5, seed=7)


def test_bench_result_is_computed_from_the_medians(monkeypatch):
    """Speedup (reference over fast), img/s and TFLOP/s of the measured medians, FLOPs per
    image: stand-in timings of 0.5 s (reference) and 0.25 s (fast) per batch of 2."""
    import fastsam_core.benchmark as benchmark

    medians = iter([0.5, 0.25])
    monkeypatch.setattr(benchmark, "time_call",
                        lambda fn, device, warmup, runs: [next(medians)] * runs)
    r = benchmark.bench_image_encoder("vit_b", 64, batch=2, warmup=0, runs=1)
    flops = benchmark.encoder_flops("vit_b", 64, 2)
    assert (r.reference_ms, r.fast_ms, r.speedup) == (500.0, 250.0, 2.0)
    assert (r.reference_img_s, r.fast_img_s) == (4.0, 8.0)
    assert r.gflop_per_image == flops / 2 / 1e9
    assert (r.reference_tflop_s, r.fast_tflop_s) == (flops * 2 / 1e12, flops * 4 / 1e12)


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


@pytest.fixture
def inputs(tmp_path):
    """A small image, a folder, a file that is no checkpoint, a small SAM's checkpoint."""
    from PIL import Image

    from tests.conftest import small_sam
    from tests.models.sam.test_predictor_parity import smooth_image

    image = tmp_path / "img.png"
    Image.fromarray(smooth_image(64, 80, 0)).save(image)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    small = tmp_path / "small.pth"
    torch.save(small_sam().state_dict(), small)
    (tmp_path / "folder").mkdir()
    return {"img": str(image), "dir": str(tmp_path / "folder"), "corrupt": str(corrupt),
            "small": str(small), "tmp": str(tmp_path)}


BAD_INPUTS = [  # arguments ({key} from `inputs`), the one-line error
    (["check", "{img}", "--checkpoint", "{small}", "--device", "banana"],
     "^fastsam: error: --device banana: "),
    (["bench", "--warmup", "-1"], "--warmup must be at least 0"),
    (["amg", "{img}", "--out", "{tmp}/o", "--dtype", "int4"], "--dtype: FastConfig.dtype"),
    (["check", "{img}", "--checkpoint", "{tmp}/missing.pth"], "--checkpoint .*: no such file"),
    (["check", "{img}", "--checkpoint", "{dir}"], "--checkpoint .*: is a folder"),
    (["check", "{img}", "--checkpoint", "{corrupt}", "--model", "vit_b"],
     "--checkpoint .*corrupt.pth: cannot load it as --model vit_b .*: not a state_dict "
     "torch.load reads"),
    (["check", "{img}", "--checkpoint", "{small}", "--model", "vit_b"],
     r"--checkpoint .*small.pth: cannot load it as --model vit_b .*Error\(s\) in loading "
     r"state_dict for Sam: (Missing key|size mismatch)"),
    (["check", "{img}", "--checkpoint", "{small}", "--model", "sam2.1_hiera_t"],
     "--checkpoint .*small.pth: cannot load it as --model sam2.1_hiera_t .*no 'model' entry"),
    (["amg", "{img}", "--out", "{tmp}/o", "--checkpoint", "{small}"],
     "--checkpoint: --model tiny runs the shipped tiny SAM"),
    (["amg", "{img}", "--out", "{tmp}/o", "--points-per-side", "0"],
     "--points-per-side must be at least 1"),
    (["amg", "{img}", "--out", "{tmp}/o", "--crop-n-layers", "-1"],
     "--crop-n-layers must be at least 0"),
    (["amg", "{img}", "--out", "{tmp}/o", "--points-per-batch", "0"],
     "--points-per-batch must be at least 1"),
    (["amg", "{img}", "--out", "{tmp}/o", "--min-mask-region-area", "-1"],
     "--min-mask-region-area must be at least 0"),
    (["check", "{img}", "--checkpoint", "{small}", "--grid", "0"], "--grid must be at least 1"),
    (["amg", "{img}", "--out", "{small}"], "--out .*small.pth: not a folder"),
    (["amg", "{img}", "--out", "{tmp}"], "--out .*: the output img.png would overwrite an input"),
    (["amg", "{img}", "--out", "{tmp}/o", "--device", "banana"], "device"),
    (["bench", "--json", "{dir}"], "--json .*: is a folder"),
    (["bench", "--json", "{tmp}/no/such/x.json"], "--json .*: the folder .* does not exist"),
    (["accuracy", "--out", "{dir}"], "--out .*: is a folder"),
    (["profile", "--out", "{small}"], "--out .*: not a folder"),
    (["summarize", "{tmp}/missing.json"], "missing.json: No such file"),
    (["summarize", "{dir}"], "folder: Is a directory"),
    (["summarize", "{corrupt}"], "result_file=.*corrupt.pth.*: not JSON"),
    (["summarize", "{small}"], "result_file=.*small.pth.*: not JSON"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=lambda a: " ".join(a)
                         if isinstance(a, list) else None)
def test_bad_paths_and_values_are_one_line_errors(args, message, inputs, capsys):
    """Each is the parser's error (exit 2, one line naming the argument), before any long
    run, not a traceback."""
    import re

    with pytest.raises(SystemExit) as exc:
        main([a.format(**inputs) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert re.search(message, err.splitlines()[-1]), err


def test_summarize_rejects_benchmark_entries_without_their_fields(tmp_path, capsys):
    result = tmp_path / "bench.json"
    result.write_text(json.dumps({"benchmarks": [{"name": "f[fast]"}]}))
    with pytest.raises(SystemExit) as exc:
        main(["summarize", str(result)])
    assert exc.value.code == 2
    assert "entries with group, name and stats" in capsys.readouterr().err


def test_only_gate_takes_arguments_after_a_double_dash(monkeypatch):
    """`--` ends the options as usual elsewhere (a file named -x.png can be passed), and
    hands the rest to pytest only for gate."""
    import fastsam_core.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_amg", lambda args, parser: seen.update(images=args.images) or 0)
    assert main(["amg", "--out", "o", "--", "a.png", "-b.png"]) == 0
    assert seen["images"] == ["a.png", "-b.png"]


def test_time_call_times_each_run_after_the_untimed_warmup():
    """`warmup` calls first, untimed, then one time per run, each covering its call (a
    stand-in call of at least 10 ms)."""
    import time

    from fastsam_core.benchmark import time_call

    calls = []

    def call():
        calls.append(len(calls))
        time.sleep(0.01)

    times = time_call(call, torch.device("cpu"), warmup=2, runs=3)
    assert len(calls) == 5 and len(times) == 3
    assert all(t >= 0.01 for t in times), times


def test_bench_in_bf16_runs_both_encoders_in_bf16():
    """dtype bfloat16: the reference runs converted to bf16 (its error against the fp32
    reference is then that of bf16, not 0) and the fast encoder is optimized in bf16 whatever
    the config's dtype, with an error within the low-precision policy of the reference's."""
    import fastsam_core.benchmark as benchmark
    from fastsam_core import FastConfig

    r = benchmark.bench_image_encoder("vit_b", 64, dtype=torch.bfloat16, warmup=0, runs=1,
                                      config=FastConfig(dtype=torch.float32))
    assert r.dtype == "bfloat16" and "ViT, 12 blocks, bfloat16" in r.report, r.report
    assert r.reference_error > 0
    assert 0 < r.fast_error <= tol.LOWP_FACTOR * r.reference_error + tol.LOWP_SLACK


def test_bench_of_the_tiny_sam_counts_the_flops_per_image():
    """variant "tiny": the shipped tiny SAM at its own size; FLOPs per image are those of
    one image's forward, also for a batch of several."""
    import fastsam_core.benchmark as benchmark
    from fastsam_core.models.tiny import tiny

    r = benchmark.bench_image_encoder("tiny", 512, batch=2, warmup=0, runs=1)
    encoder = tiny("sam").image_encoder
    size = encoder.img_size
    assert r.image_size == size != 512
    assert r.gflop_per_image == benchmark.meta_flops(encoder, 1, 3, size, size) / 1e9


def test_load_lets_out_of_memory_through():
    """An out-of-memory error is the device's: raised as it is, not a --checkpoint error."""
    import argparse

    import fastsam_core.cli as cli

    def build():
        raise torch.OutOfMemoryError("CUDA out of memory")

    args = argparse.Namespace(checkpoint="w.pth", model="vit_b")
    with pytest.raises(torch.OutOfMemoryError):
        cli._load(argparse.ArgumentParser(), args, build)


def test_setup_default_image_size_is_1024_on_cuda(monkeypatch, capsys):
    import argparse

    import fastsam_core.cli as cli

    monkeypatch.setattr(cli, "_device", lambda parser, value: torch.device("cuda"))
    args = argparse.Namespace(device=None, dtype=None, attention="auto", compile=None,
                              image_size=None, model="vit_b", batch=1, warmup=0, runs=1)
    device, _, image_size = cli._setup(args, argparse.ArgumentParser())
    assert (device.type, image_size) == ("cuda", 1024)
    assert "CPU default" not in capsys.readouterr().out
