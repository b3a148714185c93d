"""Choosing a kernel launch configuration by measurement, once per shape and device.

On first use of a shape, every candidate runs on the real inputs; a candidate whose output does
not match the reference within `MATCH_REL_L2` is discarded (a miscompiled or numerically
unsuitable tile size can never be picked), the rest are timed and the fastest wins. Choices are
kept in memory, in a per-user cache file (`cache_dir()`), and a table shipped with the package
(`kernels/tuned/<name>.json`, keyed by GPU name) answers first, so a measured GPU does not sweep
on a cold start.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastsam_core.kernels.launch import on_device_of
from fastsam_core.numerics import rel_l2
from fastsam_core.progress import note

# Relative L2 distance a candidate's output may have from the reference output (the same math
# through SDPA, in the same dtype): a few units of the dtype's rounding after a softmax-weighted
# sum, far below what a wrong tile (garbage or unwritten rows) produces.
MATCH_REL_L2 = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

SHIPPED_DIR = Path(__file__).with_name("tuned")
_nesting = [0]  # Tuner.tune calls in progress (candidates may tune what they launch)


def cache_dir() -> Path:
    """$FASTSAM_CACHE_DIR, else $XDG_CACHE_HOME/fastsam_core, else ~/.cache/fastsam_core."""
    if os.environ.get("FASTSAM_CACHE_DIR"):
        return Path(os.environ["FASTSAM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastsam_core"


def cuda_timer(fn: Callable[[], object]) -> float:
    """Median milliseconds of `fn` on the GPU (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


class Tuner:
    """Measured choice among named candidates, cached per (device, key).

    Args:
        name: the kernel's name; names the cache files.
        timer: milliseconds of one call of a callable (default: CUDA do_bench).
    """

    def __init__(self, name: str, timer: Callable[[Callable[[], object]], float] = cuda_timer):
        self.name = name
        self.timer = timer
        self.choices: dict[tuple[str, str], str] = {}
        self.last_measurements: dict[str, float] = {}
        # wall seconds in tune(); a tune() inside another's candidates (an int8 backend
        # tuning its Triton tile) counts only in the outermost, so tuners' totals add up
        self.tuning_seconds = 0.0

    def cache_file(self) -> Path:
        return cache_dir() / f"{self.name}.json"

    def cache_entries(self) -> int:
        """Choices stored in the per-user cache file (all devices)."""
        return sum(len(keys) for keys in _read(self.cache_file()).values())

    def cached(self, device: str, key: str, names: list[str]) -> str | None:
        """A choice made earlier (this process, the shipped table, the user cache), if it is
        still one of `names`; else None."""
        known = self.choices.get((device, key))
        if known not in names:
            known = self._lookup(device, key, names)
        if known is None:
            return None
        self.choices[(device, key)] = known
        return known

    def tune(
        self,
        device: str,
        key: str,
        candidates: dict[str, Callable[[], torch.Tensor]],
        reference: torch.Tensor,
        tolerance: float | None = None,
    ) -> str:
        """Measure and return the name of the fastest candidate matching `reference`.

        Args:
            device: GPU name (the cache and the shipped table are per device).
            key: the shape and dtype the choice is for.
            candidates: name -> callable returning the candidate's output for the real inputs.
            reference: the expected output.
            tolerance: relative L2 distance allowed from it (default: MATCH_REL_L2 of its
                dtype, for candidates computing the same math).

        Raises:
            RuntimeError: no candidate matched the reference.
        """
        start = time.perf_counter()
        note(f"tuning {self.name} for {key} on {device}: {len(candidates)} candidates, "
             f"once per shape (cached in {self.cache_file()})")
        if tolerance is None:
            tolerance = MATCH_REL_L2[reference.dtype]
        timings: dict[str, float] = {}
        _nesting[0] += 1
        try:
            with on_device_of([reference]):  # the timer's events on the kernels' device
                for name, run in candidates.items():
                    try:
                        out = run()
                    except Exception:  # noqa: BLE001 - out of shared memory, ...: not a candidate
                        continue
                    if rel_l2(out, reference) <= tolerance:  # NaN fails this comparison too
                        timings[name] = self.timer(run)
        finally:
            _nesting[0] -= 1
        seconds = time.perf_counter() - start
        if _nesting[0] == 0:
            self.tuning_seconds += seconds
        self.last_measurements = timings
        if not timings:
            raise RuntimeError(f"{self.name}: no candidate matched the reference for {key}")
        best = min(timings, key=timings.get)
        note(f"tuned {self.name} for {key}: {best} ({timings[best]:.3g} ms; "
             f"{len(timings)} of {len(candidates)} candidates matched) in {seconds:.1f} s")
        self.choices[(device, key)] = best
        self._store(device, key, best, timings)
        return best

    def _lookup(self, device: str, key: str, names: list[str]) -> str | None:
        """The shipped table's choice, else the user cache's, skipping one that is no longer
        among `names` (a stale shipped entry must not hide a newer measurement)."""
        for path in (SHIPPED_DIR / f"{self.name}.json", self.cache_file()):
            entry = _read(path).get(device, {}).get(key)
            if isinstance(entry, dict) and entry.get("choice") in names:
                return entry["choice"]
        return None

    def _store(self, device: str, key: str, choice: str, timings: dict[str, float]) -> None:
        path = self.cache_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            table = _read(path)
            table.setdefault(device, {})[key] = {"choice": choice, "ms": timings}
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:
                json.dump(table, f, indent=1, sort_keys=True)
            os.replace(f.name, path)
        except OSError:
            pass  # a read-only home: the choice stays in memory for this process


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
