"""FastConfig: what `optimize()` does to a model, validated once, immutable afterwards."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "math")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ORIGINALS_MODES = ("keep", "offload", "drop")
QUANTIZE_MODES = ("int8", "2:4")
QUANTIZE_LAYERS = ("all", "mlp")

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class FastConfig:
    """How `fastsam_core.optimize` rewrites a model.

    Args:
        dtype: compute dtype of the fast modules. None (default) picks it when `optimize()` runs:
            the model's own dtype if it is already bfloat16/float16, else bfloat16 when the model
            is on a CUDA device and float32 otherwise. So move the model to its device first,
            then optimize. Strings such as "bf16" or "float32" are accepted.
        attention: attention backend. "auto": on CUDA, per shape, whichever of the fused
            Triton kernel and SDPA measured faster on first use; elsewhere SDPA. "triton"
            forces the fused kernel (falling back to SDPA, with a warning, where it cannot
            run); "sdpa" forces `F.scaled_dot_product_attention` with the relative-position
            bias as its mask; "math" is the explicit softmax(q k^T + bias) v in the compute
            dtype. FASTSAM_DISABLE_TRITON=1 turns the kernel off.
        compile: None (eager) or a `torch.compile` mode for the fast modules.
        originals: what happens to the replaced reference modules when the dtype changes (when
            it does not, the fast modules share the reference parameters and nothing is copied).
            "keep": they stay where they are, so `restore()` is exact and the reference path
            is available as a fallback; costs one copy of the reference weights (vit_h:
            2.5 GB in fp32). "offload": moved to CPU memory, moved back by `restore()` (exact,
            no device memory). "drop": their parameters are freed; `restore()` rebuilds them
            from the fast weights, rounded to `dtype`.
        quantize: None, "int8" (image-encoder linears with int8 weights per output channel
            and int8 activations per token, computed at run time) or "2:4" (their weights
            magnitude-pruned to 2:4 semi-structured sparsity, no retraining). See
            fastsam_core.models.quant for what the state_dict then holds.
        quantize_layers: "all" (attention and MLP linears) or "mlp" (MLP only); "mlp" needs
            `quantize`.
    """

    dtype: torch.dtype | str | None = None
    attention: str = "auto"
    compile: str | None = None
    originals: str = "keep"
    quantize: str | None = None
    quantize_layers: str = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _parse_dtype(self.dtype))
        _check_choice("attention", self.attention, ATTENTION_BACKENDS)
        if self.compile is not None:
            _check_choice("compile", self.compile, COMPILE_MODES)
        _check_choice("originals", self.originals, ORIGINALS_MODES)
        if self.quantize is not None:
            _check_choice("quantize", self.quantize, QUANTIZE_MODES)
        _check_choice("quantize_layers", self.quantize_layers, QUANTIZE_LAYERS)
        if self.quantize is None and self.quantize_layers != "all":
            raise ValueError(f"FastConfig.quantize_layers={self.quantize_layers!r} needs "
                             f"FastConfig.quantize, one of {QUANTIZE_MODES}: without it "
                             "nothing is quantized")
        if self.quantize is not None and self.originals == "drop":
            raise ValueError("FastConfig.originals='drop' cannot be combined with "
                             "FastConfig.quantize: the float weights could not be restored")

    def replace(self, **changes) -> FastConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def resolve_dtype(self, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
        """The compute dtype for a model on `device` whose parameters are `model_dtype`."""
        if self.dtype is not None:
            return self.dtype
        if model_dtype in (torch.bfloat16, torch.float16):
            return model_dtype
        return torch.bfloat16 if device.type == "cuda" else torch.float32


def _parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() not in _DTYPE_NAMES:
            raise ValueError(
                f"FastConfig.dtype: unknown dtype name {value!r}; use one of "
                f"{sorted(_DTYPE_NAMES)} or a torch.dtype"
            )
        return _DTYPE_NAMES[value.lower()]
    if not isinstance(value, torch.dtype):
        raise TypeError(f"FastConfig.dtype must be a torch.dtype, a string or None, got {value!r}")
    if value not in _DTYPES:
        raise ValueError(f"FastConfig.dtype must be one of {_DTYPES}, got {value}")
    return value


def _check_choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"FastConfig.{field} must be a string, one of {choices}, got {value!r}")
    if value not in choices:
        raise ValueError(f"FastConfig.{field} must be one of {choices}, got {value!r}")
