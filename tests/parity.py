"""Parity assertions built on tests/tolerances.py."""

from __future__ import annotations

import copy

import torch

from fastsam_core.benchmark import rel_l2
from tests import tolerances as tol


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, limit: float) -> float:
    """Relative L2 error of an fp32 result against the fp32 reference, at most `limit`."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    err = rel_l2(actual, expected)
    assert err <= limit, f"relative L2 error {err:.3e} > {limit:.0e}"
    return err


def assert_lowp_parity(
    fast: torch.Tensor, naive: torch.Tensor, exact: torch.Tensor
) -> tuple[float, float]:
    """A low-precision result is at most LOWP_FACTOR x the naive error + LOWP_SLACK.

    Args:
        fast: the fast path's output.
        naive: the reference module converted to the same dtype.
        exact: the reference module run in float64.
    """
    assert fast.shape == exact.shape, (fast.shape, exact.shape)
    err_fast, err_naive = rel_l2(fast, exact), rel_l2(naive, exact)
    bound = tol.LOWP_FACTOR * err_naive + tol.LOWP_SLACK
    assert err_fast <= bound, f"fast error {err_fast:.3e} > {bound:.3e} (naive {err_naive:.3e})"
    return err_fast, err_naive


def in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A converted copy of a reference module (the naive low-precision or float64 reference)."""
    return copy.deepcopy(module).to(dtype)


def mask_iou_outside_margin(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """The lowest IoU, over masks, of (logits > 0) and (ref_logits > 0), on the pixels where
    the reference logit is not within MASK_LOGIT_MARGIN x std(ref_logits) of zero."""
    assert logits.shape == ref_logits.shape, (logits.shape, ref_logits.shape)
    ious = []
    for got, ref in zip(logits.reshape(-1, *logits.shape[-2:]).float(),
                        ref_logits.reshape(-1, *ref_logits.shape[-2:]).float(), strict=True):
        keep = ref.abs() > tol.MASK_LOGIT_MARGIN * ref.std()
        a, b = (got > 0) & keep, (ref > 0) & keep
        union = (a | b).sum().item()
        ious.append(1.0 if union == 0 else (a & b).sum().item() / union)
    return min(ious)
