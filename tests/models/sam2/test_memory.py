"""Parity of the fast SAM 2 memory attention and memory encoder with sam2's, per stage, on
sam2.1 hiera_t's modules (random weights) at a 16 x 16 feature grid."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
from sam2.modeling.sam.transformer import RoPEAttention

from fastsam_core import FastConfig
from fastsam_core.benchmark import rel_l2
from fastsam_core.models.sam2.memory_attention import FastMemoryAttention
from fastsam_core.models.sam2.memory_encoder import FastMemoryEncoder
from fastsam_core.pipelines.video import pad_memory_banks
from tests import tolerances as tol
from tests.models.sam2.test_image_encoder import small_sam2
from tests.parity import assert_close_fp32, assert_lowp_parity, in_dtype

GRID = 16  # 256 px at stride 16
HW = GRID * GRID


@functools.cache
def _model():
    with torch.inference_mode(False):  # normal tensors, usable by the autograd test too
        return small_sam2()


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def attention_inputs(batch=2, frames=3, pointers=4, seed=0, dtype=torch.float32):
    """curr / curr_pos HW x B x 256, memory / memory_pos (frames * HW + pointers) x B x 64."""
    d, mem = 256, 64
    m = frames * HW + pointers
    return dict(curr=_randn(HW, batch, d, seed=seed).to(dtype),
                memory=_randn(m, batch, mem, seed=seed + 1).to(dtype),
                curr_pos=_randn(HW, batch, d, seed=seed + 2).to(dtype),
                memory_pos=_randn(m, batch, mem, seed=seed + 3).to(dtype),
                num_obj_ptr_tokens=pointers)


def fast_attention(dtype=torch.float32, compile_mode=None):
    ref = _model().memory_attention
    return FastMemoryAttention.from_reference(ref, FastConfig(compile=compile_mode),
                                              dtype).eval()


@torch.inference_mode()
@pytest.mark.parametrize("frames, pointers", [(1, 0), (3, 4), (7, 16), (0, 4)])
def test_memory_attention_fp32(frames, pointers):
    ref = _model().memory_attention
    kwargs = attention_inputs(frames=frames, pointers=pointers)
    expected = ref(**kwargs)
    got = fast_attention()(**kwargs)
    assert got.shape == expected.shape == (HW, 2, 256)
    assert_close_fp32(got, expected, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_memory_attention_list_inputs_as_sam2base_passes_them():
    ref = _model().memory_attention
    kwargs = attention_inputs()
    expected = ref(**kwargs)
    kwargs["curr"], kwargs["curr_pos"] = [kwargs["curr"]], [kwargs["curr_pos"]]
    assert_close_fp32(fast_attention()(**kwargs), expected, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_memory_attention_low_precision(dtype):
    ref = _model().memory_attention
    kwargs = attention_inputs(frames=2)
    got = fast_attention(dtype)(**kwargs)
    assert got.dtype == torch.float32  # curr's dtype
    low = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    wide = {k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    naive = rope_tables_in(in_dtype(ref, dtype), torch.complex64)(**low)
    exact = rope_tables_in(in_dtype(ref, torch.float64), torch.complex128)(**wide)
    assert_sound_lowp_parity(got.double(), naive.double(), exact, dtype)


def rope_tables_in(module, dtype, side: int = GRID):
    """The reference's rotary tables for side x side tokens, built afresh in the complex
    `dtype` (.to() leaves them complex64): the shared model's tables are whatever token count
    an earlier test ran, and a real dtype would drop their imaginary part."""
    assert dtype.is_complex, dtype
    for layer in module.layers:
        for attn in (layer.self_attn, layer.cross_attn_image):
            attn.freqs_cis = attn.compute_cis(end_x=side, end_y=side).to(dtype)
    return module


def assert_sound_lowp_parity(fast, naive, exact, dtype):
    """assert_lowp_parity, after checking that the naive reference's own error is of the
    order of `dtype`'s rounding: a broken naive reference would loosen the bound silently."""
    err_naive = rel_l2(naive, exact)
    limit = tol.LOWP_NAIVE_MAX_EPS * torch.finfo(dtype).eps
    assert err_naive <= limit, f"naive reference error {err_naive:.3e} > {limit:.3e}"
    assert_lowp_parity(fast, naive, exact)


@torch.inference_mode()
def test_memory_attention_bf16_memory_with_fp32_model():
    """SAM2VideoPredictor stores memories in bf16: the fp32 fast path takes them as they are
    (the reference module needs them cast back to fp32 first)."""
    ref = _model().memory_attention
    kwargs = attention_inputs(pointers=0)
    kwargs["memory"] = kwargs["memory"].bfloat16()
    got = fast_attention()(**kwargs)
    kwargs["memory"] = kwargs["memory"].float()
    assert_close_fp32(got, ref(**kwargs), tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_memory_attention_other_grid_size():
    """A 8 x 8 grid (128 px): the reference rebuilds its table for the token count; so do we."""
    ref = _model().memory_attention
    kwargs = attention_inputs()
    small = {k: v[: 3 * 64 + 4] if k.startswith("memory") else v for k, v in kwargs.items()}
    small["curr"], small["curr_pos"] = kwargs["curr"][:64], kwargs["curr_pos"][:64]
    fast = fast_attention()
    assert_close_fp32(fast(**small), ref(**small), tol.FP32_STAGE_REL_L2)
    assert_close_fp32(fast(**kwargs), ref(**kwargs), tol.FP32_STAGE_REL_L2)


def memory_attention_with_theta(theta, side):
    """A one-layer reference MemoryAttention (random weights, eval) like sam2.1's, but with
    rotary base `theta` and tables built for a side x side grid."""
    torch.manual_seed(0)
    common = dict(embedding_dim=256, num_heads=1, downsample_rate=1, dropout=0.1,
                  rope_theta=theta, feat_sizes=(side, side))
    layer = MemoryAttentionLayer(
        activation="relu", d_model=256, dim_feedforward=512, dropout=0.1,
        pos_enc_at_attn=False, pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False, self_attention=RoPEAttention(**common),
        cross_attention=RoPEAttention(**common, rope_k_repeat=True, kv_in_dim=64))
    return MemoryAttention(d_model=256, pos_enc_at_input=True, layer=layer,
                           num_layers=1).eval()


@torch.inference_mode()
def test_memory_attention_other_rotary_base():
    """A rotary base other than sam2's 10000 is the reference's: on the grid the reference's
    table was built for and on another one (whose table is computed here)."""
    ref = memory_attention_with_theta(100.0, side=GRID // 2)
    fast = FastMemoryAttention.from_reference(ref, FastConfig(), torch.float32).eval()
    assert fast.rope_theta == 100.0
    kwargs = attention_inputs(batch=1, frames=2, pointers=4)
    small = {k: v[: 2 * 64 + 4] if k.startswith("memory") else v for k, v in kwargs.items()}
    small["curr"], small["curr_pos"] = kwargs["curr"][:64], kwargs["curr_pos"][:64]
    for inputs in (small, kwargs):
        assert_close_fp32(fast(**inputs), ref(**inputs), tol.FP32_STAGE_REL_L2)


def padded_banks(layouts, seed=0):
    """Objects with banks of (frames, pointers) each: their inputs alone (batch 1) and the
    padded batch of all of them."""
    alone = [attention_inputs(batch=1, frames=f, pointers=p, seed=seed + 10 * i)
             for i, (f, p) in enumerate(layouts)]
    banks = [(a["memory"], a["memory_pos"], a["num_obj_ptr_tokens"]) for a in alone]
    memory, memory_pos, mask, n_ptr = pad_memory_banks(banks, HW)
    batch = dict(curr=torch.cat([a["curr"] for a in alone], 1), memory=memory,
                 curr_pos=torch.cat([a["curr_pos"] for a in alone], 1), memory_pos=memory_pos,
                 num_obj_ptr_tokens=n_ptr, memory_mask=mask)
    return alone, batch


def test_pad_memory_banks_layout():
    alone, batch = padded_banks([(1, 2), (3, 0), (2, 6)])
    memory, mask = batch["memory"], batch["memory_mask"]
    assert memory.shape == (3 * HW + 6, 3, 64) and batch["num_obj_ptr_tokens"] == 6
    assert mask.tolist() == [
        [True] * HW + [False] * 2 * HW + [True] * 2 + [False] * 4,
        [True] * 3 * HW + [False] * 6,
        [True] * 2 * HW + [False] * HW + [True] * 6,
    ]
    for b, a in enumerate(alone):  # the real tokens, in order, are the object's own bank
        for name in ("memory", "memory_pos"):
            assert torch.equal(batch[name][:, b][mask[b]], a[name][:, 0])
        assert not batch["memory"][:, b][~mask[b]].any()


@pytest.mark.parametrize("autograd", [False, True])
def test_memory_attention_padded_banks_equal_each_object_alone(autograd):
    """Banks of different lengths (memory frames and object pointers) padded to one batch
    with the key mask: each object gets what the reference gives it alone. With autograd
    recording (the fast path refuses it) the reference runs per object on its unpadded
    bank."""
    ref = _model().memory_attention
    _normal_rope_tables(ref)
    alone, batch = padded_banks([(1, 2), (3, 0), (2, 6), (3, 6)])
    fast = fast_attention()
    fast.set_reference(ref)
    if autograd:
        batch["curr"].requires_grad_(True)
        with pytest.warns(UserWarning, match="autograd"):
            got = fast(**batch)
        assert got.requires_grad
    else:
        with torch.inference_mode():
            got = fast(**batch)
    assert got.shape == (HW, 4, 256)
    with torch.inference_mode():
        for b, a in enumerate(alone):
            assert_close_fp32(got[:, b : b + 1].detach(), ref(**a), tol.FP32_STAGE_REL_L2)


def _normal_rope_tables(ref):
    """The reference rebuilds its rotary tables inside inference-mode calls: make them normal
    tensors again, as autograd needs."""
    for layer in ref.layers:
        for a in (layer.self_attn, layer.cross_attn_image):
            a.freqs_cis = a.freqs_cis.clone()


def test_memory_attention_checks_the_mask():
    _, batch = padded_banks([(1, 2), (2, 0)])
    for bad in (batch["memory_mask"].float(), batch["memory_mask"][:, 1:]):
        with torch.inference_mode(), pytest.raises(ValueError, match="memory_mask"):
            fast_attention()(**{**batch, "memory_mask": bad})


def test_memory_attention_unsupported_memory_falls_back():
    """Memory that is not whole frames plus pointers: the reference decides (it fails)."""
    fast = fast_attention()
    fast.set_reference(_model().memory_attention)
    kwargs = attention_inputs(pointers=3)
    kwargs["num_obj_ptr_tokens"] = 1
    with torch.inference_mode(), pytest.warns(UserWarning, match="not whole frames"), \
            pytest.raises(RuntimeError):
        fast(**kwargs)


def encoder_inputs(batch=2, seed=0, dtype=torch.float32):
    """pix_feat B x 256 x 16 x 16, mask logits B x 1 x 256 x 256."""
    return (_randn(batch, 256, GRID, GRID, seed=seed).to(dtype),
            (4 * _randn(batch, 1, GRID * 16, GRID * 16, seed=seed + 1)).to(dtype))


@torch.inference_mode()
@pytest.mark.parametrize("skip_mask_sigmoid", [False, True])
def test_memory_encoder_fp32(skip_mask_sigmoid):
    ref = _model().memory_encoder
    pix, masks = encoder_inputs()
    expected = ref(pix, masks, skip_mask_sigmoid=skip_mask_sigmoid)
    got = FastMemoryEncoder.from_reference(ref, FastConfig(), torch.float32).eval()(
        pix, masks, skip_mask_sigmoid=skip_mask_sigmoid)
    for key in ("vision_features", "vision_pos_enc"):
        a = got[key] if key == "vision_features" else got[key][0]
        b = expected[key] if key == "vision_features" else expected[key][0]
        assert a.shape == b.shape
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_memory_encoder_other_grid_size():
    """An 8 x 8 grid after the 16 x 16 one: the cached position encoding follows the size."""
    ref = _model().memory_encoder
    fast = FastMemoryEncoder.from_reference(ref, FastConfig(), torch.float32).eval()
    for grid in (GRID, GRID // 2):
        pix = _randn(2, 256, grid, grid, seed=0)
        masks = 4 * _randn(2, 1, grid * 16, grid * 16, seed=1)
        got, expected = fast(pix, masks), ref(pix, masks)
        assert_close_fp32(got["vision_features"], expected["vision_features"],
                          tol.FP32_STAGE_REL_L2)
        assert_close_fp32(got["vision_pos_enc"][0], expected["vision_pos_enc"][0],
                          tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_memory_encoder_low_precision(dtype):
    ref = _model().memory_encoder
    pix, masks = encoder_inputs()
    got = FastMemoryEncoder.from_reference(ref, FastConfig(), dtype).eval()(pix, masks)
    assert got["vision_features"].dtype == torch.float32
    naive = in_dtype(ref, dtype)(pix.to(dtype), masks.to(dtype))
    exact = in_dtype(ref, torch.float64)(pix.double(), masks.double())
    assert_sound_lowp_parity(got["vision_features"].double(),
                             naive["vision_features"].double(), exact["vision_features"], dtype)


@torch.inference_mode()
def test_memory_encoder_fuser_blocks_with_trained_layer_scales():
    """The ConvNeXt blocks' residual branches at a trained scale: sam2 initializes their
    layer scale (gamma) to 1e-6, which hides the branch below any fp32 tolerance; trained
    checkpoints carry gammas of order 0.1 to 1, set here (on a copy of the shared model's
    encoder)."""
    ref = copy.deepcopy(_model().memory_encoder)
    gen = torch.Generator().manual_seed(0)
    for block in ref.fuser.layers:
        assert block.gamma is not None
        block.gamma.copy_(0.1 + torch.rand(block.gamma.shape, generator=gen))
    pix, masks = encoder_inputs()
    expected = ref(pix, masks)["vision_features"]
    got = FastMemoryEncoder.from_reference(ref, FastConfig(), torch.float32).eval()(
        pix, masks)["vision_features"]
    assert_close_fp32(got, expected, tol.FP32_STAGE_REL_L2)
    # the blocks move the features far beyond the parity tolerance (with sam2's initial
    # gammas they would not)
    ref.fuser.layers = ref.fuser.layers[:0]
    assert rel_l2(ref(pix, masks)["vision_features"], expected) > tol.FP32_STAGE_REL_L2


@torch.inference_mode()
@pytest.mark.parametrize("batch", [1, 2])
def test_memory_encoder_position_encoding_is_a_copy(batch):
    """A caller writing into `vision_pos_enc` in place neither fails nor changes later
    results: the reference returns a new tensor per call. A view of the cached encoding
    would (the cache itself for batch 1, a broadcast view that refuses writes for more)."""
    ref = _model().memory_encoder
    fast = FastMemoryEncoder.from_reference(ref, FastConfig(), torch.float32).eval()
    pix, masks = encoder_inputs(batch=batch)
    # a copy: sam2's own first result of a size is a view of its cache (batch 1)
    expected = ref(pix, masks)["vision_pos_enc"][0].clone()
    fast(pix, masks)["vision_pos_enc"][0].mul_(0)
    assert_close_fp32(fast(pix, masks)["vision_pos_enc"][0], expected, tol.FP32_STAGE_REL_L2)


@pytest.mark.parametrize("needs_grad", ["curr", "curr_pos", "memory_pos"])
def test_memory_modules_fall_back_under_autograd(needs_grad):
    """Whichever input needs a gradient (the position encodings had been missed)."""
    model = _model()
    model.requires_grad_(False)
    _normal_rope_tables(model.memory_attention)
    attn = fast_attention()
    attn.requires_grad_(False)
    attn.set_reference(model.memory_attention)
    kwargs = attention_inputs(frames=1, pointers=0)
    kwargs[needs_grad].requires_grad_(True)
    with pytest.warns(UserWarning, match="autograd"):
        out = attn(**kwargs)
    out.sum().backward()
    assert kwargs[needs_grad].grad is not None


def counted_fast_attention():
    """A fast memory attention compiled as FastConfig(compile=...) does (dynamic shapes),
    through CompileCounter (the eager backend: Inductor on 2 cores would take minutes)."""
    from torch._dynamo.testing import CompileCounter

    from fastsam_core.models.compiled import LazyCompiled

    fast, counter = fast_attention(), CompileCounter()
    fast._run_fast = LazyCompiled(fast._forward_fast, "default", "memory attention",
                                  backend=counter, dynamic=True)
    return fast, counter


def test_memory_attention_compiles_once_as_the_memory_bank_fills():
    """The per-frame memory attention under torch.compile(dynamic=True): 1 to 7 memory frames
    and 0 to 16 object pointers (a bank filling over the first frames) give at most two
    graphs (the first size is specialized); results equal the reference."""
    ref = _model().memory_attention
    fast, counter = counted_fast_attention()
    with torch.inference_mode():
        for frames in range(1, 8):
            kwargs = attention_inputs(batch=1, frames=frames, pointers=2 * frames + 2)
            assert_close_fp32(fast(**kwargs), ref(**kwargs), tol.FP32_STAGE_REL_L2)
    assert fast._run_fast.status == "compiled"
    assert counter.frame_count <= 2, counter.frame_count


def test_padded_memory_attention_compiles_once_as_the_banks_fill():
    """Padded banks with the key mask (objects prompted on different frames) growing over
    the first frames: at most two graphs too, results equal each object alone."""
    ref = _model().memory_attention
    fast, counter = counted_fast_attention()
    with torch.inference_mode():
        for frames in range(1, 6):
            layouts = [(frames, 2 * frames), (frames + 1, 2 * frames + 2), (1, 2)]
            alone, batch = padded_banks(layouts, seed=frames)
            got = fast(**batch)
            for b, a in enumerate(alone):
                assert_close_fp32(got[:, b : b + 1], ref(**a), tol.FP32_STAGE_REL_L2)
    assert counter.frame_count <= 2, counter.frame_count


def test_memory_attention_flops_match_the_flop_counter(monkeypatch):
    """`memory_attention_flops` against torch.utils.flop_counter on the reference, with SDPA
    written out as the two matmuls it computes (the counter does not count SDPA on the
    CPU): 3 memory frames and 4 pointer tokens, batch 2."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastsam_core.benchmark import memory_attention_flops

    def explicit_attention(q, k, v, dropout_p=0.0):
        weights = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
        return weights @ v

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", explicit_attention)
    ref = _model().memory_attention
    kwargs = attention_inputs(batch=2, frames=3, pointers=4)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        ref(**kwargs)
    assert memory_attention_flops(ref, HW, 3 * HW + 4, batch=2) == counter.get_total_flops()
