"""Quantized and 2:4-sparse linear layers: the math, with a backend per device.

int8 (dynamic activations, static weights), for y = x W^T + b with x: N x K, W: M x K:

    s_x[n] = max_k |x[n, k]| / 127          (per token, computed at run time)
    s_w[m] = max_k |W[m, k]| / 127          (per output channel, once)
    x_q = round(x / s_x), W_q = round(W / s_w)   (int8, symmetric, zero point 0)
    y[n, m] = s_x[n] * s_w[m] * sum_k x_q[n, k] W_q[m, k] + b[m]

Backends for the integer product: "int_mm" (`torch._int_mm`, CUDA, int32 accumulation) and
"dequant" (the same products in fp32 from the int8 values: the CPU path and the numerical
reference; `torch._int_mm` on the CPU is ~50x slower than an fp32 matmul here).

2:4 semi-structured sparsity: in every group of 4 consecutive input weights of an output
channel, the 2 of smallest magnitude are set to zero (magnitude pruning, no retraining). On
CUDA the pruned weight becomes a `torch.sparse.SparseSemiStructuredTensor` (sparse tensor
cores); elsewhere it stays a dense tensor with the zeros (same numbers, no speed-up).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from fastsam_core.kernels.tuning import Tuner

INT8_MAX = 127
INT8_TUNER = Tuner("int8_matmul")  # per shape and GPU: the int8 matmul backend, the kernel tile
INT8_KERNEL_VERSION = 3  # part of every tuning key: bump when kernels/int8_matmul.py changes
# The per-shape, per-GPU choice between fused kernels and separate passes: for int8 MLPs and
# for LayerNorms that feed an int8 linear directly (norm1 -> qkv).
FUSION_TUNER = Tuner("int8_fusion")
FUSION_VERSION = 3  # part of every tuning key: bump when a fused path's kernels change
FUSED_PATHS = ("fused", "separate")
# Relative L2 distance allowed between a fused and the separate int8 result. Both are int8
# results of the same layers (from the float ones: MLPs 1.1e-2 to 1.8e-2, norm1 -> qkv 7.0e-3
# to 1.0e-2); they differ where the separate passes round the LayerNorm's (and fc1's) output
# to the compute dtype first: measured 1e-7 in fp32, up to 8.3e-3 in fp16 and 1.6e-2 in bf16
# for MLPs, 2.4e-3 and 6.9e-3 for norm1 -> qkv (scripts/runs/int8_fused_paths.txt, CPU, up
# to vit_b's widths). A wrong kernel (garbage, unwritten rows) is ~1 away.
FUSED_PATHS_MATCH_REL_L2 = 5e-2
ACTIVATIONS = (None, "gelu")  # what an int8 matmul may apply before its output is stored
MAX_ROW = 8192  # widest row the row kernels take (one block of registers per row)


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row (last dim) of x: ... x K.

    Returns:
        x_q ... x K int8, scale ... x 1 fp32 (a zero row gets scale 1, all-zero codes).
    """
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    # divided by a tensor on amax's device: CUDA divides by a Python number as a multiply by
    # its reciprocal (1 ulp off for some rows), the kernels (quantize_rows, layer_norm_quant)
    # and the CPU divide exactly
    scale = amax / amax.new_full((), INT8_MAX)
    # a zero row (or one whose scale underflows to 0) gets 1; NaN stays NaN (not `scale > 0`):
    # a NaN in the row makes the linear's output row NaN, as nn.Linear's
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    x_q = torch.round(x.float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return x_q, scale


def int8_linear(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    backend: str = "dequant",
) -> torch.Tensor:
    """y = x W^T + b with x quantized per token and W per output channel.

    Args:
        x: ... x K activations (any float dtype).
        weight_q: M x K int8. weight_scale: M fp32. bias: M or None.
        backend: "int_mm" (CUDA) or "dequant".

    Returns:
        ... x M in x's dtype.
    """
    if not x.is_floating_point():
        raise TypeError(f"int8_linear: x must be floating point, got {x.dtype}")
    shape = x.shape
    x_q, x_scale = quantize_per_row(x.reshape(-1, shape[-1]))  # N x K, N x 1
    y = int8_matmul(x_q, x_scale, weight_q, weight_scale, bias, x.dtype, backend)
    return y.reshape(*shape[:-1], weight_q.shape[0])


def int8_matmul(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor,
                weight_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                backend: str = "dequant", activation: str | None = None) -> torch.Tensor:
    """y = (s_x x_q)(s_w W_q)^T + b from int8 codes: x_q N x K int8, x_scale N x 1 fp32,
    weight_q M x K int8, weight_scale M fp32, bias M or None -> N x M in `dtype`.

    backend: "int_mm" (CUDA's int32 product, then the rescale and bias), "dequant" (fp32
    products of the codes), "triton" (`fastsam_core.kernels.int8_matmul`: product, rescale
    and bias in one kernel). activation: None or "gelu" (exact GELU of the fp32 result, before
    the rounding to `dtype`; in the kernel's epilogue with "triton")."""
    check_int8_operands(x_q, x_scale, weight_q, weight_scale, bias)
    if backend == "triton":
        from fastsam_core.kernels.int8_matmul import int8_matmul as fused

        tile = int8_tile(x_q, x_scale, weight_q, weight_scale, bias, dtype, activation)
        return fused(x_q, x_scale, weight_q, weight_scale, bias, dtype, tile,
                     activation=activation)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if backend == "int_mm":
        acc = torch._int_mm(x_q, weight_q.t()).float()  # N x M, exact int32 sums
    elif backend == "dequant":
        acc = x_q.float() @ weight_q.float().t()
    else:
        raise ValueError(f"backend must be 'int_mm', 'dequant' or 'triton', got {backend!r}")
    y = acc * x_scale.reshape(-1, 1) * weight_scale.reshape(1, -1)  # N x M
    if bias is not None:
        y = y + bias.float()
    if activation == "gelu":
        y = F.gelu(y)
    return y.to(dtype)


def check_int8_operands(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor,
                        weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    """ValueError / TypeError naming the argument where `int8_matmul`'s operands do not fit:
    x_q N x K int8, x_scale N x 1 or N, weight_q M x K int8, weight_scale M or M x 1, bias M."""
    if x_q.dtype != torch.int8 or weight_q.dtype != torch.int8:
        raise TypeError(f"int8_matmul: x_q and weight_q must be int8, got {x_q.dtype} and "
                        f"{weight_q.dtype}")
    if x_q.dim() != 2 or weight_q.dim() != 2 or x_q.shape[1] != weight_q.shape[1]:
        raise ValueError(f"int8_matmul: x_q (N x K) and weight_q (M x K) must share K, got "
                         f"{tuple(x_q.shape)} and {tuple(weight_q.shape)}")
    n, m = x_q.shape[0], weight_q.shape[0]
    for name, t, size in (("x_scale", x_scale, n), ("weight_scale", weight_scale, m)):
        if tuple(t.shape) not in ((size,), (size, 1)):
            raise ValueError(f"int8_matmul: {name} must have shape ({size},) or ({size}, 1), "
                             f"got {tuple(t.shape)}")
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"int8_matmul: bias must have shape ({m},), got {tuple(bias.shape)}")


def check_no_grad(name: str, *tensors: torch.Tensor | None) -> None:
    """RuntimeError where autograd records a tensor about to be rounded to int8 codes: no
    gradient would reach it (or a LayerNorm's parameters before it), silently."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{name} is inference-only: int8 codes carry no gradient (run it "
                           "under torch.no_grad() or torch.inference_mode())")


def quantize_rows(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_per_row` of x's rows (... x K -> N x K int8, N x 1 fp32 scale, N = rows):
    one pass over each row with backend "triton" (kernels/quantize_rows.py), torch's passes
    with "torch"; "auto": the kernel on CUDA for rows it takes, torch elsewhere."""
    check_no_grad("quantize_rows", x)
    if backend == "auto":
        backend = "triton" if x.is_cuda and x.shape[-1] <= MAX_ROW else "torch"
    rows = x.reshape(-1, x.shape[-1])
    if backend == "triton":
        from fastsam_core.kernels.quantize_rows import quantize_rows as kernel

        return kernel(rows)
    if backend == "torch":
        return quantize_per_row(rows)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def layer_norm_quantize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float, backend: str = "auto"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over x's last dim (... x K) and the int8 codes of its output per row:
    (N x K int8, N x 1 fp32 scale), N = rows of x. What an int8 linear after a LayerNorm
    quantizes, in one pass with backend "triton" (the fused kernel of
    `fastsam_core.kernels.layer_norm_quant`), in three with "torch"; "auto": the kernel on
    CUDA for rows it takes, torch elsewhere."""
    check_no_grad("layer_norm_quantize", x, weight, bias)
    if backend == "auto":
        backend = "triton" if x.is_cuda and x.shape[-1] <= MAX_ROW else "torch"
    rows = x.reshape(-1, x.shape[-1])
    if backend == "triton":
        from fastsam_core.kernels.layer_norm_quant import layer_norm_quant

        return layer_norm_quant(rows, weight, bias, eps)
    if backend == "torch":
        from fastsam_core.kernels.layer_norm_quant import layer_norm_quant_ref

        return layer_norm_quant_ref(rows, weight, bias, eps)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def int8_backend(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor,
                 weight_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 tuner: Tuner = INT8_TUNER) -> str:
    """"int_mm" or "triton" for this layer's shape on this GPU, decided by measurement: on
    first use both run on the real codes, a backend whose output differs from the fp32
    reference ("dequant") beyond `tuning.MATCH_REL_L2` is discarded, the faster of the rest
    is kept (in memory, in the per-user cache, or from the shipped table; see
    `fastsam_core.kernels.tuning`). Token counts are bucketed to powers of two. With
    FASTSAM_DISABLE_TRITON set: "int_mm"."""
    from fastsam_core.ops.attention import kernel_disabled

    if kernel_disabled():
        return "int_mm"
    n, k = x_q.shape
    m = weight_q.shape[0]
    key = f"v{INT8_KERNEL_VERSION}:n{token_bucket(n)}:k{k}:m{m}:{dtype}:{triton_tag()}"
    device = device_key(x_q)
    names = ["int_mm", "triton"]
    choice = tuner.cached(device, key, names)
    if choice is not None:
        return choice
    run = partial(int8_matmul, x_q, x_scale, weight_q, weight_scale, bias, dtype)
    reference = run("dequant")
    return tuner.tune(device, key, {name: partial(run, name) for name in names}, reference)


def int8_tile(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor,
              weight_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
              activation: str | None = None, tuner: Tuner = INT8_TUNER,
              device: str | None = None):
    """The Triton int8 matmul's tile (a `kernels.int8_matmul.LaunchConfig`) for this shape on
    this GPU, by measurement: on first use every one of `TILE_CANDIDATES` runs on the real
    codes, one whose output differs from the fp32 reference ("dequant") beyond
    `tuning.MATCH_REL_L2` is discarded, the fastest of the rest is kept (with the backend
    choices of `int8_backend`, in `int8_matmul.json`). Token counts are bucketed to powers of
    two. Off CUDA and in the interpreter: None, the kernel's default (`device` names a GPU to
    tune for anyway: the tests')."""
    from fastsam_core.kernels import int8_matmul as kernel

    if device is None:
        if not x_q.is_cuda or kernel.INTERPRETER:
            return None
        device = device_key(x_q)
    n, k = x_q.shape
    m = weight_q.shape[0]
    key = (f"v{INT8_KERNEL_VERSION}:tile:n{token_bucket(n)}:k{k}:m{m}:{dtype}:{activation}:"
           f"{triton_tag()}")
    tiles = {c.as_key(): c for c in kernel.TILE_CANDIDATES}
    choice = tuner.cached(device, key, list(tiles))
    if choice is None:
        run = partial(kernel.int8_matmul, x_q, x_scale, weight_q, weight_scale, bias, dtype,
                      activation=activation)
        reference = int8_matmul(x_q, x_scale, weight_q, weight_scale, bias, dtype, "dequant",
                                activation)
        choice = tuner.tune(device, key, {name: partial(run, tile)
                                          for name, tile in tiles.items()}, reference)
    return tiles[choice]


def int8_mlp_path(x: torch.Tensor, hidden: int, has_norm: bool,
                  run: Callable[[str], torch.Tensor], tuner: Tuner = FUSION_TUNER) -> str:
    """`fused_path` of an int8 MLP (`models.quant.Int8MLP`) on input x (... x K) with `hidden`
    features, after a deferred LayerNorm or not."""
    return fused_path(x, f"mlp:h{hidden}:norm{has_norm}", run, tuner)


def layer_norm_linear_path(x: torch.Tensor, out_features: int, window_size: int,
                           run: Callable[[str], torch.Tensor],
                           tuner: Tuner = FUSION_TUNER) -> str:
    """`fused_path` of a LayerNorm on x (B x H x W x K) feeding an int8 linear with
    `out_features` directly, through a window partition (window_size > 0) or not
    (`models.quant.PendingLayerNorm.for_linear`). Grids with the same token bucket and window
    share a choice (the padding the windows add is not part of the key)."""
    return fused_path(x, f"norm_linear:m{out_features}:w{window_size}", run, tuner)


def fused_path(x: torch.Tensor, op: str, run: Callable[[str], torch.Tensor],
               tuner: Tuner = FUSION_TUNER) -> str:
    """"fused" or "separate" for the int8 layers `op` names, on input x (... x K), decided
    by measurement on first use of the shape on this GPU: `run(path)` computes the layers on
    the real input either way, the fused output must match the separate one within
    FUSED_PATHS_MATCH_REL_L2, and the faster is kept (in memory, the per-user cache, or from
    the shipped table). Token counts are bucketed to powers of two. With
    FASTSAM_DISABLE_TRITON set: "separate"."""
    from fastsam_core.ops.attention import kernel_disabled

    if kernel_disabled():
        return "separate"
    n = x.numel() // x.shape[-1]
    key = f"v{FUSION_VERSION}:{op}:n{token_bucket(n)}:k{x.shape[-1]}:{x.dtype}:{triton_tag()}"
    device = device_key(x)
    names = list(FUSED_PATHS)
    choice = tuner.cached(device, key, names)
    if choice is not None:
        return choice
    reference = run("separate")
    return tuner.tune(device, key, {name: partial(run, name) for name in names}, reference,
                      FUSED_PATHS_MATCH_REL_L2)


def token_bucket(n: int) -> int:
    """n rounded up to a power of two: the token counts one measured choice stands for."""
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def triton_tag() -> str:
    """Part of every measured choice's key: a Triton upgrade may compile a tile differently."""
    try:
        import triton
    except ImportError:
        return "triton-none"
    return f"triton{triton.__version__}"


def device_key(x: torch.Tensor) -> str:
    """The name measured choices are kept under: the GPU's name, else the device's."""
    return torch.cuda.get_device_name(x.device) if x.is_cuda else str(x.device)


def int_mm_supported(n_tokens: int, in_features: int, out_features: int,
                     device: torch.device) -> bool:
    """torch._int_mm's constraints: CUDA, more than 16 rows, sizes multiples of 8."""
    return (device.type == "cuda" and n_tokens > 16 and in_features % 8 == 0
            and out_features % 8 == 0)


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4 pruning along the input dim: M x K (K a multiple of 4) -> M x K with the
    two smallest of every 4 consecutive weights zeroed."""
    if weight.dim() != 2:
        raise ValueError(f"prune_2_4: weight must be M x K, got shape {tuple(weight.shape)}")
    m, k = weight.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {k}")
    groups = weight.reshape(m, k // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices  # M x K/4 x 2
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    # where, not a product: a dropped inf or NaN times 0 would be a NaN, a third non-zero
    return torch.where(mask, groups, torch.zeros_like(groups)).reshape(m, k)


def is_2_4_sparse(weight: torch.Tensor) -> bool:
    """True if every group of 4 consecutive input weights has at most 2 non-zeros."""
    m, k = weight.shape
    return bool(((weight.reshape(m, k // 4, 4) != 0).sum(-1) <= 2).all())


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """F.linear with a 2:4 weight (semi-structured on CUDA, dense with zeros elsewhere)."""
    return F.linear(x, weight, bias)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)
    (inf for no noise, -inf for noise without signal or infinite noise, NaN with NaNs)."""
    if reference.shape != approximation.shape:
        raise ValueError(f"sqnr_db: reference and approximation must have one shape, got "
                         f"{tuple(reference.shape)} and {tuple(approximation.shape)}")
    ref = reference.double()
    noise = (ref - approximation.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if math.isnan(noise) or math.isnan(signal):
        return math.nan
    if noise == 0:
        return math.inf
    if signal == 0 or math.isinf(noise):
        return -math.inf
    return 10 * math.log10(signal / noise)
