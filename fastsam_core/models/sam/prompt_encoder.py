"""Fast SAM prompt encoder.

Replaces `segment_anything.modeling.prompt_encoder.PromptEncoder`. Same parameters and
buffers, same outputs (fp32, as the reference returns), but:

- no boolean-mask assignment (`embedding[labels == -1] = ...` synchronizes with the host on a
  GPU): labels select their embeddings arithmetically;
- the dense positional encoding (`get_dense_pe`) is computed once per device and kept, and
  recomputed when new weights are loaded;
- the mask downscaling convolutions run in the compute dtype, the random-Fourier positional
  encoding in fp32 (its high frequencies need it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sam2.modeling.sam.prompt_encoder import PromptEncoder as Sam2PromptEncoder
from segment_anything.modeling.prompt_encoder import PromptEncoder
from torch import nn

from fastsam_core.config import FastConfig
from fastsam_core.models.convert import adopt_module, tensor_identity
from fastsam_core.models.fallback import (
    ReferenceFallback,
    has_forward_hooks,
    hooks_note,
    without_autocast,
)
from fastsam_core.models.sam.common import LAYER_NORMS_2D, layer_norm_2d
from fastsam_core.report import StageReport, UnsupportedModule


class FastPromptEncoder(ReferenceFallback):
    """SAM's prompt encoder, built from a reference `PromptEncoder` (see the module docstring).

    Outputs: sparse embeddings B x N x C and dense embeddings B x C x h x w, both fp32.
    """

    def __init__(self, ref: PromptEncoder, dtype: torch.dtype) -> None:
        super().__init__()
        self.stage = "prompt encoder"
        self.embed_dim = ref.embed_dim
        self.input_image_size = ref.input_image_size
        self.image_embedding_size = ref.image_embedding_size
        self.mask_input_size = ref.mask_input_size
        self.num_point_embeddings = ref.num_point_embeddings
        self.pe_layer = ref.pe_layer  # a buffer only: kept in fp32, shared with the reference
        self.point_embeddings = adopt_module(ref.point_embeddings, torch.float32)
        self.not_a_point_embed = adopt_module(ref.not_a_point_embed, torch.float32)
        self.mask_downscaling = adopt_module(ref.mask_downscaling, dtype)
        self.no_mask_embed = adopt_module(ref.no_mask_embed, torch.float32)
        self.fused_downscaling = _is_reference_downscaling(self.mask_downscaling)
        # sam2 labels box corners 2 and 3 (its predictor passes boxes as points)
        self.corner_labels = isinstance(ref, Sam2PromptEncoder)
        self._dense_pe: tuple[tuple, torch.Tensor] | None = None  # (gauss identity, PE)
        self.register_load_state_dict_post_hook(FastPromptEncoder._forget_dense_pe)

    @classmethod
    def from_reference(
        cls, ref: PromptEncoder, config: FastConfig, dtype: torch.dtype
    ) -> FastPromptEncoder:
        if type(ref) not in (PromptEncoder, Sam2PromptEncoder):
            raise UnsupportedModule(f"{type(ref).__qualname__} is not segment_anything's or "
                                    "sam2's PromptEncoder")
        return cls(ref, dtype)

    @staticmethod
    def _forget_dense_pe(module: FastPromptEncoder, incompatible_keys: object) -> None:
        module._dense_pe = None

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: 1 x C x h x w, fp32, cached until
        the Gaussian matrix changes (the reference's `pe_layer` called instead while hooks sit
        on it). A copy of the cache, as the reference returns a new tensor per call: a caller
        writing to it in place would change every later result."""
        if has_forward_hooks(self.pe_layer):
            return self.pe_layer(self.image_embedding_size).unsqueeze(0)
        gauss = self.pe_layer.positional_encoding_gaussian_matrix
        if torch.compiler.is_compiling():  # traced: computed in the graph, not cached
            return self._compute_dense_pe(gauss)
        key = tensor_identity(gauss)
        if self._dense_pe is None or self._dense_pe[0] != key:
            self._dense_pe = (key, self._compute_dense_pe(gauss))
        return self._dense_pe[1].clone()

    def _compute_dense_pe(self, gauss: torch.Tensor) -> torch.Tensor:
        h, w = self.image_embedding_size
        ys = (torch.arange(h, device=gauss.device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=gauss.device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # h x w x 2
        return self.fourier(grid).permute(2, 0, 1).unsqueeze(0)

    def fourier(self, coords01: torch.Tensor) -> torch.Tensor:
        """Random Fourier features of coordinates in [0, 1]: ... x 2 -> ... x C (fp32)."""
        gauss = self.pe_layer.positional_encoding_gaussian_matrix
        proj = (2 * math.pi) * ((2 * coords01.float() - 1) @ gauss)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def pixel_pe(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode pixel coordinates (x, y) of the model input frame: ... x 2 -> ... x C.

        The shift to pixel centres and the normalization run in the dtype of `coords` (float64
        from numpy, in the mask generator), then fp32, in the reference's order.
        """
        h, w = self.input_image_size
        xy = (coords if coords.is_floating_point() else coords.float()) + 0.5
        # divide by Python numbers: a tensor [w, h] would be a host-to-device copy per call
        return self.fourier(torch.stack((xy[..., 0] / w, xy[..., 1] / h), dim=-1))

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """Point tokens: B x P x 2 coords, B x P labels -> B x (P + pad) x C.

        Label -1: padding (the "not a point" embedding only, its coords ignored); 0:
        background; 1: foreground; 2 and 3 (sam2): top-left and bottom-right box corners;
        other labels keep the bare positional encoding, as in the reference.
        """
        if pad:
            coords = F.pad(coords, (0, 0, 0, 1))  # the padding point at (0, 0)
            # in a signed dtype (-1 is True as a bool, out of range as a uint8), as the
            # reference's float padding label promotes bool / uint8 labels
            labels = F.pad(labels if labels.is_floating_point() else labels.long(), (0, 1),
                           value=-1)
        labels = labels[..., None]
        # where, not a product: the reference zeroes padding points, whatever their coords
        pe = torch.where(labels != -1, self.pixel_pe(coords), 0.0)
        out = (pe
               + (labels == -1) * self.not_a_point_embed.weight
               + (labels == 0) * self.point_embeddings[0].weight
               + (labels == 1) * self.point_embeddings[1].weight)
        if self.corner_labels:
            out = (out + (labels == 2) * self.point_embeddings[2].weight
                   + (labels == 3) * self.point_embeddings[3].weight)
        return out

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Box tokens: B x 4 (x0, y0, x1, y1) -> B x 2 x C (one per corner)."""
        corners = self.pixel_pe(boxes.reshape(-1, 2, 2))
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return corners + corner_embed

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Mask inputs: B x 1 x 4h x 4w logits -> B x C x h x w (fp32)."""
        weight = self.mask_downscaling[0].weight
        x = masks.to(weight.dtype)
        if not self.fused_downscaling or has_forward_hooks(self.mask_downscaling):
            return self.mask_downscaling(x).float()
        conv1, norm1, act1, conv2, norm2, act2, conv3 = self.mask_downscaling
        x = conv1(x)
        x = act1(layer_norm_2d(x, norm1))
        x = conv2(x)
        x = act2(layer_norm_2d(x, norm2))
        return conv3(x).float()

    @without_autocast
    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as the reference: sparse B x N x C, dense B x C x h x w (fp32)."""
        tensors = [*(points or ()), boxes, masks]
        why = self.inference_only_reason(*tensors)
        if why is not None:
            return self.run_reference(why, points, boxes, masks)
        device = self.point_embeddings[0].weight.device
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        check_prompt_shapes(points, boxes, bs, labels_broadcast=self.corner_labels)
        parts = []
        if points is not None:
            parts.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self.embed_boxes(boxes))
        if parts:
            sparse = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        else:
            sparse = torch.empty((bs, 0, self.embed_dim), device=device)
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                bs, -1, *self.image_embedding_size
            )
        return sparse, dense

    def describe(self) -> list[StageReport]:
        return [StageReport("prompt_encoder", "fast",
                            "sync-free label selection, cached dense PE, fp32 Fourier features"
                            + hooks_note(self, "pe_layer", "mask_downscaling")
                            + self.fallback_summary())]


def check_prompt_shapes(points: tuple[torch.Tensor, torch.Tensor] | None,
                        boxes: torch.Tensor | None, bs: int, labels_broadcast: bool) -> None:
    """Raise where the reference fails on prompts whose shapes do not fit together (its
    concatenations and boolean indexing do; the fast path's broadcasts would not).

    labels_broadcast: labels may broadcast to the coordinates' B x N (sam2 selects with
    `torch.where`; without boxes it first appends a padding label per row, so they must be
    2-D then); segment_anything's boolean indexing needs the same shape.
    """
    if points is not None:
        coords, labels = points
        if coords.dim() != 3 or coords.shape[-1] != 2:
            raise ValueError("points: coordinates must be B x N x 2 (x, y), got shape "
                             f"{tuple(coords.shape)}")
        expected = tuple(coords.shape[:-1])
        fits = tuple(labels.shape) == expected
        if not fits and labels_broadcast and (labels.dim() == 2 or boxes is not None):
            try:
                fits = torch.broadcast_shapes(labels.shape, expected) == expected
            except RuntimeError:
                fits = False
        if not fits:
            raise ValueError(f"points: labels of shape {tuple(labels.shape)} for coordinates "
                             f"of shape {tuple(coords.shape)} (expected {expected})")
    if boxes is not None and boxes.numel() != 4 * bs:
        raise ValueError(f"boxes: shape {tuple(boxes.shape)} holds {boxes.numel() / 4:g} boxes "
                         f"for a batch of {bs} prompts (one box per prompt, B x 4; "
                         "SamPredictor.predict takes a single box, predict_torch B x 4)")


def _is_reference_downscaling(seq: nn.Module) -> bool:
    """True for PromptEncoder.mask_downscaling: conv, LN2d, act, conv, LN2d, act, conv."""
    kinds = [type(m) for m in seq] if isinstance(seq, nn.Sequential) else []
    return len(kinds) == 7 and kinds[0] is nn.Conv2d and kinds[1] in LAYER_NORMS_2D \
        and kinds[3] is nn.Conv2d and kinds[4] in LAYER_NORMS_2D and kinds[6] is nn.Conv2d
