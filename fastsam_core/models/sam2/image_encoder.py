"""Fast SAM 2 image encoder: Hiera trunk and FPN neck.

Replaces `sam2.modeling.backbones.image_encoder.ImageEncoder` (with its
`sam2.modeling.backbones.hieradet.Hiera` trunk and `FpnNeck`), keeping the parameter names
(`trunk.*`, `neck.*`), the forward signature and the output (a dict of `vision_features`,
`vision_pos_enc`, `backbone_fpn`, in the input's dtype). Differences:

- the trunk's windowed absolute position embedding (a bicubic interpolation of `pos_embed`
  plus the tiled `pos_embed_window`) is computed once per input size, device and dtype and
  kept, not interpolated every call; recomputed when weights are loaded;
- the neck's sine position encodings are computed once per feature size and broadcast over
  the batch (the reference recomputes and `repeat`s them per call);
- weights and activations in the configured dtype (the blocks' attention is SDPA, LayerNorm
  statistics fp32), whatever the autocast state; the neck's top-down upsampling in fp32 as
  the reference does; optional `torch.compile` of the whole encoder (fullgraph);
- the blocks (`FastMultiScaleBlock`) run the reference's `MultiScaleBlock.forward` at
  inference, except that with int8 linears a block's norm1 may hand its int8 qkv the codes of
  its output (models/quant.py);
- training mode or autograd recording run the kept reference encoder instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import Hiera, MultiScaleBlock, do_pool
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.backbones.utils import window_partition, window_unpartition
from sam2.modeling.position_encoding import PositionEmbeddingSine
from torch import nn

from fastsam_core.config import FastConfig
from fastsam_core.models.compiled import LazyCompiled
from fastsam_core.models.convert import adopt_module, adopt_parameter, dtype_name, tensor_identity
from fastsam_core.models.fallback import ReferenceFallback, has_forward_hooks, hooks_note
from fastsam_core.models.quant import PendingLayerNorm, build_sparse_weights
from fastsam_core.report import StageReport, UnsupportedModule


class FastMultiScaleBlock(nn.Module):
    """Hiera block (reference `MultiScaleBlock`): the same children, so the same parameter
    names, and the reference's forward with drop-path the identity (inference).

    With int8 linears `norm1` may be a `models.quant.DeferredLayerNorm` (in a block that keeps
    its width: no stage-change projection also takes norm1's output); it then hands qkv the
    int8 codes of its output, window-partitioned as codes.

    forward(x): B x H x W x dim -> B x H' x W' x dim_out (H' = H / q_stride at a q-pooling
    stage change, else H).
    """

    def __init__(self, ref: MultiScaleBlock, dtype: torch.dtype) -> None:
        super().__init__()
        ref = adopt_module(ref, dtype)
        self.dim, self.dim_out = ref.dim, ref.dim_out
        self.window_size = ref.window_size
        self.q_stride = ref.q_stride
        self.norm1 = ref.norm1
        self.pool = ref.pool  # the attention's q pooling too (None without q_stride)
        self.attn = ref.attn
        self.norm2 = ref.norm2
        self.mlp = ref.mlp
        if self.dim != self.dim_out:
            self.proj = ref.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        hw = x.shape[1:3]
        ws = self.window_size
        x = self.norm1(x)
        if isinstance(x, PendingLayerNorm):  # int8 qkv: the norm's codes, maybe (models.quant)
            x = x.for_linear(self.attn.qkv, ws, carriers=(self.attn,))
        else:
            if self.dim != self.dim_out:
                shortcut = do_pool(self.proj(x), self.pool)  # B x H' x W' x dim_out
            if ws > 0:
                # B x H x W x C -> (B * windows) x ws x ws x C, zero-padded
                x = window_partition(x, ws)[0]
        x = self.attn(x)
        if self.q_stride:  # the attention pooled q: smaller windows, the shortcut's grid
            ws = self.window_size // self.q_stride[0]
            hw = shortcut.shape[1:3]
        if self.window_size > 0:
            padded = (hw[0] + (-hw[0]) % ws, hw[1] + (-hw[1]) % ws)
            x = window_unpartition(x, ws, padded, hw)  # -> B x H' x W' x dim_out
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class FastHiera(nn.Module):
    """Hiera trunk (reference `Hiera`): same parameters, cached position embedding.

    forward(x, pos): x B x 3 x S x S, pos 1 x H x W x C (see `pos_embed_for`) -> the stage
    outputs B x C_i x H_i x W_i, high resolution first (as the reference returns them).
    """

    def __init__(self, ref: Hiera, dtype: torch.dtype) -> None:
        super().__init__()
        self.patch_embed = adopt_module(ref.patch_embed, dtype)
        self.pos_embed = adopt_parameter(ref.pos_embed, dtype)
        self.pos_embed_window = adopt_parameter(ref.pos_embed_window, dtype)
        self.blocks = nn.ModuleList(FastMultiScaleBlock(b, dtype) for b in ref.blocks)
        self.stage_ends = list(ref.stage_ends)
        self.return_interm_layers = ref.return_interm_layers
        self.channel_list = list(ref.channel_list)
        self.window_spec = ref.window_spec
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}  # by token grid
        self._pos_tables: tuple = ()  # identity of the tables the cache was computed from
        self.register_load_state_dict_post_hook(FastHiera._forget_pos_embeds)

    @staticmethod
    def _forget_pos_embeds(module: FastHiera, incompatible_keys: object) -> None:
        module._pos_cache.clear()

    def pos_embed_for(self, hw: tuple[int, int]) -> torch.Tensor:
        """The position embedding of an h x w token grid: 1 x h x w x C, cached until either
        table changes (see `tensor_identity`)."""
        if torch.compiler.is_compiling():  # traced: computed in the graph, not cached
            return self._compute_pos_embed(hw)
        tables = tensor_identity(self.pos_embed, self.pos_embed_window)
        if tables != self._pos_tables:
            self._pos_cache.clear()
            self._pos_tables = tables
        key = tuple(hw)
        if key not in self._pos_cache:
            self._pos_cache[key] = self._compute_pos_embed(hw)
        return self._pos_cache[key]

    def _compute_pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        with torch.no_grad():
            window = self.pos_embed_window
            pos = F.interpolate(self.pos_embed, size=hw, mode="bicubic")
            pos = pos + window.tile([p // w for p, w in zip(pos.shape, window.shape,
                                                             strict=True)])
            return pos.permute(0, 2, 3, 1)  # 1 x h x w x C

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x) + pos  # B x H x W x C
        outputs = []
        last = self.stage_ends[-1]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == last or (i in self.stage_ends and self.return_interm_layers):
                outputs.append(x.permute(0, 3, 1, 2))  # B x C x H x W
        return outputs


class FastFpnNeck(nn.Module):
    """FPN neck (reference `FpnNeck`): same parameters, position encodings cached.

    forward(xs, pos): the trunk's outputs and, per level, the 1 x d x H x W encoding ->
    (features, encodings) per level, as the reference returns them.
    """

    def __init__(self, ref: FpnNeck, dtype: torch.dtype) -> None:
        super().__init__()
        self.position_encoding = ref.position_encoding  # no parameters
        self.convs = adopt_module(ref.convs, dtype)
        self.backbone_channel_list = ref.backbone_channel_list
        self.d_model = ref.d_model
        self.fpn_interp_model = ref.fpn_interp_model
        self.fuse_type = ref.fuse_type
        self.fpn_top_down_levels = list(ref.fpn_top_down_levels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def pos_for(self, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
        """The sine encoding of an h x w map: 1 x d x h x w fp32, cached."""
        key = (*hw, device)
        if key not in self._pos_cache:
            probe = torch.empty(1, 1, *hw, device=device)
            self._pos_cache[key] = self.position_encoding(probe)
        return self._pos_cache[key]

    def forward(self, xs: list[torch.Tensor], pos: list[torch.Tensor]):
        """`pos` empty: `position_encoding` is called on each level, as the reference calls
        it (while hooks sit on it)."""
        n = len(self.convs) - 1
        out: list[torch.Tensor | None] = [None] * len(self.convs)
        enc: list[torch.Tensor | None] = [None] * len(self.convs)
        prev = None
        for i in range(n, -1, -1):  # top-down: low to high resolution
            lateral = self.convs[n - i](xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                top_down = F.interpolate(
                    prev.to(torch.float32), scale_factor=2.0, mode=self.fpn_interp_model,
                    align_corners=None if self.fpn_interp_model == "nearest" else False,
                    antialias=False)
                prev = lateral + top_down
                if self.fuse_type == "avg":
                    prev = prev / 2
            else:
                prev = lateral
            out[i] = prev
            # a copy of the cache, expanded over the batch (the reference repeats it): a
            # caller's write changes no later call (one into a B > 1 expansion raises)
            enc[i] = (pos[i].to(prev.dtype, copy=True).expand(prev.shape[0], -1, -1, -1) if pos
                      else self.position_encoding(prev).to(prev.dtype))
        return out, enc


class FastSam2ImageEncoder(ReferenceFallback):
    """SAM 2's image encoder (see the module docstring)."""

    def __init__(self, ref: ImageEncoder, dtype: torch.dtype,
                 compile_mode: str | None = None) -> None:
        super().__init__()
        self.stage = "SAM 2 image encoder"
        self.trunk = FastHiera(ref.trunk, dtype)
        self.neck = FastFpnNeck(ref.neck, dtype)
        self.scalp = ref.scalp
        self._run_fast = LazyCompiled(self._forward_fast, compile_mode, "SAM 2 image encoder",
                                      fullgraph=True, dynamic=False)

    @classmethod
    def from_reference(cls, ref: ImageEncoder, config: FastConfig,
                       dtype: torch.dtype) -> FastSam2ImageEncoder:
        if type(ref) is not ImageEncoder:
            raise UnsupportedModule(f"{type(ref).__qualname__} is not sam2's ImageEncoder")
        if type(ref.trunk) is not Hiera or type(ref.neck) is not FpnNeck:
            raise UnsupportedModule(f"trunk {type(ref.trunk).__qualname__} / neck "
                                    f"{type(ref.neck).__qualname__}: Hiera + FpnNeck supported")
        if any(type(b) is not MultiScaleBlock for b in ref.trunk.blocks) or \
                type(ref.neck.position_encoding) is not PositionEmbeddingSine:
            raise UnsupportedModule("not the reference Hiera blocks / sine position encoding")
        return cls(ref, dtype, config.compile)

    @property
    def dtype(self) -> torch.dtype:
        return self.trunk.pos_embed.dtype

    def forward(self, sample: torch.Tensor) -> dict:
        """sample: B x 3 x S x S float -> the reference's output dict, in sample's dtype."""
        why = self._check_input(sample) or self.inference_only_reason(sample)
        if why is not None:
            return self.run_reference(why, sample)
        stride = self.trunk.patch_embed.proj.stride
        padding = self.trunk.patch_embed.proj.padding
        kernel = self.trunk.patch_embed.proj.kernel_size
        hw = tuple((s + 2 * p - k) // st + 1 for s, p, k, st in
                   zip(sample.shape[-2:], padding, kernel, stride, strict=True))
        trunk_pos = self.trunk.pos_embed_for(hw)
        hooked = has_forward_hooks(self.neck.position_encoding)
        neck_pos = [] if hooked else self._neck_pos(hw, sample.device)
        if self._run_fast.compiled is not None:
            build_sparse_weights(self, sample)
        with torch.autocast(sample.device.type, enabled=False):
            features, pos = self._run_fast(sample.to(self.dtype), trunk_pos, neck_pos,
                                           eager=hooked)
        features = [f.to(sample.dtype) for f in features]
        pos = [p.to(sample.dtype) for p in pos]
        return {"vision_features": features[-1], "vision_pos_enc": pos,
                "backbone_fpn": features}

    def _neck_pos(self, hw: tuple[int, int], device: torch.device) -> list[torch.Tensor]:
        """The neck's encoding for each trunk output, high resolution first: the token grid
        shrinks by the q-pooling stride at each stage change."""
        sizes, (h, w) = [], hw
        for end in self.trunk.stage_ends:
            sizes.append((h, w))
            if end + 1 < len(self.trunk.blocks) and self.trunk.blocks[end + 1].q_stride:
                stride = self.trunk.blocks[end + 1].q_stride
                h, w = h // stride[0], w // stride[1]  # max-pool, floor
        if not self.trunk.return_interm_layers:
            sizes = sizes[-1:]
        return [self.neck.pos_for(s, device) for s in sizes]

    def _forward_fast(self, x: torch.Tensor, trunk_pos: torch.Tensor,
                      neck_pos: list[torch.Tensor]) -> tuple[list, list]:
        features, pos = self.neck(self.trunk(x, trunk_pos), neck_pos)
        if self.scalp > 0:  # drop the lowest-resolution level
            features, pos = features[: -self.scalp], pos[: -self.scalp]
        return features, pos

    def _check_input(self, x: torch.Tensor) -> str | None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"image_encoder: sample must be a torch.Tensor, got {type(x)}")
        if x.dim() != 4 or x.shape[1] != self.trunk.patch_embed.proj.in_channels:
            raise ValueError(f"image_encoder: sample must be B x 3 x H x W, got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"image_encoder: sample must be a normalized float tensor, got "
                             f"dtype {x.dtype}")
        if x.device != self.trunk.pos_embed.device:
            raise ValueError(f"image_encoder: sample is on {x.device}, the model on "
                             f"{self.trunk.pos_embed.device}")
        return None

    def describe(self) -> list[StageReport]:
        dtype = dtype_name(self.dtype)
        return [StageReport(
            "image_encoder", "fast",
            f"Hiera ({len(self.trunk.blocks)} blocks) + FPN neck, {dtype}, cached position "
            f"embeddings, compile: {self._run_fast.summary}"
            + hooks_note(self, "neck.position_encoding", eager=True) + self.fallback_summary())]

