"""Small numeric helpers shared by the package, its tests and its benchmarks."""

from __future__ import annotations

import torch


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64 (NaN anywhere gives NaN). An all-zero
    `expected` gives 0 for an all-zero `actual` and inf for any other."""
    actual, expected = actual.double(), expected.double()
    distance, norm = (actual - expected).norm(), expected.norm()
    if norm == 0 and distance == 0:  # 0 / 0: an exact match of an all-zero result
        return 0.0
    return (distance / norm).item()
