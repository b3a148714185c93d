"""fastsam_core.ops.attention against segment_anything's attention math."""

from __future__ import annotations

import warnings

import pytest
import torch
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos, get_rel_pos

from fastsam_core.ops import attention as ops
from fastsam_core.ops.attention import choose_backend, rel_pos_attention, rel_pos_index
from tests import tolerances as tol
from tests.parity import assert_close_fp32, assert_lowp_parity

GRIDS = [(4, 4), (6, 5), (7, 7), (14, 14)]
# CUDA where present: on a GPU host the interpreter is off, and CPU tensors never take the
# kernel (bench/run_gpu.sh runs this file there, `-m "not cuda"`)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(batch, heads, grid, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen) for _ in range(3))
    table_h = torch.randn(2 * grid[0] - 1, dim, generator=gen) * 0.5
    table_w = torch.randn(2 * grid[1] - 1, dim, generator=gen) * 0.5
    return [t.to(DEVICE) for t in (q, k, v, table_h, table_w)]


def reference(q, k, v, table_h, table_w, grid, scale):
    """segment_anything's Attention.forward core, in the dtype of its inputs."""
    b, heads, n, d = q.shape
    q, k, v = (t.reshape(b * heads, n, d) for t in (q, k, v))
    attn = (q * scale) @ k.transpose(-2, -1)
    if table_h is not None:
        attn = add_decomposed_rel_pos(attn, q, table_h, table_w, grid, grid)
    return (attn.softmax(dim=-1) @ v).view(b, heads, n, d)


def fast(q, k, v, table_h, table_w, grid, scale, backend):
    pos_h = table_h[rel_pos_index(grid[0])]
    pos_w = table_w[rel_pos_index(grid[1])]
    return rel_pos_attention(q, k, v, pos_h, pos_w, grid, scale, backend)


@pytest.mark.parametrize("size", [1, 4, 7, 14, 64])
def test_rel_pos_index_gathers_what_get_rel_pos_returns(size):
    table = torch.randn(2 * size - 1, 8)
    assert torch.equal(table[rel_pos_index(size)], get_rel_pos(size, size, table))


@pytest.mark.parametrize("backend", ["triton", "sdpa", "math"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("batch, heads, dim", [(1, 2, 16), (3, 3, 32), (2, 1, 80)])
def test_fp32(backend, grid, batch, heads, dim, kernel_launches):
    q, k, v, th, tw = inputs(batch, heads, grid, dim)
    scale = dim**-0.5
    out = fast(q, k, v, th, tw, grid, scale, backend)
    assert_close_fp32(out, reference(q, k, v, th, tw, grid, scale), tol.FP32_OP_REL_L2)
    assert kernel_launches == ([tuple(q.shape)] if backend == "triton" else [])


@pytest.mark.parametrize("backend", ["triton", "sdpa", "math"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", [(6, 5), (14, 14)])
def test_low_precision(backend, dtype, grid, kernel_launches):
    q, k, v, th, tw = inputs(2, 2, grid, 32)
    scale = 32**-0.5
    low = [t.to(dtype) for t in (q, k, v, th, tw)]
    out = fast(*low, grid, scale, backend)
    assert out.dtype == dtype
    assert kernel_launches == ([tuple(q.shape)] if backend == "triton" else [])
    naive = reference(*low, grid, scale)
    exact = reference(*(t.double() for t in (q, k, v, th, tw)), grid, scale)
    assert_lowp_parity(out, naive, exact)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "math"])
def test_under_autocast_the_bias_terms_are_handed_on_in_qs_dtype(backend, kernel_launches):
    """fp32 q under autocast: the bias einsums return bf16 terms, which reach the backend in
    q's dtype (the kernel refuses others), and the result is as good as the reference's
    under the same autocast."""
    grid, scale = (6, 5), 32**-0.5
    q, k, v, th, tw = inputs(2, 2, grid, 32)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        out = fast(q, k, v, th, tw, grid, scale, backend)
        naive = reference(q, k, v, th, tw, grid, scale)
    assert kernel_launches == ([tuple(q.shape)] if backend == "triton" else [])
    exact = reference(*(t.double() for t in (q, k, v, th, tw)), grid, scale)
    assert_lowp_parity(out, naive, exact)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "math"])
def test_without_bias(backend):
    q, k, v, _, _ = inputs(2, 2, (5, 5), 16)
    out = rel_pos_attention(q, k, v, None, None, (5, 5), 0.25, backend)
    assert_close_fp32(out, reference(q, k, v, None, None, (5, 5), 0.25), tol.FP32_OP_REL_L2)


def test_bias_changes_the_result():
    q, k, v, th, tw = inputs(1, 2, (6, 5), 16)
    with_bias = fast(q, k, v, th, tw, (6, 5), 0.25, "sdpa")
    without = rel_pos_attention(q, k, v, None, None, (6, 5), 0.25, "sdpa")
    assert (with_bias - without).norm() / without.norm() > 0.1


@pytest.mark.parametrize("backend", ["triton", "sdpa", "math"])
@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_a_scale_other_than_the_head_dims_default(backend, scale, kernel_launches):
    """`scale` is the caller's on every backend, with and without the bias, not SDPA's
    default 1 / sqrt(d) (which the scale of the other tests equals)."""
    grid = (6, 5)
    q, k, v, th, tw = inputs(2, 2, grid, 16)
    assert scale != 16**-0.5
    out = fast(q, k, v, th, tw, grid, scale, backend)
    assert_close_fp32(out, reference(q, k, v, th, tw, grid, scale), tol.FP32_OP_REL_L2)
    out = rel_pos_attention(q, k, v, None, None, grid, scale, backend)
    assert_close_fp32(out, reference(q, k, v, None, None, grid, scale), tol.FP32_OP_REL_L2)
    assert kernel_launches == ([tuple(q.shape)] * 2 if backend == "triton" else [])


@pytest.mark.parametrize("backend, sdpa_allowed", [("auto", True), ("triton", False)])
def test_only_auto_lets_the_measurement_choose_sdpa(backend, sdpa_allowed, monkeypatch):
    """The custom op as it runs on a GPU (no interpreter): "auto" measures SDPA against the
    launch configurations, "triton" the launch configurations only; where the measurement
    picks SDPA (faked here) the op returns the attention with the caller's scale."""
    measured = []

    def tuned_config(q, k, v, rel_h, rel_w, key_grid_w, scale, sdpa_allowed):
        measured.append((key_grid_w, scale, sdpa_allowed))
        return None  # SDPA

    monkeypatch.setattr(ops.kernel, "INTERPRETER", False)
    monkeypatch.setattr(ops, "kernel_unsupported", lambda *args: None)  # as on a GPU
    monkeypatch.setattr(ops, "tuned_config", tuned_config)
    grid, scale = (6, 5), 0.4
    q, k, v, th, tw = inputs(1, 2, grid, 16)
    out = fast(q, k, v, th, tw, grid, scale, backend)
    assert measured == [(5, scale, sdpa_allowed)]
    assert_close_fp32(out, reference(q, k, v, th, tw, grid, scale), tol.FP32_OP_REL_L2)


def test_auto_resolves_to_sdpa_on_any_device_but_cuda():
    """The kernel runs on CUDA only: "auto" for a model on the CPU, Apple's mps or meta
    resolves to SDPA, saying why."""
    for device in ("cpu", "mps", "meta"):
        backend, reason = choose_backend("auto", torch.device(device))
        assert backend == "sdpa" and "no CUDA device" in reason, (device, reason)


def test_unknown_backend_raises():
    q, k, v, th, tw = inputs(1, 1, (4, 4), 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        fast(q, k, v, th, tw, (4, 4), 0.25, "flash")
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="attention must be"):
        choose_backend("flash", cpu)
    assert choose_backend("auto", cpu)[0] == "sdpa" and choose_backend("math", cpu)[0] == "math"
    assert choose_backend("auto", torch.device("cuda"))[0] == "auto"


def args_of(case):
    """q, k, v, pos_h, pos_w, grid (4 x 4, d 12) with one argument made wrong by `case`."""
    q, k, v, th, tw = inputs(1, 2, (4, 4), 12)
    args = dict(q=q, k=k, v=v, pos_h=th[rel_pos_index(4)], pos_w=tw[rel_pos_index(4)],
                grid=(4, 4))
    case(args)
    return args


# Inputs that no backend computes: each raises naming the argument, whichever the backend
# (the kernel used to read them out of bounds or misread them, SDPA and math raised torch's
# own errors, or computed with the tables' dtype).
BAD_INPUTS = {
    "q-3d": (ValueError, "q must be B x heads x N x d", lambda a: a.update(q=a["q"][0])),
    "int-qkv": (TypeError, "q must be floating point",
                lambda a: a.update({n: (a[n] * 4).int() for n in "qkv"})),
    "k-fp16": (TypeError, "q, k and v must have one dtype", lambda a: a.update(k=a["k"].half())),
    "v-fp16": (TypeError, "q, k and v must have one dtype", lambda a: a.update(v=a["v"].half())),
    "k-on-meta": (ValueError, "q, k and v must be on one device",
                  lambda a: a.update(k=a["k"].to("meta"))),
    "k-head-dim": (ValueError, "k must have q's head dim",
                   lambda a: a.update(k=a["k"][..., :8])),
    "k-tokens-with-bias": (ValueError, "k must have q's 16 tokens",
                           lambda a: a.update(k=a["k"].repeat(1, 1, 2, 1),
                                              v=a["v"].repeat(1, 1, 2, 1))),
    "v-tokens": (ValueError, "v must have k's 16 tokens",
                 lambda a: a.update(v=a["v"][:, :, :8])),
    "grid": (ValueError, r"grid \(4, 5\) has 20 cells", lambda a: a.update(grid=(4, 5))),
    "pos_w-shape": (ValueError, "pos_w must be 4 x 4 x 12",
                    lambda a: a.update(pos_w=a["pos_w"][:, :3])),
    "pos_w-missing": (ValueError, "pos_h and pos_w must both", lambda a: a.update(pos_w=None)),
    "pos_h-dtype": (TypeError, "pos_h must have q's dtype",
                    lambda a: a.update(pos_h=a["pos_h"].half())),
    "pos_w-device": (ValueError, "pos_w must be on q's device",
                     lambda a: a.update(pos_w=a["pos_w"].to("meta"))),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_inputs_no_backend_computes_raise_naming_the_argument(case):
    error, match, make_bad = BAD_INPUTS[case]
    for backend in ("triton", "auto", "sdpa", "math"):
        args = args_of(make_bad)
        with pytest.raises(error, match=match):
            rel_pos_attention(**args, scale=0.25, backend=backend)


# Inputs SDPA computes but the kernel does not take (another number of keys, a wider v, k
# and v broadcast over q's batch; no bias), sliced from 2 x 2 x 32 x 20 ones: "triton" falls
# back to SDPA with a warning, "auto" silently, and the result is the attention of these.
KERNEL_UNSUPPORTED = {
    "32-keys": lambda q, k, v: (q[:1, :, :16, :12], k[:1, ..., :12], v[:1, ..., :12]),
    "8-keys": lambda q, k, v: (q[:1, :, :16, :12], k[:1, :, :8, :12], v[:1, :, :8, :12]),
    "v-width-20": lambda q, k, v: (q[:1, :, :16, :12], k[:1, :, :16, :12], v[:1, :, :16]),
    "kv-batch-1": lambda q, k, v: (q[:, :, :16, :12], k[:1, :, :16, :12], v[:1, :, :16, :12]),
}


@pytest.mark.parametrize("case", KERNEL_UNSUPPORTED)
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_inputs_only_sdpa_takes_fall_back_to_it(case, backend, monkeypatch, kernel_launches):
    monkeypatch.setattr(ops, "KERNEL_FALLBACKS", {})  # each reason warns once per process
    q, k, v = KERNEL_UNSUPPORTED[case](*inputs(2, 2, (4, 8), 20)[:3])
    scale = 12**-0.5
    exact = ((q.double() @ k.double().transpose(-2, -1)) * scale).softmax(-1) @ v.double()
    if backend == "triton":
        with pytest.warns(UserWarning, match="Triton attention unavailable"):
            out = rel_pos_attention(q, k, v, None, None, (4, 4), scale, backend)
    else:  # silently: no warning, and no fallback counted
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = rel_pos_attention(q, k, v, None, None, (4, 4), scale, backend)
        assert ops.KERNEL_FALLBACKS == {}
    assert_close_fp32(out, exact.float(), tol.FP32_OP_REL_L2)
    assert kernel_launches == []


def test_a_fallback_reason_warns_once_and_counts_every_call(monkeypatch, kernel_launches):
    """"triton" on inputs the kernel does not take: one warning per reason in a process, however
    many calls fall back for it (`KERNEL_FALLBACKS` counts them all); another reason warns
    again."""
    monkeypatch.setattr(ops, "KERNEL_FALLBACKS", {})
    q, k, v = inputs(2, 2, (4, 8), 20)[:3]
    cases = ["8-keys"] * 3 + ["v-width-20"] * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for case in cases:
            rel_pos_attention(*KERNEL_UNSUPPORTED[case](q, k, v), None, None, (4, 4), 0.25,
                              "triton")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all("Triton attention unavailable" in m for m in messages)
    assert sorted(ops.KERNEL_FALLBACKS.values()) == [2, 3]
    assert kernel_launches == []


@pytest.mark.parametrize("batch, grid, dim", [(1, (3, 0), 8), (1, (2, 3), 0), (0, (2, 3), 8)],
                         ids=["grid-width-0", "head-dim-0", "batch-0"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_empty_inputs_return_empty_without_a_launch(batch, grid, dim, backend, monkeypatch,
                                                    kernel_launches):
    """Nothing to compute: the empty result SDPA gives, no launch and no fallback (the kernel
    path divided by the grid width, split a head dim of 0, tuned for batch 0 on CUDA)."""
    monkeypatch.setattr(ops, "KERNEL_FALLBACKS", {})
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(batch, 2, n, dim, device=DEVICE) for _ in range(3))
    pos_h = torch.randn(max(2 * grid[0] - 1, 0), dim, device=DEVICE)[rel_pos_index(grid[0])]
    pos_w = torch.randn(max(2 * grid[1] - 1, 0), dim, device=DEVICE)[rel_pos_index(grid[1])]
    for bias in ((pos_h, pos_w), (None, None)):
        out = rel_pos_attention(q, k, v, *bias, grid, 1.0, backend)
        expected = rel_pos_attention(q, k, v, *bias, grid, 1.0, "sdpa")
        assert out.shape == expected.shape == q.shape and out.dtype == q.dtype
    assert kernel_launches == [] and ops.KERNEL_FALLBACKS == {}


@pytest.mark.parametrize("trained", ["qkv", "tables"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_autograd_takes_sdpa_and_gets_its_gradients(backend, trained, monkeypatch,
                                                   kernel_launches):
    """The kernel has no backward: while autograd records (q, k, v or the rel-pos tables
    requiring grad), "triton" falls back to SDPA with a warning ("auto" silently), and the
    gradients are SDPA's; under no_grad the same inputs take the kernel."""
    monkeypatch.setattr(ops, "KERNEL_FALLBACKS", {})
    grid, scale = (4, 4), 0.25
    upstream = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = {}
    for name in ("sdpa", backend):
        q, k, v, th, tw = inputs(1, 2, grid, 16)
        leaves = (q, k, v) if trained == "qkv" else (th, tw)
        for t in leaves:
            t.requires_grad_(True)
        if name == "triton":
            with pytest.warns(UserWarning, match="autograd"):
                out = fast(q, k, v, th, tw, grid, scale, name)
        else:
            out = fast(q, k, v, th, tw, grid, scale, name)
        out.backward(upstream)
        grads[name] = [t.grad for t in leaves]
    for got, expected in zip(grads[backend], grads["sdpa"], strict=True):
        assert_close_fp32(got, expected, tol.FP32_OP_REL_L2)
    assert kernel_launches == []
    with torch.no_grad():
        fast(q, k, v, th, tw, grid, scale, backend)
    assert kernel_launches == [tuple(q.shape)]
