"""The rel-pos attention kernel compiled ahead of time for the H200 (sm_90) with this machine's
Triton and its ptxas (scripts/compile_check.py), no GPU needed: each launch configuration the
tuner may pick at vit_h's shapes compiles and fits the shared memory, and the bias is formed
without the register spills that gathering it per element costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PTXAS = (Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton has no bundled ptxas")
def test_vit_h_attention_candidates_compile_for_sm90_without_spilling(tmp_path):
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "scripts/compile_check.py", "--arch", "90", "--json", str(out),
         "--only", "rel_pos_attention bf16 d80"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())["results"]
    fields = {r["name"]: r["name"].split() for r in results}  # ... kw64 m64_n64_w4_s2 row
    tuned = [r for r in results if fields[r["name"]][5] != "gather"]
    assert {"kw64", "kw14"} == {fields[r["name"]][3] for r in tuned}  # global and windowed
    assert all(r["ok"] and r["wgmma"] for r in results)  # Hopper's tensor-core matmul
    for grid in ("kw64", "kw14"):
        offered = [r for r in tuned if fields[r["name"]][3] == grid]
        assert min(r["spill"] for r in offered) == 0, offered
        gathered = [r for r in results if fields[r["name"]][3] == grid
                    and fields[r["name"]][5] == "gather"]
        same_launch = [r for r in offered if fields[r["name"]][4] == fields[gathered[0]["name"]][4]]
        assert gathered[0]["spill"] > 10 * max(same_launch[0]["spill"], 16), (gathered, offered)
