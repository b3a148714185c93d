"""Triton kernel: LayerNorm with the int8 quantization of its output fused in.

In the image encoders every MLP (and attention) block starts with a LayerNorm whose output
feeds a linear; with `FastConfig(quantize="int8")` that linear quantizes its input per token
(fastsam_core.ops.quant). Done apart, the activation makes three trips through memory: the
norm writes it, the quantizer reads it for the row maximum and again for the codes. Fused, a
row is read once and written once, as int8 (a quarter of fp32's bytes, half of bf16's):

    mean = sum_k x[k] / K,   var = sum_k (x[k] - mean)^2 / K        (fp32)
    y[k] = (x[k] - mean) / sqrt(var + eps) * w[k] + b[k]
    s    = max_k |y[k]| / 127          (1 for an all-zero row)
    q[k] = round_half_even(y[k] / s),  clamped to [-127, 127]

One program per row: the row (K <= 8192 for every SAM / SAM 2 encoder) fits one block, so
the statistics, the maximum and the codes come from registers (the rounding and the launch
rule are kernels/quantize_rows.py's). `layer_norm_quant_ref` beside the kernel is the same
math in plain torch (what the CPU runs, and the tests' reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastsam_core.kernels.launch import Launch
from fastsam_core.kernels.quantize_rows import int8_codes, row_buffers, row_launch
from fastsam_core.ops.quant import quantize_per_row


@triton.jit
def _layer_norm_quant_fwd(
    X,  # N x K input rows (row stride stride_x, unit column stride), any float dtype
    W,  # K LayerNorm weight
    B,  # K LayerNorm bias
    Q,  # N x K int8 codes out (contiguous)
    S,  # N fp32 per-row scales out
    stride_x,  # elements between consecutive rows of X
    n_cols,  # K
    eps,  # LayerNorm epsilon
    BLOCK: tl.constexpr,  # K rounded up to a power of two: one block holds a row
):
    row = tl.program_id(0).to(tl.int64)  # row x K can pass 2^31 elements
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(valid, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=valid, other=0.0).to(tl.float32)
    y = tl.where(valid, centred * rstd * w + b, 0.0)
    codes, scale = int8_codes(y, valid)
    tl.store(Q + row * n_cols + cols, codes.to(tl.int8), mask=valid)
    tl.store(S + row, scale)


def layer_norm_quant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float, out: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of x (... x K) then symmetric int8 codes per row.

    Args:
        out: optional (rows x K int8, rows fp32) contiguous buffers to write into.

    Returns:
        (... x K int8 codes, ... x 1 fp32 scales), as `layer_norm_quant_ref`.
    """
    k = x.shape[-1]
    if weight.shape != (k,) or bias.shape != (k,):
        raise ValueError(f"layer_norm_quant: weight and bias must have shape ({k},), got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    rows, q, s = row_buffers("layer_norm_quant", x, out)
    layer_norm_quant_launch(rows, weight, bias, eps, q, s)()
    return q.view(x.shape), s.view(*x.shape[:-1], 1)


def layer_norm_quant_launch(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float, q: torch.Tensor, s: torch.Tensor) -> Launch:
    """The launch `layer_norm_quant` runs on its N x K rows and buffers (`row_buffers`)."""
    k = rows.shape[1]
    return Launch(_layer_norm_quant_fwd, (rows.shape[0],),
                  (rows, weight, bias, q, s, rows.stride(0), k, eps), row_launch(k))


def layer_norm_quant_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same math in plain torch: fp32 LayerNorm, then `quantize_per_row`."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return quantize_per_row(y)
