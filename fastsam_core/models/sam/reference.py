"""Reference SAM models with random weights, at any image size, for benchmarks and tests.

Builds `segment_anything`'s own classes with the hyperparameters of
`segment_anything.build_sam._build_sam` (vit_b / vit_l / vit_h), except that the image size is
a parameter, and fills the tables the reference initializes to zero (relative positions,
absolute position embedding) so every path of the encoder is exercised.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

VIT_VARIANTS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def build_encoder(
    variant: str = "vit_b", image_size: int = 1024, **overrides: object
) -> ImageEncoderViT:
    """A reference `ImageEncoderViT` as SAM builds it (window 14, rel-pos on), random weights.

    Args:
        variant: "vit_b", "vit_l" or "vit_h".
        image_size: input size in pixels (16 px patches).
        overrides: any other `ImageEncoderViT` argument (depth, embed_dim, window_size, ...).
    """
    if variant not in VIT_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VIT_VARIANTS)}, got {variant!r}")
    kwargs = dict(
        VIT_VARIANTS[variant],
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        window_size=14,
        out_chans=256,
    )
    kwargs.update(overrides)
    return ImageEncoderViT(**kwargs).eval()


def build_sam(
    variant: str = "vit_b", image_size: int = 1024, seed: int = 0, **encoder_overrides: object
) -> Sam:
    """A reference `Sam` with random weights (seeded), zero-initialized tables filled.

    Args:
        variant: encoder variant, see `build_encoder`.
        image_size: model input size; the image embedding is image_size / patch_size (16
            unless overridden) on a side.
        seed: seed for the weights.
        encoder_overrides: passed to `build_encoder`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = _build(variant, image_size, **encoder_overrides)
    fill_zero_init_tables(sam, seed)
    return sam.eval()


def _build(variant: str, image_size: int, **encoder_overrides: object) -> Sam:
    encoder = build_encoder(variant, image_size, **encoder_overrides)
    prompt_dim = encoder.neck[0].out_channels
    grid = image_size // encoder.patch_embed.proj.stride[0]  # the encoder's token grid
    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=prompt_dim, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )


@torch.no_grad()
def fill_zero_init_tables(model: torch.nn.Module, seed: int = 0, std: float = 0.5) -> None:
    """Fill the relative-position tables and absolute position embeddings with N(0, std).

    The reference initializes them to zero, which would leave the bias path untested.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("rel_pos_h", "rel_pos_w", "pos_embed")):
            p.copy_(torch.randn(p.shape, generator=gen) * std)
