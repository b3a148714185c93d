"""bench/run_gpu.sh, run on the CPU with a reduced selection: the files it leaves under $OUT
(at most 8, at most two folders deep) and the summary table it prints last."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_runner_leaves_few_shallow_files_and_prints_the_summary(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable,
               FASTSAM_RUNNER_BENCH="bench/test_bench_end_to_end.py",
               FASTSAM_RUNNER_PROFILE="--model vit_b --image-size 128 --stage predictor")
    # the tests stage would rerun parts of this suite: the bench and profile stages here
    done = subprocess.run(["bash", "bench/run_gpu.sh", "bench", "profile"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 4 <= len(files) <= 8
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert all(p.stat().st_size < 16 * 2**20 for p in files)
    names = {p.name for p in files}
    assert "logs.tar.gz" in names and "0001_baseline.json" in names
    assert any(n.endswith(".trace.json.gz") for n in names)
    tail = done.stdout.strip().splitlines()
    assert tail[-3].startswith("group") and "speedup" in tail[-3]
    assert "fast" in tail[-2] and "reference" in tail[-1]
    assert "bench_end_to_end       rc=0" in done.stdout
    assert "profile                rc=0" in done.stdout


def test_runner_keeps_to_its_deadline(tmp_path):
    """A suite that would overrun is stopped at the deadline, the next one is not started,
    and the logs still come back; the exit status says that something did not run. A stand-in
    python sleeps instead of running the suites (everything else goes to the real one)."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
case "$*" in *--benchmark-json*) sleep 60 ;; *) exec {sys.executable} "$@" ;; esac
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=str(fake), FASTSAM_RUNNER_DEADLINE="15",
               FASTSAM_RUNNER_MIN_STEP="1", FASTSAM_RUNNER_RESERVE="0",
               FASTSAM_RUNNER_BENCH="bench/test_bench_prompt.py bench/test_bench_amg.py")
    done = subprocess.run(["bash", "bench/run_gpu.sh", "bench"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "bench_prompt" in done.stdout and "stopped at the deadline" in done.stdout
    assert "bench_amg              skipped" in done.stdout
    assert (out / "logs.tar.gz").is_file()


def test_runner_caps_the_kernel_tests(tmp_path):
    """The "tests" stage stops at FASTSAM_RUNNER_TESTS_MAX, its CUDA-marked part first, and
    the benchmarks after it still run. A stand-in python sleeps instead of running the kernel
    tests and passes the bench suite at once."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
case "$*" in *tests/kernels*) sleep 60 ;; *--benchmark-json*) exit 0 ;;
  *) exec {sys.executable} "$@" ;; esac
""")
    fake.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(fake),
               FASTSAM_RUNNER_TESTS_MAX="4", FASTSAM_RUNNER_MIN_STEP="2",
               FASTSAM_RUNNER_RESERVE="0", FASTSAM_RUNNER_BENCH="bench/test_bench_prompt.py")
    done = subprocess.run(["bash", "bench/run_gpu.sh", "tests", "bench"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()
             if line.startswith(("tests", "bench_"))}
    assert "stopped at its stage's time cap" in lines["tests_cuda"], done.stdout
    assert "skipped" in lines["tests"] and "time cap" in lines["tests"], done.stdout
    assert "rc=0" in lines["bench_prompt"], done.stdout
