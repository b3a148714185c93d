"""The int8 matmul kernel with the fused rescale and bias, against its plain-torch reference:
on the CPU through TRITON_INTERPRET=1 (root conftest), on the GPU compiled (tests marked
`cuda`)."""

from __future__ import annotations

import pytest
import torch

from fastsam_core.kernels.int8_matmul import int8_matmul, int8_matmul_ref
from fastsam_core.ops import quant
from fastsam_core.ops.quant import int8_linear, quantize_per_row
from tests import tolerances as tol
from tests.parity import assert_close_fp32

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def codes(n, m, k, seed=0, bias=True):
    """x_q N x K, x_scale N x 1, w_q M x K, w_scale M, bias M (or None), from float data."""
    gen = torch.Generator().manual_seed(seed)
    x_q, x_scale = quantize_per_row(torch.randn(n, k, generator=gen))
    w_q, w_scale = quantize_per_row(torch.randn(m, k, generator=gen) * 0.05)
    b = torch.randn(m, generator=gen) if bias else None
    return [None if t is None else t.to(DEVICE) for t in (x_q, x_scale, w_q, w_scale[:, 0], b)]


@pytest.mark.parametrize("n, m, k", [(32, 32, 32), (37, 50, 29), (70, 16, 96)],
                         ids=["one-tile", "ragged", "k-loop"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_exactly_in_fp32(n, m, k, bias):
    """Integer sums are exact on both sides and the epilogue computes in the same order."""
    x_q, x_scale, w_q, w_scale, b = codes(n, m, k, bias=bias)
    out = torch.full((n, m), float("nan"), device=DEVICE)  # unwritten elements stay NaN
    got = int8_matmul(x_q, x_scale, w_q, w_scale, b, torch.float32, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, int8_matmul_ref(x_q, x_scale, w_q, w_scale, b, torch.float32))


def test_fp16_output_is_the_rounded_fp32_result():
    x_q, x_scale, w_q, w_scale, b = codes(40, 24, 64)
    got = int8_matmul(x_q, x_scale, w_q, w_scale, b, torch.float16)
    expected = int8_matmul_ref(x_q, x_scale, w_q, w_scale, b, torch.float32).half()
    assert got.dtype == torch.float16 and torch.equal(got, expected)


def test_gelu_epilogue():
    """activation="gelu": the exact GELU of the fp32 result (the kernel's erf and torch's may
    differ in the last fp32 bits only), rounded once to the output dtype; the op layer
    applies it the same way on every backend."""
    x_q, x_scale, w_q, w_scale, b = codes(37, 50, 64)
    out = torch.full((37, 50), float("nan"), device=DEVICE)
    got = int8_matmul(x_q, x_scale, w_q, w_scale, b, torch.float32, out=out, activation="gelu")
    exact = torch.nn.functional.gelu(
        int8_matmul_ref(x_q, x_scale, w_q, w_scale, b, torch.float64)).float()
    assert torch.isfinite(got).all() and (got < 0).any()  # GELU's negative lobe is there
    assert_close_fp32(got, exact, tol.FP32_OP_REL_L2)
    half = int8_matmul(x_q, x_scale, w_q, w_scale, b, torch.float16, activation="gelu")
    assert torch.equal(half, got.half())
    ref = int8_matmul_ref(x_q, x_scale, w_q, w_scale, b, torch.float32, "gelu")
    assert_close_fp32(ref, exact, tol.FP32_OP_REL_L2)
    with pytest.raises(ValueError, match="activation"):
        int8_matmul(x_q, x_scale, w_q, w_scale, b, torch.float32, activation="relu")


def test_gelu_epilogue_to_a_few_fp32_roundings():
    """The epilogue's GELU is the exact one of the fp32 result (the reference's, bit for bit)
    to a few fp32 roundings, element by element (a truncated 1/sqrt(2) stayed within the
    L2 bound above); above -1, where 1 + erf does not cancel."""
    x_q, x_scale, w_q, w_scale, b = codes(37, 50, 64)
    got = int8_matmul(x_q, x_scale, w_q, w_scale, b, torch.float32, activation="gelu")
    pre = int8_matmul_ref(x_q, x_scale, w_q, w_scale, b, torch.float32).double()
    exact = torch.nn.functional.gelu(pre)
    kept = pre > -1
    assert kept.sum() > kept.numel() // 2
    err = (got.double() - exact).abs()[kept]
    assert (err <= tol.FP32_ROUNDING_REL * exact.abs()[kept]).all()


def test_strided_codes_and_the_linear_op():
    """Non-contiguous operands (a transposed view of the weight codes), and the op layer:
    int8_linear with backend "triton" equals the "dequant" backend."""
    x_q, x_scale, w_q, w_scale, b = codes(33, 40, 48)
    w_t = w_q.t().contiguous().t()  # same values, column-major strides
    got = int8_matmul(x_q, x_scale, w_t, w_scale, b, torch.float32)
    assert torch.equal(got, int8_matmul_ref(x_q, x_scale, w_q, w_scale, b, torch.float32))
    x = torch.randn(3, 11, 48, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert torch.equal(int8_linear(x, w_q, w_scale, b, "triton"),
                       int8_linear(x, w_q, w_scale, b, "dequant"))


def test_bad_arguments():
    x_q, x_scale, w_q, w_scale, b = codes(16, 16, 32)
    with pytest.raises(ValueError, match="share K"):
        int8_matmul(x_q, x_scale, w_q[:, :16], w_scale, b, torch.float32)
    with pytest.raises(TypeError, match="x_q and weight_q must be int8"):
        int8_matmul(x_q.float(), x_scale, w_q, w_scale, b, torch.float32)


def matmul(backend, *args):
    """`ops.quant.int8_matmul` with `backend`, or "kernel": the kernel called directly."""
    if backend == "kernel":
        return int8_matmul(*args)
    return quant.int8_matmul(*args, backend)


@pytest.mark.parametrize("backend", ["dequant", "triton", "kernel"])
def test_scales_of_either_shape_and_bad_lengths(backend):
    """x_scale N or N x 1, weight_scale M or M x 1 (as quantize_per_row returns it) give the
    same product, also where N == M (an M x 1 weight scale broadcast as a column scaled
    rows); a scale or bias of another length raises naming it (the kernel read past their
    end, "dequant" broadcast a length-1 bias)."""
    x_q, x_scale, w_q, w_scale, b = codes(24, 24, 32)
    expected = int8_matmul_ref(x_q, x_scale, w_q, w_scale, b, torch.float32)
    for xs, ws in ((x_scale[:, 0], w_scale), (x_scale, w_scale[:, None]),
                   (x_scale[:, 0], w_scale[:, None])):
        assert torch.equal(matmul(backend, x_q, xs, w_q, ws, b, torch.float32), expected)
    bad = {"x_scale": (x_scale[:-1], w_scale, b), "weight_scale": (x_scale, w_scale[:-1], b),
           "bias": (x_scale, w_scale, b[:1])}
    for name, (xs, ws, bias) in bad.items():
        with pytest.raises(ValueError, match=f"{name} must have shape"):
            matmul(backend, x_q, xs, w_q, ws, bias, torch.float32)
    if backend == "dequant":  # the linear op, given the weight's scales as M x 1
        x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        assert torch.equal(int8_linear(x, w_q, w_scale[:, None], b),
                           int8_linear(x, w_q, w_scale, b))


@pytest.mark.parametrize("shape, dtype", [((2, 2), torch.float32), ((4, 5), torch.float32),
                                          ((4, 4), torch.float16)],
                         ids=["too-small", "too-wide", "fp16-for-fp32"])
def test_bad_out_buffers_raise_before_any_write(shape, dtype):
    """An `out` that is not N x M in the output dtype raises naming it, and nothing is
    written (it is a view into a larger buffer that must stay untouched)."""
    x_q, x_scale, w_q, w_scale, b = codes(4, 4, 16)
    buffer = torch.full((64,), -1.0, dtype=dtype, device=DEVICE)
    out = buffer[: shape[0] * shape[1]].view(shape)
    with pytest.raises(ValueError, match="out must be 4 x 4"):
        int8_matmul(x_q, x_scale, w_q, w_scale, b, torch.float32, out=out)
    assert (buffer == -1).all()


@pytest.mark.cuda
@pytest.mark.parametrize("k, m", [(768, 3072), (1280, 5120)])
def test_bf16_real_widths(k, m):
    """vit_b / vit_h fc1 at 1024 tokens: the bf16 output is the fp32 reference rounded once
    (the int32 sums are exact; the reference's fp32 sums are too, far below 2^24 here)."""
    x_q, x_scale, w_q, w_scale, b = codes(1024, m, k)
    got = int8_matmul(x_q, x_scale, w_q, w_scale, b, torch.bfloat16)
    expected = int8_matmul_ref(x_q, x_scale, w_q, w_scale, b, torch.float32)
    torch.testing.assert_close(got.float(), expected, rtol=tol.BF16_ROUNDING_REL, atol=0)


def test_backend_chosen_by_measurement_and_kept(tmp_path, monkeypatch):
    """ops.quant.int8_backend: both backends run on the real codes, the faster one matching
    the fp32 reference wins, and the choice is kept (no second measurement). Fake timings
    (the real ones need a GPU), CPU tensors (torch._int_mm runs there too)."""
    from fastsam_core.kernels.tuning import Tuner
    from fastsam_core.ops.quant import int8_backend

    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTSAM_DISABLE_TRITON", raising=False)
    timed = []
    fake_ms = {"int_mm": 2.0, "triton": 1.0}

    def timer(run):
        timed.append(run.args[-1])  # partial(int8_matmul, ..., backend)
        return fake_ms[run.args[-1]]

    tuner = Tuner("int8_matmul_test", timer=timer)
    args = codes(48, 32, 64)[:4] + [None, torch.float32]
    assert int8_backend(*args, tuner=tuner) == "triton"
    assert sorted(timed) == ["int_mm", "triton"]
    assert int8_backend(*args, tuner=tuner) == "triton" and len(timed) == 2  # kept
    assert tuner.cache_entries() == 1  # recorded in the per-user cache
    fake_ms["triton"] = 3.0
    other = codes(48, 40, 64)[:4] + [None, torch.float32]  # another shape: measured anew
    assert int8_backend(*other, tuner=tuner) == "int_mm"


def test_backend_never_picks_a_wrong_kernel(tmp_path, monkeypatch):
    """A backend whose output does not match the reference is not a candidate, however fast."""
    import fastsam_core.kernels.int8_matmul as kernel
    from fastsam_core.kernels.tuning import Tuner
    from fastsam_core.ops.quant import int8_backend

    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTSAM_DISABLE_TRITON", raising=False)
    monkeypatch.setattr(kernel, "int8_matmul",
                        lambda *a, **k: torch.zeros(48, 32, device=DEVICE))
    tuner = Tuner("int8_matmul_test", timer=lambda run: {"int_mm": 2.0, "triton": 1.0}[
        run.args[-1]])
    assert int8_backend(*codes(48, 32, 64)[:4], None, torch.float32, tuner=tuner) == "int_mm"
    monkeypatch.setenv("FASTSAM_DISABLE_TRITON", "1")
    assert int8_backend(*codes(48, 24, 64)[:4], None, torch.float32, tuner=tuner) == "int_mm"


def test_tile_chosen_by_measurement_among_those_matching(tmp_path, monkeypatch):
    """ops.quant.int8_tile: every candidate tile runs on the real codes (in the interpreter
    here, tuned for a named test GPU), one returning a wrong result is never chosen however
    fast, the fastest of the rest is kept; off CUDA nothing is tuned (the kernel's default)."""
    import fastsam_core.kernels.int8_matmul as kernel
    from fastsam_core.kernels.tuning import Tuner
    from fastsam_core.ops.quant import int8_tile

    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
    tiles = kernel.TILE_CANDIDATES
    real = kernel.int8_matmul

    def second_tile_wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.zero_() if args[6] == tiles[1] else out

    monkeypatch.setattr(kernel, "int8_matmul", second_tile_wrong)
    fake_ms = dict(zip(tiles, (3.0, 0.5, 1.0, 2.0)))
    tuner = Tuner("int8_matmul_test", timer=lambda run: fake_ms[run.args[-1]])
    args = codes(40, 24, 48)
    # off CUDA nothing is tuned; on a GPU its own measurement (of the fake timings) picks
    first = int8_tile(*args, torch.float32, "gelu", tuner=tuner)
    assert first == (None if DEVICE == "cpu" else tiles[2])
    chosen = int8_tile(*args, torch.float32, "gelu", tuner=tuner, device="test-gpu")
    assert chosen == tiles[2]
    assert sorted(tuner.last_measurements) == sorted(t.as_key() for t in (tiles[0], *tiles[2:]))
    monkeypatch.setattr(kernel, "int8_matmul", lambda *a, **k: 1 / 0)  # kept: not run again
    assert int8_tile(*args, torch.float32, "gelu", tuner=tuner, device="test-gpu") == tiles[2]


@pytest.mark.parametrize("backend", ["dequant", "int_mm", "triton"])
def test_an_unknown_activation_raises_on_every_backend(backend):
    """The op layer checks `activation` whichever backend computes the product (an epilogue
    that skipped one it did not know returned the product without any activation)."""
    x_q, x_scale, w_q, w_scale, b = codes(32, 24, 32)
    with pytest.raises(ValueError, match="activation must be one of"):
        quant.int8_matmul(x_q, x_scale, w_q, w_scale, b, torch.float32, backend, "relu")


@pytest.mark.parametrize("backend", ["dequant", "triton", "kernel"])
def test_a_length_one_scale_is_not_broadcast(backend):
    """One scale for every token or every channel is not a per-token or per-channel scale: it
    raises naming it, as a bias of length 1 does ("dequant" broadcast it, the kernel read
    past its end)."""
    x_q, x_scale, w_q, w_scale, b = codes(24, 16, 32)
    bad = {"x_scale": (x_scale[:1, 0], w_scale), "weight_scale": (x_scale, w_scale[:1])}
    for name, (xs, ws) in bad.items():
        with pytest.raises(ValueError, match=f"{name} must have shape"):
            matmul(backend, x_q, xs, w_q, ws, b, torch.float32)


def test_backend_choices_are_kept_per_k_and_token_bucket(tmp_path, monkeypatch):
    """A measured backend stands for one K (and M) and for the token counts up to the next
    power of two: 33 to 64 tokens share one choice, 65 tokens or another K are measured
    anew. Fake timings."""
    from fastsam_core.kernels.tuning import Tuner

    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTSAM_DISABLE_TRITON", raising=False)
    timed = []
    tuner = Tuner("int8_matmul_test", timer=lambda run: timed.append(run.args[-1]) or 1.0)

    def measured(n, m, k):
        before = len(timed)
        quant.int8_backend(*codes(n, m, k)[:4], None, torch.float32, tuner=tuner)
        return len(timed) > before

    assert measured(48, 32, 64)
    assert not measured(64, 32, 64) and not measured(33, 32, 64)
    assert measured(65, 32, 64)
    assert measured(48, 32, 96)


def test_tile_choices_are_kept_per_activation(tmp_path, monkeypatch):
    """The tile measured for the plain product is not taken unmeasured for the one with the
    GELU epilogue, nor the reverse; a second call with either is not measured again. Fake
    timings, tuned for a named test GPU."""
    import fastsam_core.kernels.int8_matmul as kernel
    from fastsam_core.kernels.tuning import Tuner

    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
    timed = []
    tuner = Tuner("int8_matmul_test", timer=lambda run: timed.append(run.args[-1]) or 1.0)
    args = codes(40, 24, 48)
    quant.int8_tile(*args, torch.float32, None, tuner=tuner, device="test-gpu")
    assert sorted(map(str, timed)) == sorted(map(str, kernel.TILE_CANDIDATES))
    quant.int8_tile(*args, torch.float32, "gelu", tuner=tuner, device="test-gpu")
    assert len(timed) == 2 * len(kernel.TILE_CANDIDATES)
    for activation in (None, "gelu"):  # both kept
        quant.int8_tile(*args, torch.float32, activation, tuner=tuner, device="test-gpu")
    assert len(timed) == 2 * len(kernel.TILE_CANDIDATES)
