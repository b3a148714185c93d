"""optimize / restore / patched: swap reference modules for fast ones, in place and reversibly.

Every replacement is recorded on the model (outside its module tree: not in `state_dict()`,
not moved by `.to()`), so `restore()` puts back the very same module objects.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2.sam2_video_predictor import SAM2VideoPredictor, SAM2VideoPredictorVOS
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from torch import nn

from fastsam_core.config import FastConfig
from fastsam_core.models.convert import (
    dtype_name,
    follow_order,
    module_device,
    module_dtype,
    off_device,
)
from fastsam_core.models.fallback import hooks_left_behind, shown_paths
from fastsam_core.models.quant import quantize_linears
from fastsam_core.models.sam.image_encoder import FastImageEncoderViT
from fastsam_core.models.sam.mask_decoder import FastMaskDecoder
from fastsam_core.models.sam.prompt_encoder import FastPromptEncoder
from fastsam_core.models.sam2.image_encoder import FastSam2ImageEncoder
from fastsam_core.models.sam2.mask_decoder import FastSam2MaskDecoder
from fastsam_core.models.sam2.memory_attention import FastMemoryAttention
from fastsam_core.models.sam2.memory_encoder import FastMemoryEncoder
from fastsam_core.pipelines.amg import (
    DEFAULT_MAX_CHUNK_BYTES,
    FastAutomaticMaskGenerator,
    FastSam2AutomaticMaskGenerator,
)
from fastsam_core.pipelines.video import FastSam2VideoPredictor
from fastsam_core.report import Report, StageReport, UnsupportedModule

_STATE = "_fastsam_state"
# The module, not the function `segment_anything.build_sam` that shadows it on the package.
builders = importlib.import_module("segment_anything.build_sam")
sam2_builders = importlib.import_module("sam2.build_sam")
_SUPPORTED = ("segment_anything's Sam, SamPredictor, SamAutomaticMaskGenerator and sam2's "
              "SAM2Base (SAM2VideoPredictor included), SAM2ImagePredictor, "
              "SAM2AutomaticMaskGenerator")
_SWAPPED = "_fastsam_swapped_class"  # on a generator / video predictor whose class was swapped
_FAST_GENERATORS = {
    SamAutomaticMaskGenerator: FastAutomaticMaskGenerator,
    SAM2AutomaticMaskGenerator: FastSam2AutomaticMaskGenerator,
}
Optimizable = (Sam | SamPredictor | SamAutomaticMaskGenerator | SAM2Base | SAM2ImagePredictor
               | SAM2AutomaticMaskGenerator)
_STAGES = {  # attribute of the model -> its fast replacement (None: the reference, for now)
    Sam: {
        "image_encoder": FastImageEncoderViT,
        "prompt_encoder": FastPromptEncoder,
        "mask_decoder": FastMaskDecoder,
    },
    SAM2Base: {
        "image_encoder": FastSam2ImageEncoder,
        "sam_prompt_encoder": FastPromptEncoder,
        "sam_mask_decoder": FastSam2MaskDecoder,
        "memory_attention": FastMemoryAttention,
        "memory_encoder": FastMemoryEncoder,
    },
}


def _stages(model: nn.Module) -> dict:
    return _STAGES[Sam if isinstance(model, Sam) else SAM2Base]


@dataclass
class _Replacement:
    owner: nn.Module  # the module whose attribute was replaced
    name: str  # the attribute
    original: nn.Module
    fast: nn.Module
    shared: bool  # the fast module shares the original's parameters (same dtype)
    load_hook: object = None  # keeps the original in step with load_state_dict
    fast_dtype: torch.dtype = torch.float32  # module_dtype(fast) when made: a later cast shows


@dataclass
class _State:
    config: FastConfig
    dtype: torch.dtype
    own_dtype: torch.dtype | None = None  # `_own_dtype(sam)` when made: a later cast shows
    replacements: list[_Replacement] = field(default_factory=list)
    kept: list[StageReport] = field(default_factory=list)  # stages left to the reference


def optimize(model: Optimizable, config: FastConfig | None = None) -> Optimizable:
    """Replace the reference modules of `model` with fast ones, in place.

    Args:
        model: a segment_anything `Sam`, `SamPredictor` or `SamAutomaticMaskGenerator`, or a
            sam2 `SAM2Base`, `SAM2ImagePredictor` or `SAM2AutomaticMaskGenerator`: the model
            inside is optimized, and a mask generator becomes the fast one of its family
            (same settings and results); a `SAM2VideoPredictor` becomes a
            `FastSam2VideoPredictor` (objects propagated as one batch). Move the model to its
            device first: the default dtype depends on where it is (FastConfig.dtype).
        config: FastConfig; None for the defaults.

    Returns:
        `model` itself. Optimizing again with the same config does nothing.

    Raises:
        TypeError: `model` or `config` has an unsupported type (`SAM2VideoPredictorVOS`
            included: sam2 compiled it already).
        ValueError: `model` is in training mode, or already optimized with another config.
    """
    config = FastConfig() if config is None else config
    if not isinstance(config, FastConfig):
        raise TypeError(f"config must be a fastsam_core.FastConfig, got {type(config).__name__}")
    sam = _sam_of(model)
    if isinstance(sam, SAM2VideoPredictorVOS):
        raise TypeError(
            "model is a SAM2VideoPredictorVOS (build_sam2_video_predictor(vos_optimized=True)), "
            "whose modules sam2 has already compiled; build it with vos_optimized=False and "
            "optimize that")
    if type(model) in _FAST_GENERATORS:
        optimize(sam, config)
        model.__dict__[_SWAPPED] = type(model)
        model.__class__ = _FAST_GENERATORS[type(model)]
        model.max_chunk_bytes = DEFAULT_MAX_CHUNK_BYTES
        return model
    state: _State | None = sam.__dict__.get(_STATE)
    if state is not None:
        if state.config == config:
            return model
        raise ValueError(
            f"model is already optimized with {state.config}; call fastsam_core.restore(model) "
            f"before optimizing it with {config}"
        )
    if sam.training:
        raise ValueError(
            "model is in training mode; fastsam_core is inference-only: call model.eval() "
            "before optimize()"
        )
    # the tensors made here (compute-dtype copies, int8 codes) must not be inference tensors,
    # which later in-place writes (load_state_dict, optimizer steps) could not touch
    with torch.inference_mode(False), torch.no_grad():
        _replace_stages(sam, config)
    if type(sam) is SAM2VideoPredictor:  # batched multi-object propagation
        sam.__dict__[_SWAPPED] = type(sam)
        sam.__class__ = FastSam2VideoPredictor
    return model


def _replace_stages(sam: Sam | SAM2Base, config: FastConfig) -> None:
    encoder = sam.image_encoder
    dtype = config.resolve_dtype(module_device(encoder), module_dtype(encoder))
    state = _State(config=config, dtype=dtype, own_dtype=_own_dtype(sam))
    unhooked: list[str] = []
    for name, fast_class in _stages(sam).items():
        if fast_class is None:
            state.kept.append(StageReport(name, "reference", "no fast version yet"))
            continue
        try:
            fast = fast_class.from_reference(getattr(sam, name), config, dtype)
        except UnsupportedModule as err:
            warnings.warn(f"fastsam_core: {name} kept as the reference: {err}", stacklevel=3)
            state.kept.append(StageReport(name, "reference", str(err)))
        else:
            if name == "image_encoder" and config.quantize is not None:
                state.kept.append(quantize_linears(fast, config.quantize,
                                                   config.quantize_layers))
            unhooked += hooks_left_behind(name, getattr(sam, name), fast)
            _replace(state, sam, name, fast)
    if unhooked:
        warnings.warn(f"fastsam_core: forward hooks on {shown_paths(unhooked)} do not run on "
                      "the fast path: optimize() replaced or dropped those modules (register the "
                      "hooks on the optimized model's modules if you need them; restore() "
                      "brings the originals back with their hooks)", stacklevel=3)
    sam.__dict__[_STATE] = state


def restore(model: Optimizable) -> Optimizable:
    """Put back every original module of an optimized model (the same objects); a mask
    generator or video predictor gets its own class back (a video inference state made while
    optimized in bf16 / fp16 keeps its rounded frames: make a new one).

    With FastConfig.originals "keep" or "offload", or when the dtype did not change, the
    parameters are the original ones, so outputs are bit-identical to before `optimize()`. An
    original is moved to the device its fast replacement is on now, and cast to its dtype if the
    model was cast after `optimize()` (`.half()`, ...). With "drop", the originals' parameters
    are rebuilt from the fast weights (rounded to the fast dtype), with a warning.

    A mask generator whose model was restored on its own (`restore(generator.predictor.model)`)
    still has the fast class; `restore(generator)` then gives it its own class back.

    Raises:
        ValueError: `model` is not optimized.
    """
    sam = _sam_of(model)
    state: _State | None = sam.__dict__.get(_STATE)
    swapped_generator = _SWAPPED in getattr(model, "__dict__", {}) and model is not sam
    if state is None and not swapped_generator:
        raise ValueError("model is not optimized (fastsam_core.optimize was not applied to it)")
    if swapped_generator:
        model.__class__ = model.__dict__.pop(_SWAPPED)
        del model.max_chunk_bytes
    if state is None:
        return model
    if _SWAPPED in sam.__dict__:
        sam.__class__ = sam.__dict__.pop(_SWAPPED)
    own_dtype = _own_dtype(sam)
    model_cast = own_dtype if own_dtype != state.own_dtype else None
    for r in reversed(state.replacements):
        _put_back(r, state, model_cast)
    del sam.__dict__[_STATE]
    return model


def _put_back(r: _Replacement, state: _State, model_cast: torch.dtype | None) -> None:
    """restore() of one replacement: the original, on the fast module's device and in the
    dtype the model was cast to since, back in its owner."""
    device = module_device(r.fast)
    stage_dtype = module_dtype(r.fast)
    # new tensors outside inference mode: the originals stay trainable and editable
    with torch.inference_mode(False), torch.no_grad():
        if not r.shared and state.config.originals == "drop":
            r.original.to_empty(device=device)
            r.original.load_state_dict(r.fast.state_dict())
            warnings.warn(
                f"fastsam_core: {r.name} restored from its {state.dtype} weights "
                "(FastConfig.originals='drop'): outputs are not bit-identical to before",
                stacklevel=3,
            )
        elif off_device(r.original, device):  # also one moved in part: shared tensors
            r.original.to(device)
        if model_cast is not None:  # the model was cast (.half(), .to(dtype)), also to the
            r.original.to(model_cast)  # dtype its fast modules already had
        elif stage_dtype != r.fast_dtype:  # this stage was cast
            r.original.to(stage_dtype)
        else:  # no cast its tensors show; the original follows one they do not (a cast
            r.fast.align_reference()  # back after a fallback, one to the fast dtype)
    if r.load_hook is not None:
        r.load_hook.remove()
    # outside the module tree, the originals missed train()/eval() and requires_grad_()
    r.original.train(r.fast.training)
    _copy_requires_grad(r.fast, r.original)
    r.fast.set_reference(None)
    setattr(r.owner, r.name, r.original)


def is_optimized(model: Optimizable) -> bool:
    """True if `optimize()` was applied to `model` and not undone by `restore()`."""
    return _STATE in _sam_of(model).__dict__


def report(model: Optimizable) -> Report:
    """Which path each stage of `model` takes and why. `print(report(model))` shows a table."""
    sam = _sam_of(model)
    state: _State | None = sam.__dict__.get(_STATE)
    if state is None:
        stages = [StageReport(s, "reference", "not optimized") for s in _stages(sam)]
        return Report(model=f"{type(sam).__name__} (not optimized)", stages=stages)
    stages = list(state.kept)
    for r in state.replacements:  # named after the attribute they replace
        stages.extend(StageReport(r.name + s.stage[s.stage.find("."):] if "." in s.stage
                                  else r.name, s.path, s.detail) for s in r.fast.describe())
    order = list(_stages(sam))
    stages.sort(key=lambda s: order.index(s.stage.split(".")[0]))
    dtype = dtype_name(state.dtype)
    cast = {r.name: module_dtype(r.fast) for r in state.replacements
            if module_dtype(r.fast) != r.fast_dtype}
    own_dtype = _own_dtype(sam)
    if own_dtype != state.own_dtype:  # the model was cast after optimize() (.half(), .to())
        now = sorted(map(dtype_name, {own_dtype, *cast.values()}))
        dtype = f"{', '.join(now)} (optimized as {dtype}, cast since)"
    elif cast:  # some stages only (sam.mask_decoder.half())
        dtype += " (cast since: " + ", ".join(
            f"{name} {dtype_name(d)}" for name, d in cast.items()) + ")"
    return Report(model=f"{type(sam).__name__}, {dtype}, {state.config}", stages=stages)


@contextlib.contextmanager
def patched(config: FastConfig | None = None) -> Iterator[None]:
    """Within the block, every model built by the reference builders comes out optimized.

    segment_anything: `sam_model_registry[...]`, `build_sam`, `build_sam_vit_h/l/b`, through
    the builder they all call (`segment_anything.build_sam._build_sam`). sam2: `build_sam2`,
    `build_sam2_hf` and `build_sam2_video_predictor` (a `FastSam2VideoPredictor` comes out;
    with vos_optimized=True sam2's compiled predictor is left as built, with a warning),
    through the checkpoint loader they share (`sam2.build_sam._load_checkpoint`): the model
    is optimized when the builder puts it in eval mode, after moving it to its device (a model
    built with mode="train" is optimized, with the config of the block that built it, if put
    in eval mode, `eval()` or `train(False)`, while that block is open; copies of it are not).
    segment_anything's
    builders return the model on the CPU, so its default dtype resolves to fp32 there: for a
    GPU pipeline pass `FastConfig(dtype=torch.bfloat16)`. Names imported before the block are
    covered too. Undone on exit, also when the body raises; models built inside stay
    optimized. Nested blocks: the newest open block's config wins; blocks may close in any
    order (an ExitStack), the last to close undoes the patch. Not thread-safe: the patch is
    process-wide while a block is open, and a model built in one thread takes the config of
    the block opened last in any thread.
    """
    config = FastConfig() if config is None else config
    if not isinstance(config, FastConfig):
        raise TypeError(f"config must be a fastsam_core.FastConfig, got {type(config).__name__}")
    sam_current = builders._build_sam
    sam_base = getattr(sam_current, "_fastsam_base", sam_current)
    sam2_current = sam2_builders._load_checkpoint
    sam2_base = getattr(sam2_current, "_fastsam_base", sam2_current)
    built_in_train_mode: weakref.WeakSet = weakref.WeakSet()  # by this block, awaiting eval

    @functools.wraps(sam_base)
    def build_optimized(*args, **kwargs):
        return optimize(sam_base(*args, **kwargs), config)

    @functools.wraps(sam2_base)
    def load_then_optimize_on_eval(model, ckpt_path):
        sam2_base(model, ckpt_path)
        if isinstance(model, SAM2VideoPredictorVOS):
            warnings.warn("fastsam_core.patched: a SAM2VideoPredictorVOS (vos_optimized=True) "
                          "is compiled by sam2 and left as built", stacklevel=3)
            return
        _AWAITING_EVAL[model] = config  # the builder's last step, model.eval(), optimizes it
        built_in_train_mode.add(model)

    build_optimized._fastsam_base = sam_base
    load_then_optimize_on_eval._fastsam_base = sam2_base
    if not _OPEN_BLOCKS:
        if "train" in vars(SAM2Base):
            raise RuntimeError("fastsam_core.patched: SAM2Base.train is already overridden "
                               "(another patch, or a sam2 that defines it): cannot hook it")
        SAM2Base.train = _train_then_optimize
    block = _Block(builders=(build_optimized, load_then_optimize_on_eval),
                   before=(sam_current, sam2_current))
    _OPEN_BLOCKS.append(block)
    builders._build_sam, sam2_builders._load_checkpoint = block.builders
    try:
        yield
    finally:
        for model in list(built_in_train_mode):  # never put in eval mode inside the block
            _AWAITING_EVAL.pop(model, None)
        _close(block)


@dataclass
class _Block:
    """An open `patched()` block: the builders it installed, and what they replaced."""

    builders: tuple[Callable, Callable]  # segment_anything's _build_sam, sam2's _load_checkpoint
    before: tuple[Callable, Callable]


def _close(block: _Block) -> None:
    """Take `block` off the open blocks, also while a block opened after it is still open
    (exits out of order: threads, ExitStack): the builders stay the newest open block's, and
    the last block to close puts back what the first one replaced."""
    index = next(i for i, b in enumerate(_OPEN_BLOCKS) if b is block)
    del _OPEN_BLOCKS[index]
    if index < len(_OPEN_BLOCKS):  # a newer block is open: it will put back what this replaced
        _OPEN_BLOCKS[index].before = block.before
        return
    builders._build_sam, sam2_builders._load_checkpoint = block.before
    if not _OPEN_BLOCKS:
        del SAM2Base.train  # inherited again


# patched(): the open blocks, oldest first, and the sam2 models built in train mode in an open
# block that their next eval mode optimizes with that block's config. Through a class
# attribute while a block is open, not an instance one: a model built in the block pickles,
# and its copies are plain models.
_OPEN_BLOCKS: list[_Block] = []
_AWAITING_EVAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _own_dtype(sam: nn.Module) -> torch.dtype | None:
    """The dtype of the model's own first floating-point tensor (Sam's pixel_mean, SAM2Base's
    no_mem_embed, ...: in no stage), which a cast of the whole model changes."""
    own = list(sam.parameters(recurse=False)) + list(sam.buffers(recurse=False))
    return next((t.dtype for t in own if t.is_floating_point()), None)


def _copy_requires_grad(fast: nn.Module, original: nn.Module) -> None:
    """Each fast parameter's requires_grad onto the original's of the same name (a no-op for
    the parameters they share); an original parameter that the fast module holds in another
    form (a quantized linear's weight) follows the other parameters of its layer (the
    bias)."""
    fast_params = dict(fast.named_parameters())
    for name, p in original.named_parameters():
        if name in fast_params:
            flag = fast_params[name].requires_grad
        else:
            try:
                layer = fast.get_submodule(name.rpartition(".")[0])
            except AttributeError:
                continue
            flags = [q.requires_grad for q in layer.parameters(recurse=False)]
            if not flags:
                continue
            flag = any(flags)
        if p.requires_grad != flag:  # only changes: an inference tensor takes no setting
            p.requires_grad_(flag)


def _train_then_optimize(self: SAM2Base, mode: bool = True) -> SAM2Base:
    nn.Module.train(self, mode)
    config = None if mode else _AWAITING_EVAL.pop(self, None)
    if config is not None:
        optimize(self, config)
    return self


def _sam_of(model: object) -> Sam | SAM2Base:
    """The model inside a predictor or mask generator (either package)."""
    if isinstance(model, (SamAutomaticMaskGenerator, SAM2AutomaticMaskGenerator)):
        model = model.predictor
    if isinstance(model, (SamPredictor, SAM2ImagePredictor)):
        model = model.model
    if isinstance(model, (Sam, SAM2Base)):
        return model
    raise TypeError(f"fastsam_core supports {_SUPPORTED}; got {type(model).__module__}."
                    f"{type(model).__qualname__}")


def _replace(state: _State, owner: nn.Module, name: str, fast: nn.Module) -> None:
    """Swap `owner.<name>` for `fast`, handling the original per FastConfig.originals.

    A fast module that shares any tensor with its original (same dtype) keeps the original
    in place whatever the mode: moving or freeing it would move or free the shared tensors.
    """
    original = getattr(owner, name)
    shared = _shares_tensors(fast, original)
    mode = state.config.originals
    load_hook = None
    if shared or mode == "keep":
        fast.set_reference(original)
    elif mode == "offload":
        original.to("cpu")
    else:  # "drop": free the parameters; restore() rebuilds them from the fast weights
        original.to("meta")
    if shared or mode != "drop":
        load_hook = fast.register_load_state_dict_pre_hook(
            functools.partial(_load_into_original, original)
        )
    fast.train(original.training)
    follow_order(fast, original)
    setattr(owner, name, fast)
    state.replacements.append(_Replacement(owner, name, original, fast, shared, load_hook,
                                           module_dtype(fast)))


def _shares_tensors(a: nn.Module, b: nn.Module) -> bool:
    ids = {id(t) for t in (*a.parameters(), *a.buffers())}
    return any(id(t) in ids for t in (*b.parameters(), *b.buffers()))


def _misfit(loaded: object, current: object) -> bool:
    """Whether torch's load refuses `loaded` for the tensor `current` for its shape (it takes
    a 1-D tensor for a 0-D one)."""
    return (isinstance(loaded, torch.Tensor) and isinstance(current, torch.Tensor)
            and loaded.shape != current.shape and not (current.dim() == 0 and loaded.dim() == 1))


def _load_into_original(original: nn.Module, fast: nn.Module, state_dict: dict, prefix: str,
                        local_metadata: dict, *args: object) -> None:
    """Weights loaded into an optimized model reach the kept original, at full precision; an
    int8 checkpoint's linears (weight_int8, weight_scale: an optimized model's) reach it
    dequantized, with a warning."""
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    dequantized = []
    for key in [k for k in own if k.endswith(".weight_int8")]:
        name = key[:-len("_int8")]  # <linear>.weight
        scale = own.get(name + "_scale")
        if name not in own and scale is not None:
            own[name] = own[key].float() * scale.float()[:, None]
            dequantized.append(name)
    current = original.state_dict(keep_vars=True)
    for key in [k for k, v in own.items() if _misfit(v, current.get(k))]:
        del own[key]  # the model's own load reports it, under the model's key name
    assign = local_metadata.get("assign_to_params_buffers", False)
    original.load_state_dict(own, strict=False, assign=assign)
    if dequantized:
        warnings.warn(f"fastsam_core: the checkpoint holds int8 weights ({len(dequantized)} "
                      "linears): the kept originals, which the fallbacks run and restore() "
                      "puts back, get them dequantized, not the weights they were quantized "
                      "from", stacklevel=3)
