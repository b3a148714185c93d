"""The fused rel-pos attention kernel: on the CPU through TRITON_INTERPRET=1 (root conftest),
on the GPU compiled (tests marked `cuda`)."""

from __future__ import annotations

import json
import types

import pytest
import torch

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.kernels import rel_pos_attention as kernel
from fastsam_core.kernels.tuning import Tuner
from fastsam_core.ops import attention as ops
from tests import tolerances as tol
from tests.conftest import image_batch, small_sam
from tests.parity import assert_close_fp32, assert_lowp_parity, in_dtype

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = kernel.INTERPRETER_CONFIG if kernel.INTERPRETER else kernel.LaunchConfig()


def problem(batch, heads, grid, dim, dtype, seed=0):
    """q, k, v (B x heads x N x d) and the bias terms rel_h / rel_w (B x heads x N x kh/kw)."""
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen) for _ in range(3))
    rel_h = torch.randn(batch, heads, n, grid[0], generator=gen)
    rel_w = torch.randn(batch, heads, n, grid[1], generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v, rel_h, rel_w)]


def launch(q, k, v, rel_h, rel_w, grid, poison=True):
    out = kernel.empty_output(q)
    if poison:  # every element must be written: NaN anywhere unwritten fails the comparison
        out.fill_(float("nan"))
    return kernel.rel_pos_attention_fwd(q, k, v, rel_h, rel_w, grid[1], q.shape[-1] ** -0.5,
                                        CONFIG, out=out)


def reference(q, k, v, rel_h, rel_w, grid):
    return kernel.rel_pos_attention_ref(q, k, v, rel_h, rel_w, grid[1], q.shape[-1] ** -0.5)


def assert_matches_reference(out, q, k, v, rel_h, rel_w, grid):
    """fp32: within the per-op bound of the fp32 reference; low precision: the numerics
    policy against a float64 reference and the naive reference in q's dtype."""
    if q.dtype == torch.float32:
        assert_close_fp32(out, reference(q, k, v, rel_h, rel_w, grid), tol.FP32_OP_REL_L2)
    else:
        naive = reference(q, k, v, rel_h, rel_w, grid)
        exact = reference(*(t.double() for t in (q, k, v, rel_h, rel_w)), grid)
        assert_lowp_parity(out, naive, exact)


# Windows 4x4, 6x5 and 7x7 (30 and 49 tokens: not multiples of the 32-token tiles), a 14x14
# window, head dims 16, 64 and 80 (vit_h: 64 + 16 columns), batch 1 and 3; the interpreter's
# 32-key tiles take the one-hot bias on all of these.
SHAPES = [
    (1, 2, (4, 4), 16),
    (3, 2, (6, 5), 16),
    (1, 3, (7, 7), 64),
    (3, 1, (7, 7), 80),
    (1, 2, (14, 14), 80),
    (2, 1, (5, 9), 32),
]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("batch, heads, grid, dim", SHAPES)
def test_fp32(batch, heads, grid, dim, with_bias):
    q, k, v, rh, rw = problem(batch, heads, grid, dim, torch.float32)
    if not with_bias:
        rh = rw = None
    out = launch(q, k, v, rh, rw, grid)
    assert_close_fp32(out, reference(q, k, v, rh, rw, grid), tol.FP32_OP_REL_L2)


@pytest.mark.parametrize("batch, heads, grid, dim", SHAPES)
def test_fp16(batch, heads, grid, dim):
    q, k, v, rh, rw = problem(batch, heads, grid, dim, torch.float16)
    out = launch(q, k, v, rh, rw, grid)
    assert out.dtype == torch.float16
    naive = reference(q, k, v, rh, rw, grid)
    exact = reference(*(t.double() for t in (q, k, v, rh, rw)), grid)
    assert_lowp_parity(out, naive, exact)


@pytest.mark.parametrize("batch, heads, grid, dim", SHAPES[:3])
def test_bf16_with_the_interpreters_upcast(batch, heads, grid, dim):
    """bf16 through UPCAST_DOT in the interpreter (its bf16 tl.dot is wrong); compiled on CUDA."""
    q, k, v, rh, rw = problem(batch, heads, grid, dim, torch.bfloat16)
    out = launch(q, k, v, rh, rw, grid)
    naive = reference(q, k, v, rh, rw, grid)
    exact = reference(*(t.double() for t in (q, k, v, rh, rw)), grid)
    assert_lowp_parity(out, naive, exact)


# Each way of forming the bias (kernels/rel_pos_attention.py), forced, on grids where it
# applies ("row": a block is one key row), with head dims split (80 = 64 + 16, 48 = 32 + 16;
# 72 and 40 leave the second block partly masked) or padded (24 -> 32, 8 -> 16), N not a
# multiple of the query tile (7 x 7, 6 x 5).
MODE_CASES = [
    ("row", (3, 32), 80), ("row", (5, 16), 48), ("row", (7, 16), 24), ("row", (5, 16), 8),
    ("onehot", (7, 7), 80), ("onehot", (6, 5), 24), ("onehot", (3, 32), 48),
    ("onehot", (7, 7), 72), ("onehot", (20, 8), 16),  # more key rows than columns past 16
    ("gather", (7, 7), 48), ("gather", (3, 32), 80), ("gather", (6, 5), 24),
    ("gather", (3, 32), 40),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode, grid, dim", MODE_CASES)
def test_every_bias_mode_and_head_dim_split(mode, grid, dim, dtype):
    block_n = grid[1] if mode == "row" else 32
    config = kernel.LaunchConfig(32, block_n, CONFIG.num_warps, 1, bias=mode)
    assert kernel.bias_mode(config, grid) == mode
    q, k, v, rh, rw = problem(2, 2, grid, dim, dtype)
    # q, k, v as views into one qkv tensor, as the encoder passes them: a read past the head
    # dim picks up the next head's numbers, not zeros
    qkv = torch.stack([q, k, v], dim=2).permute(0, 3, 2, 1, 4).contiguous()  # B x N x 3 x h x d
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = kernel.empty_output(q).fill_(float("nan"))
    kernel.rel_pos_attention_fwd(q, k, v, rh, rw, grid[1], dim**-0.5, config, out=out)
    assert_matches_reference(out, q, k, v, rh, rw, grid)


# A -inf bias term masks its key, in every bias mode: "onehot" forms a block's bias as
# matmuls with one-hot matrices, where -inf times a zero was NaN for the whole query row, and
# a query whose first key block was masked whole subtracted a -inf maximum (NaN). The launches
# are checked to really take their mode (the interpreter's 32-key tiles on windows, forced).
def forced(bias):
    return kernel.LaunchConfig(32, 32, CONFIG.num_warps, 1, bias=bias)


MASK_CASES = {"onehot-9x9": (CONFIG, (9, 9), 16, "onehot"),  # more keys than one block
              "onehot-forced-6x7": (forced("onehot"), (6, 7), 24, "onehot"),
              "row-3x32": (forced("row"), (3, 32), 16, "row"),
              "gather-forced-5x9": (forced("gather"), (5, 9), 16, "gather")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", MASK_CASES)
def test_minus_inf_bias_terms_mask_their_keys(case, dtype):
    config, grid, dim, mode = MASK_CASES[case]
    assert kernel.bias_mode(config, grid) == mode
    q, k, v, rh, rw = problem(2, 2, grid, dim, dtype)
    if dtype == torch.float32:  # below fp16's range: a stand-in must be lower still
        rh[0, 1, 5] = -1e5
    rh[0, 1, 5, 2] = float("-inf")  # query 5 of head 1 does not see key row 2
    rw[1, 0, 3, :2] = float("-inf")  # query 3 of image 1 does not see key columns 0 and 1
    first_block_rows = (config.block_n - 1) // grid[1] + 1
    rh[1, 1, 4, :first_block_rows] = float("-inf")  # nor query 4 of image 1 its first block
    out = kernel.empty_output(q).fill_(float("nan"))
    kernel.rel_pos_attention_fwd(q, k, v, rh, rw, grid[1], dim**-0.5, config, out=out)
    assert torch.isfinite(out).all()
    assert_matches_reference(out, q, k, v, rh, rw, grid)


@pytest.mark.parametrize("case", ["row-3x32", "gather-forced-5x9"])
def test_a_query_with_every_key_masked_is_nan_as_in_softmax(case):
    """(In "onehot" mode such a query gets a finite output: see the kernel's docstring.)"""
    config, grid, dim, _ = MASK_CASES[case]
    q, k, v, rh, rw = problem(1, 1, grid, dim, torch.float32)
    rh[0, 0, 6] = float("-inf")
    out = kernel.empty_output(q)
    kernel.rel_pos_attention_fwd(q, k, v, rh, rw, grid[1], dim**-0.5, config, out=out)
    assert out[0, 0, 6].isnan().all()
    others = torch.arange(q.shape[2]) != 6
    assert_close_fp32(out[0, 0, others], reference(q, k, v, rh, rw, grid)[0, 0, others],
                      tol.FP32_OP_REL_L2)


# Arguments the kernel would read or write out of bounds, or misread: each raises naming it,
# before anything is written (q is 1 x 2 x 16 x 16 on a 4 x 4 grid; `out` is a view into a
# larger buffer that must stay untouched).
BAD_LAUNCHES = {
    "rel_h-narrow": ("rel_h must be", lambda a: a.update(rel_h=a["rel_h"][..., :2])),
    "rel_w-missing": ("rel_h and rel_w must both", lambda a: a.update(rel_w=None)),
    "k-8-tokens": ("k must match q", lambda a: a.update(k=a["k"][:, :, :8])),
    "v-fp16": ("v must match q", lambda a: a.update(v=a["v"].half())),
    "out-4-tokens": ("out must match q", lambda a: a.update(out=a["out"][:, :, :4])),
    "out-fp16": ("out must match q",  # fp16 numbers in the watched buffer's bytes
                 lambda a: a.update(out=a["out"].view(torch.float16)[..., :16])),
    "grid-width-0": ("multiple of the grid width", lambda a: a.update(key_grid_w=0)),
    "k-on-meta": ("k must match q", lambda a: a.update(k=a["k"].to("meta"))),
    "rel_w-on-meta": ("rel_w must be", lambda a: a.update(rel_w=a["rel_w"].to("meta"))),
    # fp16 terms for fp32 q: "onehot" stood fp32's most negative value in for -inf, which is
    # -inf again in fp16, and a masked key made its query NaN
    "rel_h-fp16": ("rel_h must be", lambda a: a.update(rel_h=a["rel_h"].half())),
}


@pytest.mark.parametrize("case", BAD_LAUNCHES)
def test_bad_launch_arguments_raise_before_any_write(case):
    match, make_bad = BAD_LAUNCHES[case]
    q, k, v, rh, rw = problem(1, 2, (4, 4), 16, torch.float32)
    buffer = torch.full((4 * q.numel(),), -1.0, device=DEVICE)
    out = buffer[: q.numel()].view(1, 16, 2, 16).transpose(1, 2)  # empty_output's layout
    args = dict(q=q, k=k, v=v, rel_h=rh, rel_w=rw, key_grid_w=4, out=out)
    make_bad(args)
    with pytest.raises(ValueError, match=match):
        kernel.rel_pos_attention_fwd(scale=0.25, config=CONFIG, **args)
    assert (buffer == -1).all()


def test_bias_mode_and_head_dim_split_rules():
    """What a launch uses when nothing is forced, and what the tuner is offered."""
    vit_global, window = (64, 64), (14, 14)
    assert kernel.bias_mode(kernel.LaunchConfig(128, 64), vit_global) == "row"
    assert kernel.bias_mode(kernel.LaunchConfig(64, 32), vit_global) == "gather"
    assert kernel.bias_mode(kernel.LaunchConfig(64, 32), window) == "onehot"
    assert kernel.bias_mode(kernel.LaunchConfig(64, 64), (32, 32)) == "onehot"
    with pytest.raises(ValueError, match="block_n == grid width"):
        kernel.bias_mode(kernel.LaunchConfig(64, 32, bias="row"), vit_global)
    with pytest.raises(ValueError, match="bias must be"):
        kernel.LaunchConfig(bias="dense")
    q = torch.zeros(1, 1, 30, 16)
    with pytest.raises(ValueError, match="multiple of the grid width"):
        kernel.rel_pos_attention_launch(q, q, q, None, None, 7, 0.25, kernel.LaunchConfig(),
                                        kernel.empty_output(q))
    for grid, tiled in ((vit_global, "row"), (window, "onehot")):  # measured against each other
        modes = {(c.block_m, c.block_n, kernel.bias_mode(c, grid)) for c in ops.CANDIDATES}
        assert {(64, 64, tiled), (64, 64, "gather"), (128, 64, tiled), (128, 64, "gather")} <= modes
    # a 48-wide grid gathers at every tile: the forced-gather candidates are not timed twice
    distinct = ops.distinct_launches((48, 48))
    assert len(distinct) == len({(c.block_m, c.block_n, c.num_warps, c.num_stages)
                                 for c in ops.CANDIDATES}) < len(ops.CANDIDATES)
    assert len(ops.distinct_launches(vit_global)) == len(ops.CANDIDATES)
    fp32 = ops.distinct_launches(vit_global, torch.float32)  # 128 x 128 exceeds shared memory
    assert "m128_n128_w8_s2" not in fp32 and len(fp32) == len(ops.CANDIDATES) - 1
    splits = {d: kernel.head_dim_split(d) for d in (8, 16, 24, 32, 48, 64, 72, 80, 96, 128)}
    assert splits == {8: (16, 0), 16: (16, 0), 24: (32, 0), 32: (32, 0), 48: (32, 16),
                      64: (64, 0), 72: (64, 16), 80: (64, 16), 96: (64, 32), 128: (128, 0)}


def test_a_block_of_one_key_row_takes_the_row_bias_even_on_a_small_grid():
    """"row" comes before "onehot": a 7 x 16 window with 16-key blocks loads rel_w once."""
    assert kernel.bias_mode(kernel.LaunchConfig(64, 16), (7, 16)) == "row"
    assert kernel.bias_mode(kernel.LaunchConfig(64, 32), (7, 16)) == "onehot"


def test_supports_names_the_inputs_the_kernel_does_not_take():
    q = torch.zeros(1, 2, 16, 16, device=DEVICE)
    assert kernel.supports(q, 4) is None and kernel.supports(q, 4, q, q) is None
    assert kernel.supports(torch.zeros(1, 2, 16, 256, device=DEVICE), 4) is None
    assert "head dim 257 > 256" in kernel.supports(torch.zeros(1, 2, 16, 257, device=DEVICE), 4)
    assert "q of shape (0, 2, 16, 16)" in kernel.supports(q[:0], 4)
    assert "k (1, 2, 16, 16) torch.float16 is not q's" in kernel.supports(q, 4, k=q.half())
    assert "v (1, 2, 8, 16) torch.float32 is not q's" in kernel.supports(q, 4, v=q[:, :, :8])
    assert "multiple of the grid width 0" in kernel.supports(q, 0)


def test_strided_inputs_as_the_encoder_passes_them():
    """q, k, v as views into one B x N x 3 x heads x d qkv tensor (not contiguous)."""
    b, n, heads, d, grid = 2, 30, 3, 16, (6, 5)
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, n, 3, heads, d, generator=gen).to(DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    rh = torch.randn(b, heads, n, grid[0], generator=gen).to(DEVICE)
    # rel_w with a non-unit last stride: the launch copies it to the layout the kernel reads
    rw = torch.randn(b, heads, grid[1], n, generator=gen).to(DEVICE).transpose(-1, -2)
    out = launch(q, k, v, rh, rw, grid)
    assert_close_fp32(out, reference(q, k, v, rh, rw, grid), tol.FP32_OP_REL_L2)
    assert out.transpose(1, 2).is_contiguous()  # B x N x heads x d: free reshape to B x N x C


# The interpreter runs each program in Python: one image keeps these to a few seconds.
@torch.inference_mode()
@pytest.mark.parametrize("name", ["win5-padded", "no-rel-pos"])
def test_whole_encoder_with_triton_attention(name, kernel_launches):
    sam = small_sam(name).to(DEVICE)  # on a GPU machine: the compiled kernel, fp32 ("ieee")
    x = image_batch(batch=1).to(DEVICE)
    expected = sam.image_encoder(x)
    # fp32 stated: on CUDA the default dtype is bf16
    fastsam_core.optimize(sam, FastConfig(attention="triton", dtype=torch.float32))
    rep = fastsam_core.report(sam)
    assert rep.path_of("image_encoder.attention[global]") == "triton"
    assert_close_fp32(sam.image_encoder(x), expected, tol.FP32_STAGE_REL_L2)
    assert len(kernel_launches) == len(sam.image_encoder.blocks)  # every block, none on SDPA


@torch.inference_mode()
def test_encoder_fp16_with_triton_attention(kernel_launches):
    sam = small_sam("win5-padded").to(DEVICE)
    x = image_batch(batch=1).to(DEVICE)
    naive = in_dtype(sam.image_encoder, torch.float16)(x.half())
    exact = in_dtype(sam.image_encoder, torch.float64)(x.double())
    fastsam_core.optimize(sam, FastConfig(attention="triton", dtype=torch.float16))
    assert_lowp_parity(sam.image_encoder(x), naive, exact)
    assert len(kernel_launches) == len(sam.image_encoder.blocks)


def test_compile_fullgraph_traces_the_custom_op():
    """torch.compile(fullgraph=True) through torch.ops.fastsam.rel_pos_attention (aot_eager
    backend: the trace is what is under test, Inductor on CPU costs minutes)."""
    q, k, v, rh, rw = problem(2, 2, (6, 5), 16, torch.float32)

    def attend(q, k, v, rh, rw):
        return torch.ops.fastsam.rel_pos_attention(q, k, v, rh, rw, 5, 0.25, False) * 2

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    expected = kernel.rel_pos_attention_ref(q, k, v, rh, rw, 5, 0.25) * 2
    assert_close_fp32(compiled(q, k, v, rh, rw), expected, tol.FP32_OP_REL_L2)


@torch.inference_mode()
def test_compile_fullgraph_traces_the_encoder_with_triton_attention():
    sam = small_sam().to(DEVICE)
    x = image_batch(batch=1).to(DEVICE)
    expected = sam.image_encoder(x)
    fastsam_core.optimize(sam, FastConfig(attention="triton", dtype=torch.float32))
    fast = sam.image_encoder
    compiled = torch.compile(fast._forward_fast, backend="aot_eager", fullgraph=True)
    assert_close_fp32(compiled(x), expected, tol.FP32_STAGE_REL_L2)


def test_disable_env_and_unsupported_inputs_fall_back_to_sdpa(monkeypatch):
    q, k, v, rh, rw = problem(1, 2, (4, 4), 16, torch.float32)
    pos = torch.randn(4, 4, 16, device=DEVICE)
    expected = ops.rel_pos_attention(q, k, v, pos, pos, (4, 4), 0.25, "sdpa")
    monkeypatch.setenv(ops.DISABLE_ENV, "1")
    monkeypatch.setattr(ops, "KERNEL_FALLBACKS", {})
    with pytest.warns(UserWarning, match="FASTSAM_DISABLE_TRITON"):
        out = ops.rel_pos_attention(q, k, v, pos, pos, (4, 4), 0.25, "triton")
    assert torch.equal(out, expected)
    assert ops.choose_backend("auto", torch.device("cuda"))[0] == "sdpa"
    monkeypatch.delenv(ops.DISABLE_ENV)
    assert "float64" in kernel.supports(q.double(), 4)
    assert "multiple of the grid width" in kernel.supports(q, 5)


def test_disable_env_set_to_zero_or_empty_leaves_the_kernel_on(monkeypatch):
    for value in ("0", ""):
        monkeypatch.setenv(ops.DISABLE_ENV, value)
        assert not ops.kernel_disabled()
        assert ops.choose_backend("auto", torch.device("cuda"))[0] == "auto"


class TestTuner:
    """The measured choice, with fake timings (timing the interpreter would measure numpy)."""

    def candidates(self, q, k, v, rh, rw, grid):
        good = [kernel.LaunchConfig(32, 32, 1, 1), kernel.LaunchConfig(16, 16, 1, 1)]
        cands = {c.as_key(): (lambda c=c: kernel.rel_pos_attention_fwd(
            q, k, v, rh, rw, grid[1], 0.25, c)) for c in good}
        cands["broken"] = lambda: torch.zeros_like(q)  # fastest, but wrong
        cands["crashes"] = lambda: 1 / 0
        return cands

    def test_only_candidates_matching_the_reference_are_timed_and_chosen(self, tmp_path,
                                                                          monkeypatch):
        monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
        q, k, v, rh, rw = problem(1, 2, (6, 5), 16, torch.float32)
        speed = {"m32_n32_w1_s1": 2.0, "m16_n16_w1_s1": 1.0, "broken": 0.1}
        timed = []

        def timer(fn):
            name = next(n for n, f in cands.items() if f is fn)
            timed.append(name)
            return speed[name]

        cands = self.candidates(q, k, v, rh, rw, (6, 5))
        tuner = Tuner("test_kernel", timer=timer)
        reference = kernel.rel_pos_attention_ref(q, k, v, rh, rw, 5, 0.25)
        assert tuner.tune("gpu0", "shape", cands, reference) == "m16_n16_w1_s1"
        assert sorted(timed) == ["m16_n16_w1_s1", "m32_n32_w1_s1"]
        stored = json.loads((tmp_path / "test_kernel.json").read_text())
        assert stored["gpu0"]["shape"]["choice"] == "m16_n16_w1_s1"
        fresh = Tuner("test_kernel", timer=timer)  # a new process: from the disk cache
        assert fresh.cached("gpu0", "shape", list(cands)) == "m16_n16_w1_s1"
        assert fresh.cached("gpu0", "shape", ["m32_n32_w1_s1"]) is None  # no longer offered
        assert fresh.cached("gpu1", "shape", list(cands)) is None  # another GPU

    def test_shipped_table_answers_before_the_user_cache(self, tmp_path, monkeypatch):
        import fastsam_core.kernels.tuning as tuning

        shipped = tmp_path / "shipped"
        shipped.mkdir()
        (shipped / "k.json").write_text(json.dumps({"H200": {"s": {"choice": "a"}}}))
        monkeypatch.setattr(tuning, "SHIPPED_DIR", shipped)
        monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path / "user"))
        (tmp_path / "user").mkdir()
        (tmp_path / "user" / "k.json").write_text(json.dumps({"H200": {"s": {"choice": "b"}}}))
        assert Tuner("k").cached("H200", "s", ["a", "b"]) == "a"
        # a shipped choice no longer offered (a candidate renamed since) does not hide the
        # user's own measurement, which tuning stored (it had tuned again in every process)
        assert Tuner("k").cached("H200", "s", ["b", "c"]) == "b"
        assert Tuner("k").cached("H200", "s", ["c"]) is None
        stale = Tuner("k")
        stale.choices[("H200", "s")] = "z"  # chosen earlier in this process, since renamed
        assert stale.cached("H200", "s", ["b", "c"]) == "b"

    def test_no_matching_candidate_raises(self, tmp_path, monkeypatch):
        monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
        q = torch.ones(1, 1, 4, 16)
        tuner = Tuner("none", timer=lambda fn: 1.0)
        with pytest.raises(RuntimeError, match="no candidate matched"):
            tuner.tune("gpu", "s", {"zero": lambda: torch.zeros_like(q)}, q)

    def test_an_exact_candidate_for_an_all_zero_reference_is_chosen(self, tmp_path,
                                                                     monkeypatch):
        """A linear without bias fed zeros: its relative distance is 0 / 0 (it was NaN and the
        int8 tuners raised "no candidate matched" to the user)."""
        monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
        zeros = torch.zeros(4)
        tuner = Tuner("zero", timer=lambda fn: 1.0)
        assert tuner.tune("gpu", "s", {"exact": lambda: torch.zeros(4)}, zeros) == "exact"

    def test_tuning_nested_in_a_candidate_counts_once(self, tmp_path, monkeypatch):
        import fastsam_core.kernels.tuning as tuning

        monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
        x = torch.ones(4)
        clock = [0.0]  # seconds; each timing takes one
        monkeypatch.setattr(tuning, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

        def timer(fn):
            clock[0] += 1.0
            return 1.0

        inner = Tuner("inner", timer=timer)

        def nested():  # a backend that tunes its own tile on first use, as int8's does
            inner.tune("gpu", "tile", {"a": lambda: x}, x)
            return x

        outer = Tuner("outer", timer=timer)
        outer.tune("gpu", "backend", {"nested": nested, "plain": lambda: x}, x)
        assert clock[0] == 3.0  # the inner timing, then the outer's two
        assert inner.tuning_seconds == 0.0  # inside the outer's measurement
        assert outer.tuning_seconds == 3.0
        inner.tune("gpu", "tile2", {"a": lambda: x}, x)  # on its own: its own time
        assert inner.tuning_seconds == 1.0

    def test_no_matching_launch_is_remembered(self, tmp_path, monkeypatch):
        monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
        monkeypatch.setattr(ops.torch.cuda, "get_device_name", lambda device=None: "gpu0")
        monkeypatch.setattr(ops, "UNMATCHED", {})
        monkeypatch.setattr(ops, "KERNEL_FALLBACKS", {})
        monkeypatch.setattr(ops.TUNER, "timer", lambda fn: 1.0)
        launched = []

        def miscompiled(q, *args, **kwargs):
            launched.append(args[-1])
            return torch.zeros_like(q)

        monkeypatch.setattr(kernel, "rel_pos_attention_fwd", miscompiled)
        q, k, v, rh, rw = problem(1, 2, (4, 4), 16, torch.float32)
        with pytest.warns(UserWarning, match="no candidate matched"):
            assert ops.tuned_config(q, k, v, rh, rw, 4, 0.25, False) is None
        assert len(launched) == len(ops.distinct_launches((4, 4), torch.float32))
        assert ops.tuned_config(q, k, v, rh, rw, 4, 0.25, False) is None  # SDPA, not re-tuned
        assert len(launched) == len(ops.distinct_launches((4, 4), torch.float32))
        assert list(ops.KERNEL_FALLBACKS.values()) == [2]

    def test_the_match_tolerance_is_that_of_the_reference_dtype(self, tmp_path, monkeypatch):
        """A candidate off by more than fp32's rounding is no fp32 candidate, however fast,
        though it passes as a bf16 one (MATCH_REL_L2 of the reference's dtype)."""
        import fastsam_core.kernels.tuning as tuning

        monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
        x = torch.randn(64, generator=torch.Generator().manual_seed(0))
        off = (tuning.MATCH_REL_L2[torch.float32] * tuning.MATCH_REL_L2[torch.bfloat16]) ** 0.5
        for dtype, expected in ((torch.float32, "exact"), (torch.bfloat16, "approximate")):
            ref = x.to(dtype)
            cands = {"exact": lambda ref=ref: ref.clone(),
                     "approximate": lambda dtype=dtype: (x * (1 + off)).to(dtype)}  # faster
            tuner = Tuner("tolerance", timer=lambda fn, c=cands: 1.0 if fn is c["approximate"]
                          else 2.0)
            assert tuner.tune("gpu0", f"s_{dtype}", cands, ref) == expected

    def test_a_choice_stays_in_memory_where_the_cache_cannot_be_written(self, tmp_path,
                                                                        monkeypatch):
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        monkeypatch.setenv("FASTSAM_CACHE_DIR", str(blocker / "cache"))  # mkdir fails
        x = torch.ones(4)
        timed = []
        tuner = Tuner("unwritable", timer=lambda fn: timed.append(fn) or 1.0)
        assert tuner.tune("gpu0", "s", {"a": lambda: x}, x) == "a"
        assert tuner.cached("gpu0", "s", ["a"]) == "a"  # not measured again in this process
        assert tuner.cache_entries() == 0 and len(timed) == 1

    def test_a_corrupt_cache_file_is_ignored_and_replaced(self, tmp_path, monkeypatch):
        monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
        (tmp_path / "corrupt.json").write_text('{"gpu0": {"s": {"choi')  # cut off
        x = torch.ones(4)
        tuner = Tuner("corrupt", timer=lambda fn: 1.0)
        assert tuner.cached("gpu0", "s", ["a"]) is None and tuner.cache_entries() == 0
        assert tuner.tune("gpu0", "s", {"a": lambda: x}, x) == "a"
        assert json.loads((tmp_path / "corrupt.json").read_text())["gpu0"]["s"]["choice"] == "a"

    def test_cache_dir_is_fastsam_cache_dir_else_xdg_else_home(self, tmp_path, monkeypatch):
        import fastsam_core.kernels.tuning as tuning

        monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path / "own"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert tuning.cache_dir() == tmp_path / "own"
        monkeypatch.delenv("FASTSAM_CACHE_DIR")
        assert tuning.cache_dir() == tmp_path / "xdg" / "fastsam_core"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert tuning.cache_dir() == tmp_path / "home" / ".cache" / "fastsam_core"

    def test_launch_choices_are_kept_per_dtype(self):
        """A choice measured in fp32 is not taken for bf16 or fp16 unmeasured (their tiles,
        and whether SDPA wins, differ)."""
        q = problem(1, 2, (4, 4), 16, torch.float32)[0]
        keys = {ops.tuning_key(q.to(dtype), 4, True, True)
                for dtype in (torch.float32, torch.float16, torch.bfloat16)}
        assert len(keys) == 3

    def test_launch_choices_are_kept_per_mode_bias_grid_and_batch_bucket(self):
        """A choice stands for one key: measured with SDPA among the candidates ("auto") or
        without ("triton"), with or without the bias, per key-grid width, and for batch x heads
        up to the next power of two (3 and 4 share a choice, 5 does not)."""
        def key(bh=2, key_grid_w=4, has_bias=True, sdpa_allowed=True):
            return ops.tuning_key(torch.zeros(bh, 1, 16, 16), key_grid_w, has_bias, sdpa_allowed)

        assert len({key(), key(has_bias=False), key(sdpa_allowed=False), key(key_grid_w=8)}) == 4
        assert key(bh=3) == key(bh=4) != key(bh=5) == key(bh=8)
        assert key(bh=1) != key(bh=2)

    def test_candidates_are_the_launches_of_the_key_grid(self, monkeypatch):
        """tuned_config measures the distinct launches of q's h x w key grid (h = N / w), not
        of its transpose: on a 32 x 64 grid a 64-key block is one row, so the forced-gather
        64 x 64 tiles are no duplicates; on a 64 x 32 grid they are."""
        offered = []
        monkeypatch.setattr(ops.torch.cuda, "get_device_name", lambda device=None: "gpu0")
        monkeypatch.setattr(ops, "UNMATCHED", {})
        monkeypatch.setattr(ops.TUNER, "cached",
                            lambda device, key, names: offered.append(names) or names[0])
        q = torch.zeros(1, 2, 32 * 64, 16)
        ops.tuned_config(q, q, q, None, None, 64, 0.25, False)
        wide, tall = (list(ops.distinct_launches(g, torch.float32)) for g in ((32, 64), (64, 32)))
        assert offered == [wide] and wide != tall

    def test_tests_tune_into_a_cache_of_their_own(self):
        import fastsam_core.kernels.tuning as tuning

        assert tuning.cache_dir().name.startswith("tuning-cache")  # tests/conftest.py

    def test_shipped_table_is_valid_json(self):
        import fastsam_core.kernels.tuning as tuning

        paths = list(tuning.SHIPPED_DIR.glob("*.json"))
        assert tuning.SHIPPED_DIR / "rel_pos_attention.json" in paths  # the package's tables
        for path in paths:
            json.loads(path.read_text())


cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize(
    "grid, batch_heads, dim",
    [((64, 64), (8, 16), 80), ((14, 14), (200, 16), 80),  # vit_h global, windowed (bs 8)
     ((64, 64), (8, 12), 64), ((14, 14), (200, 12), 64)],  # vit_b
)
def test_real_shapes_bf16_on_cuda(grid, batch_heads, dim):
    q, k, v, rh, rw = problem(batch_heads[0], batch_heads[1], grid, dim, torch.bfloat16)
    out = launch(q, k, v, rh, rw, grid)
    naive = reference(q, k, v, rh, rw, grid)
    exact = reference(*(t.double() for t in (q, k, v, rh, rw)), grid)
    assert_lowp_parity(out, naive, exact)


@cuda
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_tuned_op_on_cuda(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
    q, k, v, rh, rw = problem(2, 4, (14, 14), 80, torch.bfloat16)
    out = torch.ops.fastsam.rel_pos_attention(q, k, v, rh, rw, 14, 80**-0.5, backend == "auto")
    naive = reference(q, k, v, rh, rw, (14, 14))
    exact = reference(*(t.double() for t in (q, k, v, rh, rw)), (14, 14))
    assert_lowp_parity(out, naive, exact)
    assert ops.TUNER.last_measurements  # measured on first use


@cuda
@pytest.mark.parametrize("config", ops.CANDIDATES if ops.kernel is not None else [],
                         ids=lambda c: c.as_key())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_tuning_candidate_on_cuda(config, dtype):
    """Each launch configuration the tuner may pick, on the vit_h shapes (d = 80)."""
    for batch, grid in ((2, (64, 64)), (50, (14, 14))):
        q, k, v, rh, rw = problem(batch, 16, grid, 80, dtype)
        out = kernel.rel_pos_attention_fwd(q, k, v, rh, rw, grid[1], 80**-0.5, config)
        naive = reference(q, k, v, rh, rw, grid)
        exact = reference(*(t.double() for t in (q, k, v, rh, rw)), grid)
        assert_lowp_parity(out, naive, exact)

