"""Fast SAM mask decoder.

Replaces `segment_anything.modeling.mask_decoder.MaskDecoder`, with the same parameters and
`forward` contract, plus `decode_batch` for prompts of several images at once. Differences:

- the image embedding is not repeated per prompt (`torch.repeat_interleave` in the reference):
  prompts read their image's embedding (see `transformer.py`), the positional encoding is
  broadcast;
- the two-way transformer on SDPA in the compute dtype, LayerNorm statistics in fp32;
- the four hypernetwork MLPs run as one batched matmul per layer, not a Python loop;
- outputs in the reference's dtype (fp32), no host-device synchronization.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder

from fastsam_core.config import FastConfig
from fastsam_core.models.compiled import LazyCompiled
from fastsam_core.models.convert import adopt_module, dtype_name, to_device
from fastsam_core.models.fallback import (
    ReferenceFallback,
    has_forward_hooks,
    hooks_note,
    without_autocast,
)
from fastsam_core.models.sam.common import LAYER_NORMS_2D, layer_norm_2d
from fastsam_core.models.sam.transformer import FastTwoWayTransformer, PromptGroups
from fastsam_core.report import StageReport, UnsupportedModule


class FastMaskDecoder(ReferenceFallback):
    """SAM's mask decoder, built from a reference `MaskDecoder` (see the module docstring)."""

    def __init__(self, ref: MaskDecoder, dtype: torch.dtype, compile_mode: str | None = None
                 ) -> None:
        super().__init__()
        self.stage = "mask decoder"
        self.transformer_dim = ref.transformer_dim
        self.transformer = FastTwoWayTransformer.from_reference(ref.transformer, dtype)
        self.num_multimask_outputs = ref.num_multimask_outputs
        self.iou_token = adopt_module(ref.iou_token, dtype)
        self.num_mask_tokens = ref.num_mask_tokens
        self.mask_tokens = adopt_module(ref.mask_tokens, dtype)
        self.output_upscaling = adopt_module(ref.output_upscaling, dtype)
        self.output_hypernetworks_mlps = adopt_module(ref.output_hypernetworks_mlps, dtype)
        self.iou_prediction_head = adopt_module(ref.iou_prediction_head, dtype)
        # dynamic shapes: one graph for every prompt count K and token count T
        self._decode_dense = LazyCompiled(self.decode, compile_mode, "mask decoder",
                                          dynamic=True)

    @classmethod
    def from_reference(
        cls, ref: MaskDecoder, config: FastConfig, dtype: torch.dtype
    ) -> FastMaskDecoder:
        if type(ref) is not MaskDecoder:
            raise UnsupportedModule(f"{type(ref).__qualname__} is not segment_anything's "
                                    "MaskDecoder")
        mlps = ref.output_hypernetworks_mlps
        if any(type(m) is not MLP or m.sigmoid_output for m in mlps) or \
                len({tuple(layer.weight.shape for layer in m.layers) for m in mlps}) != 1:
            raise UnsupportedModule("hypernetwork MLPs differ from the reference layout")
        return cls(ref, dtype, config.compile)

    @property
    def dtype(self) -> torch.dtype:
        return self.iou_token.weight.dtype

    @without_autocast
    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference contract: masks K x M x 4h x 4w and IoU predictions K x M (M = 3 with
        multimask_output, else 1), for K prompts on one image (image_embeddings 1 x C x h x w).
        """
        why = self.inference_only_reason(image_embeddings, image_pe, sparse_prompt_embeddings,
                                         dense_prompt_embeddings)
        if why is None and image_embeddings.shape[0] != 1:
            why = f"image_embeddings batch {image_embeddings.shape[0]} (not 1)"
        if why is None:
            why = dense_batch_reason(dense_prompt_embeddings, sparse_prompt_embeddings.shape[0])
        if why is not None:
            return self.run_reference(why, image_embeddings, image_pe, sparse_prompt_embeddings,
                                      dense_prompt_embeddings, multimask_output)
        k = sparse_prompt_embeddings.shape[0]
        dense = dense_prompt_embeddings
        if dense.dim() == 4 and dense.stride(0) == 0:  # the no-mask embedding, broadcast
            dense = dense[:1]
        groups = PromptGroups(
            torch.zeros(k, dtype=torch.long, device=image_embeddings.device), n_images=1)
        tokens = self.prompt_tokens(sparse_prompt_embeddings.to(self.dtype))
        masks, iou, _ = self._decode_dense(image_embeddings, image_pe, tokens, dense, groups,
                                           eager=self.hooks_on_fused())
        return self.select(masks, iou, multimask_output, image_embeddings.dtype)

    @without_autocast
    def decode_batch(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: list[torch.Tensor],
        dense: torch.Tensor,
        multimask_output: bool,
        high_res: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Decode the prompts of several images in one call.

        Args:
            image_embeddings: n_img x C x h x w.
            image_pe: 1 x C x h x w.
            sparse: per image, K_i x T_i x C prompt embeddings (K_i may be 0; T_i may differ).
            dense: sum(K_i) x C x h x w mask embeddings, or 1 x C x h x w for all prompts.
            multimask_output: as in `forward`.
            high_res: SAM 2's high-resolution features, n_img in their batch.

        Returns:
            what `forward` returns (SAM: masks sum(K_i) x M x 4h x 4w and IoU sum(K_i) x M),
            prompts in image order, in the dtype of image_embeddings.

        Not a call of the module: forward hooks on the decoder itself do not run (a warning
        says so); those on its submodules run as in `forward`.
        """
        if self._forward_hooks or self._forward_pre_hooks:
            warnings.warn("fastsam_core: forward hooks on the mask decoder do not run in "
                          "decode_batch (predict_batch): it decodes the prompts of several "
                          "images in one call, not through the module's forward",
                          stacklevel=3)
        device = image_embeddings.device
        kept = [i for i, s in enumerate(sparse) if s.shape[0]]  # images with prompts
        if not kept:
            n, (h, w) = self.n_output_tokens(), image_embeddings.shape[-2:]

            def empty(*shape: int) -> torch.Tensor:  # in the compute dtype, as decode's
                return image_embeddings.new_empty(shape, dtype=self.dtype)

            # num_mask_tokens counts the single-mask token (the reference's 1 + multimask)
            return self.finish(empty(0, self.num_mask_tokens, 4 * h, 4 * w),
                               empty(0, self.num_mask_tokens),
                               empty(0, n, self.transformer_dim),
                               multimask_output, image_embeddings.dtype)
        if len(kept) < len(sparse):
            index = to_device(torch.tensor(kept), device)
            image_embeddings = image_embeddings[index]
            high_res = None if high_res is None else [f[index] for f in high_res]
            sparse = [sparse[i] for i in kept]
        # sizes are known on the host: the jagged structure costs no device-to-host sync
        counts = [s.shape[0] for s in sparse]
        image_index = torch.repeat_interleave(torch.arange(len(sparse)), torch.tensor(counts))
        groups = PromptGroups(
            to_device(image_index, device), n_images=len(sparse),
            prompt_lengths=[[s.shape[1] + self.n_output_tokens()] * s.shape[0] for s in sparse],
        )
        token_rows = [self.prompt_tokens(s.to(self.dtype)).flatten(0, 1) for s in sparse]
        tokens = groups.tokens(torch.cat(token_rows))  # sum(K_i) x j x C
        high_res = high_res or None  # a model without high-res features passes []
        if high_res is not None and len(sparse) > 1:  # each prompt's image's features
            high_res = [f[groups.image_index] for f in high_res]
        masks, iou, out_tokens = self.decode(image_embeddings, image_pe, tokens, dense, groups,
                                             high_res)
        return self.finish(masks, iou, out_tokens, multimask_output, image_embeddings.dtype)

    def finish(self, masks: torch.Tensor, iou: torch.Tensor, out_tokens: torch.Tensor,
               multimask_output: bool, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """`decode`'s results as `forward` returns them."""
        return self.select(masks, iou, multimask_output, dtype)

    def prompt_tokens(self, sparse: torch.Tensor) -> torch.Tensor:
        """K x T x C prompt embeddings -> K x (1 + M + T) x C with the IoU and mask tokens."""
        out = torch.cat(self.output_token_weights(), dim=0)
        return torch.cat([out.expand(sparse.shape[0], -1, -1), sparse], dim=1)

    def output_token_weights(self) -> list[torch.Tensor]:
        """The learned tokens placed before each prompt's tokens: IoU, then the masks'."""
        return [self.iou_token.weight, self.mask_tokens.weight]

    def decode(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        tokens: torch.Tensor,
        dense: torch.Tensor,
        groups: PromptGroups | None,
        high_res: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All mask tokens' masks and IoU predictions.

        Args:
            image_embeddings: n_img x C x h x w, or K x C x h x w (one per prompt) when
                `groups` is None.
            image_pe: 1 x C x h x w.
            tokens: K x T x C (dense or jagged), the output tokens first.
            dense: K x C x h x w per prompt, or 1 x C x h x w for all.
            groups: prompt -> image, or None for one image per prompt.
            high_res: SAM 2's high-resolution features (s0: C/8 at 4h x 4w, s1: C/4 at
                2h x 2w, batch 1 or K), added during upscaling; None for SAM.

        Returns:
            masks K x (1 + M) x 4h x 4w, IoU K x (1 + M), and the output tokens after the
            transformer K x n_out x C, in the compute dtype.
        """
        n_img, c, h, w = image_embeddings.shape
        k = tokens.shape[0]
        # n_img x C x h x w -> n_img x HW x C, channels last from here on
        src = image_embeddings.to(self.dtype).flatten(2).transpose(1, 2)
        dense = dense.to(self.dtype).flatten(2).transpose(1, 2)  # (K or 1) x HW x C
        # per-prompt mask inputs make the image side per prompt (one prompt: either way)
        if groups is not None and dense.shape[0] == k and k != 1:
            src, groups = groups.gather(src) + dense, None
        else:
            src = src + dense
        pe = image_pe.to(self.dtype).flatten(2).transpose(1, 2)  # 1 x HW x C
        hs, src = self.transformer(src, pe, tokens, groups)

        n_out = self.n_output_tokens()
        if hs.is_nested:  # only the output tokens are needed: K x n_out x C
            hs = _leading_rows(hs, n_out)
        s = n_out - 1 - self.num_mask_tokens  # SAM 2's object-score token comes first
        iou_token_out = hs[:, s, :]
        mask_tokens_out = hs[:, s + 1: s + 1 + self.num_mask_tokens, :]

        # K x HW x C -> K x C x h x w -> K x C/8 x 4h x 4w
        upscaled = self.upscale(src.transpose(1, 2).reshape(k, c, h, w), high_res)
        hyper_in = self.hypernetworks(mask_tokens_out)  # K x M x C/8
        masks = (hyper_in @ upscaled.flatten(2)).unflatten(-1, upscaled.shape[-2:])
        return masks, self.iou_prediction_head(iou_token_out), hs[:, :n_out]

    def n_output_tokens(self) -> int:
        return sum(w.shape[0] for w in self.output_token_weights())

    def upscale(self, x: torch.Tensor, high_res: list[torch.Tensor] | None = None
                ) -> torch.Tensor:
        """output_upscaling (with SAM 2's high-res features added after each transposed
        convolution): K x C x h x w -> K x C/8 x 4h x 4w. While hooks sit on these modules
        each is called, as the reference calls it."""
        seq = self.output_upscaling
        hooked = has_forward_hooks(seq)
        if not (len(seq) == 5 and type(seq[1]) in LAYER_NORMS_2D) or (hooked and not high_res):
            return seq(x)
        up1, norm, act1, up2, act2 = seq
        x = up1(x)
        if high_res:
            x = x + high_res[1].to(x.dtype)
        x = up2(act1(norm(x) if hooked else layer_norm_2d(x, norm)))
        if high_res:
            x = x + high_res[0].to(x.dtype)
        return act2(x)

    def hooks_on_fused_note(self) -> str:
        """`describe()`'s words for `hooks_on_fused`."""
        return hooks_note(self, "output_upscaling", "output_hypernetworks_mlps", eager=True)

    def hooks_on_fused(self) -> bool:
        """Whether forward hooks sit on modules `upscale` / `hypernetworks` would fuse."""
        return has_forward_hooks(self.output_upscaling, self.output_hypernetworks_mlps)

    def hypernetworks(self, tokens: torch.Tensor) -> torch.Tensor:
        """The M mask tokens through their own 3-layer MLPs at once: K x M x C -> K x M x C/8
        (one MLP call per token, as the reference makes, while hooks sit on them)."""
        mlps = self.output_hypernetworks_mlps
        if has_forward_hooks(mlps):
            return torch.stack([mlp(tokens[:, i]) for i, mlp in enumerate(mlps)], dim=1)
        x = tokens.transpose(0, 1)  # M x K x C
        for i in range(mlps[0].num_layers):
            weight = torch.stack([m.layers[i].weight for m in mlps])  # M x out x in
            bias = torch.stack([m.layers[i].bias for m in mlps])  # M x out
            x = torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))
            if i < mlps[0].num_layers - 1:
                x = F.relu(x)
        return x.transpose(0, 1)

    @staticmethod
    def select(masks: torch.Tensor, iou: torch.Tensor, multimask_output: bool,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl].to(dtype), iou[:, sl].to(dtype)

    def describe(self) -> list[StageReport]:
        dtype = dtype_name(self.dtype)
        detail = (f"SDPA two-way transformer, {dtype}, no per-prompt image copy, "
                  f"compile: {self._decode_dense.summary}")
        return [StageReport("mask_decoder", "fast",
                            detail + self.hooks_on_fused_note() + self.fallback_summary())]


def _leading_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of every sequence of a jagged B x j x C tensor: B x n x C."""
    offsets = x.offsets()
    rows = offsets[:-1, None] + torch.arange(n, device=offsets.device)  # B x n
    return x.values()[rows]


def dense_batch_reason(dense: torch.Tensor, k: int) -> str | None:
    """Why the fast decoder cannot take these dense prompt embeddings for k prompts, or None.

    The fast decoder pairs dense row i with prompt i, or shares one row; the reference also
    broadcasts k = 1 prompt over several mask inputs (a result per mask input).
    """
    if dense.shape[0] in (1, k):
        return None
    return f"dense_prompt_embeddings batch {dense.shape[0]} for {k} prompts"
