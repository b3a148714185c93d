"""Fast SAM 2 memory encoder: a frame's features fused with its predicted mask.

Replaces `sam2.modeling.memory_encoder.MemoryEncoder` (mask downsampler, pixel-feature
projection, ConvNeXt fuser, output projection, sine position encoding), keeping the parameter
names, the forward signature and the output (`{"vision_features", "vision_pos_enc"}`, in
pix_feat's dtype). Differences: weights and activations in the configured dtype whatever the
autocast state, channel LayerNorms as `F.layer_norm` (fp32 statistics in low precision; the
reference computes them in the input dtype), the position encoding computed once per size and
broadcast over the batch, optional `torch.compile` of the fused computation; training mode or
autograd recording run the kept reference.
"""

from __future__ import annotations

import torch
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from torch import nn

from fastsam_core.config import FastConfig
from fastsam_core.models.compiled import LazyCompiled
from fastsam_core.models.convert import adopt_module, dtype_name
from fastsam_core.models.fallback import (
    ReferenceFallback,
    has_forward_hooks,
    hooks_note,
    without_autocast,
)
from fastsam_core.models.sam.common import LAYER_NORMS_2D, layer_norm_2d
from fastsam_core.report import StageReport, UnsupportedModule


class FastMemoryEncoder(ReferenceFallback):
    """SAM 2's memory encoder (see the module docstring)."""

    def __init__(self, ref: MemoryEncoder, dtype: torch.dtype,
                 compile_mode: str | None = None) -> None:
        super().__init__()
        self.stage = "SAM 2 memory encoder"
        self.mask_downsampler = adopt_module(ref.mask_downsampler, dtype)
        self.pix_feat_proj = adopt_module(ref.pix_feat_proj, dtype)
        self.fuser = adopt_module(ref.fuser, dtype)
        self.out_proj = adopt_module(ref.out_proj, dtype)
        self.position_encoding = ref.position_encoding  # no parameters
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._run_fast = LazyCompiled(self._encode, compile_mode, "SAM 2 memory encoder")

    @classmethod
    def from_reference(cls, ref: MemoryEncoder, config: FastConfig,
                       dtype: torch.dtype) -> FastMemoryEncoder:
        if type(ref) is not MemoryEncoder:
            raise UnsupportedModule(f"{type(ref).__qualname__} is not sam2's MemoryEncoder")
        downsampler_ok = type(ref.mask_downsampler) is MaskDownSampler and all(
            isinstance(m, (nn.Conv2d, nn.GELU, *LAYER_NORMS_2D))
            for m in ref.mask_downsampler.encoder)
        fuser_ok = type(ref.fuser) is Fuser and all(
            type(layer) is CXBlock and isinstance(layer.drop_path, nn.Identity)
            for layer in ref.fuser.layers)
        if not (downsampler_ok and fuser_ok and
                type(ref.position_encoding) is PositionEmbeddingSine):
            raise UnsupportedModule("not the reference mask downsampler / fuser / sine "
                                    "position encoding")
        return cls(ref, dtype, config.compile)

    @property
    def dtype(self) -> torch.dtype:
        return self.pix_feat_proj.weight.dtype

    @without_autocast
    def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor,
                skip_mask_sigmoid: bool = False) -> dict:
        """pix_feat B x C x h x w, masks B x 1 x H x W (logits, or probabilities with
        skip_mask_sigmoid) -> {"vision_features": B x C_out x h x w, "vision_pos_enc":
        [B x C_out x h x w]}."""
        why = self.inference_only_reason(pix_feat, masks)
        if why is not None:
            return self.run_reference(why, pix_feat, masks, skip_mask_sigmoid)
        x = self._run_fast(pix_feat, masks, skip_mask_sigmoid,
                           eager=has_forward_hooks(self.mask_downsampler, self.fuser))
        # a copy per call, as the reference makes: callers may write into their memories
        pos = self._pos(x).to(x.dtype).expand(x.shape[0], -1, -1, -1).clone()
        return {"vision_features": x, "vision_pos_enc": [pos]}

    def _encode(self, pix_feat: torch.Tensor, masks: torch.Tensor,
                skip_mask_sigmoid: bool) -> torch.Tensor:
        """The memory features, B x C_out x h x w in pix_feat's dtype (the mask downsampler
        and the fuser called as the reference calls them while hooks sit on them)."""
        masks = masks.to(self.dtype)
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        if has_forward_hooks(self.mask_downsampler):
            masks = self.mask_downsampler(masks)
        else:
            for layer in self.mask_downsampler.encoder:  # B x 1 x H x W -> B x C x h x w
                masks = layer_norm_2d(masks, layer) if isinstance(layer, LAYER_NORMS_2D) \
                    else layer(masks)
        x = self.pix_feat_proj(pix_feat.to(device=masks.device, dtype=self.dtype)) + masks
        if has_forward_hooks(self.fuser):
            x = self.fuser(x)
        else:
            x = self.fuser.proj(x)
            for block in self.fuser.layers:
                x = x + self._cx_block(block, x)
        return self.out_proj(x).to(pix_feat.dtype)

    @staticmethod
    def _cx_block(block: CXBlock, x: torch.Tensor) -> torch.Tensor:
        """The residual branch of a ConvNeXt block: B x C x h x w -> B x C x h x w."""
        y = layer_norm_2d(block.dwconv(x), block.norm).permute(0, 2, 3, 1)  # B x h x w x C
        y = block.pwconv2(block.act(block.pwconv1(y)))
        if block.gamma is not None:
            y = block.gamma * y
        return y.permute(0, 3, 1, 2)

    def _pos(self, x: torch.Tensor) -> torch.Tensor:
        """The sine encoding of x's h x w grid, 1 x C x h x w fp32, cached (B x C x h x w
        from the module, called on x as the reference calls it, while hooks sit on it)."""
        if has_forward_hooks(self.position_encoding):
            return self.position_encoding(x)
        key = (*x.shape[-2:], x.device)
        if key not in self._pos_cache:
            probe = torch.empty(1, 1, *x.shape[-2:], device=x.device)
            self._pos_cache[key] = self.position_encoding(probe)
        return self._pos_cache[key]

    def describe(self) -> list[StageReport]:
        dtype = dtype_name(self.dtype)
        return [StageReport("memory_encoder", "fast",
                            f"mask downsampler + {len(self.fuser.layers)} ConvNeXt blocks, "
                            f"{dtype}, cached position encoding, compile: "
                            f"{self._run_fast.summary}"
                            + hooks_note(self, "mask_downsampler", "fuser", eager=True)
                            + hooks_note(self, "position_encoding")
                            + self.fallback_summary())]
