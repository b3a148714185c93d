"""The fused LayerNorm + int8 quantization kernel against its plain-torch reference: on the
CPU through TRITON_INTERPRET=1 (root conftest), on the GPU compiled (tests marked `cuda`)."""

from __future__ import annotations

import pytest
import torch

from fastsam_core.kernels.layer_norm_quant import layer_norm_quant, layer_norm_quant_ref
from fastsam_core.kernels.quantize_rows import MAX_ROW
from tests import tolerances as tol
from tests.parity import assert_close_fp32

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POISON_CODE = -128  # never produced: codes are clamped to [-127, 127]


def problem(shape, dtype, seed=0, row_stride_pad=0):
    """x (... x K, rows possibly strided), LayerNorm weight and bias (K)."""
    gen = torch.Generator().manual_seed(seed)
    k = shape[-1]
    full = torch.randn(*shape[:-1], k + row_stride_pad, generator=gen) * 3 + 0.5
    x = full[..., :k]  # row stride k + pad, unit column stride
    weight = torch.randn(k, generator=gen) * 0.5 + 1
    bias = torch.randn(k, generator=gen) * 0.1
    return [t.to(DEVICE, dtype) for t in (x, weight, bias)]


def run_poisoned(x, weight, bias, eps=1e-6):
    rows = x.numel() // x.shape[-1]
    q = torch.full((rows, x.shape[-1]), POISON_CODE, dtype=torch.int8, device=x.device)
    s = torch.full((rows,), float("nan"), device=x.device)
    return layer_norm_quant(x, weight, bias, eps, out=(q, s))


def assert_matches_reference(x, weight, bias, eps=1e-6):
    q, s = run_poisoned(x, weight, bias, eps)
    q_ref, s_ref = layer_norm_quant_ref(x, weight, bias, eps)
    assert q.shape == q_ref.shape and q.dtype == torch.int8
    assert s.shape == s_ref.shape and s.dtype == torch.float32
    assert (q != POISON_CODE).all() and torch.isfinite(s).all()  # every element written
    assert_close_fp32(s, s_ref, tol.FP32_OP_REL_L2)
    # statistics summed in another order can move a value across a rounding boundary: a code
    # may differ by one only where the reference sits that close to a half
    v = layer_norm_ref_values(x, weight, bias, eps) / s_ref
    near_half = ((v - v.floor()) - 0.5).abs() < tol.INT8_CODE_TIE_BAND
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and not (diff.bool() & ~near_half).any()


def layer_norm_ref_values(x, weight, bias, eps):
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(),
                                          bias.float(), eps)


@pytest.mark.parametrize("shape", [(3, 16), (5, 80), (2, 7, 100), (4, 1280)],
                         ids=["16", "80", "3d-100", "1280"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(shape, dtype):
    assert_matches_reference(*problem(shape, dtype))


def test_strided_rows():
    assert_matches_reference(*problem((6, 48), torch.float32, row_stride_pad=5))


def test_column_strided_rows_and_the_widest_rows():
    """As for quantize_rows: a column-major view of the rows is read as its values, and rows
    of exactly MAX_ROW features run."""
    x, weight, bias = problem((6, 48), torch.float32)
    x = x.t().contiguous().t()  # same values, column stride 6
    assert x.stride(-1) != 1
    assert_matches_reference(x, weight, bias)
    assert_matches_reference(*problem((2, MAX_ROW), torch.float32))


def test_eps_where_it_matters():
    """Rows of variance ~0.09 with eps 0.1: the kernel adds eps as the reference does (at
    the tests' eps of 1e-6 and variance ~9 leaving it out changed nothing)."""
    x, weight, bias = problem((4, 48), torch.float32)
    assert_matches_reference(x * 0.1, weight, bias, eps=0.1)


def test_zero_rows_get_scale_one_and_zero_codes():
    x, weight, bias = problem((3, 32), torch.float32)
    q, s = run_poisoned(x, torch.zeros_like(weight), torch.zeros_like(bias))
    assert (q == 0).all() and (s == 1).all()


def test_round_half_to_even_like_torch():
    """Codes that land exactly on halves: the kernel rounds as torch.round does (half to
    even), not half away from zero. With a zero weight the LayerNorm output is its bias,
    exactly, and a bias whose maximum is 127 makes the scale exactly 1."""
    y = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0], device=DEVICE)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    q, s = layer_norm_quant(x, torch.zeros_like(y), y, 1e-6)
    assert (s == 1).all()
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 3] == torch.round(y).int().tolist()


def test_bad_arguments():
    x, weight, bias = problem((2, 16), torch.float32)
    with pytest.raises(ValueError, match="weight and bias"):
        layer_norm_quant(x, weight[:8], bias, 1e-6)
    with pytest.raises(ValueError, match="weight and bias"):
        layer_norm_quant(x, weight, bias[:8], 1e-6)
    wide = torch.zeros(1, MAX_ROW + 1, device=DEVICE)
    with pytest.raises(ValueError, match="features"):
        layer_norm_quant(wide, wide[0], wide[0], 1e-6)


# the interpreter's tl.max is numpy's nanmax, which warns on the all-NaN LayerNorm row
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_rows_keep_a_nan_scale_and_underflowing_scales_agree(backend):
    """A NaN in a row makes its LayerNorm output NaN: its scale is NaN (not 1, nor one from
    the other elements), the other rows are unaffected. A weight of ~1e-44 makes every row's
    max / 127 underflow to 0: scale 1 and zero codes, as for a zero row, on both backends."""
    from fastsam_core.ops.quant import layer_norm_quantize

    x, weight, bias = problem((3, 32), torch.float32)
    x[1, 4] = float("nan")
    q, s = layer_norm_quantize(x, weight, bias, 1e-6, backend)
    q_ref, s_ref = layer_norm_quant_ref(x, weight, bias, 1e-6)
    assert s[1].isnan().all() and s_ref[1].isnan().all()
    assert_close_fp32(s[0::2], s_ref[0::2], tol.FP32_OP_REL_L2)
    tiny = torch.full_like(weight, 1e-44)
    q, s = layer_norm_quantize(x[0::2], tiny, torch.zeros_like(bias), 1e-6, backend)
    assert (s == 1).all() and (q == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("k", [768, 1280])
def test_bf16_real_widths(k):
    assert_matches_reference(*problem((64, k), torch.bfloat16))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_norm_then_int8_linear_from_codes(backend):
    """The op and module layers: LayerNorm codes (`ops.quant.layer_norm_quantize`) fed to
    `Int8Linear.forward_codes` give what `Int8Linear` gives on the LayerNorm's output (the
    same codes with "torch"; with the kernel a code may move by one at a rounding tie)."""
    from fastsam_core.models.quant import Int8Linear
    from fastsam_core.ops.quant import layer_norm_quantize, sqnr_db

    x, weight, bias = problem((2, 9, 64), torch.float32)
    linear = Int8Linear(torch.nn.Linear(64, 32).to(DEVICE))
    expected = linear(layer_norm_ref_values(x, weight, bias, 1e-6))
    x_q, x_scale = layer_norm_quantize(x, weight, bias, 1e-6, backend)
    got = linear.forward_codes(x_q, x_scale, torch.float32).view(2, 9, 32)
    if backend == "torch":
        assert torch.equal(got, expected)
    else:
        assert sqnr_db(expected, got) >= tol.INT8_TIE_FLIP_MIN_SQNR_DB


def test_layer_norm_quantize_checks_its_backend():
    from fastsam_core.ops.quant import layer_norm_quantize

    x, weight, bias = problem((2, 16), torch.float32)
    with pytest.raises(ValueError, match="backend"):
        layer_norm_quantize(x, weight, bias, 1e-6, "cuda")
