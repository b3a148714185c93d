"""int8 and 2:4-sparse replacements for the image encoders' `nn.Linear` layers.

`quantize_linears(encoder, mode, layers)` swaps, inside a fast image encoder (SAM ViT or SAM 2
Hiera), the blocks' linears for:

- `Int8Linear` ("int8"): weights int8 per output channel, activations int8 per token at run
  time (see fastsam_core.ops.quant). Its state_dict holds `weight_int8` (int8) and
  `weight_scale` (fp32) instead of `weight`: it loads into a model optimized with the same
  config, not into the reference.
- `Sparse24Linear` ("2:4"): the weight magnitude-pruned to 2:4 in the compute dtype, run on
  the sparse tensor cores on CUDA. Its state_dict keeps the reference's keys (the pruned
  weight loads into the reference).

`layers` is "all" (attention qkv and projection, MLP, Hiera's stage-change projection) or
"mlp" (the MLP only).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastsam_core.ops.quant import (
    int8_backend,
    int8_matmul,
    int_mm_supported,
    prune_2_4,
    quantize_per_row,
)
from fastsam_core.report import StageReport


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights and dynamically quantized int8 activations."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight_q, scale = quantize_per_row(linear.weight.detach())
        self.register_buffer("weight_int8", weight_q)
        self.register_buffer("weight_scale", scale[:, 0])
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ... x in -> ... x out, x's dtype."""
        x_q, x_scale = quantize_per_row(x.reshape(-1, self.in_features))  # N x in, N x 1
        y = self.forward_codes(x_q, x_scale, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward_codes(self, x_q: torch.Tensor, x_scale: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
        """The layer on activations already quantized per token (N x in int8 codes, N x 1
        fp32 scales, e.g. from `ops.quant.layer_norm_quantize`) -> N x out in `dtype`.

        The matmul backend: on CUDA, `torch._int_mm` or the fused Triton kernel, whichever
        measured faster for this shape on this GPU (`ops.quant.int8_backend`; `_int_mm` while
        torch.compile traces, which sees no Triton launch); elsewhere "dequant"."""
        args = (x_q, x_scale, self.weight_int8, self.weight_scale, self.bias, dtype)
        if not int_mm_supported(x_q.shape[0], self.in_features, self.out_features,
                                x_q.device):
            backend = "dequant"
        elif torch.compiler.is_compiling():
            backend = "int_mm"
        else:
            backend = int8_backend(*args)
        return int8_matmul(*args, backend)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]


class Sparse24Linear(nn.Module):
    """`nn.Linear` with a 2:4 magnitude-pruned weight (semi-structured sparse on CUDA)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(prune_2_4(linear.weight.detach()), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        self._sparse: tuple | None = None  # (device, dtype, semi-structured weight), lazily

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.is_cuda and weight.dtype in (torch.float16, torch.bfloat16):
            key = (weight.device, weight.dtype, weight.data_ptr())
            if self._sparse is None or self._sparse[0] != key:
                from torch.sparse import to_sparse_semi_structured

                self._sparse = (key, to_sparse_semi_structured(weight))
            weight = self._sparse[1]
        return torch.nn.functional.linear(x, weight, self.bias)


MODES = {"int8": Int8Linear, "2:4": Sparse24Linear}


def target_linears(encoder: nn.Module, layers: str) -> list[str]:
    """Paths (from `encoder`) of the linears to replace in a fast image encoder's blocks."""
    prefix = "blocks" if hasattr(encoder, "blocks") else "trunk.blocks"
    out = []
    for i, block in enumerate(encoder.get_submodule(prefix)):
        base = f"{prefix}.{i}"
        out += [f"{base}.mlp.{name}" for name, child in block.mlp.named_modules()
                if isinstance(child, nn.Linear)]
        if layers == "all":
            out += [f"{base}.attn.qkv", f"{base}.attn.proj"]
            if isinstance(getattr(block, "proj", None), nn.Linear):  # Hiera's stage change
                out.append(f"{base}.proj")
    return out


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same children, parameters and buffers (not copied)."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new


def _replace(root: nn.Module, path: str, replacement: nn.Module) -> None:
    """Set `root.<path>` to `replacement`, copying (shallowly) every module on the way: the
    fast encoder may share those modules with the reference, which must stay untouched."""
    *parents, leaf = path.split(".")
    module = root
    for name in parents:
        child = _shallow_copy(module._modules[name])
        module._modules[name] = child
        module = child
    module._modules[leaf] = replacement


def quantize_linears(encoder: nn.Module, mode: str, layers: str) -> StageReport:
    """Replace the encoder blocks' linears (see the module docstring); the reference modules
    the encoder shares stay untouched.

    Returns:
        What was done, for `report()`.
    """
    swapped = 0
    for path in target_linears(encoder, layers):
        linear = encoder.get_submodule(path)
        if mode == "2:4" and linear.in_features % 4:
            continue  # 2:4 needs groups of 4 input features: this layer stays dense
        _replace(encoder, path, MODES[mode](linear))
        swapped += 1
    how = {"int8": "int8 weights per channel, int8 activations per token (on CUDA int_mm or "
                   "the fused Triton kernel, chosen per shape by measurement; dequantized "
                   "fp32 products elsewhere)",
           "2:4": "2:4 magnitude-pruned weights (sparse tensor cores on CUDA, dense "
                  "elsewhere)"}[mode]
    return StageReport("image_encoder.linears", mode, f"{swapped} layers ({layers}): {how}")
