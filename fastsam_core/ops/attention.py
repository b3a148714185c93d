"""Attention with SAM's decomposed relative-position bias.

Replaces the core of `segment_anything.modeling.image_encoder.Attention.forward`:
`(q * scale) @ k^T`, `add_decomposed_rel_pos(...)`, softmax, `@ v`, which materializes the
attention matrix in fp32. For a query at grid cell (i, j) and a key at (m, n):

    score = scale * q . k + q . pos_h[i, m] + q . pos_w[j, n]

with `pos_h[i, m] = rel_pos_h[i - m + h - 1]` (likewise for w). The two bias terms are small
(B x heads x N x h and x w); only their broadcast sum is N x N.

Backends:
    "sdpa": the bias is built once in the compute dtype and passed as the mask of
            `F.scaled_dot_product_attention` (fused softmax with fp32 statistics).
    "math": explicit scores in the compute dtype, softmax (fp32 statistics), `@ v`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math")


def rel_pos_index(size: int, device: torch.device | None = None) -> torch.Tensor:
    """Index into a (2 * size - 1) x C relative-position table for each (query, key) pair.

    Returns:
        size x size int64 tensor, entry [i, m] = i - m + size - 1.
    """
    coords = torch.arange(size, device=device)
    return coords[:, None] - coords[None, :] + (size - 1)


def rel_pos_terms(
    q: torch.Tensor, pos_h: torch.Tensor, pos_w: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decomposed bias terms q . pos_h and q . pos_w.

    Args:
        q: B x heads x N x d queries (unscaled), N = h * w.
        pos_h: h x h x d table gathered per (query row, key row).
        pos_w: w x w x d table gathered per (query column, key column).
        grid: (h, w).

    Returns:
        rel_h: B x heads x h x w x h, rel_w: B x heads x h x w x w.
    """
    h, w = grid
    q_grid = q.unflatten(2, (h, w))  # B x heads x h x w x d
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, pos_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, pos_w)
    return rel_h, rel_w


def rel_pos_bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """Broadcast sum of the two bias terms: B x heads x N x N in their dtype."""
    b, heads, h, w, _ = rel_h.shape
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # B x heads x h x w x h x w
    return bias.reshape(b, heads, h * w, h * w)


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_h: torch.Tensor | None,
    pos_w: torch.Tensor | None,
    grid: tuple[int, int],
    scale: float,
    backend: str = "sdpa",
) -> torch.Tensor:
    """softmax(scale * q k^T + rel-pos bias) v.

    Args:
        q, k, v: B x heads x N x d, N = h * w, all in the compute dtype.
        pos_h, pos_w: gathered tables (see `rel_pos_terms`), or both None for no bias.
        grid: (h, w) token grid of q and k.
        scale: softmax scale applied to q . k (not to the bias terms).
        backend: "sdpa" or "math".

    Returns:
        B x heads x N x d in the dtype of q.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    bias = None
    if pos_h is not None:
        bias = rel_pos_bias(*rel_pos_terms(q, pos_h, pos_w, grid))
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # B x heads x N x N
    if bias is not None:
        scores = scores + bias
    # softmax of a low-precision tensor accumulates in fp32 and returns the input dtype.
    return torch.matmul(scores.softmax(dim=-1), v)


def choose_backend(requested: str) -> tuple[str, str]:
    """Resolve FastConfig.attention to a backend of this module, with the reason.

    Returns:
        (backend, reason).
    """
    if requested == "auto":
        return "sdpa", "auto: fused SDPA, bias as mask (no fp32 attention matrix)"
    if requested not in BACKENDS:
        raise ValueError(f"attention must be 'auto' or one of {BACKENDS}, got {requested!r}")
    return requested, "forced by FastConfig.attention"
