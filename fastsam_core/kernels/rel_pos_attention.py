"""Triton kernel: attention with SAM's decomposed relative-position bias fused in.

For one (batch, head), queries i and keys j on an h x w token grid, key j at grid cell
(row(j), col(j)) = (j // w, j % w):

    S[i, j] = scale * q_i . k_j + rel_h[i, row(j)] + rel_w[i, col(j)]
    O[i]    = sum_j softmax_j(S[i, :]) v_j

where rel_h = q . pos_h (N x h per head) and rel_w = q . pos_w (N x w) are the decomposed
terms of `segment_anything.modeling.image_encoder.add_decomposed_rel_pos`, computed beforehand
by two small matmuls (fastsam_core.ops.attention.rel_pos_terms). The N x N matrix S is never
materialized: keys and values stream through in BLOCK_N blocks while each program keeps, for its
BLOCK_M queries, the running row maximum m_i, the running softmax denominator l_i and the fp32
output accumulator (the online softmax of FlashAttention):

    m_new = max(m_i, rowmax(S_blk));  p = exp(S_blk - m_new);  alpha = exp(m_i - m_new)
    l_i   = alpha * l_i + rowsum(p);   acc = alpha * acc + p @ V_blk;   O = acc / l_i

The bias of a block is gathered from rel_h / rel_w with integer division of the key index by
the grid width: no N x N bias either. Head dims that are not a power of two (vit_h: 80) are
handled by masking the d axis up to BLOCK_D, without padding q/k/v in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# TRITON_INTERPRET=1 is read when a kernel is decorated: runs on CPU tensors, with numpy.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and scheduling of one launch.

    Rules of thumb: BLOCK_M queries per program (64-128: enough work per program to hide load
    latency, few enough programs' registers to keep occupancy); BLOCK_N keys per step (32-64:
    the S tile is BLOCK_M x BLOCK_N fp32 registers); num_warps 4 for 64-row tiles, 8 for 128;
    num_stages 2-3 software-pipelines the K/V loads.
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def as_key(self) -> str:
        return f"m{self.block_m}_n{self.block_n}_w{self.num_warps}_s{self.num_stages}"


# The interpreter runs a numpy op per tile per step: large tiles make few, cheap steps.
INTERPRETER_CONFIG = LaunchConfig(block_m=32, block_n=32, num_warps=1, num_stages=1)


@triton.jit
def _rel_pos_attention_fwd(
    Q,  # B x heads x N x d queries (any strides), compute dtype
    K,  # B x heads x N x d keys
    V,  # B x heads x N x d values
    RH,  # B x heads x N x kh: rel_h[i, key row], any float dtype (unused without HAS_BIAS)
    RW,  # B x heads x N x kw: rel_w[i, key column]
    Out,  # B x heads x N x d output (any strides), written once per element
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rhb, stride_rhh, stride_rhn, stride_rhk,
    stride_rwb, stride_rwh, stride_rwn, stride_rwk,
    stride_ob, stride_oh, stride_on, stride_od,
    heads,  # number of heads: program_id(1) = b * heads + h
    n_tokens,  # N = kh * kw
    scale,  # softmax scale on q . k (not on the bias)
    KEY_W: tl.constexpr,  # kw: width of the key grid, key j sits at (j // kw, j % kw)
    HEAD_DIM: tl.constexpr,  # d
    BLOCK_D: tl.constexpr,  # d rounded up to a power of two >= 16 (tl.dot's minimum)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), "tf32" otherwise (ignored)
    UPCAST_DOT: tl.constexpr,  # interpreter only: tl.dot on bf16 is wrong there (triton #11584)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64: b * stride_qb exceeds 2**31 for large batches (qkv views: stride_qb = N * 3C)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < n_tokens
    d_valid = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn \
        + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    rh_base = RH + b * stride_rhb + h * stride_rhh + offs_m[:, None] * stride_rhn
    rw_base = RW + b * stride_rwb + h * stride_rwh + offs_m[:, None] * stride_rwn

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    log2e = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the native instruction

    for start_n in range(0, n_tokens, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < n_tokens
        # K^T tile: BLOCK_D x BLOCK_N
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        if UPCAST_DOT:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale  # BLOCK_M x BLOCK_N, fp32
        if HAS_BIAS:
            both = m_valid[:, None] & n_valid[None, :]
            rel_h = tl.load(rh_base + (offs_n // KEY_W)[None, :] * stride_rhk, mask=both,
                            other=0.0)
            rel_w = tl.load(rw_base + (offs_n % KEY_W)[None, :] * stride_rwk, mask=both,
                            other=0.0)
            s += rel_h.to(tl.float32) + rel_w.to(tl.float32)
        s = tl.where(n_valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2((s - m_new[:, None]) * log2e)
        alpha = tl.exp2((m_i - m_new) * log2e)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on \
        + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def empty_output(q: torch.Tensor) -> torch.Tensor:
    """B x heads x N x d, laid out as B x N x heads x d: `out.transpose(1, 2).reshape(B, N, C)`
    is then free, which is how the encoder consumes it."""
    b, heads, n, d = q.shape
    return q.new_empty(b, n, heads, d).transpose(1, 2)


def rel_pos_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor | None,
    rel_w: torch.Tensor | None,
    key_grid_w: int,
    scale: float,
    config: LaunchConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel.

    Args:
        q, k, v: B x heads x N x d, same dtype (bf16, fp16 or fp32), any strides.
        rel_h: B x heads x N x kh bias terms, or None (then rel_w must be None too).
        rel_w: B x heads x N x kw bias terms; kh * kw == N.
        key_grid_w: kw.
        scale: softmax scale on q . k.
        config: tile sizes.
        out: optional preallocated output (see `empty_output`).

    Returns:
        B x heads x N x d in q's dtype.
    """
    b, heads, n, d = q.shape
    out = empty_output(q) if out is None else out
    has_bias = rel_h is not None
    dummy = q.new_empty(1, 1, 1, 1)
    rh = rel_h if has_bias else dummy
    rw = rel_w if has_bias else dummy
    grid = (triton.cdiv(n, config.block_m), b * heads)
    _rel_pos_attention_fwd[grid](
        q, k, v, rh, rw, out,
        *q.stride(), *k.stride(), *v.stride(), *rh.stride(), *rw.stride(), *out.stride(),
        heads, n, scale,
        KEY_W=key_grid_w,
        HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        HAS_BIAS=has_bias,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOT=INTERPRETER and q.dtype == torch.bfloat16,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def rel_pos_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor | None,
    rel_w: torch.Tensor | None,
    key_grid_w: int,
    scale: float,
) -> torch.Tensor:
    """Plain-torch reference of the kernel's math (materializes the N x N scores)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # B x heads x N x N
    if rel_h is not None:
        n = q.shape[2]
        key = torch.arange(n, device=q.device)
        scores = scores + rel_h[..., key // key_grid_w] + rel_w[..., key % key_grid_w]
    return torch.matmul(scores.softmax(dim=-1), v)


def supports(q: torch.Tensor, key_grid_w: int) -> str | None:
    """None if the kernel handles these inputs, else the reason it does not."""
    if q.device.type != "cuda" and not INTERPRETER:
        return f"{q.device.type} tensors need CUDA (or TRITON_INTERPRET=1 for testing)"
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {q.dtype}"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    if q.shape[2] % key_grid_w:
        return f"{q.shape[2]} tokens is not a multiple of the grid width {key_grid_w}"
    return None


def flops(batch_heads: int, n: int, d: int) -> int:
    """Matmul FLOPs of one forward: q k^T and p v."""
    return 4 * batch_heads * n * n * d

