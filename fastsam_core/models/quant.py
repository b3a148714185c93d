"""int8 and 2:4-sparse replacements for the image encoders' `nn.Linear` layers.

`quantize_linears(encoder, mode, layers)` swaps, inside a fast image encoder (SAM ViT or SAM 2
Hiera), the blocks' linears for:

- `Int8Linear` ("int8"): weights int8 per output channel, activations int8 per token at run
  time (see fastsam_core.ops.quant). Its state_dict holds `weight_int8` (int8) and
  `weight_scale` (fp32) instead of `weight`: it loads into a model optimized with the same
  config, not into the reference. A reference checkpoint loads into it quantized.
- `Sparse24Linear` ("2:4"): the weight magnitude-pruned to 2:4 in the compute dtype, run on
  the sparse tensor cores on CUDA. Its state_dict keeps the reference's keys (the pruned
  weight loads into the reference); a reference checkpoint loads into it pruned.

`layers` is "all" (attention qkv and projection, MLP, Hiera's stage-change projection) or
"mlp" (the MLP only).

With "int8", each block's MLP (SAM's `MLPBlock`, SAM 2's two-layer `MLP`, exact GELU) becomes
an `Int8MLP` over the two int8 linears, and the LayerNorm before it (`norm2`) a
`DeferredLayerNorm`, so that on CUDA the MLP can run as fused kernels: LayerNorm and the
quantization of its output in one pass, GELU in fc1's matmul epilogue, fc1's output
quantized in one pass (kernels/layer_norm_quant.py, int8_matmul.py, quantize_rows.py);
whether that is faster than the separate passes is measured per shape on first use.
The LayerNorm before attention (`norm1`) is deferred too, to the int8 qkv linear behind it,
in SAM's ViT blocks and in the Hiera blocks that keep their width (at a stage change norm1's
output also feeds the shortcut's projection): on CUDA the norm and the quantization of its
output can run as one kernel whose int8 codes (not the normalized activations) are
window-partitioned for qkv (`PendingLayerNorm.for_linear`), again where measured faster per
shape. State_dict keys are unchanged by this (same child names).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_utils import MLP
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import window_partition
from torch import nn

from fastsam_core.models.convert import tensor_identity
from fastsam_core.models.fallback import has_forward_hooks
from fastsam_core.ops.quant import (
    FUSED_PATHS,
    check_no_grad,
    int8_backend,
    int8_matmul,
    int8_mlp_path,
    int_mm_supported,
    layer_norm_linear_path,
    layer_norm_quantize,
    prune_2_4,
    quantize_per_row,
    quantize_rows,
)
from fastsam_core.report import StageReport


class Int8Tokens(NamedTuple):
    """Activations already quantized per token, as an `Int8Linear` takes them: codes ... x K
    int8, scales ... x 1 fp32 (code times scale is the activation), and the dtype the
    activations had (the linear's output dtype)."""

    codes: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def map(self, layout: Callable[[torch.Tensor], torch.Tensor]) -> Int8Tokens:
        """`layout` (a reshape, a window partition: anything moving whole tokens) applied to
        the codes and to the scales alike."""
        return Int8Tokens(layout(self.codes), layout(self.scales), self.dtype)


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights and dynamically quantized int8 activations."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.source_dtype = linear.weight.dtype  # what a loaded float weight is rounded to
        weight_q, scale = quantize_per_row(linear.weight.detach())
        self.register_buffer("weight_int8", weight_q)
        self.register_buffer("weight_scale", scale[:, 0])
        self.bias = linear.bias  # shared: in-place edits of it reach the original too
        self._register_load_state_dict_pre_hook(self._quantize_float_weight)

    def _quantize_float_weight(self, state_dict: dict, prefix: str, local_metadata: dict,
                               strict: bool, missing_keys: list, unexpected_keys: list,
                               error_msgs: list) -> None:
        """A float checkpoint (the reference's `weight` key) loads quantized, as `optimize()`
        quantizes: rounded to the source dtype, then to int8 per output channel. A weight of
        another shape is reported as torch reports it for the reference's `weight`."""
        weight = state_dict.pop(prefix + "weight", None)
        if weight is None or prefix + "weight_int8" in state_dict:
            return
        shape = torch.Size((self.out_features, self.in_features))
        if weight.shape != shape:
            error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape "
                              f"{weight.shape} from checkpoint, the shape in current model is "
                              f"{shape}.")
            state_dict[prefix + "weight_int8"] = self.weight_int8  # loaded as they are:
            state_dict[prefix + "weight_scale"] = self.weight_scale  # not missing keys
            return
        weight_q, scale = quantize_per_row(weight.to(self.weight_int8.device,
                                                     self.source_dtype))
        state_dict[prefix + "weight_int8"] = weight_q
        state_dict[prefix + "weight_scale"] = scale[:, 0]

    def _apply(self, fn: Callable, recurse: bool = True) -> Int8Linear:
        """`.to()`, `.cuda()`, `.half()`: the scales follow the device but stay fp32 (rounded
        to bf16 they would move every dequantized weight by up to 2**-8 of its value)."""
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def forward(self, x: torch.Tensor | Int8Tokens) -> torch.Tensor:
        """x: ... x in (float, or `Int8Tokens` already quantized) -> ... x out, x's dtype."""
        if isinstance(x, Int8Tokens):
            y = self.forward_codes(x.codes.reshape(-1, self.in_features),
                                   x.scales.reshape(-1, 1), x.dtype)  # N x out
            return y.reshape(*x.shape[:-1], self.out_features)
        if not x.is_floating_point():
            raise TypeError(f"Int8Linear: x must be floating point, got {x.dtype}")
        check_no_grad("Int8Linear", x)
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
    """`nn.Linear` with a 2:4 magnitude-pruned weight (semi-structured sparse on CUDA). A
    checkpoint loaded into it is pruned the same way (a pruned one stays as it is)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(prune_2_4(linear.weight.detach()), requires_grad=False)
        self.bias = linear.bias  # shared: in-place edits of it reach the original too
        self._sparse: tuple | None = None  # (weight's identity, semi-structured weight)
        self._prebuilt = False  # _sparse made fresh before a compiled call (build_sparse_weights)
        self.register_load_state_dict_pre_hook(self._prune_float_weight)

    @staticmethod
    def _prune_float_weight(module: Sparse24Linear, state_dict: dict, prefix: str,
                            local_metadata: dict, *args: object) -> None:
        """A checkpoint's weight loads pruned, as `optimize()` prunes (in this layer's dtype;
        with `load_state_dict(assign=True)` in the checkpoint's, as every other tensor). A
        pruned copy: the checkpoint's own tensor is not written (with assign=True it would
        become this weight, and pruning it in place pruned the model it came from)."""
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, torch.Tensor) and weight.shape == module.weight.shape:
            weight = weight.detach()
            if not local_metadata.get("assign_to_params_buffers", False):
                weight = weight.to(module.weight.device, module.weight.dtype)
            state_dict[prefix + "weight"] = prune_2_4(weight)
        module._sparse = None

    def runs_sparse(self, x: torch.Tensor) -> bool:
        """Whether a forward on `x` takes the sparse tensor cores (CUDA, fp16 / bf16)."""
        return x.is_cuda and self.weight.dtype in (torch.float16, torch.bfloat16)

    def sparse_weight(self) -> torch.Tensor | None:
        """The weight as a semi-structured sparse tensor, built again when the weight changed
        (`tensor_identity`); None for a weight the sparse kernels do not take (dense then)."""
        key = tensor_identity(self.weight)
        if self._sparse is None or self._sparse[0] != key:
            self._sparse = (key, semi_structured(self.weight))
        return self._sparse[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.runs_sparse(x):
            if torch.compiler.is_compiling() and self._prebuilt and self._sparse is not None:
                sparse = self._sparse[1]
            else:  # under a caller's own torch.compile: a graph break, the check runs eagerly
                sparse = _sparse_weight_untraced(self)
            if sparse is not None:
                weight = sparse
        y = F.linear(x, weight, self.bias)
        # row-major, as nn.Linear returns it: attention's views and SDPA's fused kernels
        # want a unit last stride
        return y if y.stride(-1) == 1 else y.contiguous()


_sparse_weight_untraced = torch.compiler.disable(Sparse24Linear.sparse_weight)


def build_sparse_weights(encoder: nn.Module, x: torch.Tensor) -> None:
    """Make the semi-structured weights of the encoder's 2:4 layers (`quantize_linears`)
    that a forward on `x` runs sparse fresh, before a compiled forward: its trace takes them
    as they are, as a fullgraph trace cannot check them (`tensor_identity` does not trace:
    the whole encoder would run eager)."""
    for layer in encoder.__dict__.get("_sparse_layers", ()):
        if layer.runs_sparse(x):
            layer.sparse_weight()
            layer._prebuilt = True


def semi_structured(weight: torch.Tensor) -> torch.Tensor | None:
    """A 2:4 CUDA weight as torch's semi-structured sparse tensor. With cuSPARSELt (the
    default backend) the product is written transposed unless the transpose is fused into
    the matmul, which makes `F.linear`'s output row-major at no cost.

    None, with a warning, where torch's sparse backend does not take the weight: each
    dimension must be a multiple of its tile (16 x 16 with cuSPARSELt, 32 x 64 with CUTLASS
    in fp16 / bf16; the 24-wide first stage of this package's tiny SAM 2, `models/tiny.py`,
    is neither), or the GPU has no sparse tensor cores. The layer then multiplies by its
    pruned weight densely."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, to_sparse_semi_structured

    try:
        sparse = to_sparse_semi_structured(weight)
    except RuntimeError as err:
        warnings.warn(f"fastsam_core: a 2:4 layer's {tuple(weight.shape)} weight runs as a "
                      f"dense product (the sparse kernels do not take it: {err})", stacklevel=2)
        return None
    if isinstance(sparse, SparseSemiStructuredTensorCUSPARSELT):
        sparse.fuse_transpose_cusparselt = True
    return sparse


class PendingLayerNorm:
    """A LayerNorm not applied yet: x (... x K) and the `DeferredLayerNorm` that returned it.
    `Int8MLP` normalizes and quantizes it in one pass, or takes `value()`; an attention block
    hands it to its int8 qkv through `for_linear`."""

    def __init__(self, x: torch.Tensor, norm: DeferredLayerNorm) -> None:
        self.x = x
        self.norm = norm

    def value(self) -> torch.Tensor:
        """The LayerNorm's output, as `nn.LayerNorm` computes it."""
        norm = self.norm
        return F.layer_norm(self.x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def for_linear(self, linear: nn.Module, window_size: int = 0,
                   carriers: tuple[nn.Module, ...] = ()) -> torch.Tensor | Int8Tokens:
        """The LayerNorm's output (x: B x H x W x K) as `linear` takes it, window-partitioned
        for window_size > 0 ((B * windows) x ws x ws x K, zero-padded as segment_anything's
        `window_partition` pads: a padded token has codes 0, the zero input the reference
        gives the linear there).

        Path "separate": `value()`, partitioned. Path "fused" (an `Int8Linear` only): the
        LayerNorm and the quantization of its output in one kernel, the `Int8Tokens`
        partitioned (int8 codes move, not activations). Which one: `norm.path`, for "auto"
        `DeferredLayerNorm.choose_path` (`carriers`: the modules that take the result to
        `linear`, e.g. the attention holding qkv)."""
        path = self.norm.choose_path(self, linear, window_size, carriers)
        if path == "fused" and not isinstance(linear, Int8Linear):
            raise ValueError(f"DeferredLayerNorm.path 'fused' needs an Int8Linear after it, "
                             f"got {type(linear).__name__}")
        return self.laid_out(path, window_size)

    def laid_out(self, path: str, window_size: int) -> torch.Tensor | Int8Tokens:
        """The LayerNorm's output by `path` ("fused": `Int8Tokens`), window-partitioned."""
        if path not in FUSED_PATHS:
            raise ValueError(f"DeferredLayerNorm.path must be 'auto' or one of {FUSED_PATHS}, "
                             f"got {path!r}")
        if path == "separate":
            out = self.value()
        else:
            norm = self.norm
            x = self.x
            codes, scales = layer_norm_quantize(x, norm.weight, norm.bias, norm.eps, "triton")
            # N x K, N x 1 -> B x H x W x K, B x H x W x 1
            out = Int8Tokens(codes.view(x.shape), scales.view(*x.shape[:-1], 1), x.dtype)
        if window_size == 0:
            return out

        def partition(t: torch.Tensor) -> torch.Tensor:
            return window_partition(t, window_size)[0]  # (B * windows) x ws x ws x K

        return out.map(partition) if isinstance(out, Int8Tokens) else partition(out)


class DeferredLayerNorm(nn.Module):
    """A block's LayerNorm in front of int8 layers that may apply it themselves: `norm2`
    before an `Int8MLP`, or SAM's `norm1` before the int8 qkv. The `nn.LayerNorm`'s
    parameters (same state_dict keys), but forward returns a `PendingLayerNorm`.

    `path` says how `PendingLayerNorm.for_linear` feeds a linear ("auto", "fused",
    "separate"; see `choose_path`); before an `Int8MLP` the MLP's own path decides.
    """

    measured_devices = ("cuda",)  # where "auto" measures; the CPU runs the separate passes

    def __init__(self, norm: nn.LayerNorm, path: str = "auto") -> None:
        super().__init__()
        self.normalized_shape = norm.normalized_shape
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        self.path = path

    def forward(self, x: torch.Tensor) -> PendingLayerNorm:
        return PendingLayerNorm(x, self)

    def choose_path(self, pending: PendingLayerNorm, linear: nn.Module, window_size: int,
                    carriers: tuple[nn.Module, ...] = ()) -> str:
        """`path`, or for "auto": on CUDA outside torch.compile the faster of the two paths
        into this int8 linear, measured per shape on first use
        (`ops.quant.layer_norm_linear_path`); "separate" elsewhere, for a float linear, and
        while forward hooks sit on the linear or its `carriers` (they would see
        `Int8Tokens`; a global module hook counts as one on every module)."""
        if self.path != "auto":
            return self.path
        x = pending.x
        if (torch.compiler.is_compiling() or not isinstance(linear, Int8Linear)
                or x.device.type not in self.measured_devices
                or has_forward_hooks(linear, *carriers)):
            return "separate"
        return layer_norm_linear_path(x, linear.out_features, window_size,
                                      lambda path: linear(pending.laid_out(path, window_size)))


class Int8MLP(nn.Module):
    """An encoder block's MLP (fc1, exact GELU, fc2) over two `Int8Linear`s.

    Replaces segment_anything's `MLPBlock` (children `lin1`, `lin2`, `act`) or sam2's
    two-layer `MLP` (`layers.0`, `layers.1`, `act`), keeping their child names. Two paths,
    the same math up to where the hidden activation is rounded:

    - "separate": (LayerNorm), fc1, GELU, fc2 as modules, each linear quantizing its input;
    - "fused": LayerNorm + quantization in one kernel (or the input quantized in one pass),
      fc1 with GELU in its epilogue (Triton int8 matmul), its output quantized in one pass,
      fc2 from those codes.

    `path` "auto" (default): on CUDA outside torch.compile the faster of the two, measured per
    shape on first use (`ops.quant.int8_mlp_path`); "separate" elsewhere, and while forward
    hooks sit on fc1, act or fc2 (they fire only when those are called as modules; a global
    module hook counts as one on every module). Hooks on the block's norm2 (output) or on the MLP
    (input) see the `PendingLayerNorm`, not a tensor.

    forward(x): x ... x K, or the `PendingLayerNorm` of `norm2` -> ... x K in x's dtype.
    """

    measured_devices = ("cuda",)  # where "auto" measures; the CPU runs the separate passes

    def __init__(self, mlp: nn.Module, path: str = "auto") -> None:
        super().__init__()
        if isinstance(mlp, MLPBlock):
            self.lin1, self.lin2 = mlp.lin1, mlp.lin2
        else:
            self.layers = nn.ModuleList(mlp.layers)
        self.act = mlp.act
        self.path = path

    @property
    def fc1(self) -> Int8Linear:
        return self.lin1 if hasattr(self, "lin1") else self.layers[0]

    @property
    def fc2(self) -> Int8Linear:
        return self.lin2 if hasattr(self, "lin2") else self.layers[1]

    def forward(self, x: torch.Tensor | PendingLayerNorm) -> torch.Tensor:
        return self.run(self.choose_path(x), x)

    def choose_path(self, x: torch.Tensor | PendingLayerNorm) -> str:
        if self.path != "auto":
            return self.path
        if torch.compiler.is_compiling():  # traced: torch ops only, no Triton launch
            return "separate"
        src = x.x if isinstance(x, PendingLayerNorm) else x
        if src.device.type not in self.measured_devices or has_forward_hooks(
                self.fc1, self.act, self.fc2):
            return "separate"
        return int8_mlp_path(src, self.fc1.out_features, isinstance(x, PendingLayerNorm),
                             lambda path: self.run(path, x))

    def run(self, path: str, x: torch.Tensor | PendingLayerNorm) -> torch.Tensor:
        if path not in FUSED_PATHS:
            raise ValueError(f"Int8MLP.path must be 'auto' or one of {FUSED_PATHS}, "
                             f"got {path!r}")
        if path == "separate":
            h = x.value() if isinstance(x, PendingLayerNorm) else x
            return self.fc2(self.act(self.fc1(h)))
        if isinstance(x, PendingLayerNorm):
            src, norm = x.x, x.norm
            codes, scales = layer_norm_quantize(src, norm.weight, norm.bias, norm.eps, "triton")
        else:
            src = x
            codes, scales = quantize_rows(src, "triton")
        fc1, fc2 = self.fc1, self.fc2
        h = int8_matmul(codes, scales, fc1.weight_int8, fc1.weight_scale, fc1.bias, src.dtype,
                        "triton", activation="gelu")  # N x hidden
        h_codes, h_scales = quantize_rows(h, "triton")
        y = fc2.forward_codes(h_codes, h_scales, src.dtype)  # N x out
        return y.view(*src.shape[:-1], fc2.out_features)


def fusable_mlp(mlp: nn.Module) -> bool:
    """True for an MLP `Int8MLP` can take: SAM's MLPBlock or sam2's two-layer MLP without a
    sigmoid, exact GELU, both linears int8, widths within the row kernels' reach."""
    from fastsam_core.kernels.quantize_rows import MAX_ROW

    if type(mlp) is MLPBlock:
        linears = [mlp.lin1, mlp.lin2]
    elif type(mlp) is MLP and mlp.num_layers == 2 and not mlp.sigmoid_output:
        linears = list(mlp.layers)
    else:
        return False
    return (type(mlp.act) is nn.GELU and mlp.act.approximate == "none"
            and all(isinstance(lin, Int8Linear) for lin in linears)
            and max(linears[0].in_features, linears[0].out_features) <= MAX_ROW)


def _block_types() -> tuple[type, type]:
    from fastsam_core.models.sam.image_encoder import FastBlock
    from fastsam_core.models.sam2.image_encoder import FastMultiScaleBlock

    return FastBlock, FastMultiScaleBlock


def defers_norm2(block: nn.Module) -> bool:
    """True for the blocks whose forward is `x + mlp(norm2(x))` with norm2 an affine
    nn.LayerNorm (weight and bias): ours, for SAM (`FastBlock`) and SAM 2
    (`FastMultiScaleBlock`)."""
    return type(block) in _block_types() and _affine_layer_norm(block.norm2)


def defers_norm1(block: nn.Module) -> bool:
    """True for our blocks whose forward hands a deferred norm1 to qkv
    (`PendingLayerNorm.for_linear`): an affine nn.LayerNorm norm1 before an int8 qkv within
    the row kernels' reach, in a block that keeps its width (a Hiera stage change also
    projects norm1's output for the shortcut)."""
    from fastsam_core.kernels.quantize_rows import MAX_ROW

    vit_block, hiera_block = _block_types()
    keeps_width = type(block) is vit_block or (type(block) is hiera_block
                                               and block.dim == block.dim_out)
    return (keeps_width and _affine_layer_norm(block.norm1)
            and isinstance(block.attn.qkv, Int8Linear)
            and block.attn.qkv.in_features <= MAX_ROW)


def _affine_layer_norm(norm: nn.Module) -> bool:
    return type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None


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
    swapped = []
    for path in target_linears(encoder, layers):
        linear = encoder.get_submodule(path)
        if mode == "2:4" and linear.in_features % 4:
            continue  # 2:4 needs groups of 4 input features: this layer stays dense
        swapped.append(MODES[mode](linear))
        _replace(encoder, path, swapped[-1])
    if mode == "2:4":  # for build_sparse_weights, without a walk of the modules per call
        encoder.__dict__["_sparse_layers"] = swapped
    fused, norms = fuse_int8_layers(encoder) if mode == "int8" else (0, 0)
    how = {"int8": "int8 weights per channel, int8 activations per token (on CUDA int_mm or "
                   "the fused Triton kernel, chosen per shape by measurement; dequantized "
                   "fp32 products elsewhere)",
           "2:4": "2:4 magnitude-pruned weights (sparse tensor cores on CUDA in bf16 / "
                  "fp16 where torch's sparse kernels take the shape, dense products with "
                  "the zeros elsewhere)"}[mode]
    if fused:
        how += (f"; {fused} MLPs can run as fused kernels (LayerNorm + quantization, GELU in "
                "fc1's epilogue), on CUDA where measured faster per shape")
    if norms:
        how += (f"; {norms} norm1 LayerNorms can feed their int8 qkv as one LayerNorm + "
                "quantization kernel, on CUDA where measured faster per shape")
    return StageReport("image_encoder.linears", mode,
                       f"{len(swapped)} layers ({layers}): {how}")


def fuse_int8_layers(encoder: nn.Module) -> tuple[int, int]:
    """Make each block's int8 MLP an `Int8MLP` (and its norm2 a `DeferredLayerNorm` where
    the block allows), and norm1 before an int8 qkv a `DeferredLayerNorm` where the block
    allows (`defers_norm1`); returns how many MLPs and how many norm1s."""
    prefix = "blocks" if hasattr(encoder, "blocks") else "trunk.blocks"
    mlps = norms = 0
    for i, block in enumerate(encoder.get_submodule(prefix)):
        if defers_norm1(block):
            _replace(encoder, f"{prefix}.{i}.norm1", DeferredLayerNorm(block.norm1))
            norms += 1
        if fusable_mlp(block.mlp):
            _replace(encoder, f"{prefix}.{i}.mlp", Int8MLP(block.mlp))
            if defers_norm2(block):
                _replace(encoder, f"{prefix}.{i}.norm2", DeferredLayerNorm(block.norm2))
            mlps += 1
    return mlps, norms
