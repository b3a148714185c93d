"""Triton kernel: symmetric int8 quantization of each row (token), in one pass.

What an int8 linear does to its input (fastsam_core.ops.quant.quantize_per_row), for a row
x of K features:

    s    = max_k |x[k]| / 127          (1 for an all-zero row)
    q[k] = round_half_even(x[k] / s),  clamped to [-127, 127]

In torch that is six passes over the activation (abs, max, cast, divide, round, clamp and
cast); here a row is read once and written once, as int8. One program per row: every row of
the SAM / SAM 2 encoders (K <= 8192, the MLPs' hidden width included) fits one block of
registers, so the maximum and the codes come from the same load. `int8_codes` is the
rounding shared with the fused LayerNorm kernel (kernels/layer_norm_quant.py);
`quantize_rows_ref` beside the kernel is the plain-torch math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsam_core.kernels.launch import Launch
from fastsam_core.ops.quant import MAX_ROW, quantize_per_row  # MAX_ROW: widest row per program


@triton.jit
def int8_codes(y, valid):
    """(codes as floats in [-127, 127], scale) of one row y (fp32, zero where not valid)."""
    amax = tl.max(tl.where(valid, tl.abs(y), 0.0), axis=0)
    # correctly rounded divisions, as torch's: a plain `/` compiles to an approximate one
    scale = tl.math.div_rn(amax, 127.0)
    scale = tl.where(scale == 0.0, 1.0, scale)  # a zero row, or a scale that underflows
    # tl.max drops NaN: a row holding one gets a NaN scale, as torch's amax gives it
    has_nan = tl.max(tl.where(valid & (y != y), 1, 0), axis=0) > 0
    scale = tl.where(has_nan, float("nan"), scale)
    v = tl.math.div_rn(y, scale)
    # round half to even, as torch.round (the interpreter has no libdevice.rint)
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where((r - v == 0.5) & odd, r - 1.0, r)
    return tl.minimum(tl.maximum(r, -127.0), 127.0), scale


@triton.jit
def _quantize_rows_fwd(
    X,  # N x K input rows (row stride stride_x, unit column stride), any float dtype
    Q,  # N x K int8 codes out (contiguous)
    S,  # N fp32 per-row scales out
    stride_x,  # elements between consecutive rows of X
    n_cols,  # K
    BLOCK: tl.constexpr,  # K rounded up to a power of two: one block holds a row
):
    row = tl.program_id(0).to(tl.int64)  # row x K can pass 2^31 elements
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
    codes, scale = int8_codes(x, valid)
    tl.store(Q + row * n_cols + cols, codes.to(tl.int8), mask=valid)
    tl.store(S + row, scale)


def row_launch(k: int) -> dict:
    """Block and warps for one row of k features per program: 4 warps cover a 1024-wide row
    with 8 elements per thread; wider rows get more warps, so the registers per thread stay
    flat (the MLP's 5120-wide hidden rows: 16 warps)."""
    block = max(16, triton.next_power_of_2(k))
    return dict(BLOCK=block, num_warps=min(16, max(4, block // 256)))


def row_buffers(name: str, x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x's rows (N x K, unit column stride) and the code and scale buffers to write (`out`,
    or new N x K int8 and N fp32 ones), for a kernel `name` taking one row per program."""
    k = x.shape[-1]
    if k > MAX_ROW:
        raise ValueError(f"{name}: rows of {k} > {MAX_ROW} features")
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if out is None:
        out = (torch.empty(rows.shape, dtype=torch.int8, device=x.device),
               torch.empty(rows.shape[0], dtype=torch.float32, device=x.device))
    q, s = out  # the kernel writes them as contiguous N x K int8 and N fp32
    if (q.shape != rows.shape or q.dtype != torch.int8 or not q.is_contiguous()
            or s.shape != rows.shape[:1] or s.dtype != torch.float32 or not s.is_contiguous()
            or q.device != x.device or s.device != x.device):
        raise ValueError(f"{name}: out must be contiguous ({tuple(rows.shape)} int8, "
                         f"({rows.shape[0]},) float32) on {x.device}, got "
                         f"({tuple(q.shape)} {q.dtype}, {tuple(s.shape)} {s.dtype})")
    return rows, q, s


def quantize_rows(x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of x (... x K).

    Args:
        out: optional (rows x K int8, rows fp32) contiguous buffers to write into.

    Returns:
        (... x K int8 codes, ... x 1 fp32 scales), as `quantize_rows_ref`.
    """
    rows, q, s = row_buffers("quantize_rows", x, out)
    quantize_rows_launch(rows, q, s)()
    return q.view(x.shape), s.view(*x.shape[:-1], 1)


def quantize_rows_launch(rows: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> Launch:
    """The launch `quantize_rows` runs on its N x K rows and buffers (`row_buffers`)."""
    k = rows.shape[1]
    return Launch(_quantize_rows_fwd, (rows.shape[0],), (rows, q, s, rows.stride(0), k),
                  row_launch(k))


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same math in plain torch (`ops.quant.quantize_per_row`)."""
    return quantize_per_row(x)
