"""Progress lines of the long first calls: kernel tuning and torch.compile say on stderr what
they do and what came of it, once, and FASTSAM_QUIET=1 silences them."""

from __future__ import annotations

import pytest
import torch

from fastsam_core.kernels.tuning import Tuner
from fastsam_core.models.compiled import LazyCompiled
from fastsam_core.progress import note


@pytest.mark.parametrize("quiet", [False, True])
def test_tuning_says_what_it_measures_and_chose(tmp_path, monkeypatch, capsys, quiet):
    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTSAM_QUIET", "1" if quiet else "")
    x = torch.arange(4.0)
    candidates = {"slow": lambda: x.clone(), "fast": lambda: x.clone(),
                  "wrong": lambda: torch.zeros(4)}
    tuner = Tuner("progress_test", timer=lambda run: 2.0 if run is candidates["slow"] else 1.0)
    assert tuner.tune("gpu0", "n4", candidates, x) == "fast"
    err = capsys.readouterr().err
    if quiet:
        assert err == ""
        return
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("[fastsam] tuning progress_test for n4 on gpu0: 3 candidates")
    assert str(tmp_path / "progress_test.json") in lines[0]
    assert lines[1].startswith("[fastsam] tuned progress_test for n4: fast (1 ms; 2 of 3")


@pytest.mark.parametrize("quiet", [False, True])
def test_compilation_says_it_compiles_once(monkeypatch, capsys, quiet):
    monkeypatch.setenv("FASTSAM_QUIET", "1" if quiet else "")
    torch._dynamo.reset()
    compiled = LazyCompiled(lambda t: t * 2 + 1, "default", "test function", backend="eager")
    assert compiled.summary == "pending first call"
    for _ in range(2):
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))
    err = capsys.readouterr().err
    assert compiled.status == "compiled" and compiled.first_call_s > 0
    assert compiled.summary == f"compiled (first call {compiled.first_call_s:.1f} s)"  # report()
    if quiet:
        assert err == ""
        return
    assert err.splitlines() == [
        "[fastsam] compiling the test function (torch.compile mode='default') on its first call",
        f"[fastsam] compiled the test function: first call {compiled.first_call_s:.1f} s"]


@pytest.mark.parametrize("value, silent", [(None, False), ("", False), ("0", False),
                                           ("1", True), ("yes", True)])
def test_only_a_value_but_empty_or_zero_silences(monkeypatch, capsys, value, silent):
    if value is None:
        monkeypatch.delenv("FASTSAM_QUIET", raising=False)
    else:
        monkeypatch.setenv("FASTSAM_QUIET", value)
    note("hello")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("" if silent else "[fastsam] hello\n")
