"""Fast two-way transformer of SAM's mask decoder.

Replaces `segment_anything.modeling.transformer.{TwoWayTransformer, TwoWayAttentionBlock,
Attention}`, with the same parameters. Differences:

- attention through `F.scaled_dot_product_attention` (fp32 softmax statistics, no attention
  matrix in memory), LayerNorm through `F.layer_norm` (fp32 statistics), in the compute dtype;
- prompts are carried as a batch of K prompts, each with its own tokens: a dense K x T x C
  tensor when all prompts have T tokens, or a NestedTensor (jagged layout) K x j x C when the
  token count differs between prompts (points without a box get a padding point, boxes add
  two corners);
- images are not copied per prompt: the image side ("keys") starts as one n_img x HW x C
  tensor per image, and prompt k reads image `image_index[k]`. The first block's attention
  from the prompt tokens to the image runs once per image over all of that image's prompt
  tokens (the same softmax rows as per prompt); only its attention from the image to the
  tokens makes the image side per prompt, as the reference's output is.
"""

from __future__ import annotations

import itertools
import warnings

import torch
import torch.nn.functional as F
from sam2.modeling.sam.transformer import TwoWayAttentionBlock as Sam2TwoWayAttentionBlock
from sam2.modeling.sam.transformer import TwoWayTransformer as Sam2TwoWayTransformer
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from torch import nn

from fastsam_core.models.convert import adopt_module, to_device
from fastsam_core.report import UnsupportedModule


def jagged(values: torch.Tensor, offsets: torch.Tensor, seqlens: tuple[int, int]) -> torch.Tensor:
    """A jagged NestedTensor B x j x C over `values` (total x C) split at `offsets` (B + 1).

    `seqlens` (shortest, longest sequence), known on the host, spares SDPA a device-to-host
    read of the offsets.
    """
    return torch.nested.nested_tensor_from_jagged(values, offsets, min_seqlen=seqlens[0],
                                                  max_seqlen=seqlens[1])


def as_jagged(x: torch.Tensor) -> torch.Tensor:
    """A dense B x L x C tensor as a jagged NestedTensor with equal lengths (a view)."""
    if x.is_nested:
        return x
    b, n, c = x.shape
    offsets = torch.arange(0, (b + 1) * n, n, device=x.device, dtype=torch.int64)
    return jagged(x.reshape(b * n, c), offsets, (n, n))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not q.is_nested:
        return F.scaled_dot_product_attention(q, k, v)
    with warnings.catch_warnings():  # the CPU path goes through torch's strided nested tensors
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")
        return F.scaled_dot_product_attention(q, k, v)


class FastTwoWayAttention(nn.Module):
    """Multi-head attention with a down-projected inner width (reference `Attention`).

    Inputs may be dense B x L x C or jagged B x j x C; with any of them jagged, all three are
    taken as jagged and the output is jagged like q.
    """

    def __init__(self, ref: Attention, dtype: torch.dtype) -> None:
        super().__init__()
        self.embedding_dim = ref.embedding_dim
        self.internal_dim = ref.internal_dim
        self.num_heads = ref.num_heads
        self.q_proj = adopt_module(ref.q_proj, dtype)
        self.k_proj = adopt_module(ref.k_proj, dtype)
        self.v_proj = adopt_module(ref.v_proj, dtype)
        self.out_proj = adopt_module(ref.out_proj, dtype)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: PromptGroups | None = None
    ) -> torch.Tensor:
        """q: B x Lq x C, k and v: B x Lk x C (dense or jagged) -> B x Lq x C, dense or jagged
        like q. With `groups`, q is per image (n_img x Lq x C) and is projected once per image
        before each prompt reads its image's rows."""
        dense_q = not q.is_nested
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        if groups is not None:
            q = groups.gather(q)
        nested = q.is_nested or k.is_nested or v.is_nested
        if nested:
            q, k, v = as_jagged(q), as_jagged(k), as_jagged(v)
        # B x L x C' -> B x heads x L x d
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = _sdpa(q, k, v)
        # B x heads x L x d -> B x L x C'
        out = self.out_proj(out.transpose(1, 2).flatten(-2))
        if nested and dense_q:  # equal lengths: back to B x Lq x C
            out = out.values().unflatten(0, (out.shape[0], -1))
        return out


class FastTwoWayAttentionBlock(nn.Module):
    """Reference `TwoWayAttentionBlock`: token self-attention, tokens -> image, MLP,
    image -> tokens."""

    def __init__(self, ref: TwoWayAttentionBlock, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = FastTwoWayAttention(ref.self_attn, dtype)
        self.norm1 = adopt_module(ref.norm1, dtype)
        self.cross_attn_token_to_image = FastTwoWayAttention(ref.cross_attn_token_to_image, dtype)
        self.norm2 = adopt_module(ref.norm2, dtype)
        self.mlp = adopt_module(ref.mlp, dtype)
        self.norm3 = adopt_module(ref.norm3, dtype)
        self.norm4 = adopt_module(ref.norm4, dtype)
        self.cross_attn_image_to_token = FastTwoWayAttention(ref.cross_attn_image_to_token, dtype)
        self.skip_first_layer_pe = ref.skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        groups: PromptGroups | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block.

        Args:
            queries, query_pe: K x T x C prompt tokens and their positional part (dense or
                jagged).
            keys: the image side, K x HW x C per prompt, or n_img x HW x C per image when
                `groups` says which prompts read which image.
            key_pe: 1 x HW x C image positional encoding.
            groups: how prompts map to images while the image side is still per image.

        Returns:
            queries K x T x C, keys K x HW x C.
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        if groups is None:
            attn = self.cross_attn_token_to_image(q, k, keys)
        else:  # all tokens of an image in one sequence: same softmax rows, one k/v per image
            attn = groups.per_prompt(self.cross_attn_token_to_image(groups.per_image(q), k, keys))
        queries = self.norm2(queries + attn)
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        attn = self.cross_attn_image_to_token(k, q, queries, groups)
        if groups is not None:  # from here on the image side is per prompt
            keys = groups.gather(keys)
        keys = self.norm4(keys + attn)
        return queries, keys


class FastTwoWayTransformer(nn.Module):
    """Reference `TwoWayTransformer`, on prompt batches (see the module docstring)."""

    def __init__(self, ref: TwoWayTransformer, dtype: torch.dtype) -> None:
        super().__init__()
        self.depth = ref.depth
        self.embedding_dim = ref.embedding_dim
        self.num_heads = ref.num_heads
        self.mlp_dim = ref.mlp_dim
        self.layers = nn.ModuleList(FastTwoWayAttentionBlock(b, dtype) for b in ref.layers)
        self.final_attn_token_to_image = FastTwoWayAttention(ref.final_attn_token_to_image, dtype)
        self.norm_final_attn = adopt_module(ref.norm_final_attn, dtype)

    @classmethod
    def from_reference(cls, ref: TwoWayTransformer, dtype: torch.dtype) -> FastTwoWayTransformer:
        """From segment_anything's or sam2's TwoWayTransformer (the same architecture)."""
        if type(ref) not in (TwoWayTransformer, Sam2TwoWayTransformer) or any(
            type(b) not in (TwoWayAttentionBlock, Sam2TwoWayAttentionBlock) for b in ref.layers
        ):
            raise UnsupportedModule(f"{type(ref).__qualname__} is not the reference "
                                    "TwoWayTransformer")
        return cls(ref, dtype)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        groups: PromptGroups | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-way attention between prompt tokens and the image.

        Args:
            image_embedding: K x HW x C per prompt, or n_img x HW x C per image with `groups`.
            image_pe: 1 x HW x C.
            point_embedding: K x T x C tokens (dense or jagged).
            groups: prompt -> image mapping for a per-image `image_embedding`.

        Returns:
            queries K x T x C (dense or jagged like the input), keys K x HW x C.
        """
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, image_pe, groups)
            groups = None
        if groups is not None:  # depth 0: the image side was never made per prompt
            keys = groups.gather(keys)
        q = queries + point_embedding
        k = keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class PromptGroups:
    """Which image each prompt reads, while the image side is kept once per image.

    Args:
        image_index: K, the image of each prompt, non-decreasing (prompts sorted by image).
        n_images: number of images.
        prompt_lengths: tokens of each prompt, for jagged tokens (None: dense K x T x C
            tokens of a single image).
    """

    def __init__(self, image_index: torch.Tensor, n_images: int,
                 prompt_lengths: list[list[int]] | None = None) -> None:
        self.image_index = image_index
        self.n_images = n_images
        if prompt_lengths is not None:  # per image, the token count of each of its prompts
            flat = [n for per_image in prompt_lengths for n in per_image]
            totals = [sum(per_image) for per_image in prompt_lengths]
            offsets = to_device(torch.tensor(  # one host-to-device copy for both
                [0, *itertools.accumulate(flat), 0, *itertools.accumulate(totals)]),
                image_index.device)
            self.prompt_offsets = offsets[: len(flat) + 1]
            self.image_offsets = offsets[len(flat) + 1:]
            self.prompt_seqlens = (min(flat), max(flat))
            self.image_seqlens = (min(totals), max(totals))

    def tokens(self, values: torch.Tensor) -> torch.Tensor:
        """Jagged K x j x C prompt tokens over `values` (sum of lengths x C)."""
        return jagged(values, self.prompt_offsets, self.prompt_seqlens)

    def per_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """K x T x C prompt tokens -> n_img x L x C: each image's prompts' tokens in a row."""
        if tokens.is_nested:
            return jagged(tokens.values(), self.image_offsets, self.image_seqlens)
        k, t, c = tokens.shape  # dense tokens: a single image
        return tokens.reshape(1, k * t, c)

    def per_prompt(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of `per_image`."""
        if tokens.is_nested:
            return self.tokens(tokens.values())
        return tokens.reshape(self.image_index.shape[0], -1, tokens.shape[-1])

    def gather(self, per_image: torch.Tensor) -> torch.Tensor:
        """n_img x HW x C -> K x HW x C (a broadcast view for a single image)."""
        if self.n_images == 1:
            return per_image.expand(self.image_index.shape[0], -1, -1)
        return per_image[self.image_index]
