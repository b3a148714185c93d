"""fastsam_core.numerics.rel_l2: the measure every parity bound of the suite is stated in
(tests/tolerances.py), so it is checked on values whose distance is known exactly."""

from __future__ import annotations

import math

import torch

from fastsam_core.numerics import rel_l2


def test_rel_l2_is_the_l2_distance_over_the_expected_norm():
    expected = torch.tensor([3.0, 4.0])  # norm 5
    assert rel_l2(torch.tensor([4.0, 4.0]), expected) == 0.2  # ||(1, 0)|| / 5: L2, not max
    assert rel_l2(expected * 3, expected) == 2.0  # over ||expected||, not ||actual||
    assert rel_l2(expected, expected) == 0.0


def test_rel_l2_is_taken_in_float64_and_nan_anywhere_gives_nan():
    expected = torch.full((8,), 3e4, dtype=torch.float16)  # its norm overflows fp16
    assert rel_l2(expected * 2, expected) == 1.0
    assert math.isnan(rel_l2(torch.tensor([float("nan"), 1.0]), torch.ones(2)))


def test_rel_l2_of_an_all_zero_expected_is_zero_only_for_an_exact_match():
    """The tuner accepts a candidate whose rel_l2 to the reference is within its tolerance: an
    exact candidate for an all-zero reference (0 / 0) was rejected as not matching."""
    zeros = torch.zeros(4)
    assert rel_l2(zeros, zeros) == 0.0
    assert rel_l2(torch.tensor([0.0, 1e-30, 0.0, 0.0]), zeros) == math.inf
    assert math.isnan(rel_l2(torch.tensor([float("nan"), 0.0, 0.0, 0.0]), zeros))
