"""The rel-pos attention and int8 matmul kernels compiled ahead of time for the H200 (sm_90)
with this machine's Triton and its ptxas (scripts/compile_check.py), no GPU needed: each
launch configuration the tuners may pick at vit_h's shapes, in bf16, compiles from the
arguments the encoder passes, fits the shared memory, uses Hopper's wgmma with
software-pipelined loads, and spills no registers (the attention kernel padding the head dim
80 to 128 spilled 556-676 bytes per thread on the windows at 64-key tiles,
scripts/runs/compile_check_f3a00d3-sm90-*.txt; today's: scripts/runs/compile_check-sm90-*.txt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from fastsam_core.kernels.int8_matmul import TILE_CANDIDATES
from fastsam_core.ops.attention import CANDIDATES

REPO = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def specializes_like_the_jit() -> bool:
    """The script specializes arguments through Triton's own (private) function for it."""
    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton has no bundled ptxas")
@pytest.mark.skipif(not specializes_like_the_jit(),
                    reason="this Triton has no native_specialize_impl (Triton 3.6 and 3.8 do)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA run compiles these itself")
@pytest.mark.parametrize("only, expected", [
    ("rel_pos_attention bf16 d80", 2 * len(CANDIDATES)),  # global and windowed
    ("int8_matmul bf16", 2 * len(TILE_CANDIDATES)),  # fc1 (GELU epilogue) and fc2
], ids=["attention", "int8_matmul"])
def test_vit_h_candidates_compile_for_sm90_without_spilling(tmp_path, only, expected):
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "scripts/compile_check.py", "--arch", "90", "--json", str(out),
         "--only", only],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())["results"]
    assert len(results) == expected
    for r in results:
        assert r["ok"] and r["wgmma"] and r["async_loads"] > 0 and r["spill"] == 0, r


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton has no bundled ptxas")
@pytest.mark.skipif(not specializes_like_the_jit(),
                    reason="this Triton has no native_specialize_impl (Triton 3.6 and 3.8 do)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA run compiles these itself")
def test_recorded_test_launches_compile_for_sm90(tmp_path):
    """scripts/record_launches.py records the launches of a test run with the GPU's launch
    configurations (the int8 kernel's default 128 x 128 x 64 tiles with 8 warps, not the
    interpreter's 32s with 1), once each; compile_check --launches compiles them all for
    sm_90."""
    launches, out = tmp_path / "launches.json", tmp_path / "compile.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "scripts"), str(REPO),
                                                      env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/kernels/test_int8_matmul.py", "-q",
         "-p", "no:cacheprovider", "-p", "record_launches", "--record-launches",
         str(launches)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads(launches.read_text())["launches"]
    assert records and all(r["test"].startswith("tests/kernels/test_int8_matmul.py::")
                           for r in records)
    specs = [json.dumps(r["spec"], sort_keys=True) for r in records]
    assert len(set(specs)) == len(specs)
    assert len({r["name"] for r in records}) == len(records)  # a name tells them apart
    tiles = {(r["spec"]["constexprs"]["BLOCK_M"], r["spec"]["options"]["num_warps"])
             for r in records}  # the default, and the tiles tests pass themselves
    assert (128, 8) in tiles and (32, 1) not in tiles
    env.pop("TRITON_INTERPRET")
    done = subprocess.run(
        [sys.executable, "scripts/compile_check.py", "--arch", "90", "--launches",
         str(launches), "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["name"] for r in results] == [r["name"] for r in records]
    assert all(r["ok"] for r in results)


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton has no bundled ptxas")
@pytest.mark.skipif(not specializes_like_the_jit(),
                    reason="this Triton has no native_specialize_impl (Triton 3.6 and 3.8 do)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA run compiles these itself")
def test_a_launch_over_the_targets_shared_memory_fails_the_check(tmp_path):
    """A variant asking for more shared memory than the target's per-block limit (here a
    limit of 1 KiB stands in) is reported failed, and the exit status says so."""
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "scripts"), str(REPO),
                                                      env.get("PYTHONPATH")]))
    driver = ("import sys, compile_check; compile_check.SHARED_LIMIT[90] = 1024; "
              "sys.exit(compile_check.main(sys.argv[1:]))")
    done = subprocess.run(
        [sys.executable, "-c", driver, "--arch", "90", "--json", str(out), "--only",
         f"int8_matmul bf16 fc2 {TILE_CANDIDATES[0].as_key()}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout + done.stderr
    [row] = json.loads(out.read_text())["results"]
    assert not row["ok"] and row["error"] == f"shared memory {row['shared']} > 1024 bytes"
    assert "FAILED shared memory" in done.stdout
