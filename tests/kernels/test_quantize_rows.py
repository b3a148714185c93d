"""The one-pass per-row int8 quantization kernel against its plain-torch reference: on the CPU
through TRITON_INTERPRET=1 (root conftest), on the GPU compiled (tests marked `cuda`)."""

from __future__ import annotations

import pytest
import torch

from fastsam_core.kernels.quantize_rows import MAX_ROW, quantize_rows, quantize_rows_ref
from fastsam_core.ops import quant

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POISON_CODE = -128  # never produced: codes are clamped to [-127, 127]


def rows_of(shape, dtype, seed=0, row_stride_pad=0):
    """... x K rows of very different ranges (row stride K + pad, unit column stride)."""
    gen = torch.Generator().manual_seed(seed)
    k = shape[-1]
    full = torch.randn(*shape[:-1], k + row_stride_pad, generator=gen)
    full = full * torch.logspace(-2, 2, full.shape[-2])[:, None]
    return full[..., :k].to(DEVICE, dtype)


def run_poisoned(x):
    n = x.numel() // x.shape[-1]
    q = torch.full((n, x.shape[-1]), POISON_CODE, dtype=torch.int8, device=x.device)
    s = torch.full((n,), float("nan"), device=x.device)
    return quantize_rows(x, out=(q, s))


def assert_exact(x):
    """The maximum is exact in any dtype and the divisions are the same correctly rounded
    fp32 ones on both sides: codes and scales must be identical, every element written."""
    q, s = run_poisoned(x)
    q_ref, s_ref = quantize_rows_ref(x)
    assert (q != POISON_CODE).all() and torch.isfinite(s).all()
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("shape", [(3, 16), (5, 80), (2, 7, 100), (4, 5120)],
                         ids=["16", "80", "3d-100", "5120"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_exactly(shape, dtype):
    assert_exact(rows_of(shape, dtype))


def test_strided_rows_and_zero_rows():
    assert_exact(rows_of((6, 48), torch.float32, row_stride_pad=5))
    q, s = run_poisoned(torch.zeros(3, 32, device=DEVICE))
    assert (q == 0).all() and (s == 1).all()


def test_round_half_to_even_like_torch():
    """A row whose maximum is 127 has scale exactly 1: its halves must round to even."""
    y = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0]], device=DEVICE)
    q, s = quantize_rows(y)
    assert (s == 1).all()
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 3] == torch.round(y[0]).int().tolist()


def test_bad_arguments_and_the_op_layer():
    with pytest.raises(ValueError, match="features"):
        quantize_rows(torch.zeros(1, MAX_ROW + 1, device=DEVICE))
    x = rows_of((2, 5, 24), torch.float32)
    for got, expected in zip(quant.quantize_rows(x, "triton"), quant.quantize_rows(x, "torch"),
                             strict=True):
        assert got.shape == expected.shape and torch.equal(got, expected)
    assert quant.quantize_rows(x, "torch")[0].shape == (10, 24)
    with pytest.raises(ValueError, match="backend"):
        quant.quantize_rows(x, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("k", [3072, 5120])
def test_bf16_real_widths(k):
    """The MLPs' hidden widths (vit_b, vit_h) in bf16."""
    assert_exact(rows_of((64, k), torch.bfloat16))
