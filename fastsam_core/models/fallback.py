"""Running the kept reference module where a fast module does not apply (training, autograd,
shapes it does not handle), saying so once per reason."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from fastsam_core.config import FastConfig
from fastsam_core.models.convert import module_device, module_dtype, off_device


class ReferenceFallback(nn.Module):
    """Base of the fast modules: holds the reference module outside the module tree (not in
    `state_dict()`, not moved by `.to()`: it follows on its next call, `align_reference`) and
    counts the calls that ran it, per reason."""

    stage = "module"  # name used in messages and reports

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_reference"] = None
        # this module's dtype when its reference was last aligned to it (align_reference)
        self.__dict__["_reference_dtype"] = None
        # the dtype of the last cast applied to this module since then (`_apply`), or None
        self.__dict__["_pending_cast"] = None
        self.fallbacks: dict[str, int] = {}

    def set_reference(self, ref: nn.Module | None) -> None:
        """The reference module to fall back to (None: no fallback)."""
        self.__dict__["_reference"] = ref
        self.__dict__["_reference_dtype"] = None if ref is None else module_dtype(self)
        self.__dict__["_pending_cast"] = None

    def _apply(self, fn: Callable, recurse: bool = True) -> ReferenceFallback:
        """`.to()`, `.half()`, ...: a cast is noted for the kept reference, also one to the
        dtype this module already has (bf16-optimized, then `.to(torch.bfloat16)`), which
        its tensors do not show. Where this call materializes a module built on the meta
        device (`to_empty()`, before `load_state_dict`), the reference is materialized with
        it: the tensors the two shared stay shared (`to_empty` gives a meta parameter a new
        object), the reference's own ones are allocated for the checkpoint to reach."""
        ref = self.__dict__["_reference"]
        materializing = ref is not None and on_meta(self) and on_meta(ref)
        shared = shared_slots(ref, self) if materializing else []
        super()._apply(fn, recurse)
        cast = cast_dtype_of(fn)
        if cast is not None:
            self.__dict__["_pending_cast"] = cast
        if materializing and not on_meta(self):
            for ref_owner, ref_name, owner, name in shared:
                registry = "_parameters" if ref_name in ref_owner._parameters else "_buffers"
                getattr(ref_owner, registry)[ref_name] = getattr(owner, name)
            device = module_device(self)
            with torch.inference_mode(False), torch.no_grad():  # what is still on meta
                ref._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
        return self

    def align_reference(self, device: torch.device | None = None) -> None:
        """Move the kept reference to `device` if any of its tensors is elsewhere, and cast it
        as this module was cast since the two were last aligned (`.half()` after optimize():
        to the dtype of the last cast, else to this module's dtype if that changed). Moves
        and casts reach the reference only through the tensors they share (none for a
        compute-dtype copy; all but the quantized linears' weights for an fp32 int8 one), so
        it may have moved or been cast in part. Outside inference mode: the reference's
        tensors must stay trainable and editable."""
        ref = self.__dict__["_reference"]
        if ref is None:
            return
        dtype = module_dtype(self)
        cast = self.__dict__.get("_pending_cast")
        if cast is None and dtype != self.__dict__.get("_reference_dtype", dtype):
            cast = dtype
        with torch.inference_mode(False), torch.no_grad():
            if device is not None and off_device(ref, device):
                ref.to(device)  # the model was moved after optimize()
            if cast is not None:
                ref.to(cast)
        self.__dict__["_reference_dtype"] = dtype
        self.__dict__["_pending_cast"] = None

    def inference_only_reason(self, *inputs: torch.Tensor) -> str | None:
        """Why the fast path must not run now (training mode, autograd recording), or None.

        The fast weights may be a converted copy: gradients through them would not reach the
        model's parameters, so those calls go to the reference (whose own weights then get the
        gradients, as its warning says).
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
            warnings.warn(f"fastsam_core: {why}: running the reference {self.stage}"
                          f"{self._separate_weights_note(ref)}", stacklevel=3)
        self.fallbacks[why] = self.fallbacks.get(why, 0) + 1
        if ref.training != self.training:
            ref.train(self.training)
        self.align_reference(next((a.device for a in args if isinstance(a, torch.Tensor)),
                                  None))
        return ref(*args)

    def _separate_weights_note(self, ref: nn.Module) -> str:
        """What a user training or editing the model must know when the reference holds its
        own weights (the fast ones are a converted copy), else ""."""
        own = {id(p) for p in self.parameters()}
        if all(id(p) in own for p in ref.parameters()):
            return ""
        return (f", which keeps its own {module_dtype(ref)} weights: gradients reach those, "
                "not model.parameters() (an optimizer on those changes nothing), and in-place "
                "edits of the model's weights do not reach it; restore(model) before training "
                "or editing weights")

    def fallback_summary(self) -> str:
        if not self.fallbacks:
            return ""
        return "; reference fallbacks: " + ", ".join(
            f"{why}: {n}x" for why, n in self.fallbacks.items())


def shared_slots(ref: nn.Module, fast: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(module of `ref`, name, module of `fast`, name) of each parameter or buffer held by
    both, where they are held by different modules."""
    def slots(root: nn.Module):
        for module in root.modules():
            for registry in (module._parameters, module._buffers):
                for name, t in registry.items():
                    if t is not None:
                        yield module, name, t

    in_fast = {id(t): (module, name) for module, name, t in slots(fast)}
    return [(module, name, *in_fast[id(t)]) for module, name, t in slots(ref)
            if id(t) in in_fast and in_fast[id(t)][0] is not module]


def on_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of `module` is on the meta device (no data)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def cast_dtype_of(fn: Callable) -> torch.dtype | None:
    """The dtype a `Module._apply` function casts every floating tensor to (`.half()`,
    `.to(dtype)`), or None where it keeps their dtypes (`.cuda()`, `.to(device)`): found by
    applying it to two empty tensors of different dtypes."""
    try:
        dtypes = {fn(torch.empty(0, dtype=d)).dtype for d in (torch.float32, torch.float16)}
    except Exception:  # not a tensor-to-tensor function: no cast known
        return None
    return dtypes.pop() if len(dtypes) == 1 else None


def fallbacks_of(model: nn.Module) -> dict[str, dict[str, int]]:
    """The reference fallbacks (reason: calls) of each fast module of `model` that ran one,
    by module path: a fallback keeps the results, not the fast path."""
    return {name: m.fallbacks for name, m in model.named_modules()
            if isinstance(m, ReferenceFallback) and m.fallbacks}


def has_forward_hooks(*modules: nn.Module) -> bool:
    """Whether a forward hook or pre-hook sits on any of `modules` or their submodules; a
    global module hook (`torch.nn.modules.module.register_module_forward_hook` or
    `_pre_hook`, as torch.utils.flop_counter's module tracking registers) sits on every
    module. Where a fast forward would use a module's weights directly, or a cached output
    of it, it calls the module instead while this is true, so the hooks run."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks
               for module in modules for m in module.modules())


def hooks_left_behind(name: str, original: nn.Module, fast: nn.Module) -> list[str]:
    """Paths (from the model) of the modules in `original` with forward hooks or pre-hooks
    that will not run once `fast` replaces `original`: those that `fast` does not hold at the
    same path with the same hook registries (a module replaced by a fast one, or not kept,
    such as a dropout). A module `fast` shares, or a compute-dtype copy of it (which shares
    its registries), runs its hooks: the fast forwards call it, or call it instead of a fused
    form while it has hooks (`has_forward_hooks`). Global module hooks run on the fast
    modules too."""
    left = []
    for path, m in original.named_modules():
        if not (m._forward_hooks or m._forward_pre_hooks):
            continue
        try:
            held = fast.get_submodule(path)
        except AttributeError:
            held = None
        if held is None or held._forward_hooks is not m._forward_hooks \
                or held._forward_pre_hooks is not m._forward_pre_hooks:
            left.append(f"{name}.{path}" if path else name)
    return left


def shown_paths(paths: list[str], most: int = 8) -> str:
    """The first `most` of `paths`, comma-separated, and how many more."""
    more = f" and {len(paths) - most} more" if len(paths) > most else ""
    return ", ".join(paths[:most]) + more


def hooks_note(owner: nn.Module, *names: str, eager: bool = False) -> str:
    """For `describe()`: which of `owner`'s submodules (dotted `names`) a fast forward calls
    as modules now because forward hooks sit on them ("; forward hooks on ...: ..."), or ""
    if none. `eager`: those hooks also make the compiled part run eagerly."""
    hooked = [n for n in names if has_forward_hooks(owner.get_submodule(n))]
    if not hooked:
        return ""
    how = "called as modules" + (", run eagerly" if eager else "")
    return f"; forward hooks on {', '.join(hooked)}: {how}"


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


def fast_view(module: nn.Module, fast_class: type, name: str) -> nn.Module:
    """`module` if it is already a `fast_class`, else a fast view of it sharing its weights
    (in its own dtype, default config) that falls back to it where the fast path does not
    apply: the batched pipelines use the fast modules on unoptimized models too. Forward hooks
    on `module` (the model's `name`) that the view does not run are named in a warning."""
    if isinstance(module, fast_class):
        return module
    view = fast_class.from_reference(module, FastConfig(), module_dtype(module))
    shared = {id(m) for m in module.modules()}
    for m in view.modules():  # eval mode, but not for the modules it shares with the model:
        if id(m) not in shared:  # the user's train/eval modes stay as they were
            m.training = False
    view.training = module.training  # in training mode the view runs as the module would
    view.set_reference(module)
    left = hooks_left_behind(name, module, view)
    if left:
        warnings.warn(f"fastsam_core: forward hooks on {shown_paths(left)} do not run: the "
                      f"model is not optimized, and the fast view of its {name} that the "
                      "batched pipelines run does not call those modules (optimize() the "
                      "model to keep hooks on the modules it shares running)", stacklevel=3)
    return view
