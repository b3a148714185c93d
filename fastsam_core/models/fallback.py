"""Running the kept reference module where a fast module does not apply (training, autograd,
shapes it does not handle), saying so once per reason."""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from fastsam_core.config import FastConfig
from fastsam_core.models.convert import module_device, module_dtype


class ReferenceFallback(nn.Module):
    """Base of the fast modules: holds the reference module outside the module tree (not in
    `state_dict()`, not moved by `.to()`) and counts the calls that ran it, per reason."""

    stage = "module"  # name used in messages and reports

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_reference"] = None
        self.fallbacks: dict[str, int] = {}

    def set_reference(self, ref: nn.Module | None) -> None:
        """The reference module to fall back to (None: no fallback)."""
        self.__dict__["_reference"] = ref

    def inference_only_reason(self, *inputs: torch.Tensor) -> str | None:
        """Why the fast path must not run now (training mode, autograd recording), or None.

        The fast weights may be a converted copy: gradients through them would not reach the
        model's parameters, so those calls go to the reference.
        """
        if self.training:
            return "the model is in training mode"
        if torch.is_grad_enabled() and (
            any(t.requires_grad for t in inputs if isinstance(t, torch.Tensor))
            or any(p.requires_grad for p in self.parameters())
        ):
            return "autograd is recording (use torch.inference_mode() or no_grad())"
        return None

    def run_reference(self, why: str, *args: object) -> object:
        """Call the kept reference module with `args`; RuntimeError if it was not kept."""
        ref = self.__dict__["_reference"]
        if ref is None:
            raise RuntimeError(
                f"fastsam_core: {why}, which the fast {self.stage} does not support, and the "
                f"reference {self.stage} was not kept (FastConfig.originals); call "
                "fastsam_core.restore(model) first"
            )
        if why not in self.fallbacks:
            warnings.warn(f"fastsam_core: {why}: running the reference {self.stage}",
                          stacklevel=3)
        self.fallbacks[why] = self.fallbacks.get(why, 0) + 1
        if ref.training != self.training:
            ref.train(self.training)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is not None and module_device(ref) != device:
            ref.to(device)  # the model was moved after optimize(): move the original too
        return ref(*args)

    def fallback_summary(self) -> str:
        if not self.fallbacks:
            return ""
        return "; reference fallbacks: " + ", ".join(
            f"{why}: {n}x" for why, n in self.fallbacks.items())


def has_forward_hooks(*modules: nn.Module) -> bool:
    """Whether a forward hook or pre-hook sits on any of `modules` or their submodules (global
    module hooks aside). Where a fast forward would use a module's weights directly, or a
    cached output of it, it calls the module instead while this is true, so the hooks run."""
    return any(m._forward_hooks or m._forward_pre_hooks
               for module in modules for m in module.modules())


def without_autocast(method):
    """Run a fast module's method in its own dtypes whatever the caller's autocast state (the
    configured dtype is the fast path's contract; autocast would silently change it)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        device_type = module_device(self).type
        if not torch.is_autocast_enabled(device_type):
            return method(self, *args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return method(self, *args, **kwargs)

    return wrapper


def fast_view(module: nn.Module, fast_class: type) -> nn.Module:
    """`module` if it is already a `fast_class`, else a fast view of it sharing its weights
    (in its own dtype, default config) that falls back to it where the fast path does not
    apply: the batched pipelines use the fast modules on unoptimized models too."""
    if isinstance(module, fast_class):
        return module
    view = fast_class.from_reference(module, FastConfig(), module_dtype(module)).eval()
    view.set_reference(module)
    return view
