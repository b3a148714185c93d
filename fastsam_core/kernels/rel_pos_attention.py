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

No N x N bias either. How a block's bias is formed from rel_h / rel_w (BIAS_MODE; which is
faster is measured: the tuner's candidates hold both tiled and gathered forms):

    "row"     BLOCK_N == w: a block is one key row, columns 0..w-1 in order, so its bias is
              rel_h[:, row] (one column) + the program's rel_w tile, loaded once;
    "onehot"  small grids (windows): rel_h and rel_w tiles loaded once, the bias of a block
              as two matmuls with one-hot matrices, rel_h @ [r == row(j)] + rel_w @ [c ==
              col(j)] (each product exact, summed in fp32);
    "gather"  otherwise: rel_h[i, j // w] and rel_w[i, j % w] loaded per element.

A -inf bias term masks its key, as in the reference (a block whose keys are all masked so far
shifts by 0, not by its -inf maximum). "onehot" stands the dtype's most negative finite value
in for -inf (-inf times a one-hot zero would be NaN), so there a query whose every key is
masked may get a finite output where softmax gives NaN; in the other modes it is NaN too.

Head dims are split into a power-of-two part and a remainder instead of being padded to the
next power of two (vit_h's 80 = 64 + 16, not 128: 37.5% fewer multiply-adds, accumulator
registers and K/V tile bytes; compiled for sm_90 in bf16, the padded kernel spilled 556-676
bytes of registers per thread on vit_h's windows at 64-key tiles, this one spills at none of
its candidates, scripts/runs/compile_check-sm90-*.txt; the padded one:
scripts/runs/compile_check_f3a00d3-sm90-*.txt),
the d axis masked where the remainder is partial; q/k/v are never padded in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastsam_core.kernels.launch import Launch

# TRITON_INTERPRET=1 is read when a kernel is decorated: runs on CPU tensors, with numpy.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
BIAS_MODES = ("row", "onehot", "gather")
ONEHOT_MAX_DEPTH = 64  # largest padded h + w the one-hot matmuls take (windows: 16 + 16)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and scheduling of one launch.

    Rules of thumb: BLOCK_M queries per program (64-128: enough work per program to hide load
    latency, few enough programs' registers to keep occupancy); BLOCK_N keys per step (32-64:
    the S tile is BLOCK_M x BLOCK_N fp32 registers; equal to the grid width, the bias comes
    from a tile loaded once); num_warps 4 for 64-row tiles, 8 for 128; num_stages 2-3
    software-pipelines the K/V loads. `bias` forces a BIAS_MODE ("auto": `bias_mode`).
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    bias: str = "auto"

    def __post_init__(self):
        if self.bias not in ("auto", *BIAS_MODES):
            raise ValueError(f"bias must be 'auto' or one of {BIAS_MODES}, got {self.bias!r}")

    def as_key(self) -> str:
        key = f"m{self.block_m}_n{self.block_n}_w{self.num_warps}_s{self.num_stages}"
        return key if self.bias == "auto" else f"{key}_{self.bias}"


# The interpreter runs a numpy op per tile per step: large tiles make few, cheap steps.
INTERPRETER_CONFIG = LaunchConfig(block_m=32, block_n=32, num_warps=1, num_stages=1)


def bias_mode(config: LaunchConfig, grid: tuple[int, int]) -> str:
    """The BIAS_MODE a launch of `config` on an h x w key grid uses: `config.bias` if forced,
    else "row" when a block is one key row, "onehot" for small grids, "gather" otherwise."""
    if config.bias != "auto":
        if config.bias == "row" and config.block_n != grid[1]:
            raise ValueError(f"bias 'row' needs block_n == grid width, got {config.block_n} "
                             f"and {grid[1]}")
        return config.bias
    if config.block_n == grid[1]:
        return "row"
    if _pad(grid[0]) + _pad(grid[1]) <= ONEHOT_MAX_DEPTH:
        return "onehot"
    return "gather"


def head_dim_split(d: int) -> tuple[int, int]:
    """(D0, D1): the head dim as a power of two D0 >= 16 plus a remainder block D1 (0 or a
    power of two >= 16), where that covers d with fewer columns than padding to a power of
    two (80 -> 64 + 16; 64 -> 64 + 0; 24 -> 32 + 0)."""
    padded = _pad(d)
    low = max(16, 1 << (d.bit_length() - 1))
    if low >= d or low + _pad(d - low) >= padded:
        return padded, 0
    return low, _pad(d - low)


def _pad(n: int) -> int:
    """n rounded up to a power of two >= 16 (tl.dot's smallest block dimension)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _rel_pos_attention_fwd(
    Q,  # B x heads x N x d queries (any strides), compute dtype
    K,  # B x heads x N x d keys
    V,  # B x heads x N x d values
    RH,  # B x heads x N x kh: rel_h[i, key row], unit last stride (unused without HAS_BIAS)
    RW,  # B x heads x N x kw: rel_w[i, key column], unit last stride
    Out,  # B x heads x N x d output (any strides), written once per element
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rhb, stride_rhh, stride_rhn,
    stride_rwb, stride_rwh, stride_rwn,
    stride_ob, stride_oh, stride_on, stride_od,
    heads,  # number of heads: program_id(1) = b * heads + h
    n_tokens,  # N = kh * kw
    scale,  # softmax scale on q . k (not on the bias)
    KEY_H: tl.constexpr,  # kh: height of the key grid
    KEY_W: tl.constexpr,  # kw: width of the key grid, key j sits at (j // kw, j % kw)
    HEAD_DIM: tl.constexpr,  # d
    D0: tl.constexpr,  # head-dim columns of the first block (a power of two >= 16)
    D1: tl.constexpr,  # head-dim columns of the second block, 0 for none (head_dim_split)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_MODE: tl.constexpr,  # 0 "row", 1 "onehot", 2 "gather" (see the module docstring)
    PAD_H: tl.constexpr,  # kh and kw rounded up to a power of two >= 16 ("onehot" tiles)
    PAD_W: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), "tf32" otherwise (ignored)
    UPCAST_DOT: tl.constexpr,  # interpreter only: tl.dot on bf16 is wrong there (triton #11584)
    NEG_FINITE: tl.constexpr,  # the most negative finite value of the compute dtype
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64: b * stride_qb exceeds 2**31 for large batches (qkv views: stride_qb = N * 3C)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < n_tokens
    offs_d0 = tl.arange(0, D0)
    d0_valid = offs_d0 < HEAD_DIM
    q_base = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    q0 = tl.load(q_base + offs_d0[None, :] * stride_qd, mask=m_valid[:, None] & d0_valid[None, :],
                 other=0.0)
    if UPCAST_DOT:
        q0 = q0.to(tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        d1_valid = offs_d1 < HEAD_DIM
        q1 = tl.load(q_base + offs_d1[None, :] * stride_qd,
                     mask=m_valid[:, None] & d1_valid[None, :], other=0.0)
        if UPCAST_DOT:
            q1 = q1.to(tl.float32)
        acc1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    rh_base = RH + b * stride_rhb + h * stride_rhh + offs_m[:, None] * stride_rhn  # BLOCK_M x 1
    rw_base = RW + b * stride_rwb + h * stride_rwh + offs_m[:, None] * stride_rwn
    if HAS_BIAS:
        if BIAS_MODE == 0:  # rel_w[i, col] for the columns of every block: BLOCK_M x kw
            rw_tile = tl.load(rw_base + tl.arange(0, BLOCK_N)[None, :], mask=m_valid[:, None],
                              other=0.0)
        if BIAS_MODE == 1:  # all of rel_h and rel_w: BLOCK_M x PAD_H and BLOCK_M x PAD_W
            cols_h = tl.arange(0, PAD_H)
            cols_w = tl.arange(0, PAD_W)
            rh_tile = tl.load(rh_base + cols_h[None, :],
                              mask=m_valid[:, None] & (cols_h < KEY_H)[None, :], other=0.0)
            rw_tile = tl.load(rw_base + cols_w[None, :],
                              mask=m_valid[:, None] & (cols_w < KEY_W)[None, :], other=0.0)
            if UPCAST_DOT:
                rh_tile = rh_tile.to(tl.float32)
                rw_tile = rw_tile.to(tl.float32)
            # -inf times a one-hot zero is NaN: the dtype's most negative finite value masks
            # the key all the same (+inf and NaN stay NaN, as in the reference)
            rh_tile = tl.where(rh_tile == float("-inf"), NEG_FINITE, rh_tile)
            rw_tile = tl.where(rw_tile == float("-inf"), NEG_FINITE, rw_tile)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    log2e = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the native instruction

    for start_n in range(0, n_tokens, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < n_tokens
        # K^T tiles: D0 x BLOCK_N (and D1 x BLOCK_N)
        k0 = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d0[:, None] * stride_kd,
                     mask=n_valid[None, :] & d0_valid[:, None], other=0.0)
        v0 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d0[None, :] * stride_vd,
                     mask=n_valid[:, None] & d0_valid[None, :], other=0.0)
        if UPCAST_DOT:
            k0 = k0.to(tl.float32)
            v0 = v0.to(tl.float32)
        s = tl.dot(q0, k0, input_precision=DOT_PRECISION)  # BLOCK_M x BLOCK_N, fp32
        if D1 > 0:
            k1 = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d1[:, None] * stride_kd,
                         mask=n_valid[None, :] & d1_valid[:, None], other=0.0)
            v1 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d1[None, :] * stride_vd,
                         mask=n_valid[:, None] & d1_valid[None, :], other=0.0)
            if UPCAST_DOT:
                k1 = k1.to(tl.float32)
                v1 = v1.to(tl.float32)
            s = tl.dot(q1, k1, s, input_precision=DOT_PRECISION)
        s = s * scale
        if HAS_BIAS:
            if BIAS_MODE == 0:  # the block is key row start_n // kw, all its columns in order
                rel_h = tl.load(rh_base + start_n // KEY_W, mask=m_valid[:, None], other=0.0)
                s += rel_h.to(tl.float32) + rw_tile.to(tl.float32)
            elif BIAS_MODE == 1:
                rows = (tl.arange(0, PAD_H)[:, None] == (offs_n // KEY_W)[None, :])
                cols = (tl.arange(0, PAD_W)[:, None] == (offs_n % KEY_W)[None, :])
                s = tl.dot(rh_tile, rows.to(rh_tile.dtype), s, input_precision="ieee")
                s = tl.dot(rw_tile, cols.to(rw_tile.dtype), s, input_precision="ieee")
            else:
                both = m_valid[:, None] & n_valid[None, :]
                rel_h = tl.load(rh_base + (offs_n // KEY_W)[None, :], mask=both, other=0.0)
                rel_w = tl.load(rw_base + (offs_n % KEY_W)[None, :], mask=both, other=0.0)
                s += rel_h.to(tl.float32) + rel_w.to(tl.float32)
        s = tl.where(n_valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a query whose keys so far are all masked (-inf bias terms): subtract 0, not -inf,
        # so that its p and alpha are 0, not NaN (NaN only if every key is masked, as softmax)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2((s - m_shift[:, None]) * log2e)
        alpha = tl.exp2((m_i - m_shift) * log2e)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        if D1 > 0:
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    o_base = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on
    tl.store(o_base + offs_d0[None, :] * stride_od, (acc0 / l_i[:, None]).to(Out.dtype.element_ty),
             mask=m_valid[:, None] & d0_valid[None, :])
    if D1 > 0:
        tl.store(o_base + offs_d1[None, :] * stride_od,
                 (acc1 / l_i[:, None]).to(Out.dtype.element_ty),
                 mask=m_valid[:, None] & d1_valid[None, :])


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
        rel_h: B x heads x N x kh bias terms in q's dtype, or None (then rel_w must be None
            too).
        rel_w: B x heads x N x kw bias terms in q's dtype; kh * kw == N.
        key_grid_w: kw.
        scale: softmax scale on q . k.
        config: tile sizes.
        out: optional preallocated output (see `empty_output`).

    Returns:
        B x heads x N x d in q's dtype.
    """
    out = empty_output(q) if out is None else out
    rel_pos_attention_launch(q, k, v, rel_h, rel_w, key_grid_w, scale, config, out)()
    return out


def rel_pos_attention_launch(q, k, v, rel_h, rel_w, key_grid_w: int, scale: float,
                             config: LaunchConfig, out: torch.Tensor) -> Launch:
    """The launch `rel_pos_attention_fwd` runs (same arguments, `out` required)."""
    b, heads, n, d = q.shape
    check_launch(q, k, v, rel_h, rel_w, key_grid_w, out)
    grid_hw = (n // key_grid_w, key_grid_w)
    has_bias = rel_h is not None
    if has_bias:  # the kernel reads the bias terms' last dim with unit stride
        rh, rw = (t if t.stride(-1) == 1 else t.contiguous() for t in (rel_h, rel_w))
    else:
        rh = rw = q.new_empty(1, 1, 1, 1)
    d0, d1 = head_dim_split(d)
    args = (q, k, v, rh, rw, out,
            *q.stride(), *k.stride(), *v.stride(), *rh.stride()[:3], *rw.stride()[:3],
            *out.stride(), heads, n, scale)
    meta = dict(
        KEY_H=grid_hw[0],
        KEY_W=key_grid_w,
        HEAD_DIM=d,
        D0=d0,
        D1=d1,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        HAS_BIAS=has_bias,
        BIAS_MODE=BIAS_MODES.index(bias_mode(config, grid_hw)),
        PAD_H=_pad(grid_hw[0]),
        PAD_W=_pad(grid_hw[1]),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOT=INTERPRETER and q.dtype == torch.bfloat16,
        NEG_FINITE=torch.finfo(q.dtype).min,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return Launch(_rel_pos_attention_fwd, (triton.cdiv(n, config.block_m), b * heads), args,
                  meta)


def check_launch(q, k, v, rel_h, rel_w, key_grid_w: int, out: torch.Tensor) -> None:
    """ValueError for arguments the kernel would read or write out of bounds, or misread: it
    indexes k, v, rel_h, rel_w and out by q's shape and loads them as q's dtype."""
    b, heads, n, _ = q.shape
    if key_grid_w <= 0 or n % key_grid_w:
        raise ValueError(f"rel_pos_attention: {n} tokens is not a multiple of the grid width "
                         f"{key_grid_w} (key_grid_w)")
    for name, t in (("k", k), ("v", v), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"rel_pos_attention: {name} must match q ({tuple(q.shape)}, "
                             f"{q.dtype}, {q.device}), got {tuple(t.shape)}, {t.dtype}, "
                             f"{t.device}")
    if (rel_h is None) != (rel_w is None):
        raise ValueError("rel_pos_attention: rel_h and rel_w must both be tensors or both None")
    if rel_h is not None:
        for name, t, size in (("rel_h", rel_h, n // key_grid_w), ("rel_w", rel_w, key_grid_w)):
            if (tuple(t.shape) != (b, heads, n, size) or t.dtype != q.dtype
                    or t.device != q.device):
                raise ValueError(f"rel_pos_attention: {name} must be {(b, heads, n, size)} "
                                 f"{q.dtype} on {q.device}, got {tuple(t.shape)} {t.dtype} on "
                                 f"{t.device}")


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


def supports(q: torch.Tensor, key_grid_w: int, k: torch.Tensor | None = None,
             v: torch.Tensor | None = None) -> str | None:
    """None if the kernel handles these inputs, else the reason it does not."""
    if q.dim() != 4 or q.numel() == 0:
        return f"q of shape {tuple(q.shape)}"
    for name, t in (("k", k), ("v", v)):  # SDPA broadcasts, takes other key counts and v widths
        if t is not None and (t.shape != q.shape or t.dtype != q.dtype):
            return f"{name} {tuple(t.shape)} {t.dtype} is not q's {tuple(q.shape)} {q.dtype}"
    if q.device.type != "cuda" and not INTERPRETER:
        return f"{q.device.type} tensors need CUDA (or TRITON_INTERPRET=1 for testing)"
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {q.dtype}"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    if key_grid_w <= 0 or q.shape[2] % key_grid_w:
        return f"{q.shape[2]} tokens is not a multiple of the grid width {key_grid_w}"
    return None


def flops(batch_heads: int, n: int, d: int) -> int:
    """Matmul FLOPs of one forward: q k^T and p v."""
    return 4 * batch_heads * n * n * d

