"""Attention with SAM's decomposed relative-position bias.

Replaces the core of `segment_anything.modeling.image_encoder.Attention.forward`:
`(q * scale) @ k^T`, `add_decomposed_rel_pos(...)`, softmax, `@ v`, which materializes the
attention matrix in fp32. For a query at grid cell (i, j) and a key at (m, n):

    score = scale * q . k + q . pos_h[i, m] + q . pos_w[j, n]

with `pos_h[i, m] = rel_pos_h[i - m + h - 1]` (likewise for w). The two bias terms are small
(B x heads x N x h and x w); only their broadcast sum is N x N.

Backends:
    "triton": the fused kernel of fastsam_core.kernels.rel_pos_attention (no N x N tensor at
              all), through the custom op `torch.ops.fastsam.rel_pos_attention` so that
              torch.compile(fullgraph=True) traces through it.
    "auto":   the same custom op, which on first use of a shape times the kernel's launch
              configurations and SDPA on the real inputs and keeps the fastest.
    "sdpa":   the bias is built once in the compute dtype and passed as the mask of
              `F.scaled_dot_product_attention` (fused softmax with fp32 statistics).
    "math":   explicit scores in the compute dtype, softmax (fp32 statistics), `@ v`.
Inputs the kernel does not support, a kernel disabled with FASTSAM_DISABLE_TRITON=1, a machine
without Triton, or a shape where no launch configuration matched the reference take the SDPA
path (with one warning when "triton" was asked for).
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch
import torch.nn.functional as F

from fastsam_core.config import ATTENTION_BACKENDS as BACKENDS
from fastsam_core.kernels.tuning import Tuner

try:
    from fastsam_core.kernels import rel_pos_attention as kernel
except ImportError:  # no Triton on this platform: the SDPA and math paths still work
    kernel = None

DISABLE_ENV = "FASTSAM_DISABLE_TRITON"
TUNER = Tuner("rel_pos_attention")
KERNEL_VERSION = 3  # part of every tuning key: bump when the kernel's code changes
KERNEL_FALLBACKS: dict[str, int] = {}  # reason -> calls (this process) that wanted the kernel
UNMATCHED: dict[tuple[str, str], str] = {}  # (GPU, tuning key) -> why no launch matched


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
        rel_h: B x heads x N x h (query i, key row), rel_w: B x heads x N x w (key column).
    """
    h, w = grid
    q_grid = q.unflatten(2, (h, w))  # B x heads x h x w x d
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, pos_h).flatten(2, 3)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, pos_w).flatten(2, 3)
    return rel_h, rel_w


def rel_pos_bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """B x heads x N x N bias in the terms' dtype: bias[i, j] = rel_h[i, row(j)] +
    rel_w[i, col(j)], key j at (j // w, j % w)."""
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # B x heads x N x kh x kw
    return bias.flatten(-2)


def kernel_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "0") not in ("", "0")


def kernel_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       rel_h: torch.Tensor | None, rel_w: torch.Tensor | None,
                       grid: tuple[int, int]) -> str | None:
    """None if the Triton kernel can run on these inputs, else why not."""
    if kernel is None:
        return "Triton is not installed"
    if kernel_disabled():
        return f"disabled by {DISABLE_ENV}"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k, v, rel_h, rel_w)):
        return "autograd is recording and the kernel has no backward"
    return kernel.supports(q, grid[1], k, v)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_h: torch.Tensor | None,
                 pos_w: torch.Tensor | None, grid: tuple[int, int]) -> None:
    """ValueError / TypeError naming the argument for inputs that no backend computes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"rel_pos_attention: {name} must be B x heads x N x d, got shape "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"rel_pos_attention: {name} must be floating point, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"rel_pos_attention: q, k and v must have one dtype, got {q.dtype}, "
                        f"{k.dtype} and {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"rel_pos_attention: q, k and v must be on one device, got {q.device}, "
                         f"{k.device} and {v.device}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"rel_pos_attention: k must have q's head dim {q.shape[-1]}, got "
                         f"shape {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"rel_pos_attention: v must have k's {k.shape[2]} tokens, got shape "
                         f"{tuple(v.shape)}")
    if (pos_h is None) != (pos_w is None):
        raise ValueError("rel_pos_attention: pos_h and pos_w must both be tensors or both None")
    if pos_h is None:
        return
    h, w = grid
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"rel_pos_attention: with a rel-pos bias k must have q's {q.shape[2]} "
                         f"tokens, got shape {tuple(k.shape)}")
    if h * w != q.shape[2]:
        raise ValueError(f"rel_pos_attention: grid {tuple(grid)} has {h * w} cells, q has "
                         f"{q.shape[2]} tokens")
    for name, t, size in (("pos_h", pos_h, h), ("pos_w", pos_w, w)):
        if tuple(t.shape) != (size, size, q.shape[-1]):
            raise ValueError(f"rel_pos_attention: {name} must be {size} x {size} x "
                             f"{q.shape[-1]} for grid {tuple(grid)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"rel_pos_attention: {name} must have q's dtype {q.dtype}, got "
                            f"{t.dtype}")
        if t.device != q.device:
            raise ValueError(f"rel_pos_attention: {name} must be on q's device {q.device}, got "
                             f"{t.device}")


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
        backend: one of BACKENDS.

    Returns:
        B x heads x N x d in the dtype of q (strides may differ between backends).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_inputs(q, k, v, pos_h, pos_w, grid)
    rel_h, rel_w = (None, None) if pos_h is None else rel_pos_terms(q, pos_h, pos_w, grid)
    if rel_h is not None and rel_h.dtype != q.dtype:  # autocast ran the einsums in its dtype
        rel_h, rel_w = rel_h.to(q.dtype), rel_w.to(q.dtype)  # the kernel takes q's dtype only
    if backend in ("auto", "triton") and q.numel() == 0:
        backend = "sdpa"  # nothing to compute: no launch, no warning
    if backend in ("auto", "triton"):
        reason = kernel_unsupported(q, k, v, rel_h, rel_w, grid)
        if reason is None:
            return torch.ops.fastsam.rel_pos_attention(
                q, k, v, rel_h, rel_w, grid[1], scale, backend == "auto"
            )
        if backend == "triton" and not torch.compiler.is_compiling():
            note_fallback(reason)
        backend = "sdpa"
    bias = None if rel_h is None else rel_pos_bias(rel_h, rel_w)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # B x heads x N x N
    if bias is not None:
        scores = scores + bias
    # softmax of a low-precision tensor accumulates in fp32 and returns the input dtype.
    return torch.matmul(scores.softmax(dim=-1), v)


def _sdpa_into_layout(q, k, v, rel_h, rel_w, scale):
    """The SDPA path with the custom op's output layout."""
    bias = None if rel_h is None else rel_pos_bias(rel_h, rel_w)
    return kernel.empty_output(q).copy_(F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                                scale=scale))


@torch.library.custom_op("fastsam::rel_pos_attention", mutates_args=())
def _rel_pos_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor | None,
    rel_w: torch.Tensor | None,
    key_grid_w: int,
    scale: float,
    sdpa_allowed: bool,
) -> torch.Tensor:
    """The fused kernel, with its launch configuration (or SDPA, if allowed) chosen by
    measurement on first use of a shape; B x heads x N x d laid out as B x N x heads x d."""
    if kernel.INTERPRETER:  # timing the interpreter would measure numpy, not the kernel
        config = kernel.INTERPRETER_CONFIG
    else:
        config = tuned_config(q, k, v, rel_h, rel_w, key_grid_w, scale, sdpa_allowed)
    if config is None:
        return _sdpa_into_layout(q, k, v, rel_h, rel_w, scale)
    return kernel.rel_pos_attention_fwd(q, k, v, rel_h, rel_w, key_grid_w, scale, config,
                                        out=kernel.empty_output(q))


@_rel_pos_attention_op.register_fake
def _(q, k, v, rel_h, rel_w, key_grid_w, scale, sdpa_allowed):
    return kernel.empty_output(q)


if kernel is not None:
    # Tile sizes; the bias mode follows from them and the grid (`kernel.bias_mode`: a 64-key
    # block on vit's 64-wide global grid is one row, window grids take the one-hot form), and
    # the last two gather the bias at the most common tiles, so that the tuner measures the
    # bias modes against each other on every grid.
    CANDIDATES = [
        kernel.LaunchConfig(64, 64, 4, 2),
        kernel.LaunchConfig(64, 64, 4, 3),
        kernel.LaunchConfig(64, 32, 4, 3),
        kernel.LaunchConfig(128, 64, 8, 2),
        kernel.LaunchConfig(128, 64, 8, 3),
        kernel.LaunchConfig(128, 32, 8, 3),
        kernel.LaunchConfig(128, 128, 8, 2),
        kernel.LaunchConfig(64, 64, 4, 2, bias="gather"),
        kernel.LaunchConfig(128, 64, 8, 2, bias="gather"),
    ]


# fp32 tiles of this many query x key elements or more do not fit sm_90's 227 KiB of shared
# memory (128 x 128: 295-320 KB, scripts/runs/compile_check-sm90-*.txt): not candidates.
FP32_MAX_TILE = 128 * 128


@functools.cache  # looked up on every call of the op on CUDA
def distinct_launches(grid: tuple[int, int], dtype: torch.dtype = torch.bfloat16
                      ) -> dict[str, kernel.LaunchConfig]:
    """CANDIDATES by name for `dtype`, less those that launch the same kernel as an earlier
    one on an h x w key grid (a forced "gather" where the tile gathers anyway). Not to be
    mutated."""
    seen, configs = set(), {}
    for c in CANDIDATES:
        if dtype == torch.float32 and c.block_m * c.block_n >= FP32_MAX_TILE:
            continue
        launch = (c.block_m, c.block_n, c.num_warps, c.num_stages, kernel.bias_mode(c, grid))
        if launch not in seen:
            seen.add(launch)
            configs[c.as_key()] = c
    return configs


def tuning_key(q: torch.Tensor, key_grid_w: int, has_bias: bool, sdpa_allowed: bool) -> str:
    """What a launch choice is valid for: shape (batch x heads bucketed to a power of two),
    dtype, bias, mode, kernel and Triton versions."""
    import triton

    b, heads, n, d = q.shape
    bucket = 2 ** math.ceil(math.log2(b * heads))
    return (f"n{n}_kw{key_grid_w}_d{d}_bh{bucket}_{str(q.dtype)[6:]}_bias{has_bias}_"
            f"{'auto' if sdpa_allowed else 'triton'}_v{KERNEL_VERSION}_triton{triton.__version__}")


def tuned_config(q, k, v, rel_h, rel_w, key_grid_w, scale, sdpa_allowed):
    """The measured-fastest LaunchConfig for this shape, or None for SDPA (it won, or no
    launch configuration matched the reference)."""
    key = tuning_key(q, key_grid_w, rel_h is not None, sdpa_allowed)
    configs = distinct_launches((q.shape[2] // key_grid_w, key_grid_w), q.dtype)
    names = [*configs, "sdpa"] if sdpa_allowed else list(configs)
    device = torch.cuda.get_device_name(q.device)
    if (device, key) in UNMATCHED:
        note_fallback(UNMATCHED[device, key])
        return None
    choice = TUNER.cached(device, key, names)
    if choice is None:
        candidates = {
            name: (lambda c=c: kernel.rel_pos_attention_fwd(q, k, v, rel_h, rel_w,
                                                            key_grid_w, scale, c))
            for name, c in configs.items()
        }
        if sdpa_allowed:  # timed as it would run: bias built, output in the op's layout
            candidates["sdpa"] = lambda: _sdpa_into_layout(q, k, v, rel_h, rel_w, scale)
        reference = _sdpa_into_layout(q, k, v, rel_h, rel_w, scale)
        try:
            choice = TUNER.tune(device, key, candidates, reference)
        except RuntimeError as err:  # no configuration matched: the correct path instead
            UNMATCHED[device, key] = str(err)  # and not measured again on every call
            note_fallback(str(err))
            return None
    return configs.get(choice)  # None for "sdpa"


def note_fallback(reason: str) -> None:
    if reason not in KERNEL_FALLBACKS:
        warnings.warn(f"fastsam_core: Triton attention unavailable ({reason}); using SDPA",
                      stacklevel=3)
    KERNEL_FALLBACKS[reason] = KERNEL_FALLBACKS.get(reason, 0) + 1


def choose_backend(requested: str, device: torch.device) -> tuple[str, str]:
    """Resolve FastConfig.attention for a model on `device`, with the reason.

    Returns:
        (backend, reason).
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention must be one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        return requested, "forced by FastConfig.attention"
    if device.type == "cuda" and kernel is not None and not kernel_disabled():
        return "auto", "auto: Triton kernel or SDPA, whichever measured faster per shape"
    why = ("Triton is not installed" if kernel is None else
           f"{DISABLE_ENV} is set" if kernel_disabled() else "no CUDA device")
    return "sdpa", f"auto: fused SDPA, bias as mask ({why}: no Triton kernel)"
