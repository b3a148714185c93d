"""Shared conventions of the bench suites (imported by each bench file).

Every suite has, per group, a "reference" case and one or more "fast*" cases, timed in the same
run; `record()` fills `extra_info` the same way everywhere: device, torch/triton versions,
impl, the case's own fields (dtype, batch, ...), ms, and for fast cases the speedup over the
group's reference measured in this run (for variants "fast_*" also `speedup_vs_fast`, over
the group's "fast" case). img/s and TFLOP/s when the case passes `items` (images
per call) and `flops` (per call).

FASTSAM_BENCH_FAST_REPEAT (default 1) makes every timed call of a fast case do its work that
many times: a deliberately slowed fast path, to show that the regression gate catches it (a
repeat slows the work itself, so it shows on a busy machine too, unlike a sleep).
"""

from __future__ import annotations

import os

from fastsam_core.benchmark import default_device, env_info

DEVICE = default_device()
_median_s: dict[tuple[str, str], float] = {}


def repeats(impl: str) -> int:
    """How many times a case does its work per timed call: 1, except for fast cases under the
    FASTSAM_BENCH_FAST_REPEAT test hook above."""
    if impl == "reference":
        return 1
    return max(1, int(os.environ.get("FASTSAM_BENCH_FAST_REPEAT", "1") or 1))


def fail_on_fallbacks(model, impl: str) -> None:
    """Fail the case if a fast module of `model` ran its reference (training mode, autograd,
    a shape it does not take): its time would be the reference's under the fast name."""
    import pytest

    from fastsam_core.models.fallback import fallbacks_of

    ran = fallbacks_of(model)
    if ran:
        pytest.fail(f"{impl} ran reference fallbacks: {ran}")


def record(benchmark, group: str, impl: str, items: int | None = None,
           flops: float | None = None, **info: object) -> None:
    """Fill `benchmark.extra_info` (see the module docstring)."""
    info.update(env_info(DEVICE), impl=impl, group=group)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        _median_s[(group, impl)] = median
        info["ms"] = median * 1e3
        if items is not None:
            info["img_s"] = items / median
        if flops is not None:
            info["tflop_s"] = flops / median / 1e12
        # floor_* cases time torch alone (a bound, not our path): no speedup to gate
        if impl != "reference" and not impl.startswith("floor_") \
                and (group, "reference") in _median_s:
            info["speedup"] = _median_s[(group, "reference")] / median
        if impl.startswith("fast_") and (group, "fast") in _median_s:
            info["speedup_vs_fast"] = _median_s[(group, "fast")] / median
    benchmark.extra_info.update(info)
