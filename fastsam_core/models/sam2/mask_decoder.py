"""Fast SAM 2 mask decoder.

Replaces `sam2.modeling.sam.mask_decoder.MaskDecoder` with the machinery of the fast SAM
decoder (`fastsam_core.models.sam.mask_decoder`: SDPA two-way transformer in the compute
dtype, no per-prompt copy of the image when prompts share it, batched hypernetworks, no host
sync), plus what SAM 2 adds: the object-score token and head, the high-resolution skip
features added during upscaling, dynamic multimask selection via stability, and the SAM
output tokens used as object pointers. Same parameters, forward signature and outputs
(fp32). `conv_s0` / `conv_s1`, which `SAM2Base.forward_image` applies to the encoder's
features once per image, keep the reference's dtype.
"""

from __future__ import annotations

import torch
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam2_utils import MLP
from torch import nn

from fastsam_core.config import FastConfig
from fastsam_core.models.convert import adopt_module, dtype_name, module_dtype
from fastsam_core.models.fallback import without_autocast
from fastsam_core.models.sam.mask_decoder import FastMaskDecoder, dense_batch_reason
from fastsam_core.models.sam.transformer import PromptGroups
from fastsam_core.report import StageReport, UnsupportedModule


class FastSam2MaskDecoder(FastMaskDecoder):
    """SAM 2's mask decoder (see the module docstring)."""

    def __init__(self, ref: MaskDecoder, dtype: torch.dtype,
                 compile_mode: str | None = None) -> None:
        super().__init__(ref, dtype, compile_mode)
        self.stage = "SAM 2 mask decoder"
        self.pred_obj_scores = ref.pred_obj_scores
        if self.pred_obj_scores:
            self.obj_score_token = adopt_module(ref.obj_score_token, dtype)
            self.pred_obj_score_head = adopt_module(ref.pred_obj_score_head, dtype)
        self.use_multimask_token_for_obj_ptr = ref.use_multimask_token_for_obj_ptr
        self.use_high_res_features = ref.use_high_res_features
        if self.use_high_res_features:  # used by SAM2Base.forward_image on encoder features
            self.conv_s0 = ref.conv_s0
            self.conv_s1 = ref.conv_s1
        self.dynamic_multimask_via_stability = ref.dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = ref.dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = ref.dynamic_multimask_stability_thresh

    @classmethod
    def from_reference(cls, ref: MaskDecoder, config: FastConfig,
                       dtype: torch.dtype) -> FastSam2MaskDecoder:
        if type(ref) is not MaskDecoder:
            raise UnsupportedModule(f"{type(ref).__qualname__} is not sam2's MaskDecoder")
        mlps = ref.output_hypernetworks_mlps
        if any(type(m) is not MLP or m.sigmoid_output or type(m.act) is not nn.ReLU
               for m in mlps) or \
                len({tuple(layer.weight.shape for layer in m.layers) for m in mlps}) != 1:
            raise UnsupportedModule("hypernetwork MLPs differ from the reference layout")
        return cls(ref, dtype, config.compile)

    def output_token_weights(self) -> list[torch.Tensor]:
        tokens = [self.iou_token.weight, self.mask_tokens.weight]
        return [self.obj_score_token.weight, *tokens] if self.pred_obj_scores else tokens

    @without_autocast
    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference contract.

        Args:
            image_embeddings: 1 x C x h x w shared by the K prompts (repeat_image=True), or
                K x C x h x w, one per prompt.
            image_pe: 1 x C x h x w. sparse_prompt_embeddings: K x T x C.
            dense_prompt_embeddings: K x C x h x w (or the broadcast no-mask embedding).
            multimask_output: 3 masks per prompt, else 1 (chosen by stability if configured).
            repeat_image: see image_embeddings.
            high_res_features: [s0 (B x C/8 x 4h x 4w), s1 (B x C/4 x 2h x 2w)] if the model
                uses them, B as image_embeddings.

        Returns:
            masks K x M x 4h x 4w, IoU K x M, SAM output tokens K x (3 or 1) x C, object score
            logits K x 1, all in image_embeddings' dtype.
        """
        if self.use_high_res_features and (high_res_features is None
                                           or len(high_res_features) != 2):
            got = None if high_res_features is None else f"{len(high_res_features)} levels"
            raise ValueError("high_res_features: this decoder uses high-resolution features, "
                             f"[s0, s1] (2 levels), got {got}")
        args = (image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output, repeat_image, high_res_features)
        why = self.inference_only_reason(image_embeddings, image_pe, sparse_prompt_embeddings,
                                         dense_prompt_embeddings, *(high_res_features or ()))
        k = sparse_prompt_embeddings.shape[0]
        if why is None and repeat_image and image_embeddings.shape[0] != 1:
            why = f"repeat_image with image_embeddings batch {image_embeddings.shape[0]}"
        if why is None and not repeat_image and image_embeddings.shape[0] != k:
            why = f"image_embeddings batch {image_embeddings.shape[0]} for {k} prompts"
        if why is None:
            why = dense_batch_reason(dense_prompt_embeddings, k)
        if why is not None:
            return self.run_reference(why, *args)
        dense = dense_prompt_embeddings
        if dense.dim() == 4 and dense.stride(0) == 0:  # the no-mask embedding, broadcast
            dense = dense[:1]
        groups = None
        if repeat_image:  # one image read by every prompt: kept once
            groups = PromptGroups(
                torch.zeros(k, dtype=torch.long, device=image_embeddings.device), n_images=1)
        high_res = None
        if self.use_high_res_features:
            high_res = [f.to(self.dtype) for f in high_res_features]
        tokens = self.prompt_tokens(sparse_prompt_embeddings.to(self.dtype))
        masks, iou, out_tokens = self._decode_dense(image_embeddings, image_pe, tokens, dense,
                                                    groups, high_res,
                                                    eager=self.hooks_on_fused())
        return self.finish(masks, iou, out_tokens, multimask_output, image_embeddings.dtype)

    def finish(self, masks: torch.Tensor, iou: torch.Tensor, out_tokens: torch.Tensor,
               multimask_output: bool, dtype: torch.dtype):
        """The reference's output selection, on the device (no host sync); in training mode
        without the stability selection, as the reference."""
        s = 1 if self.pred_obj_scores else 0
        mask_tokens = out_tokens[:, s + 1:]
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(out_tokens[:, 0])
        else:
            object_score_logits = 10.0 * iou.new_ones(iou.shape[0], 1)
        if multimask_output:
            masks, iou = masks[:, 1:], iou[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou = self.stable_or_best(masks, iou)
        else:
            masks, iou = masks[:, :1], iou[:, :1]
        multi = multimask_output and self.use_multimask_token_for_obj_ptr
        tokens = mask_tokens[:, 1:] if multi else mask_tokens[:, :1]
        return (masks.to(dtype), iou.to(dtype), tokens.to(dtype),
                object_score_logits.to(dtype))

    def stable_or_best(self, masks: torch.Tensor, iou: torch.Tensor):
        """Single-mask output: the single-mask token's mask if its stability (IoU of the
        masks thresholded at +-delta) reaches the threshold, else the multimask output with
        the highest predicted IoU. masks K x 4 x H x W, iou K x 4 -> K x 1 x H x W, K x 1."""
        best = iou[:, 1:].argmax(dim=-1, keepdim=True) + 1  # K x 1, index into all 4
        best_mask = masks.gather(1, best[:, :, None, None].expand(-1, -1, *masks.shape[-2:]))
        best_iou = iou.gather(1, best)
        single = masks[:, :1].flatten(-2).float()
        delta = self.dynamic_multimask_stability_delta
        inner = (single > delta).sum(-1).float()
        outer = (single > -delta).sum(-1).float()
        stability = torch.where(outer > 0, inner / outer, 1.0)  # K x 1
        stable = stability >= self.dynamic_multimask_stability_thresh
        return (torch.where(stable[..., None, None], masks[:, :1], best_mask),
                torch.where(stable, iou[:, :1], best_iou))

    def describe(self) -> list[StageReport]:
        dtype = dtype_name(self.dtype)
        skip = dtype_name(module_dtype(self.conv_s0)) \
            if self.use_high_res_features else "-"
        return [StageReport(
            "sam_mask_decoder", "fast",
            f"SDPA two-way transformer, {dtype} (high-res projections {skip}), object "
            f"scores, compile: {self._decode_dense.summary}" + self.hooks_on_fused_note()
            + self.fallback_summary())]
