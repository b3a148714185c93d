"""Triton kernel: int8 matmul with the dequantization and the bias fused into its epilogue.

An int8 linear (fastsam_core.ops.quant) multiplies per-token int8 activation codes by
per-channel int8 weight codes and rescales:

    acc[n, m] = sum_k x_q[n, k] * w_q[m, k]                  (int32, exact)
    y[n, m]   = acc[n, m] * s_x[n] * s_w[m] + b[m]            (fp32, stored in the out dtype)
    y[n, m]   = gelu(y[n, m]) = y / 2 (1 + erf(y / sqrt 2))  (optional: the MLP's fc1)

`torch._int_mm` returns the int32 N x M product, and the rescale and bias are two more passes
over it (an int32 write and read, then a float one: at SAM's MLP shapes more bytes than the
product's inputs). Here each program keeps its BLOCK_N x BLOCK_M int32 tile in registers over
the K loop and writes only the final y, once, in the activation dtype. The epilogue computes
in the order of `int8_matmul_ref` (fp32 acc, times s_x, times s_w, plus b), so the two agree
exactly in fp32. With activation "gelu" the exact (erf) GELU of the encoders' MLPs is applied
to the fp32 value before the one rounding to the out dtype: the MLP's hidden activation is
written once instead of written, read and written again by a separate GELU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastsam_core.kernels.launch import Launch
from fastsam_core.ops import quant


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one launch.

    Rules of thumb: 128 x 128 output tiles with BLOCK_K 64 keep the int8 tensor cores fed
    (each K step loads 16 KiB of codes per operand) while the int32 accumulator fits the
    registers of 8 warps; num_stages 3 software-pipelines the code loads. tl.dot needs every
    block dimension >= 16.
    """

    block_n: int = 128
    block_m: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def as_key(self) -> str:
        return (f"n{self.block_n}_m{self.block_m}_k{self.block_k}_w{self.num_warps}_"
                f"s{self.num_stages}")


# The tiles measured per shape on CUDA (`ops.quant.int8_tile`): compiled for sm_90 at vit_h's
# MLP shapes, GELU epilogue included, none spills registers (256-wide output tiles do;
# scripts/runs/compile_check-sm90-*.txt).
TILE_CANDIDATES = (LaunchConfig(), LaunchConfig(block_k=128), LaunchConfig(64, 128, 128, 4, 4),
                   LaunchConfig(128, 64, 128, 4, 4))

# TRITON_INTERPRET=1 is read when a kernel is decorated: runs on CPU tensors, with numpy.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter runs a numpy op per tile: small tiles keep the tests' shapes cheap.
INTERPRETER_CONFIG = LaunchConfig(block_n=32, block_m=32, block_k=32, num_warps=1,
                                  num_stages=1)


@triton.jit
def _int8_matmul_fwd(
    XQ,  # N x K int8 activation codes
    XS,  # N fp32 activation scales (contiguous)
    WQ,  # M x K int8 weight codes
    WS,  # M fp32 weight scales (contiguous)
    Bias,  # M bias, any float dtype (unused without HAS_BIAS)
    Out,  # N x M output in the activation dtype, written once per element
    n_rows, n_out, n_in,  # N, M, K
    stride_xn, stride_xk,
    stride_wm, stride_wk,
    stride_on, stride_om,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,  # apply the exact GELU to the fp32 result before storing it
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_N
    rn = row0 + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    # the block's rows addressed from its first row, that one 64-bit: rows x row stride can
    # pass 2^31 elements (over 400k tokens of a 5120-wide layer), offsets within a block do not
    XQ += row0.to(tl.int64) * stride_xn
    Out += row0.to(tl.int64) * stride_on
    local = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for k0 in range(0, n_in, BLOCK_K):
        kk = k0 + rk
        x = tl.load(XQ + local[:, None] * stride_xn + kk[None, :] * stride_xk,
                    mask=(rn[:, None] < n_rows) & (kk[None, :] < n_in), other=0)
        # the weight tile transposed on load: BLOCK_K x BLOCK_M
        w = tl.load(WQ + rm[None, :] * stride_wm + kk[:, None] * stride_wk,
                    mask=(rm[None, :] < n_out) & (kk[:, None] < n_in), other=0)
        acc += tl.dot(x, w, out_dtype=tl.int32)
    sx = tl.load(XS + rn, mask=rn < n_rows, other=0.0)
    sw = tl.load(WS + rm, mask=rm < n_out, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(Bias + rm, mask=rm < n_out, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    tl.store(Out + local[:, None] * stride_on + rm[None, :] * stride_om,
             y.to(Out.dtype.element_ty), mask=(rn[:, None] < n_rows) & (rm[None, :] < n_out))


def int8_matmul_ref(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor,
                    weight_scale: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype, activation: str | None = None) -> torch.Tensor:
    """The same math in plain torch: the codes' products summed in fp32 (exact while the
    sums stay below 2^24), then the same epilogue (`ops.quant.int8_matmul`, "dequant")."""
    return quant.int8_matmul(x_q, x_scale.reshape(-1, 1), weight_q, weight_scale, bias, dtype,
                             "dequant", activation)


def int8_matmul(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor,
                weight_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                config: LaunchConfig | None = None,
                out: torch.Tensor | None = None,
                activation: str | None = None) -> torch.Tensor:
    """y = (s_x x_q)(s_w W_q)^T + b: x_q N x K int8, x_scale N x 1 (or N) fp32, weight_q
    M x K int8, weight_scale M fp32, bias M or None -> N x M in `dtype` (or into `out`).
    `config`: the launch (default: LaunchConfig, the interpreter's small tiles on CPU).
    `activation`: None or "gelu" (exact, applied in fp32 before the output is stored)."""
    quant.check_int8_operands(x_q, x_scale, weight_q, weight_scale, bias)
    n, m = x_q.shape[0], weight_q.shape[0]
    if out is not None and (out.shape != (n, m) or out.dtype != dtype
                            or out.device != x_q.device):
        raise ValueError(f"int8_matmul: out must be {n} x {m} {dtype} on {x_q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if activation not in quant.ACTIVATIONS:
        raise ValueError(f"int8_matmul: activation must be one of {quant.ACTIVATIONS}, got "
                         f"{activation!r}")
    if out is None:
        out = torch.empty(n, m, dtype=dtype, device=x_q.device)
    int8_matmul_launch(x_q, x_scale, weight_q, weight_scale, bias, out, config, activation)()
    return out


def int8_matmul_launch(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor,
                       weight_scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                       config: LaunchConfig | None = None,
                       activation: str | None = None) -> Launch:
    """The launch `int8_matmul` runs (its arguments, checked there; `out` N x M required)."""
    n, k = x_q.shape
    m = weight_q.shape[0]
    config = config or (INTERPRETER_CONFIG if INTERPRETER else LaunchConfig())
    x_scale = x_scale.reshape(n).float().contiguous()
    weight_scale = weight_scale.float().contiguous()
    args = (x_q, x_scale, weight_q, weight_scale, bias if bias is not None else weight_scale,
            out, n, m, k, x_q.stride(0), x_q.stride(1), weight_q.stride(0), weight_q.stride(1),
            out.stride(0), out.stride(1))
    meta = dict(HAS_BIAS=bias is not None, GELU=activation == "gelu", BLOCK_N=config.block_n,
                BLOCK_M=config.block_m, BLOCK_K=config.block_k, num_warps=config.num_warps,
                num_stages=config.num_stages,
                # rescale, then bias, each rounded as torch rounds them: no fused multiply-add
                # (the result is then the reference's to the bit; the epilogue is not the cost)
                enable_fp_fusion=False)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
    return Launch(_int8_matmul_fwd, grid, args, meta)
