"""Parity of the fast SAM ViT image encoder with segment_anything's, stage by stage.

fp32 against the fp32 reference; bf16 / fp16 against a float64 reference, bounded by the error
of the reference itself run in that dtype (tests/tolerances.py).
"""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Block

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.benchmark import rel_l2
from fastsam_core.models.sam import image_encoder as image_encoder_module
from fastsam_core.models.sam.image_encoder import FastBlock, FastImageEncoderViT
from fastsam_core.models.sam.reference import build_sam, fill_zero_init_tables
from fastsam_core.report import UnsupportedModule
from tests import tolerances as tol
from tests.conftest import DEVICES, IMAGE_SIZE, SMALL, SMALL_CONFIGS, image_batch, small_sam
from tests.parity import assert_close_fp32, assert_lowp_parity, in_dtype

LOW_DTYPES = [torch.bfloat16, torch.float16]


def fast_encoder(encoder, dtype=torch.float32, attention="auto") -> FastImageEncoderViT:
    config = FastConfig(attention=attention)
    return FastImageEncoderViT.from_reference(encoder, config, dtype).eval()


def tokens(encoder, batch=2, seed=1) -> torch.Tensor:
    """B x H x W x C tokens of the encoder's width and grid."""
    grid = encoder.img_size // 16
    dim = encoder.patch_embed.proj.out_channels
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, grid, grid, dim, generator=gen)


@torch.inference_mode()
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_encoder_fp32(name, attention):
    ref = small_sam(name).image_encoder
    x = image_batch()
    fast = fast_encoder(ref, attention=attention)
    assert_close_fp32(fast(x), ref(x), tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("device", DEVICES)
def test_auto_attention_is_resolved_where_the_encoder_runs(device, monkeypatch):
    """A model optimized on the CPU (where patched() gets segment_anything's models) and
    moved to CUDA afterwards may take the kernel there: "auto" stays "auto" in the blocks,
    each call passes the kernel-or-SDPA choice on CUDA and SDPA elsewhere, and report() says
    what the model's device gets now."""
    sam = small_sam("win4")
    fastsam_core.optimize(sam, FastConfig(dtype=torch.float32))
    sam.to(device)
    backends = []

    def spy(*args):
        backends.append(args[-1])
        return rel_pos_attention(*args)

    rel_pos_attention = image_encoder_module.rel_pos_attention
    monkeypatch.setattr(image_encoder_module, "rel_pos_attention", spy)
    sam.image_encoder(image_batch(batch=1).to(device))
    on_cuda = device == "cuda"
    assert set(backends) == {"auto" if on_cuda else "sdpa"}
    assert {b.attn.backend for b in sam.image_encoder.blocks} == {"auto"}
    path = fastsam_core.report(sam).path_of("image_encoder.attention[global]")
    assert path == ("auto" if on_cuda else "sdpa")
    if not on_cuda:  # the report follows the device the encoder is on now
        monkeypatch.setattr(image_encoder_module, "module_device",
                            lambda module: torch.device("cuda"))
        monkeypatch.delenv("FASTSAM_DISABLE_TRITON", raising=False)
        assert fastsam_core.report(sam).path_of("image_encoder.attention[global]") == "auto"


@torch.inference_mode()
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("name", ["win4", "win5-padded"])
def test_encoder_low_precision(name, dtype):
    ref = small_sam(name).image_encoder
    x = image_batch()
    out = fast_encoder(ref, dtype)(x)
    assert out.dtype == torch.float32  # the dtype of its input, like the reference
    naive = in_dtype(ref, dtype)(x.to(dtype))
    exact = in_dtype(ref, torch.float64)(x.double())
    assert_lowp_parity(out, naive, exact)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_DTYPES])
def test_patch_embedding(dtype):
    ref = small_sam().image_encoder
    x = image_batch()
    out = fast_encoder(ref, dtype).embed(x.to(dtype))
    expected = ref.patch_embed(x) + ref.pos_embed
    if dtype == torch.float32:
        assert_close_fp32(out, expected, tol.FP32_OP_REL_L2)
    else:
        ref64 = in_dtype(ref, torch.float64)
        naive = in_dtype(ref, dtype)
        assert_lowp_parity(out, naive.patch_embed(x.to(dtype)) + naive.pos_embed,
                           ref64.patch_embed(x.double()) + ref64.pos_embed)


def _block_pair(name, kind, dtype, attention="sdpa"):
    ref = small_sam(name).image_encoder
    index = 0 if kind == "windowed" else 1  # SMALL: blocks 1 and 3 are global
    block = ref.blocks[index]
    assert (block.window_size > 0) == (kind == "windowed")
    return block, fast_encoder(ref, dtype, attention).blocks[index], tokens(ref)


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["windowed", "global"])
@pytest.mark.parametrize("name", ["win4", "win5-padded", "win6-padded-d32", "no-rel-pos"])
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_block_fp32(name, kind, attention):
    block, fast, x = _block_pair(name, kind, torch.float32, attention)
    assert_close_fp32(fast(x), block(x), tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["windowed", "global"])
@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_block_low_precision(kind, dtype):
    block, fast, x = _block_pair("win5-padded", kind, dtype)
    assert_lowp_parity(fast(x.to(dtype)), in_dtype(block, dtype)(x.to(dtype)),
                       in_dtype(block, torch.float64)(x.double()))


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_DTYPES])
def test_neck(dtype):
    ref = small_sam().image_encoder
    for p in ref.neck.parameters():  # LayerNorm2d starts at weight 1, bias 0: make it count
        p.add_(torch.randn_like(p) * 0.1)
    x = tokens(ref)
    fast = fast_encoder(ref, dtype)
    assert fast.fused_neck
    out = fast.neck_forward(x.to(dtype))
    expected = ref.neck(x.permute(0, 3, 1, 2))
    if dtype == torch.float32:
        assert_close_fp32(out, expected, tol.FP32_STAGE_REL_L2)
        assert out.is_contiguous()
    else:
        naive = in_dtype(ref.neck, dtype)(x.permute(0, 3, 1, 2).to(dtype))
        exact = in_dtype(ref.neck, torch.float64)(x.permute(0, 3, 1, 2).double())
        assert_lowp_parity(out, naive, exact)


@torch.inference_mode()
@pytest.mark.parametrize("index, change, fused", [
    (2, dict(stride=2), True),  # still the fused layout: conv2's stride is applied
    (0, dict(bias=True), False),  # the others run the reference's modules
    (0, dict(stride=2), False),
    (2, dict(dilation=2, padding=2), False),
], ids=["conv2-stride", "conv1-bias", "conv1-stride", "conv2-dilation"])
def test_neck_of_other_convolutions(index, change, fused):
    """A neck whose convolutions differ from ImageEncoderViT's: fused only where the fused
    form computes what the reference modules do."""
    ref = small_sam().image_encoder
    conv = ref.neck[index]
    settings = dict(kernel_size=conv.kernel_size, padding=conv.padding, bias=False) | change
    torch.manual_seed(0)
    ref.neck[index] = torch.nn.Conv2d(conv.in_channels, conv.out_channels, **settings)
    x = tokens(ref)
    fast = fast_encoder(ref)
    assert fast.fused_neck == fused
    assert_close_fp32(fast.neck_forward(x), ref.neck(x.permute(0, 3, 1, 2)),
                      tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_input_on_another_device_than_the_model_raises():
    fast = fast_encoder(small_sam().image_encoder).to("meta")
    with pytest.raises(ValueError, match="x is on cpu, the model on meta"):
        fast(image_batch(batch=1))


@torch.inference_mode()
def test_neck_where_the_layer_norm_eps_matters():
    """Small tokens: the variance the neck's first LayerNorm2d sees is then of the order of its
    eps (1e-6), so the fused layer_norm must take the reference's eps, not a default."""
    ref = small_sam().image_encoder
    x = tokens(ref) * 0.01
    out = fast_encoder(ref).neck_forward(x)
    assert_close_fp32(out, ref.neck(x.permute(0, 3, 1, 2)), tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_real_size_global_block_fp32():
    """One vit_b global block at SAM's real token grid: 64 x 64 tokens, dim 768, 12 heads."""
    torch.manual_seed(0)
    block = Block(dim=768, num_heads=12, use_rel_pos=True, window_size=0,
                  input_size=(64, 64), norm_layer=torch.nn.LayerNorm).eval()
    fill_zero_init_tables(block, std=0.5)
    fast = FastBlock.from_reference(block, (64, 64), torch.float32, "sdpa")
    x = torch.randn(1, 64, 64, 768, generator=torch.Generator().manual_seed(1))
    assert_close_fp32(fast(x), block(x), tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_bias_is_exercised():
    """The parity tests would catch a dropped relative-position bias: it moves the output."""
    ref = small_sam().image_encoder
    x = image_batch()
    fast = fast_encoder(ref)
    with_bias = fast(x)
    for blk in fast.blocks:
        blk.attn.use_rel_pos = False
    assert rel_l2(fast(x), with_bias) > 100 * tol.FP32_STAGE_REL_L2


@torch.inference_mode()
def test_windows_of_one_token_are_windowed_blocks():
    """window_size 1 (each token its own window) is windowed attention, for the encoder and
    for its report alike."""
    ref = build_sam("vit_b", IMAGE_SIZE, 0, **dict(SMALL, window_size=1)).image_encoder
    fast = fast_encoder(ref)
    x = image_batch(batch=1)
    assert_close_fp32(fast(x), ref(x), tol.FP32_STAGE_REL_L2)
    stages = {s.stage: s for s in fast.describe()}
    assert stages["image_encoder.attention[windowed]"].detail.startswith(
        "2 blocks on 1x1 tokens")
    assert stages["image_encoder.attention[global]"].detail.startswith(
        "2 blocks on 16x16 tokens")


@pytest.mark.parametrize("part", ["", ".attn"])
def test_a_block_or_attention_of_another_class_is_unsupported(part):
    """A subclass of the reference's Block or Attention may compute anything: not built, and
    the reason names the class."""
    ref = small_sam().image_encoder
    module = ref.get_submodule(f"blocks.2{part}")
    module.__class__ = type("Other", (type(module),), {})
    with pytest.raises(UnsupportedModule, match=r"blocks\[2\].* Other"):
        fast_encoder(ref)


def test_state_dict_keys_and_shapes_are_the_reference():
    ref = small_sam("win5-padded").image_encoder
    for dtype in (torch.float32, torch.bfloat16):
        fast = fast_encoder(ref, dtype).state_dict()
        expected = ref.state_dict()
        assert list(fast) == list(expected)
        assert all(fast[k].shape == expected[k].shape for k in expected)
        assert all(fast[k].dtype == dtype for k in expected)


def test_fp32_shares_reference_parameters_and_bf16_copies_them():
    ref = small_sam().image_encoder
    ref_params = {id(p) for p in ref.parameters()}
    assert {id(p) for p in fast_encoder(ref).parameters()} == ref_params
    assert not ref_params & {id(p) for p in fast_encoder(ref, torch.bfloat16).parameters()}


def test_index_tables_are_nonpersistent_buffers_moved_by_to():
    fast = fast_encoder(small_sam().image_encoder)
    names = {n for n, _ in fast.named_buffers()}
    assert "blocks.0.attn.rel_index_h" in names and "blocks.1.attn.rel_index_w" in names
    assert not any("rel_index" in k for k in fast.state_dict())
    fast.to("meta")
    assert fast.blocks[0].attn.rel_index_h.device.type == "meta"


@torch.inference_mode()
@pytest.mark.parametrize(
    "bad, error",
    [
        (torch.randn(2, 3, 128, 128), "256 x 256 pixels"),
        (torch.randn(2, 4, 256, 256), "B x 3 x 256 x 256"),
        (torch.randn(3, 256, 256), "B x 3 x 256 x 256"),
        (torch.zeros(1, 3, 256, 256, dtype=torch.uint8), "floating-point"),
        (torch.randn(1, 3, 256, 272), "256 x 256 pixels"),  # 16 x 17 tokens: no fallback
    ],
)
def test_bad_input_raises_value_error(bad, error):
    fast = fast_encoder(small_sam().image_encoder)
    with pytest.raises(ValueError, match=error):
        fast(bad)


@torch.inference_mode()
@pytest.mark.parametrize("name, size", [("no-abs-pos", 192), ("win4", 264)])
def test_other_input_size_falls_back_to_reference(name, size):
    """Without absolute positions the reference takes any size; with them, any size its patch
    convolution floors to the position grid (256 px: 16 x 16 tokens from 256..271 px). The
    fast encoder runs the reference for them."""
    ref = small_sam(name).image_encoder
    assert (ref.pos_embed is None) == (name == "no-abs-pos")
    fast = fast_encoder(ref)
    fast.set_reference(ref)
    x = image_batch(size=size)
    with pytest.warns(UserWarning, match="differs from img_size"):
        out = fast(x)
    assert torch.equal(out, ref(x))
    if ref.pos_embed is not None:
        with pytest.raises(ValueError, match="256 x 256 pixels"):
            fast(image_batch(size=272))  # 17 x 17 tokens: the reference cannot add positions
    fast.set_reference(None)
    with pytest.raises(RuntimeError, match="not kept"):
        fast(x)
