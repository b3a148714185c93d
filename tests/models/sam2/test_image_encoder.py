"""Parity of the fast SAM 2 image encoder (Hiera trunk + FPN neck) with sam2's, and the
SAM2ImagePredictor on an optimized model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sam2.build_sam import build_sam2
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.sam2.image_encoder import FastSam2ImageEncoder
from tests import tolerances as tol
from tests.models.sam.test_predictor_parity import smooth_image
from tests.parity import (
    assert_close_fp32,
    assert_lowp_parity,
    in_dtype,
    mask_iou_outside_margin,
)


def randomize_pos_embeds(module: torch.nn.Module, seed: int = 0) -> None:
    """sam2 starts pos_embed and pos_embed_window at zero: fill them so they matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def small_encoder(seed: int = 0, top_down=(2, 3), interp="nearest", fuse="sum", q_pool=3,
                  interm=True, windows=(8, 4, 4, 2)) -> ImageEncoder:
    """A small Hiera (4 stages, q-pooling, windowed and global blocks) with its FPN neck.
    `interm` False: the trunk returns its last stage only, the neck has one level (no scalp)."""
    torch.manual_seed(seed)
    trunk = Hiera(embed_dim=32, num_heads=1, stages=(1, 2, 3, 1), global_att_blocks=(4,),
                  window_pos_embed_bkg_spatial_size=(7, 7), window_spec=windows,
                  q_pool=q_pool, return_interm_layers=interm)
    neck = FpnNeck(PositionEmbeddingSine(64), d_model=64,
                   backbone_channel_list=trunk.channel_list, fpn_top_down_levels=top_down,
                   fpn_interp_model=interp, fuse_type=fuse)
    encoder = ImageEncoder(trunk, neck, scalp=1 if interm else 0).eval()
    randomize_pos_embeds(encoder, seed)
    return encoder


def small_sam2(seed: int = 0, overrides: tuple[str, ...] = ()):
    """sam2.1 hiera_t at 256 px (the quirks of design.md section 8), pos embeds filled."""
    torch.manual_seed(seed)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu",
                       hydra_overrides_extra=["++model.image_size=256", *overrides])
    randomize_pos_embeds(model.image_encoder, seed)
    return model


def images(batch=2, size=128, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fast(encoder, dtype=torch.float32):
    return FastSam2ImageEncoder.from_reference(encoder, FastConfig(), dtype).eval()


def outputs(out: dict) -> list[torch.Tensor]:
    return [out["vision_features"], *out["backbone_fpn"], *out["vision_pos_enc"]]


@torch.inference_mode()
@pytest.mark.parametrize("top_down, interp, fuse", [((2, 3), "nearest", "sum"),
                                                    ((0, 1, 2, 3), "bilinear", "sum"),
                                                    ((1, 2, 3), "nearest", "avg")])
def test_encoder_fp32(top_down, interp, fuse):
    ref = small_encoder(top_down=top_down, interp=interp, fuse=fuse)
    x = images()
    expected, got = ref(x), fast(ref)(x)
    assert set(got) == set(expected)
    for a, b in zip(outputs(got), outputs(expected), strict=True):
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("kwargs", [
    dict(q_pool=2, top_down=(0, 1)),  # no q-pooling into the last stage: two 8 x 8 levels
    dict(interm=False, top_down=None),  # the last stage only, one neck level, scalp 0
], ids=["q_pool=2", "last stage only"])
def test_encoder_fp32_other_trunk_layouts(kwargs):
    """The neck's encodings follow the trunk's stage sizes as the reference's does: a stage
    change without q-pooling keeps the size; a trunk without intermediate layers returns (and
    the neck encodes) its last stage only."""
    ref = small_encoder(**kwargs)
    x = images()
    expected, got = ref(x), fast(ref)(x)
    for a, b in zip(outputs(got), outputs(expected), strict=True):
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_encoder_at_a_size_off_the_strides_and_windows():
    """70 px: the patch embedding (kernel 7, stride 4, padding 3) gives 18 x 18 tokens, not
    70 // 4; the q-pooling floors (9 -> 4 -> 2) inside windows of 6 padded to 12, for the trunk
    and for the neck's encodings alike. (The reference takes grids of a multiple of the first
    window only, and q-pools in windows that tile the pooled grid too.)"""
    ref = small_encoder(windows=(6, 6, 4, 2))
    x = images(size=70)
    expected, got = ref(x), fast(ref)(x)
    assert [f.shape[-1] for f in expected["backbone_fpn"]] == [18, 9, 4]
    for a, b in zip(outputs(got), outputs(expected), strict=True):
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_neck_adds_the_top_down_path_in_fp32_in_bf16():
    """The reference upsamples the coarser level in fp32 and adds it to the bf16 lateral: the
    levels it fuses are fp32 sums (and their encodings fp32), the others bf16."""
    ref = small_encoder(top_down=(1, 2, 3))
    encoder = fast(ref, torch.bfloat16)
    naive = in_dtype(ref, torch.bfloat16)
    trunk_out = naive.trunk(images().to(torch.bfloat16))
    expected, expected_pos = naive.neck(trunk_out)
    sizes = [tuple(t.shape[-2:]) for t in trunk_out]
    got, pos = encoder.neck(trunk_out, [encoder.neck.pos_for(s, torch.device("cpu"))
                                        for s in sizes])
    assert [t.dtype for t in expected] == [torch.bfloat16, torch.float32, torch.float32,
                                           torch.bfloat16]
    assert [t.dtype for t in got + pos] == [t.dtype for t in expected + expected_pos]
    exact, exact_pos = in_dtype(ref, torch.float64).neck([t.double() for t in trunk_out])
    for a, b, c in zip(got + pos, expected + expected_pos, exact + exact_pos, strict=True):
        assert_lowp_parity(a, b, c)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_encoder_low_precision(dtype):
    ref = small_encoder()
    x = images()
    got = fast(ref, dtype)(x)
    assert got["vision_features"].dtype == torch.float32  # the input's dtype
    naive = in_dtype(ref, dtype)(x.to(dtype))
    exact = in_dtype(ref, torch.float64)(x.double())
    for level in range(len(exact["backbone_fpn"])):
        assert_lowp_parity(got["backbone_fpn"][level], naive["backbone_fpn"][level],
                           exact["backbone_fpn"][level])


@torch.inference_mode()
def test_cached_position_embedding_is_the_references_and_follows_loaded_weights():
    ref = small_encoder()
    encoder = fast(ref)
    hw = (32, 32)  # 128 px through the stride-4 patch embedding
    assert_close_fp32(encoder.trunk.pos_embed_for(hw)[0], ref.trunk._get_pos_embed(hw)[0],
                      tol.FP32_OP_REL_L2)
    assert encoder.trunk.pos_embed_for(hw) is encoder.trunk.pos_embed_for(hw)  # cached
    other = small_encoder(seed=5)
    encoder.load_state_dict(other.state_dict())
    assert_close_fp32(encoder.trunk.pos_embed_for(hw)[0], other.trunk._get_pos_embed(hw)[0],
                      tol.FP32_OP_REL_L2)


@torch.inference_mode()
def test_cached_position_embedding_follows_the_input_size():
    """One encoder on inputs of two sizes and back: each size gets its own embedding."""
    ref = small_encoder()
    encoder = fast(ref)
    for size in (128, 64, 128):
        x = images(size=size)
        for a, b in zip(outputs(encoder(x)), outputs(ref(x)), strict=True):
            assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


@torch.no_grad()
def test_a_write_to_the_returned_position_encoding_changes_no_later_call():
    """What the encoder returns is the caller's (the fp32 encoder returned its cache). The
    reference's outputs are taken first: it shares its position_encoding (and that module's
    cache) with the fast neck, so a write into that cache would reach it too."""
    ref = small_encoder()
    encoder, x = fast(ref), images(batch=1)
    expected = [t.clone() for t in outputs(ref(x))]
    for pos in encoder(x)["vision_pos_enc"]:
        pos.zero_()
    for a, b in zip(outputs(encoder(x)), expected, strict=True):
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


@torch.no_grad()
def test_position_embedding_traces_into_a_users_compiled_function():
    ref = small_encoder()
    expected = ref.trunk._get_pos_embed((16, 16))  # the reference's, 1 x h x w x C
    encoder = fast(ref)
    traced = torch.compile(lambda: encoder.trunk.pos_embed_for((16, 16)) * 1, backend="eager",
                           fullgraph=True)
    torch._dynamo.reset()
    assert_close_fp32(traced(), expected, tol.FP32_OP_REL_L2)


def test_cached_position_embedding_follows_a_training_step():
    """train(), an optimizer step on the shared fp32 weights, eval(): the fast path must see
    the stepped position tables, not the cached embedding of the old ones."""
    ref = small_encoder()
    encoder = fast(ref)
    encoder.set_reference(ref)
    x = images(batch=1)
    with torch.inference_mode():
        encoder(x)  # fills the cache
    encoder.train()
    optimizer = torch.optim.SGD(encoder.parameters(), lr=1.0)
    with pytest.warns(UserWarning, match="training mode") as warned:
        encoder(x)["vision_features"].square().mean().backward()
    assert "keeps its own" not in str(warned[0].message)  # shared weights: nothing to say
    optimizer.step()
    encoder.eval()
    with torch.inference_mode():
        got, expected = outputs(encoder(x)), outputs(ref(x))
    for g, e in zip(got, expected, strict=True):
        assert_close_fp32(g, e, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_neck_alone():
    ref = small_encoder()
    encoder = fast(ref)
    x = images()
    trunk_out = ref.trunk(x)
    expected, expected_pos = ref.neck(trunk_out)
    sizes = [t.shape[-2:] for t in trunk_out]
    got, pos = encoder.neck(trunk_out, [encoder.neck.pos_for(tuple(s), x.device) for s in sizes])
    for a, b in zip(got + pos, expected + expected_pos, strict=True):
        assert_close_fp32(a, b, tol.FP32_OP_REL_L2)


def test_state_dict_keys_are_the_references():
    ref = small_encoder()
    for dtype in (torch.float32, torch.bfloat16):
        keys = fast(ref, dtype).state_dict()
        assert list(keys) == list(ref.state_dict())
        assert all(v.dtype == dtype for v in keys.values())


@pytest.mark.parametrize("bad, error", [
    (torch.randn(2, 4, 128, 128), "B x 3 x H x W"),
    (torch.zeros(1, 3, 128, 128, dtype=torch.uint8), "normalized float"),
])
def test_bad_input(bad, error):
    with torch.inference_mode(), pytest.raises(ValueError, match=error):
        fast(small_encoder())(bad)


def test_sample_on_another_device_than_the_model_raises():
    encoder = fast(small_encoder()).to("meta")
    with torch.inference_mode(), pytest.raises(ValueError, match="on cpu, the model on meta"):
        encoder(images(batch=1))


PROMPTS = {
    "point": dict(point_coords=np.array([[70.0, 95.0]]), point_labels=np.array([1])),
    "box": dict(box=np.array([30.0, 40.0, 200.0, 150.0])),
    "point and box": dict(point_coords=np.array([[120.0, 90.0]]), point_labels=np.array([1]),
                          box=np.array([30.0, 40.0, 200.0, 150.0])),
}


def predictor_logits(predictor, image):
    predictor.set_image(image)
    return {name: predictor.predict(**p, multimask_output=True, return_logits=True)
            for name, p in PROMPTS.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_predictor_on_optimized_model(dtype):
    model = small_sam2()
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # 256 px (design.md, sec. 8)
    image = smooth_image(180, 240)
    expected = predictor_logits(predictor, image)
    assert fastsam_core.optimize(predictor, FastConfig(dtype=dtype)) is predictor
    assert fastsam_core.report(model).path_of("image_encoder") == "fast"
    got = predictor_logits(predictor, image)
    for name in PROMPTS:
        logits, scores = (torch.as_tensor(a) for a in got[name][:2])
        ref_logits, ref_scores = (torch.as_tensor(a) for a in expected[name][:2])
        iou = mask_iou_outside_margin(logits, ref_logits)
        if dtype == torch.float32:
            assert_close_fp32(logits, ref_logits, tol.FP32_STAGE_REL_L2)
            assert_close_fp32(scores, ref_scores, tol.FP32_STAGE_REL_L2)
            assert iou >= tol.MASK_IOU_FP32, name
        else:
            assert iou >= tol.MASK_IOU_BF16, (name, iou)
    fastsam_core.restore(predictor)
    assert type(model.image_encoder) is ImageEncoder


def test_patched_covers_sam2_builders_imported_before():
    with fastsam_core.patched(FastConfig(attention="math")):
        model = small_sam2()  # calls build_sam2, imported at the top of this file
        train = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu",
                           mode="train", hydra_overrides_extra=["++model.image_size=256"])
    assert fastsam_core.is_optimized(model) and not model.training
    assert not fastsam_core.is_optimized(train)
    train.eval()  # outside the block: nothing happens
    assert not fastsam_core.is_optimized(train)
    assert not fastsam_core.is_optimized(small_sam2())
    assert "train" not in vars(SAM2Base) and "eval" not in vars(train)  # nothing left


def build_in_train_mode():
    return build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", mode="train",
                      hydra_overrides_extra=["++model.image_size=256"])


def test_patched_train_mode_model_pickles_copies_plainly_and_takes_its_blocks_config(
        tmp_path):
    """A model built with mode="train" in a block: it pickles; a copy of it is a plain model;
    eval mode (eval() or train(False)) while that block is open optimizes it with that
    block's config, and not once the block has closed."""
    import copy

    with fastsam_core.patched(FastConfig(attention="math")):
        outer_built = build_in_train_mode()
        torch.save(outer_built, tmp_path / "model.pt")
        copied = copy.deepcopy(outer_built)
        with fastsam_core.patched(FastConfig(attention="sdpa")):
            outer_built.train(False)
            inner_built = build_in_train_mode()
        inner_built.eval()  # its block has closed, the outer one is still open
        copied.eval()
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    loaded.eval()
    assert not fastsam_core.is_optimized(loaded) and not fastsam_core.is_optimized(copied)
    assert "attention='math'" in fastsam_core.report(outer_built).model
    assert not fastsam_core.is_optimized(inner_built)


def test_patched_optimizes_a_train_mode_model_once():
    """Eval mode optimizes a model built in train mode in the block once: restored inside the
    block, the model stays restored through a later eval()."""
    with fastsam_core.patched(FastConfig(attention="math")):
        model = build_in_train_mode()
        model.eval()
        assert fastsam_core.is_optimized(model)
        fastsam_core.restore(model)
        model.train().eval()
        assert not fastsam_core.is_optimized(model)


@pytest.mark.parametrize("part", ["trunk", "neck.position_encoding"])
def test_unsupported_trunk_is_kept_with_a_warning(part):
    """A subclass of the reference's trunk, or of its neck's sine encoding, may compute
    anything: the reference encoder is kept."""
    model = small_sam2()
    module = model.image_encoder.get_submodule(part)
    module.__class__ = type("Other", (type(module),), {})
    with pytest.warns(UserWarning, match="image_encoder kept as the reference"):
        fastsam_core.optimize(model)
    assert fastsam_core.report(model).path_of("image_encoder") == "reference"


@torch.inference_mode()
def test_encoder_traces_with_fullgraph():
    """torch.compile(fullgraph=True) through the whole encoder (aot_eager: the trace is what
    is under test; Inductor on this CPU would take minutes)."""
    from fastsam_core.models.compiled import LazyCompiled

    ref = small_encoder()
    encoder = fast(ref)
    encoder._run_fast = LazyCompiled(encoder._forward_fast, "default", "SAM 2 image encoder",
                                     backend="aot_eager", fullgraph=True)
    x = images()
    got = encoder(x)
    assert encoder._run_fast.status == "compiled"
    for a, b in zip(outputs(got), outputs(ref(x)), strict=True):
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)
