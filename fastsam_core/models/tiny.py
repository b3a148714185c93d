"""Tiny trained checkpoints shipped with the package (SAM and SAM 2), loaded offline.

Builds the reference models (`segment_anything.modeling.Sam`, `sam2.modeling.sam2_base.SAM2Base`)
from small configurations and loads the state_dicts that `scripts/train_tiny.py` trained on the
procedural shapes of `fastsam_core.models.tiny_data`. They stand in for the real checkpoints
(which cannot be downloaded here) wherever a test needs masks that mean something: confident
logits, masks that follow object boundaries, IoU predictions that pass the automatic mask
generator's thresholds. Replaces nothing in the reference packages; the builders mirror
`segment_anything.build_sam._build_sam` and sam2's `configs/sam2.1/sam2.1_hiera_t.yaml` with
small dimensions. How each was trained: scripts/TRAINING.md.

Each checkpoint is `tiny_weights/<kind>.pt` (a state_dict) plus `tiny_weights/<kind>.json`:
`{"kind", "model": constructor config, "training": how it was trained, "heldout": measured
IoUs}`. Tensors may be stored in fp16 to keep the files small; they are loaded back as fp32.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).parent / "tiny_weights"
KINDS = ("sam", "sam2")


def tiny(kind: str = "sam") -> nn.Module:
    """The shipped tiny trained model: reference classes, eval mode, fp32, CPU.

    Args:
        kind: "sam" (a `segment_anything` `Sam`, 128 px input) or "sam2" (a sam2 `SAM2Base`
            image path, 256 px input; its memory modules are untrained).

    Returns:
        The model. Use it with the reference predictors (`SamPredictor`, `SAM2ImagePredictor`:
        set its `_bb_feat_sizes` for the model's size, design.md section 8); its input size is
        `model.image_encoder.img_size` (SAM) or `model.image_size` (SAM 2).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not (WEIGHTS_DIR / f"{kind}.pt").exists():
        raise FileNotFoundError(f"no tiny {kind!r} checkpoint ships in {WEIGHTS_DIR}")
    config = load_config(WEIGHTS_DIR / f"{kind}.json")
    model = build_from_config(config)
    state = torch.load(WEIGHTS_DIR / f"{kind}.pt", map_location="cpu", weights_only=True)
    load_state(model, state)
    return model.eval()


def sam2_feature_sizes(image_size: int) -> list[tuple[int, int]]:
    """The backbone feature sizes (strides 4, 8, 16) that `SAM2ImagePredictor._bb_feat_sizes`
    must hold for a SAM 2 model of `image_size` px (the predictor hard-codes 1024 px's;
    design.md section 8)."""
    return [(image_size // s, image_size // s) for s in (4, 8, 16)]


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint's json config (see the module docstring for its keys)."""
    with open(path) as f:
        return json.load(f)


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `state` into `model` strictly, casting each tensor to the parameter's dtype."""
    own = model.state_dict()
    cast = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    model.load_state_dict(cast, strict=True)


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """Build the reference model (random weights) described by a checkpoint config."""
    kind = config.get("kind")
    if kind == "sam":
        return build_tiny_sam(config["model"])
    if kind == "sam2":
        return build_tiny_sam2(config["model"])
    raise ValueError(f"config['kind'] must be one of {KINDS}, got {kind!r}")


def build_tiny_sam(cfg: dict[str, Any]) -> nn.Module:
    """A `segment_anything` `Sam` from a small configuration, as `_build_sam` wires it.

    Args:
        cfg: image_size, patch_size, encoder_embed_dim, encoder_depth, encoder_num_heads,
            encoder_global_attn_indexes, encoder_window_size, encoder_mlp_ratio, use_rel_pos,
            prompt_embed_dim (the neck's output channels), decoder_depth, decoder_mlp_dim,
            decoder_num_heads, iou_head_depth, iou_head_hidden_dim, mask_in_chans.

    Returns:
        The model in training mode with PyTorch's default initialization.
    """
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    size, patch, dim = cfg["image_size"], cfg["patch_size"], cfg["prompt_embed_dim"]
    if size % patch:
        raise ValueError(f"image_size {size} must be a multiple of patch_size {patch}")
    grid = size // patch
    encoder = ImageEncoderViT(
        img_size=size,
        patch_size=patch,
        embed_dim=cfg["encoder_embed_dim"],
        depth=cfg["encoder_depth"],
        num_heads=cfg["encoder_num_heads"],
        mlp_ratio=cfg["encoder_mlp_ratio"],
        out_chans=dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=cfg["use_rel_pos"],
        window_size=cfg["encoder_window_size"],
        global_attn_indexes=tuple(cfg["encoder_global_attn_indexes"]),
    )
    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(size, size),
            mask_in_chans=cfg["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=cfg["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=cfg["decoder_mlp_dim"],
                num_heads=cfg["decoder_num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=cfg["iou_head_depth"],
            iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        ),
    )


def build_tiny_sam2(cfg: dict[str, Any]) -> nn.Module:
    """A sam2 `SAM2Base` from a small configuration, wired as `sam2.1_hiera_t.yaml`.

    The trunk is a Hiera with `len(trunk_stages)` stages; with three stages and `scalp=0` the
    neck's outputs have strides 4, 8 and 16, the image embedding is image_size / 16 on a side
    and the mask decoder uses the two finer levels (`use_high_res_features_in_sam`). The memory
    attention and memory encoder are built (SAM2Base needs them) with the given small sizes.

    Args:
        cfg: image_size, trunk_embed_dim, trunk_num_heads, trunk_stages, trunk_window_spec,
            trunk_global_att_blocks, trunk_window_pos_embed_bkg_spatial_size, scalp, d_model
            (neck and decoder width), fpn_top_down_levels, mem_dim, memory_attention_layers,
            memory_attention_ffn_dim, num_maskmem, decoder_mlp_dim, decoder_num_heads,
            iou_head_hidden_dim.

    Returns:
        The model in training mode with the reference initialization.
    """
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine
    from sam2.modeling.sam.mask_decoder import MaskDecoder
    from sam2.modeling.sam.transformer import RoPEAttention, TwoWayTransformer
    from sam2.modeling.sam2_base import SAM2Base

    size, d, mem = cfg["image_size"], cfg["d_model"], cfg["mem_dim"]
    stages = tuple(cfg["trunk_stages"])
    trunk = Hiera(
        embed_dim=cfg["trunk_embed_dim"],
        num_heads=cfg["trunk_num_heads"],
        q_pool=len(stages) - 1,
        stages=stages,
        window_spec=tuple(cfg["trunk_window_spec"]),
        global_att_blocks=tuple(cfg["trunk_global_att_blocks"]),
        window_pos_embed_bkg_spatial_size=tuple(cfg["trunk_window_pos_embed_bkg_spatial_size"]),
    )
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(num_pos_feats=d, normalize=True, temperature=10000),
        d_model=d,
        backbone_channel_list=list(trunk.channel_list),
        fpn_top_down_levels=list(cfg["fpn_top_down_levels"]),
        fpn_interp_model="nearest",
    )
    grid = size // 16
    rope = {"rope_theta": 10000.0, "feat_sizes": [grid, grid], "embedding_dim": d, "num_heads": 1}
    layer = MemoryAttentionLayer(
        activation="relu",
        cross_attention=RoPEAttention(
            rope_k_repeat=True, downsample_rate=1, dropout=0.1, kv_in_dim=mem, **rope
        ),
        d_model=d,
        dim_feedforward=cfg["memory_attention_ffn_dim"],
        dropout=0.1,
        pos_enc_at_attn=False,
        pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
        self_attention=RoPEAttention(downsample_rate=1, dropout=0.1, **rope),
    )
    memory_encoder = MemoryEncoder(
        out_dim=mem,
        mask_downsampler=MaskDownSampler(embed_dim=d, kernel_size=3, stride=2, padding=1),
        fuser=Fuser(CXBlock(dim=d, kernel_size=7, padding=3, layer_scale_init_value=1e-6), 2),
        position_encoding=PositionEmbeddingSine(num_pos_feats=mem, normalize=True),
        in_dim=d,
    )
    model = SAM2Base(
        image_encoder=ImageEncoder(trunk=trunk, neck=neck, scalp=cfg["scalp"]),
        memory_attention=MemoryAttention(
            d_model=d,
            pos_enc_at_input=True,
            layer=layer,
            num_layers=cfg["memory_attention_layers"],
        ),
        memory_encoder=memory_encoder,
        num_maskmem=cfg["num_maskmem"],
        image_size=size,
        **SAM2_FLAGS,
    )
    # SAM2Base hard-codes the decoder's widths (mlp 2048, 8 heads, IoU head 256), too big for
    # a tiny model: rebuild it with the same flags and the configured widths.
    model.sam_mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2,
            embedding_dim=d,
            mlp_dim=cfg["decoder_mlp_dim"],
            num_heads=cfg["decoder_num_heads"],
        ),
        transformer_dim=d,
        iou_head_depth=3,
        iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        use_high_res_features=model.use_high_res_features_in_sam,
        iou_prediction_use_sigmoid=model.iou_prediction_use_sigmoid,
        pred_obj_scores=model.pred_obj_scores,
        pred_obj_scores_mlp=model.pred_obj_scores_mlp,
        use_multimask_token_for_obj_ptr=model.use_multimask_token_for_obj_ptr,
    )
    return model


# The SAM2Base flags of sam2.1_hiera_t.yaml (everything but the module sizes).
SAM2_FLAGS: dict[str, Any] = {
    "sigmoid_scale_for_mem_enc": 20.0,
    "sigmoid_bias_for_mem_enc": -10.0,
    "use_mask_input_as_output_without_sam": True,
    "directly_add_no_mem_embed": True,
    "no_obj_embed_spatial": True,
    "use_high_res_features_in_sam": True,
    "multimask_output_in_sam": True,
    "iou_prediction_use_sigmoid": True,
    "use_obj_ptrs_in_encoder": True,
    "add_tpos_enc_to_obj_ptrs": True,
    "proj_tpos_enc_in_obj_ptrs": True,
    "use_signed_tpos_enc_to_obj_ptrs": True,
    "only_obj_ptrs_in_the_past_for_eval": True,
    "pred_obj_scores": True,
    "pred_obj_scores_mlp": True,
    "fixed_no_obj_ptr": True,
    "multimask_output_for_tracking": True,
    "use_multimask_token_for_obj_ptr": True,
    "multimask_min_pt_num": 0,
    "multimask_max_pt_num": 1,
    "use_mlp_for_obj_ptr_proj": True,
    "compile_image_encoder": False,
}
