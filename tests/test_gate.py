"""`fastsam gate`: the regression gate over bench/ (pytest-benchmark compare + speedup ratios)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsam_core.gate import compare_ratios, device_slug, latest_baseline, speedups

REPO = Path(__file__).resolve().parents[1]


def test_device_slug_is_a_folder_name():
    slug = device_slug("cpu")
    assert slug.startswith("cpu-") and "/" not in slug and " " not in slug


def test_compare_ratios_flags_only_drops_beyond_tolerance():
    rows = compare_ratios({"a": 1.9, "b": 1.0, "new": 3.0}, {"a": 2.0, "b": 2.0, "gone": 1.0},
                          tolerance=0.15)
    assert [(name, ok) for name, _, _, ok in rows] == [("a", True), ("b", False)]
    # a drop of exactly the tolerance is within it; an unchanged speedup passes a zero one
    rows = compare_ratios({"a": 1.5, "b": 2.0}, {"a": 2.0, "b": 2.0}, tolerance=0.25)
    assert [ok for *_, ok in rows] == [True, True]
    assert [ok for *_, ok in compare_ratios({"a": 2.0}, {"a": 2.0}, tolerance=0.0)] == [True]


def test_device_slug_does_not_depend_on_the_thread_count(monkeypatch):
    """One baseline folder per device: a CPU's slug names its architecture, not the number
    of threads torch happens to use in this run."""
    slugs = set()
    for threads in (1, 2, 16):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        slugs.add(device_slug("cpu"))
    assert len(slugs) == 1 and "thread" not in slugs.pop()


def test_speedups_and_latest_baseline(tmp_path):
    folder = tmp_path / "Linux-CPython-3.11-64bit"
    folder.mkdir()
    for i, speed in ((1, 1.5), (2, 2.5)):
        (folder / f"000{i}_baseline.json").write_text(json.dumps({"benchmarks": [
            {"fullname": "f[fast]", "extra_info": {"speedup": speed}},
            {"fullname": "f[reference]", "extra_info": {}}]}))
    latest = latest_baseline(tmp_path)
    assert latest.name == "0002_baseline.json"
    assert speedups(latest) == {"f[fast]": 2.5}
    assert latest_baseline(tmp_path / "missing") is None


def test_latest_baseline_prefers_this_platform_then_the_newest_saved(tmp_path):
    """A higher save counter of another platform does not win over this platform's file;
    without one of this platform's, the most recently saved file of any platform does."""
    def save(platform: str, name: str, when: str) -> Path:
        (tmp_path / platform).mkdir(exist_ok=True)
        path = tmp_path / platform / name
        path.write_text(json.dumps({"datetime": when, "benchmarks": []}))
        return path

    old = save("Linux-CPython-3.11-64bit", "0007_baseline.json", "2026-11-01T10:00:00")
    new = save("Linux-CPython-3.12-64bit", "0001_baseline.json", "2026-12-01T10:00:00")
    assert latest_baseline(tmp_path, platform="Linux-CPython-3.11-64bit") == old
    assert latest_baseline(tmp_path, platform="Linux-CPython-3.13-64bit") == new


def gate(tmp_path, *args, repeat=1):
    env = dict(os.environ, FASTSAM_BENCH_FAST_REPEAT=str(repeat))
    cmd = [sys.executable, "-m", "fastsam_core", "gate", "bench/test_bench_image_encoder.py",
           "--baselines", str(tmp_path), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)


def test_gate_passes_unchanged_and_fails_a_slowed_fast_path(tmp_path):
    """The small image-encoder suite: save a baseline, rerun unchanged (passes), rerun with the
    fast path doing its work 8 times per call (the speedup collapses: fails). Tolerances are
    wide because this runs on a shared 2-core machine; the int8 case is left out: its CPU
    stand-in (fp32 products of the codes) swung 2.6x between runs here (24 to 69 ms, 3 rounds)
    and failed the unchanged rerun, which says nothing about the gate. The unchanged pair
    gets a second try with a new baseline (one CI run saw a reference baseline of 98 ms
    against 42 ms in the rerun)."""
    cases = ("--", "-k", "not fast_int8")
    wide = ("--abs-tolerance", "400", "--ratio-tolerance", "60")
    for _ in range(2):  # a fresh baseline once: 3 rounds can catch a neighbour's burst
        saved = gate(tmp_path, "--save", *cases)
        assert saved.returncode == 0, saved.stdout + saved.stderr
        assert list(tmp_path.glob("*/*/0001_baseline.json"))
        same = gate(tmp_path, *wide, *cases)
        if same.returncode == 0:
            break
    assert same.returncode == 0, same.stdout + same.stderr
    assert "ok " in same.stdout and "-fast_int8]" not in same.stdout  # the case was left out
    for _ in range(2):  # likewise: a burst of load on the reference case can hide the 8x
        slowed = gate(tmp_path, *wide, *cases, repeat=8)
        if slowed.returncode == 1:
            break
    assert slowed.returncode == 1, slowed.stdout + slowed.stderr
    assert "FAIL" in slowed.stdout


def test_gate_without_baseline_says_so(tmp_path):
    done = gate(tmp_path, "--", "-k", "nothing_matches_this")
    assert done.returncode != 0
    assert "no baseline for this device" in done.stdout


@pytest.mark.parametrize("args, named", [
    (["--abs-tolerance", "x"], "--abs-tolerance"),
    (["--abs-tolerance", "-5"], "--abs-tolerance must be at least 0"),
    (["--abs-tolerance", "nan"], "--abs-tolerance must be at least 0"),
    (["--ratio-tolerance", "-1"], "--ratio-tolerance must be between 0 and 100"),
    (["--ratio-tolerance", "150"], "--ratio-tolerance must be between 0 and 100"),
])
def test_gate_rejects_bad_arguments(args, named):
    done = subprocess.run([sys.executable, "-m", "fastsam_core", "gate", *args], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert named in done.stderr
    assert "pytest" not in done.stdout  # refused before any bench run


def test_merge_results_keeps_every_readable_part(tmp_path):
    from fastsam_core.gate import merge_results

    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps({"machine_info": {"node": f"m{i}"}, "benchmarks": [
            {"fullname": f"suite{i}[fast]", "extra_info": {"speedup": 2.0}}]}))
    killed = tmp_path / "killed.json"  # a suite stopped before pytest-benchmark wrote it
    out = tmp_path / "baselines" / "platform" / "0001_baseline.json"
    assert merge_results([parts[0], killed, parts[1]], out) == 2
    merged = json.loads(out.read_text())
    assert merged["machine_info"] == {"node": "m0"}
    assert speedups(out) == {"suite0[fast]": 2.0, "suite1[fast]": 2.0}
    assert merge_results([killed], tmp_path / "none.json") == 0
    assert not (tmp_path / "none.json").exists()


def test_summarize_tables_a_benchmark_file_and_rejects_other_results(tmp_path, capsys):
    from fastsam_core.cli import main

    result = tmp_path / "bench.json"
    result.write_text(json.dumps({"benchmarks": [
        {"group": "g", "name": "f[fast]", "stats": {"median": 0.002},
         "extra_info": {"impl": "fast", "device": "cpu test", "img_s": 500.0, "speedup": 1.5}},
        {"group": "g", "name": "f[reference]", "stats": {"median": 0.003},
         "extra_info": {"impl": "reference"}}]}))
    assert main(["summarize", str(result)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "cpu test, 2 cases"
    assert table[2].split() == ["g", "fast", "2.000", "500.00", "-", "1.50"]
    assert table[3].split() == ["g", "reference", "3.000", "-", "-", "-"]

    other = REPO / "bench/results/cpu-x86_64-2threads_vit_b-1024-bs1-fp32_fastsam-bench.json"
    with pytest.raises(SystemExit) as exc:
        main(["summarize", str(other)])
    assert exc.value.code == 2
    assert "result_file=" in capsys.readouterr().err


def test_gate_saves_no_baseline_from_a_failed_run(tmp_path):
    suite = tmp_path / "test_bench_failing.py"
    suite.write_text("def test_timed_then_wrong(benchmark):\n"
                     "    benchmark(sum, [1, 2])\n"
                     "    assert False\n")
    cmd = [sys.executable, "-m", "fastsam_core", "gate", str(suite), "--baselines",
           str(tmp_path / "baselines"), "--save"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no baseline saved" in done.stdout
    assert not list((tmp_path / "baselines").rglob("*.json"))


def test_gate_says_when_the_selection_matches_nothing(tmp_path):
    suite = tmp_path / "test_bench_tiny.py"
    suite.write_text("def test_timed(benchmark):\n    benchmark(sum, [1, 2])\n")
    cmd = [sys.executable, "-m", "fastsam_core", "gate", str(suite), "--baselines",
           str(tmp_path / "baselines")]
    saved = subprocess.run([*cmd, "--save"], cwd=REPO, capture_output=True, text=True)
    assert saved.returncode == 0, saved.stdout + saved.stderr
    done = subprocess.run([*cmd, "--", "-k", "nothing_matches_this"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 5, done.stdout + done.stderr
    assert "matched no benchmarks" in done.stdout and "regressed" not in done.stdout


def test_summarize_keeps_groups_apart_that_differ_at_their_end(tmp_path):
    """The video groups end in their object count; the group column was cut at 34 characters,
    which printed "... hiera_b+-1024 1 obj" and "... 8 obj" alike."""
    from fastsam_core.gate import summarize

    groups = [f"sam2 memory_attention hiera_b+-1024 {n} obj" for n in (1, 8)]
    result = tmp_path / "bench.json"
    result.write_text(json.dumps({"benchmarks": [
        {"group": g, "name": "f[fast]", "stats": {"median": 0.001}} for g in groups]}))
    rows = summarize(result).splitlines()
    assert [r for r in rows if r.startswith("sam2 ")] == [
        f"{g} {'f[fast]':<18} {1.0:>9.3f} {'-':>8} {'-':>8} {'-':>8}" for g in groups]


def test_bench_record_fills_speedups_and_rates(monkeypatch):
    """bench/common.py's `record`: what the gate compares. Speedup = the group's reference
    median over the case's; a "fast_*" variant also over the group's "fast" case; img/s and
    TFLOP/s per call from `items` and `flops`."""
    import types

    import bench.common as common

    monkeypatch.setattr(common, "_median_s", {})

    def case(median):
        stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=median))
        return types.SimpleNamespace(stats=stats, extra_info={})

    ref, fast, variant = case(0.5), case(0.25), case(0.125)
    for bench, impl in ((ref, "reference"), (fast, "fast"), (variant, "fast_int8")):
        common.record(bench, "g", impl, items=2, flops=1e12, batch=2)
    assert "speedup" not in ref.extra_info and ref.extra_info["batch"] == 2
    assert (fast.extra_info["ms"], fast.extra_info["speedup"]) == (250.0, 2.0)
    assert (fast.extra_info["img_s"], fast.extra_info["tflop_s"]) == (8.0, 4.0)
    assert (variant.extra_info["speedup"], variant.extra_info["speedup_vs_fast"]) == (4.0, 2.0)
    assert "speedup_vs_fast" not in fast.extra_info


def test_bench_fast_repeat_slows_only_the_fast_cases(monkeypatch):
    import bench.common as common

    monkeypatch.delenv("FASTSAM_BENCH_FAST_REPEAT", raising=False)
    assert [common.repeats(i) for i in ("reference", "fast", "fast_int8")] == [1, 1, 1]
    monkeypatch.setenv("FASTSAM_BENCH_FAST_REPEAT", "3")
    assert [common.repeats(i) for i in ("reference", "fast", "fast_int8")] == [1, 3, 3]
