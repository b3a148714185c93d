"""Constructor variants of segment_anything's modules: the fast model keeps parity with the
reference through SamPredictor (fp32), whatever the sizes and layers a user builds it with."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.fallback import fallbacks_of
from fastsam_core.models.sam.reference import build_sam, fill_zero_init_tables
from tests import tolerances as tol
from tests.models.sam.test_predictor_parity import PROMPTS, smooth_image
from tests.parity import assert_close_fp32, mask_iou_outside_margin

# 128 px, 16 px patches: an 8 x 8 token grid, windows of 4, block 1 global, width 64
ENCODER = dict(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0,
               out_chans=64, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
               use_rel_pos=True, window_size=4, global_attn_indexes=(1,))

VARIANTS = {  # (part, overrides): the reference's constructor arguments a user may change
    "patch 8 (16 x 16 grid)": ("encoder", dict(patch_size=8)),
    "120 px (7 x 7 grid, padded windows)": ("encoder", dict(img_size=120)),
    "window 10 > grid": ("encoder", dict(window_size=10)),
    "no windows": ("encoder", dict(window_size=0, global_attn_indexes=())),
    "head dim 48": ("encoder", dict(embed_dim=96, num_heads=2)),
    "mlp ratio 2.5, no qkv bias, ReLU, RMSNorm": ("encoder", dict(
        mlp_ratio=2.5, qkv_bias=False, act_layer=nn.ReLU, norm_layer=nn.RMSNorm)),
    "out_chans 128": ("encoder", dict(out_chans=128)),
    "1 multimask output": ("decoder", dict(num_multimask_outputs=1)),
    "4 multimask outputs": ("decoder", dict(num_multimask_outputs=4)),
    "IoU head depth 1, ReLU": ("decoder", dict(iou_head_depth=1, iou_head_hidden_dim=32,
                                               activation=nn.ReLU)),
    "transformer depth 0": ("transformer", dict(depth=0)),
    "transformer depth 3, 8 heads, no downsampling": ("transformer", dict(
        depth=3, num_heads=8, attention_downsample_rate=1)),
    "mask_in_chans 8, ReLU": ("prompt", dict(mask_in_chans=8, activation=nn.ReLU)),
    "pixel mean and std": ("sam", dict(pixel_mean=[100.0, 110.0, 120.0],
                                       pixel_std=[50.0, 60.0, 70.0])),
}


def variant_sam(part: str = "encoder", overrides: dict | None = None, seed: int = 0) -> Sam:
    """A small reference Sam with `overrides` for the constructor of `part` ("encoder",
    "prompt", "decoder", "transformer" or "sam"), random weights (relative and absolute
    positions filled, norms' weights moved off 1 and 0)."""
    parts = {part: overrides or {}}
    encoder = dict(ENCODER, **parts.get("encoder", {}))
    dim, size = encoder["out_chans"], encoder["img_size"]
    grid = size // encoder["patch_size"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = TwoWayTransformer(**dict(dict(depth=2, embedding_dim=dim, mlp_dim=128,
                                                    num_heads=4), **parts.get("transformer", {})))
        sam = Sam(
            image_encoder=ImageEncoderViT(**encoder),
            prompt_encoder=PromptEncoder(**dict(
                dict(embed_dim=dim, image_embedding_size=(grid, grid),
                     input_image_size=(size, size), mask_in_chans=16),
                **parts.get("prompt", {}))),
            mask_decoder=MaskDecoder(**dict(
                dict(num_multimask_outputs=3, transformer=transformer, transformer_dim=dim,
                     iou_head_depth=3, iou_head_hidden_dim=64),
                **parts.get("decoder", {}))),
            **parts.get("sam", {}),
        )
        with torch.no_grad():  # norms start at weight 1, bias 0: make them count
            for p in sam.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
    fill_zero_init_tables(sam, seed)
    return sam.eval()


def run_predictor(sam: Sam, image: np.ndarray) -> dict:
    """SamPredictor's outputs (masks, scores, low-res logits) for two prompts, single and
    multimask, a mask-input refinement, and the image embedding."""
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    out = {f"{name} multimask={mm}": tuple(
        torch.from_numpy(a) for a in predictor.predict(**PROMPTS[name], multimask_output=mm,
                                                       return_logits=True))
           for mm in (True, False) for name in ("two points", "point and box")}
    low_res = out["two points multimask=True"][2]
    refined = predictor.predict(**PROMPTS["two points"], mask_input=low_res[:1].numpy(),
                                multimask_output=False, return_logits=True)
    out["mask input"] = tuple(torch.from_numpy(a) for a in refined)
    out["embedding"] = (predictor.features,)
    return out


def assert_predictor_parity(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name, ref in expected.items():
        for a, b in zip(got[name], ref, strict=True):
            assert a.shape == b.shape, (name, a.shape, b.shape)
            assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)
        if name != "embedding":
            assert mask_iou_outside_margin(got[name][0], ref[0]) >= tol.MASK_IOU_FP32, name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_predictor_parity_fp32(variant):
    sam = variant_sam(*VARIANTS[variant])
    image = smooth_image()
    with torch.no_grad():
        expected = run_predictor(sam, image)
        fastsam_core.optimize(sam, FastConfig(dtype=torch.float32))
        got = run_predictor(sam, image)
    assert not fallbacks_of(sam), fallbacks_of(sam)
    assert all(s.path != "reference" for s in fastsam_core.report(sam).stages)
    assert_predictor_parity(got, expected)


@pytest.mark.parametrize("attention", ["math", "triton"])
@pytest.mark.parametrize("variant", ["patch 8 (16 x 16 grid)",
                                     "120 px (7 x 7 grid, padded windows)", "head dim 48"])
def test_encoder_variants_other_backends_fp32(variant, attention, kernel_launches):
    """The math path and the Triton kernel (its interpreter on a CPU) on the variants'
    grids and head dims."""
    sam = variant_sam(*VARIANTS[variant])
    x = torch.randn(1, 3, sam.image_encoder.img_size, sam.image_encoder.img_size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = sam.image_encoder(x)
        fastsam_core.optimize(sam, FastConfig(dtype=torch.float32, attention=attention))
        got = sam.image_encoder(x)
    assert_close_fp32(got, expected, tol.FP32_STAGE_REL_L2)
    assert fastsam_core.report(sam).path_of("image_encoder") == "fast"
    assert bool(kernel_launches) == (attention == "triton")


@torch.inference_mode()
def test_reference_builder_follows_the_patch_size():
    """build_sam with another patch size: the prompt encoder's grid is the encoder's token
    grid (it was image_size / 16, so the reference model itself failed in its decoder)."""
    sam = build_sam("vit_b", 128, patch_size=8, depth=2, embed_dim=64, num_heads=4,
                    global_attn_indexes=(1,), window_size=4)
    assert sam.prompt_encoder.image_embedding_size == (16, 16)
    assert sam.prompt_encoder.mask_input_size == (64, 64)
    predictor = SamPredictor(sam)
    predictor.set_image(smooth_image(96, 128))
    masks, scores, low_res = predictor.predict(point_coords=np.array([[40.0, 30.0]]),
                                               point_labels=np.array([1]))
    assert masks.shape == (3, 96, 128) and low_res.shape == (3, 64, 64)


def test_img_size_changed_after_construction_keeps_the_reference_encoder():
    """A model built for 128 px, run at 64 px (img_size set, absolute positions interpolated,
    as done to run SAM at a lower resolution): the reference interpolates its global blocks'
    relative-position tables on every call; the fast encoder does not take them, so the
    encoder stays the reference, with a warning saying why, and the outputs are unchanged."""
    sam = variant_sam()
    encoder = sam.image_encoder
    with torch.no_grad():
        encoder.img_size = 64  # 4 x 4 tokens: one window; the global tables are for 8 x 8
        encoder.pos_embed = nn.Parameter(torch.nn.functional.interpolate(
            encoder.pos_embed.permute(0, 3, 1, 2), size=(4, 4), mode="bilinear",
        ).permute(0, 2, 3, 1))
        prompt = sam.prompt_encoder
        prompt.image_embedding_size, prompt.input_image_size = (4, 4), (64, 64)
        prompt.mask_input_size = (16, 16)
        image = smooth_image(60, 50)
        expected = run_predictor(sam, image)
        with pytest.warns(UserWarning, match="image_encoder kept as the reference: rel_pos_h "
                          "has 15 rows, expected 7 .* the reference interpolates"):
            fastsam_core.optimize(sam, FastConfig(dtype=torch.float32))
        assert fastsam_core.report(sam).path_of("image_encoder") == "reference"
        assert fastsam_core.report(sam).path_of("mask_decoder") == "fast"
        assert_predictor_parity(run_predictor(sam, image), expected)
