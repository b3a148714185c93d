"""Performance regression gate over the bench/ suites (`fastsam gate`).

Two checks, both against a baseline committed per device in `bench/baselines/<device>/`
(pytest-benchmark files its runs by platform, not by GPU, hence one storage per device):

1. absolute times, with pytest-benchmark's own `--benchmark-compare` and
   `--benchmark-compare-fail=median:<N>%`;
2. speedup ratios (fast vs reference, measured in the same run, `extra_info["speedup"]`):
   robust on shared, noisy machines where absolute times drift together.

    python -m fastsam_core gate --save     # record this device's baseline
    python -m fastsam_core gate            # compare; exit status 1 on a regression
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fastsam_core.benchmark import default_device, device_name


def device_slug(device: torch.device | str | None = None) -> str:
    """A folder name for this device: 'nvidia-h200', 'cpu-x86-64', ..."""
    device = torch.device(device) if device is not None else default_device()
    name = device_name(device)
    if device.type == "cpu":
        name = name.split(" (")[0]  # without the thread count
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def latest_baseline(storage: Path, platform: str | None = None) -> Path | None:
    """The newest pytest-benchmark file under `storage`: of this platform's subfolder
    (pytest-benchmark's machine id, e.g. 'Linux-CPython-3.12-64bit') by its save counter,
    else of any platform by the time each file records."""
    if platform is None:
        from pytest_benchmark.utils import get_machine_id  # the gate runs pytest-benchmark

        platform = get_machine_id()
    own = sorted((storage / platform).glob("*.json"), key=lambda p: p.name)
    if own:
        return own[-1]
    files = sorted(storage.glob("*/*.json"), key=lambda p: (_saved_at(p), p.name))
    return files[-1] if files else None


def _saved_at(result_file: Path) -> str:
    """The ISO time a pytest-benchmark file records ('' if it records none)."""
    try:
        return str(json.loads(result_file.read_text()).get("datetime", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def speedups(result_file: Path) -> dict[str, float]:
    """fullname -> speedup of every case that recorded one."""
    data = json.loads(result_file.read_text())
    return {b["fullname"]: b["extra_info"]["speedup"] for b in data["benchmarks"]
            if "speedup" in b.get("extra_info", {})}


def compare_ratios(run: dict[str, float], baseline: dict[str, float],
                   tolerance: float) -> list[tuple[str, float, float, bool]]:
    """(case, baseline speedup, speedup now, ok) for the cases in both."""
    rows = []
    for name in sorted(set(run) & set(baseline)):
        ok = run[name] >= baseline[name] * (1 - tolerance)
        rows.append((name, baseline[name], run[name], ok))
    return rows


def run_gate(paths: list[str], baselines: Path, save: bool, abs_tolerance: float,
             ratio_tolerance: float, pytest_args: list[str]) -> int:
    """Run the bench suites and gate them; returns the exit status (0: no regression)."""
    storage = baselines / device_slug()
    baseline = None if save else latest_baseline(storage)
    if not save and baseline is None:  # before the run, not after it
        print(f"[fastsam gate] no baseline for this device under {storage}: run with "
              "--save first")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "run.json"
        cmd = [sys.executable, "-m", "pytest", *paths, "--benchmark-only", "-q",
               f"--benchmark-storage=file://{storage.resolve()}", f"--benchmark-json={result}",
               *pytest_args]
        if save:
            cmd.append("--benchmark-save=baseline")
        elif baseline is not None:
            cmd += [f"--benchmark-compare={baseline.resolve()}",  # any platform's file
                    f"--benchmark-compare-fail=median:{abs_tolerance:g}%"]
        print("[fastsam gate] " + shlex.join(cmd), flush=True)
        before = set(storage.rglob("*.json")) if save else set()
        status = subprocess.call(cmd)
        if save:
            if status != 0:  # a failed run is no baseline to gate against
                for new in set(storage.rglob("*.json")) - before:
                    new.unlink()
                print(f"[fastsam gate] the run failed (pytest exit {status}): no baseline "
                      "saved")
            else:
                print(f"[fastsam gate] baseline saved under {storage}")
            return status
        if status == 5:  # pytest: no tests collected
            print("[fastsam gate] the selection matched no benchmarks (pytest exit 5): "
                  "nothing gated")
            return status
        if status != 0:
            print(f"[fastsam gate] absolute times regressed by more than {abs_tolerance:g}% "
                  f"(or a benchmark failed) against {baseline}")
        if not result.exists():
            return status or 1
        rows = compare_ratios(speedups(result), speedups(baseline), ratio_tolerance)
    print(f"\n[fastsam gate] speedup ratios vs {baseline.name} (tolerance {ratio_tolerance:.0%})")
    for name, before, now, ok in rows:
        print(f"  {'ok  ' if ok else 'FAIL'} {now:6.2f}x (baseline {before:6.2f}x)  {name}")
    if not all(ok for *_, ok in rows):
        return 1
    return status


def merge_results(parts: list[Path], out: Path) -> int:
    """Write one pytest-benchmark file holding the cases of several (runs of single suites,
    e.g. bench/run_gpu.sh's, one per file so that a suite that overruns loses only itself):
    the first file's machine and commit info, every file's benchmarks. Returns the number of
    cases; unreadable parts (a suite killed before writing) are skipped."""
    merged: dict | None = None
    for part in parts:
        try:
            data = json.loads(Path(part).read_text())
        except (OSError, ValueError):
            continue
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data["benchmarks"]
    if merged is None:
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1))
    return len(merged["benchmarks"])


def summarize(result_file: Path) -> str:
    """A table of a pytest-benchmark result file: per group, each case's median ms, img/s,
    TFLOP/s and speedup (from `extra_info`, see bench/common.py)."""
    try:
        data = json.loads(Path(result_file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"result_file={str(result_file)!r}: not JSON ({err})") from None
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benchmarks, list) or not all(
            isinstance(b, dict) and {"group", "name", "stats"} <= b.keys()
            and isinstance(b["stats"], dict) and "median" in b["stats"] for b in benchmarks):
        raise ValueError(f"result_file={str(result_file)!r}: not a pytest-benchmark result "
                         "(no 'benchmarks' list of entries with group, name and stats; "
                         "`fastsam bench --json` and `fastsam accuracy --out` files are "
                         "printed by their own commands)")
    # as wide as the longest group (up to 48): cut at a fixed width, groups that differ only
    # at their end ("... 1 obj", "... 8 obj") printed alike
    width = min(48, max([34, *(len(b["group"] or "") for b in benchmarks)]))
    lines = [f"{'group':<{width}} {'impl':<18} {'ms':>9} {'img/s':>8} {'TFLOP/s':>8} "
             f"{'speedup':>8}"]
    for b in sorted(benchmarks, key=lambda b: (b["group"] or "", b["name"])):
        info = b.get("extra_info", {})
        img_s, tflop_s, speedup = (format(info[k], spec) if k in info else "-" for k, spec in
                                   (("img_s", ".2f"), ("tflop_s", ".3g"), ("speedup", ".2f")))
        impl = str(info.get("impl", b["name"]))[:18]
        lines.append(f"{(b['group'] or '')[:width]:<{width}} {impl:<18} "
                     f"{b['stats']['median'] * 1e3:>9.3f} {img_s:>8} {tflop_s:>8} {speedup:>8}")
    device = next((b["extra_info"].get("device") for b in benchmarks
                   if "device" in b.get("extra_info", {})), "unknown device")
    return f"{device}, {len(benchmarks)} cases\n" + "\n".join(lines)
