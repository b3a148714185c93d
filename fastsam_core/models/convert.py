"""Take over a reference module's weights in a compute dtype: shared when the dtype matches."""

from __future__ import annotations

import copy

import torch
from torch import nn

# nn.Module's forward hook registries (torch 2.x)
_FORWARD_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                       "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def adopt_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` itself when its floating-point tensors are already `dtype`, else a copy in `dtype`.

    The copy is made without a temporary full-precision duplicate: each floating parameter and
    buffer is converted directly into the new module. Parameters keep their `requires_grad`.
    Each copied module shares its original's forward hook registries: hooks registered on
    either, before or after, run on both (the hooks themselves are not copied), and their
    handles remove them from both.
    """
    tensors = list(module.parameters()) + list(module.buffers())
    if all(t.dtype == dtype for t in tensors if t.is_floating_point()):
        return module
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = adopt_parameter(p, dtype)
    for b in module.buffers():
        memo[id(b)] = b.detach().to(dtype) if b.is_floating_point() else b.detach().clone()
    memo.update((id(registry), registry) for registry in forward_hook_registries(module))
    return copy.deepcopy(module, memo)


def follow_order(fast: nn.Module, reference: nn.Module) -> None:
    """Register `fast`'s parameters, buffers and submodules in `reference`'s order, those of
    the same name, recursively (the others after them), so that `state_dict()` and
    `named_parameters()` list them as the reference does: anything that pairs tensors by
    position (an optimizer's state, `parameters_to_vector`) pairs the same ones."""
    containers = (nn.Sequential, nn.ModuleList)  # their order is what they compute
    registries = ("_parameters", "_buffers") if isinstance(fast, containers) else (
        "_parameters", "_buffers", "_modules")
    for registry in registries:
        own, order = getattr(fast, registry), list(getattr(reference, registry))
        rank = {name: i for i, name in enumerate(order)}
        ordered = sorted(own.items(), key=lambda item: rank.get(item[0], len(order)))
        own.clear()
        own.update(ordered)  # sorted() is stable: names not in `reference` keep their order
    for name, child in fast._modules.items():
        ref_child = reference._modules.get(name)
        if child is not None and ref_child is not None and child is not ref_child:
            follow_order(child, ref_child)


def forward_hook_registries(module: nn.Module) -> list[dict]:
    """The dicts holding the forward hooks and pre-hooks of `module` and its submodules."""
    return [getattr(m, name) for m in module.modules() for name in _FORWARD_HOOK_DICTS
            if hasattr(m, name)]


def adopt_parameter(param: nn.Parameter, dtype: torch.dtype) -> nn.Parameter:
    """`param` itself if it is already `dtype`, else a converted copy."""
    if param.dtype == dtype:
        return param
    return nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)


def tensor_identity(*tensors: torch.Tensor) -> tuple:
    """A cache key that changes when any of `tensors` is replaced, moved, cast or written in
    place (optimizer steps and `load_state_dict` bump `_version`; writes through `.data` do
    not). Inference tensors track no version: writes to them (possible only under
    `torch.inference_mode()`) are not seen; the caches keyed so also clear on load_state_dict."""
    return tuple((t.device, t.dtype, t.data_ptr(), None if t.is_inference() else t._version)
                 for t in tensors)


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16, as reports and command lines spell it."""
    return str(dtype).replace("torch.", "")


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for an empty module)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def off_device(module: nn.Module, device: torch.device) -> bool:
    """True if any parameter or buffer of `module` is not on `device`. A kept original that
    shares only some tensors with its fast module (the quantized linears' weights are the
    fast module's own) has moved in part after `.cuda()` / `.to(device)`, which move shared
    parameters in place: its first tensor alone does not say where the rest is."""
    return any(t.device != device for t in (*module.parameters(), *module.buffers()))


def module_dtype(module: nn.Module) -> torch.dtype:
    """Dtype of a module's first floating-point parameter (float32 if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` without blocking the host: through pinned memory and a
    non-blocking copy on CUDA (a pageable copy would wait for all queued GPU work)."""
    if tensor.device == device or device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
