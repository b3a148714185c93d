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


def test_column_strided_rows_and_the_widest_rows():
    """Rows whose features are not adjacent (a column-major view: the kernel reads a unit
    column stride) are made contiguous first; rows of exactly MAX_ROW features, the widest
    the kernel takes (where "auto" still sends them), run."""
    x = rows_of((6, 48), torch.float32)
    x = x.t().contiguous().t()  # same values, column stride 6
    assert x.stride(-1) != 1
    assert_exact(x)
    assert_exact(rows_of((2, MAX_ROW), torch.float32))


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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_rows_keep_a_nan_scale_and_underflowing_scales_agree(backend):
    """A NaN in a row gives that row a NaN scale (its linear's output row is then NaN, as
    nn.Linear's), not scale 1 nor one from the other elements; a row whose max / 127
    underflows to 0 (|x| ~ 1e-44) gets scale 1 and zero codes, as a zero row, on both
    backends (the kernel divided by the zero scale)."""
    x = rows_of((5, 40), torch.float32)
    x[1, 7] = float("nan")
    x[2] = 0
    x[3] = x[3].sign() * 1e-44
    q, s = quant.quantize_rows(x, backend)
    q_ref, s_ref = quantize_rows_ref(x)
    assert s[1].isnan().all() and s_ref[1].isnan().all()
    assert (s[2:4] == 1).all() and (q[2:4] == 0).all()
    finite = torch.tensor([True, False, True, True, True], device=DEVICE)
    assert torch.equal(q[finite], q_ref[finite]) and torch.equal(s[finite], s_ref[finite])


@pytest.mark.parametrize("case", ["too-few-rows", "too-narrow", "scales-too-short",
                                  "codes-int16", "codes-strided", "scales-fp16",
                                  "scales-strided"])
@pytest.mark.parametrize("name", ["quantize_rows", "layer_norm_quant"])
def test_bad_out_buffers_raise_before_any_write(name, case):
    """Both row kernels write `out` as contiguous N x K int8 codes and N fp32 scales: any
    other buffer raises naming it, and nothing is written (the buffers are views into larger
    ones that must stay untouched)."""
    from fastsam_core.kernels.layer_norm_quant import layer_norm_quant

    x = rows_of((4, 8), torch.float32)
    codes = torch.full((128,), 7, dtype=torch.int16 if case == "codes-int16" else torch.int8,
                       device=DEVICE)
    scales = torch.full((16,), 7.0, device=DEVICE,
                        dtype=torch.float16 if case == "scales-fp16" else torch.float32)
    q, s = {"too-few-rows": (codes[:8].view(1, 8), scales[:1]),
            "too-narrow": (codes[:16].view(4, 4), scales[:4]),
            "scales-too-short": (codes[:32].view(4, 8), scales[:2]),
            "codes-int16": (codes[:32].view(4, 8), scales[:4]),
            "codes-strided": (codes[:64].view(4, 16)[:, ::2], scales[:4]),
            "scales-fp16": (codes[:32].view(4, 8), scales[:4]),
            "scales-strided": (codes[:32].view(4, 8), scales[:8:2])}[case]
    with pytest.raises(ValueError, match="out must be"):
        if name == "quantize_rows":
            quantize_rows(x, out=(q, s))
        else:
            layer_norm_quant(x, torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE),
                             1e-6, out=(q, s))
    assert (codes == 7).all() and (scales == 7).all()


@pytest.mark.parametrize("op", ["quantize_rows", "layer_norm_quantize"])
def test_auto_takes_torch_for_rows_wider_than_the_kernels_take(op, monkeypatch):
    """"auto" means the kernel on CUDA for rows of up to MAX_ROW features, torch for wider
    ones (the kernels raise for those). CUDA is stood in for by patching `Tensor.is_cuda`,
    and the kernels by a stub that only reports being chosen (the interpreter is no CUDA
    device); the torch result is computed for real."""
    import fastsam_core.kernels.layer_norm_quant as layer_norm_kernel
    import fastsam_core.kernels.quantize_rows as rows_kernel

    class KernelChosen(Exception):
        pass

    def chosen(*args, **kwargs):
        raise KernelChosen

    monkeypatch.setattr(rows_kernel, "quantize_rows", chosen)
    monkeypatch.setattr(layer_norm_kernel, "layer_norm_quant", chosen)
    gen = torch.Generator().manual_seed(0)
    wide, widest = (torch.randn(2, k, generator=gen) for k in (MAX_ROW + 1, MAX_ROW))

    def run(x, backend):
        if op == "quantize_rows":
            return quant.quantize_rows(x, backend)
        k = x.shape[-1]
        return quant.layer_norm_quantize(x, torch.ones(k), torch.zeros(k), 1e-6, backend)

    expected = run(wide, "torch")
    with monkeypatch.context() as on_cuda:
        on_cuda.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        got = run(wide, "auto")
        with pytest.raises(KernelChosen):
            run(widest, "auto")
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.cuda
@pytest.mark.parametrize("k", [3072, 5120])
def test_bf16_real_widths(k):
    """The MLPs' hidden widths (vit_b, vit_h) in bf16."""
    assert_exact(rows_of((64, k), torch.bfloat16))
