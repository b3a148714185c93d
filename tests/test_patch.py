"""optimize / restore / is_optimized / report / patched, and their error cases."""

from __future__ import annotations

import warnings

import pytest
import torch
from sam2.modeling.sam2_base import SAM2Base
from segment_anything import SamPredictor, build_sam_vit_b, sam_model_registry
from segment_anything.modeling import ImageEncoderViT

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.sam.image_encoder import FastImageEncoderViT
from fastsam_core.models.sam.reference import build_encoder
from fastsam_core.patch import builders, sam2_builders
from tests import tolerances as tol
from tests.conftest import image_batch, small_sam
from tests.parity import assert_close_fp32, assert_lowp_parity, in_dtype


def encode(sam, x):
    return encode_with(sam.image_encoder, x)


def encode_with(encoder, x):
    with torch.inference_mode():
        return encoder(x)


def assert_bf16_encoder(out, reference_encoder, x):
    """The numerics policy for a bf16 encoder output (tests/tolerances.py)."""
    naive = encode_with(in_dtype(reference_encoder, torch.bfloat16), x.bfloat16())
    exact = encode_with(in_dtype(reference_encoder, torch.float64), x.double())
    assert_lowp_parity(out, naive, exact)


def test_optimize_replaces_encoder_and_restore_brings_back_the_same_objects(sam):
    x = image_batch()
    before = encode(sam, x)
    original = sam.image_encoder
    params = [p for p in original.parameters()]
    assert fastsam_core.optimize(sam) is sam
    assert isinstance(sam.image_encoder, FastImageEncoderViT)
    assert fastsam_core.is_optimized(sam)
    assert_close_fp32(encode(sam, x), before, tol.FP32_STAGE_REL_L2)
    assert fastsam_core.restore(sam) is sam
    assert sam.image_encoder is original
    assert all(a is b for a, b in zip(original.parameters(), params, strict=True))
    assert not fastsam_core.is_optimized(sam)
    assert torch.equal(encode(sam, x), before)


@pytest.mark.parametrize("originals", ["keep", "offload", "drop"])
def test_restore_after_bf16_per_originals_mode(originals):
    sam = small_sam()
    x = image_batch()
    before = encode(sam, x)
    original = sam.image_encoder
    rounded = in_dtype(in_dtype(original, torch.bfloat16), torch.float32)
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16, originals=originals))
    if originals == "drop":
        assert all(p.device.type == "meta" for p in original.parameters())
        with pytest.warns(UserWarning, match="not bit-identical"):
            fastsam_core.restore(sam)
        assert sam.image_encoder is original
        # rebuilt from the bf16 weights: the original weights rounded to bf16, exactly
        assert torch.equal(encode(sam, x), encode_with(rounded, x))
        assert not torch.equal(encode(sam, x), before)
    else:
        fastsam_core.restore(sam)
        assert sam.image_encoder is original
        assert torch.equal(encode(sam, x), before)


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_originals_are_outside_the_module_tree(kind):
    """Same tensors, listed in the reference's order (SAM 2's fast decoder had registered its
    object-score token after the upscaling layers: what pairs tensors by position, an
    optimizer's state or `parameters_to_vector`, paired other ones)."""
    from tests.models.sam2.test_image_encoder import small_sam2

    sam = small_sam() if kind == "sam" else small_sam2()
    n_params = sum(p.numel() for p in sam.parameters())
    keys, names = list(sam.state_dict()), [name for name, _ in sam.named_parameters()]
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    assert sum(p.numel() for p in sam.parameters()) == n_params
    assert list(sam.state_dict()) == keys
    assert [name for name, _ in sam.named_parameters()] == names
    assert not any(isinstance(m, ImageEncoderViT) for m in sam.modules())


def test_optimize_twice_same_config_is_noop_other_config_raises(sam):
    fastsam_core.optimize(sam)
    fast = sam.image_encoder
    fastsam_core.optimize(sam)
    assert sam.image_encoder is fast
    with pytest.raises(ValueError, match="already optimized"):
        fastsam_core.optimize(sam, FastConfig(attention="math"))


def test_predictor_is_accepted(sam):
    predictor = SamPredictor(sam)
    assert fastsam_core.optimize(predictor) is predictor
    assert fastsam_core.is_optimized(sam) and fastsam_core.is_optimized(predictor)
    fastsam_core.restore(predictor)
    assert not fastsam_core.is_optimized(sam)


@pytest.mark.parametrize("bad", [torch.nn.Linear(2, 2), "vit_b", None])
def test_unsupported_model_raises_type_error(bad):
    with pytest.raises(TypeError, match="supports segment_anything.s Sam"):
        fastsam_core.optimize(bad)


def test_bad_config_raises(sam):
    with pytest.raises(TypeError, match="FastConfig"):
        fastsam_core.optimize(sam, {"dtype": "bf16"})


def test_training_mode_raises(sam):
    sam.train()
    with pytest.raises(ValueError, match="model.eval()"):
        fastsam_core.optimize(sam)


def test_restore_of_unoptimized_model_raises(sam):
    with pytest.raises(ValueError, match="not optimized"):
        fastsam_core.restore(sam)


def test_non_vit_encoder_is_kept_with_a_warning(sam):
    class OtherEncoder(ImageEncoderViT):  # stands for MobileSAM's TinyViT, HQ-SAM's ViT, ...
        pass

    other = OtherEncoder(img_size=256, embed_dim=64, depth=1, num_heads=4)
    sam.image_encoder = other
    with pytest.warns(UserWarning, match="image_encoder kept as the reference"):
        fastsam_core.optimize(sam)
    assert sam.image_encoder is other
    assert fastsam_core.report(sam).path_of("image_encoder") == "reference"
    fastsam_core.restore(sam)
    assert sam.image_encoder is other


def test_hooks_on_replaced_modules_are_named_in_a_warning(sam):
    """A forward hook (or pre-hook) on a module optimize() replaces would silently stop
    running: optimize() names those modules in one warning. A hook on a module the fast
    stage keeps (fp32: the blocks' own LayerNorms) runs on, and is not named; restore()
    brings the hooked originals back, hooks and all."""
    x = image_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastsam_core.optimize(sam)  # no hooks: no warning
    fastsam_core.restore(sam)
    calls = []
    encoder = sam.image_encoder
    encoder.register_forward_hook(lambda m, args, out: calls.append("encoder"))
    encoder.blocks[0].register_forward_pre_hook(lambda m, args: calls.append("block"))
    encoder.blocks[0].norm1.register_forward_hook(lambda m, args, out: calls.append("norm1"))
    with pytest.warns(UserWarning) as caught:
        fastsam_core.optimize(sam)
    (message,) = [str(w.message) for w in caught]
    assert "forward hooks on image_encoder, image_encoder.blocks.0 do not run" in message
    assert "norm1" not in message
    encode(sam, x)
    assert calls == ["norm1"]
    fastsam_core.restore(sam)
    calls.clear()
    encode(sam, x)
    assert calls == ["block", "norm1", "encoder"]


def test_report_names_each_stage_path_and_reason(sam):
    assert fastsam_core.report(sam).path_of("image_encoder") == "reference"
    fastsam_core.optimize(sam, FastConfig(attention="math"))
    rep = fastsam_core.report(sam)
    assert rep.path_of("image_encoder") == "fast"
    assert rep.path_of("image_encoder.attention[windowed]") == "math"
    assert rep.path_of("image_encoder.attention[global]") == "math"
    assert rep.path_of("prompt_encoder") == "fast" and rep.path_of("mask_decoder") == "fast"
    order = ["image_encoder", "prompt_encoder", "mask_decoder"]
    stages = [s.stage.split(".")[0] for s in rep.stages]
    assert stages == sorted(stages, key=order.index) and set(stages) == set(order)
    text = str(rep)
    assert "forced by FastConfig.attention" in text and "compile: eager" in text
    assert "forward hooks" not in text


def test_report_path_of_a_stage_the_model_does_not_have_raises(sam):
    rep = fastsam_core.report(sam)
    assert rep.path_of("image_encoder") == "reference"
    with pytest.raises(KeyError):
        rep.path_of("image_encoder.attention[window]")  # a misspelt stage is no answer


def test_state_dict_of_optimized_model_loads_into_reference(tmp_path):
    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    torch.save(sam.state_dict(), tmp_path / "optimized.pt")
    plain = small_sam(seed=1)
    plain.load_state_dict(torch.load(tmp_path / "optimized.pt"))
    expected = {k: v.to(torch.float32) for k, v in sam.state_dict().items()}
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimized_model_pickles_and_its_copy_restores(tmp_path, dtype):
    """torch.save(model) of an optimized model: the copy runs the same, and restores."""
    sam = small_sam()
    x = image_batch()
    expected = encode(sam, x)
    fastsam_core.optimize(sam, FastConfig(dtype=dtype))
    fast_out = encode(sam, x)
    torch.save(sam, tmp_path / "optimized.pt")
    copy = torch.load(tmp_path / "optimized.pt", weights_only=False)
    assert torch.equal(encode(copy, x), fast_out)
    fastsam_core.restore(copy)
    assert not fastsam_core.is_optimized(copy)
    assert torch.equal(encode(copy, x), expected)


def test_checkpoint_round_trip_load_optimize_restore(tmp_path):
    """A random model's checkpoint, as users load theirs: load, optimize, predict, restore."""
    torch.save(small_sam(seed=3).state_dict(), tmp_path / "sam.pt")
    sam = small_sam(seed=0)
    sam.load_state_dict(torch.load(tmp_path / "sam.pt"))
    x = image_batch()
    expected = encode(small_sam(seed=3), x)
    before = encode(sam, x)
    assert torch.equal(before, expected)
    fastsam_core.optimize(sam)
    assert_close_fp32(encode(sam, x), expected, tol.FP32_STAGE_REL_L2)
    fastsam_core.restore(sam)
    assert torch.equal(encode(sam, x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["to_empty", "assign"])
def test_a_model_built_on_meta_then_materialized_and_loaded(dtype, how):
    """Empty-weights loading (accelerate's ways): built on the meta device, optimized, then
    `to_empty()` and `load_state_dict`, or `load_state_dict(assign=True)`. The attention's
    index tables are rebuilt (uninitialized, or left on meta: no checkpoint holds them) and
    the kept originals are materialized and loaded too (they stayed on meta; restore()
    failed), sharing what they shared with the fast modules."""
    checkpoint = small_sam(seed=3).state_dict()
    x = image_batch(batch=1)
    expected = encode(small_sam(seed=3), x)
    with torch.device("meta"):
        sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(dtype=dtype))
    if how == "to_empty":
        sam.to_empty(device="cpu")
    sam.load_state_dict(checkpoint, assign=how == "assign")
    encoder = sam.image_encoder
    original = encoder.__dict__["_reference"]
    if dtype == torch.bfloat16 and how == "to_empty":
        assert_bf16_encoder(encode(sam, x), small_sam(seed=3).image_encoder, x)
    else:  # fp32, or fp32 weights assigned
        assert_close_fp32(encode(sam, x), expected, tol.FP32_STAGE_REL_L2)
    if dtype == torch.float32 and how == "to_empty":
        assert {id(p) for p in encoder.parameters()} == {id(p) for p in original.parameters()}
    fastsam_core.restore(sam)
    assert sam.image_encoder is original
    assert torch.equal(encode(sam, x), expected)


@pytest.mark.parametrize("config", [FastConfig(dtype=torch.float32),
                                    FastConfig(dtype=torch.bfloat16),
                                    FastConfig(dtype=torch.float32, quantize="int8")],
                         ids=["fp32", "bf16", "int8"])
@pytest.mark.parametrize("misfit_qkv", [torch.zeros(10, 10), torch.zeros(10)], ids=["2d", "1d"])
def test_a_misfit_checkpoint_raises_the_references_error(config, misfit_qkv):
    """Every size mismatch, named by the model's keys (the load into the kept original had
    raised first, for its own stage and keys; an int8 linear quantized the misfit weight and
    named its own keys, or failed on a 1-D one)."""
    misfit = small_sam(seed=3).state_dict()
    misfit["image_encoder.blocks.0.attn.qkv.weight"] = misfit_qkv
    misfit["mask_decoder.iou_token.weight"] = torch.zeros(2, 2)
    with pytest.raises(RuntimeError) as expected:
        small_sam().load_state_dict(misfit)
    sam = small_sam()
    fastsam_core.optimize(sam, config)
    with pytest.raises(RuntimeError) as got:
        sam.load_state_dict(misfit)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("originals", ["keep", "offload"])
def test_checkpoint_loaded_after_optimize_reaches_the_originals(tmp_path, originals):
    torch.save(small_sam(seed=3).state_dict(), tmp_path / "sam.pt")
    x = image_batch()
    expected = encode(small_sam(seed=3), x)
    sam = small_sam(seed=0)
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16, originals=originals))
    sam.load_state_dict(torch.load(tmp_path / "sam.pt"))
    assert_bf16_encoder(encode(sam, x), small_sam(seed=3).image_encoder, x)
    fastsam_core.restore(sam)
    assert torch.equal(encode(sam, x), expected)


def test_patched_covers_registry_and_builders_imported_before(monkeypatch):
    calls = []
    # The real vit_b at 1024 px costs seconds on CPU: build a small encoder instead, through
    # the same inner builder the registry and the build_sam_* functions share.
    def small_build(**kwargs):
        calls.append(kwargs["encoder_depth"])
        sam = small_sam()
        return sam

    monkeypatch.setattr(builders, "_build_sam", small_build)
    with fastsam_core.patched(FastConfig(attention="math")):
        a = sam_model_registry["vit_b"]()
        b = build_sam_vit_b()  # imported at the top of this file, before the block
    c = build_sam_vit_b()
    assert calls == [12, 12, 12]
    assert fastsam_core.is_optimized(a) and fastsam_core.is_optimized(b)
    assert fastsam_core.report(a).path_of("image_encoder.attention[global]") == "math"
    assert not fastsam_core.is_optimized(c)
    assert builders._build_sam is small_build


def test_patched_is_undone_when_the_body_raises_and_nests():
    original = builders._build_sam
    with pytest.raises(RuntimeError, match="boom"):
        with fastsam_core.patched():
            assert builders._build_sam is not original
            raise RuntimeError("boom")
    assert builders._build_sam is original
    with fastsam_core.patched(FastConfig(attention="math")):
        outer = builders._build_sam
        with fastsam_core.patched(FastConfig(attention="sdpa")):
            inner = builders._build_sam
            assert inner._fastsam_base is original  # innermost config wins, no double optimize
        assert builders._build_sam is outer
    assert builders._build_sam is original


def test_patched_blocks_closed_out_of_order():
    """Blocks closed in another order than opened (an ExitStack, threads): the newest open
    block's builders stay until it closes, and the last to close puts back the originals
    (closing the oldest first used to leave the builders patched for good)."""
    original, original_sam2 = builders._build_sam, sam2_builders._load_checkpoint
    outer, middle, inner = (fastsam_core.patched(FastConfig(attention=a))
                            for a in ("math", "sdpa", "math"))
    outer.__enter__()
    middle.__enter__()
    inner.__enter__()
    inner_builders = builders._build_sam, sam2_builders._load_checkpoint
    middle.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    assert (builders._build_sam, sam2_builders._load_checkpoint) == inner_builders
    assert "train" in vars(SAM2Base)  # still hooked for the open block
    inner.__exit__(None, None, None)
    assert builders._build_sam is original and sam2_builders._load_checkpoint is original_sam2
    assert "train" not in vars(SAM2Base)


def test_patched_real_builder_end_to_end():
    """The real builder (vit_b at 1024 px, on the meta device so nothing is computed)."""
    with torch.device("meta"), fastsam_core.patched():
        sam = sam_model_registry["vit_b"]()
    assert isinstance(sam.image_encoder, FastImageEncoderViT)
    assert len(sam.image_encoder.blocks) == 12


def test_inference_mode_and_no_grad_take_the_fast_path(sam):
    x = image_batch()
    fastsam_core.optimize(sam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            a = sam.image_encoder(x)
        with torch.no_grad():
            b = sam.image_encoder(x)
    assert torch.equal(a, b)
    assert not sam.image_encoder.fallbacks


def test_optimize_inside_inference_mode_runs_outside(sam):
    x = image_batch()
    reference = in_dtype(sam.image_encoder, torch.float32)
    with torch.inference_mode():
        fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    with torch.no_grad():
        out = sam.image_encoder(x)
    assert_bf16_encoder(out, reference, x)


@pytest.mark.parametrize("quantize", [None, "int8", "2:4"])
def test_optimize_inside_inference_mode_leaves_weights_editable(quantize):
    """optimize() under inference_mode must not make inference tensors of the weights it
    converts: load_state_dict and in-place edits must still work outside it."""
    sam = small_sam()
    with torch.inference_mode():
        fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16, quantize=quantize))
    sam.load_state_dict(small_sam(seed=5).state_dict())
    with torch.no_grad():
        for p in sam.parameters():
            p.mul_(1)
    assert not any(t.is_inference() for t in (*sam.parameters(), *sam.buffers()))


def test_restore_gives_the_originals_the_models_mode():
    """The originals sit outside the module tree while optimized: train() / eval() since
    optimize() did not reach them, so restore() sets their mode from the model."""
    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    sam.train()
    fastsam_core.restore(sam)
    assert all(m.training for m in sam.modules())
    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    sam.train()
    with pytest.warns(UserWarning, match="training mode"):
        sam.image_encoder(image_batch(batch=1))  # the fallback puts its original in train
    sam.eval()
    fastsam_core.restore(sam)
    assert not any(m.training for m in sam.modules())


def test_autocast_does_not_change_the_fast_path(sam):
    x = image_batch()
    fastsam_core.optimize(sam)
    plain = encode(sam, x)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = sam.image_encoder(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, plain)


def test_grad_mode_and_train_mode_fall_back_to_reference(sam):
    x = image_batch()
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    fast = sam.image_encoder
    with pytest.warns(UserWarning, match="autograd is recording.* keeps its own torch.float32 "
                      "weights: gradients reach those, not model.parameters()"):
        out = fast(x)  # parameters require grad, grad mode on: the reference runs
    out.sum().backward()
    original = fast._reference
    assert all(p.grad is not None for p in original.parameters())
    assert out.dtype == torch.float32
    sam.train()
    with torch.no_grad(), pytest.warns(UserWarning, match="training mode"):
        fast(x)
    sam.eval()
    assert set(fast.fallbacks) == {
        "autograd is recording (use torch.inference_mode() or no_grad())",
        "the model is in training mode",
    }
    assert "reference fallbacks" in str(fastsam_core.report(sam))


def test_a_fallback_warns_once_per_reason(sam):
    fastsam_core.optimize(sam, FastConfig(dtype=torch.float32))
    x = image_batch(batch=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # not Python's once-per-location filter
        for _ in range(2):
            sam.image_encoder(x)  # parameters require grad, grad mode on: the reference
    assert [str(w.message) for w in caught if "fastsam_core" in str(w.message)] == [
        "fastsam_core: autograd is recording (use torch.inference_mode() or no_grad()): "
        "running the reference image encoder"]
    assert list(sam.image_encoder.fallbacks.values()) == [2]


def test_a_training_mode_fallback_runs_the_reference_in_training_mode():
    """sam2.1's memory attention has dropout: in training mode the fallback computes what
    the reference model in training mode does, dropout included (the kept reference had
    been put in eval mode by optimize())."""
    from tests.models.sam2.test_image_encoder import small_sam2
    from tests.models.sam2.test_memory import attention_inputs

    model, plain = small_sam2(), small_sam2()
    fastsam_core.optimize(model, FastConfig())
    model.train()
    plain.train()
    kwargs = attention_inputs(frames=1, pointers=0)
    with torch.no_grad():
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="training mode"):
            got = model.memory_attention(**kwargs)
        torch.manual_seed(0)
        expected = plain.memory_attention(**kwargs)
        in_eval = plain.eval().memory_attention(**kwargs)
    assert torch.equal(got, expected)
    assert not torch.equal(got, in_eval)  # dropout ran


def test_fallback_without_kept_original_raises(sam):
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16, originals="offload"))
    with pytest.raises(RuntimeError, match="was not kept"):
        sam.image_encoder(image_batch())


def test_moving_the_model_after_optimize_moves_restore_too():
    sam = small_sam()
    original = sam.image_encoder
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    sam.to("meta")
    assert all(p.device.type == "cpu" for p in original.parameters())  # not moved by .to()
    fastsam_core.restore(sam)
    assert all(p.device.type == "meta" for p in original.parameters())  # moved on restore


def test_casting_the_model_after_optimize_casts_restore_too():
    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    sam.mask_decoder.half()  # one stage: the header names it, not the model
    assert fastsam_core.report(sam).model.startswith(
        "Sam, bfloat16 (cast since: mask_decoder float16), FastConfig(")
    sam.half()
    assert "float16 (optimized as bfloat16, cast since)" in fastsam_core.report(sam).model
    fastsam_core.restore(sam)
    assert {t.dtype for t in (*sam.parameters(), *sam.buffers()) if t.is_floating_point()} \
        == {torch.float16}
    x = image_batch(batch=1).half()
    assert torch.equal(encode(sam, x), encode(small_sam().half(), x))


@pytest.mark.parametrize("originals", ["offload", "drop"])
def test_one_stage_cast_after_optimize_casts_restore_too_without_a_kept_original(originals):
    """bf16 optimize with the originals offloaded or dropped (no kept reference to align),
    then one stage cast on its own: restore() gives that stage's original the cast dtype (as
    with "keep"), the other stages keep theirs."""
    sam = small_sam()
    with warnings.catch_warnings():  # "drop": restored from the bf16 weights, warned
        warnings.simplefilter("ignore")
        fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16, originals=originals))
        sam.mask_decoder.half()
        fastsam_core.restore(sam)
    assert {p.dtype for p in sam.mask_decoder.parameters()} == {torch.float16}
    assert {p.dtype for p in sam.image_encoder.parameters()} == {torch.float32}


@pytest.mark.parametrize("originals", ["offload", "drop"])
def test_originals_sharing_the_fast_modules_tensors_are_kept_whatever_the_mode(originals):
    """fp32 (the CPU default): the fast modules share the originals' tensors, so "offload"
    and "drop" must leave the originals in place (dropping them freed the fast encoder's own
    weights): the fast path, its reference fallback and an exact restore() all work."""
    sam = small_sam()
    x = image_batch(batch=1)
    before = encode(sam, x)
    fastsam_core.optimize(sam, FastConfig(originals=originals))
    assert_close_fp32(encode(sam, x), before, tol.FP32_STAGE_REL_L2)
    with pytest.warns(UserWarning, match="autograd is recording"):
        fallback = sam.image_encoder(x)
    assert torch.equal(fallback.detach(), before)
    fastsam_core.restore(sam)
    assert torch.equal(encode(sam, x), before)


def test_a_model_cast_after_optimize_falls_back_in_the_cast_dtype():
    """bf16 optimize, then `.half()`: the reference fallback (autograd recording) runs the
    kept fp32 original cast to fp16, as the model cast without optimizing runs (it ran the
    fp32 original and failed on the fp16 input); cast back to bf16, the fallback and
    restore() follow (the original had stayed fp16)."""
    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    plain = small_sam()
    x = image_batch(batch=1)
    for cast in (torch.float16, torch.bfloat16):
        sam.to(cast)
        plain.to(cast)
        with warnings.catch_warnings():  # "autograd is recording": warned once
            warnings.simplefilter("ignore")
            got = sam.image_encoder(x.to(cast))
        expected = encode(plain, x.to(cast))
        assert got.dtype == cast and torch.equal(got.detach(), expected)
    assert list(sam.image_encoder.fallbacks.values()) == [2]
    fastsam_core.restore(sam)
    assert {p.dtype for p in sam.parameters()} == {torch.bfloat16}
    assert torch.equal(encode(sam, x.bfloat16()), expected)


def test_a_model_cast_to_its_fast_dtype_falls_back_in_it():
    """bf16 optimize, then `.to(torch.bfloat16)`, a cast the fast modules' tensors do not
    show (they were bf16 already): the fallback runs the original cast to bf16, as the model
    cast without optimizing runs (it ran the fp32 original and failed on the bf16 input).
    The same for one stage cast on its own (the cast after optimize() decides its dtype, as
    without optimizing), with or without a fallback in between; the model stays fp32."""
    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    sam.to(torch.bfloat16)
    x = image_batch(batch=1).bfloat16()
    with pytest.warns(UserWarning, match="autograd is recording"):
        got = sam.image_encoder(x)
    expected = encode(small_sam().bfloat16(), x)
    assert got.dtype == torch.bfloat16 and torch.equal(got.detach(), expected)

    for fallback_between in (False, True):
        sam = small_sam()
        fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
        sam.image_encoder.half()
        if fallback_between:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sam.image_encoder(x.half())
        sam.image_encoder.bfloat16()
        fastsam_core.restore(sam)
        assert {p.dtype for p in sam.image_encoder.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in sam.mask_decoder.parameters()} == {torch.float32}


def test_a_fallback_in_inference_mode_leaves_the_original_trainable():
    """A fallback that moves or casts the kept original (here: after `.half()`) from
    inside `torch.inference_mode()`, as sam2's predictors call the model: the original's
    tensors are not inference tensors (after restore(), backward failed on them)."""
    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    sam.half().train()
    with torch.inference_mode(), pytest.warns(UserWarning, match="training mode"):
        sam.image_encoder(image_batch(batch=1).half())
    fastsam_core.restore(sam.eval())
    assert not any(t.is_inference() for t in (*sam.parameters(), *sam.buffers()))


def test_restore_in_inference_mode_of_a_model_made_there():
    """A model built inside `torch.inference_mode()` (inference tensors), frozen, optimized,
    its encoder unfrozen, restored inside inference mode: the flags reach the originals as
    the caller's mode allows (only the moves and casts leave inference mode)."""
    with torch.inference_mode():
        sam = small_sam()
    sam.requires_grad_(False)
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    sam.image_encoder.requires_grad_(True)
    with torch.inference_mode():
        fastsam_core.restore(sam)
    assert not fastsam_core.is_optimized(sam)
    assert {p.requires_grad for p in sam.image_encoder.parameters()} == {True}
    assert {p.requires_grad for p in sam.mask_decoder.parameters()} == {False}


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_casting_the_model_to_the_fast_dtype_casts_restore_too(kind):
    """A cast to the dtype the fast modules already have (bf16 here, CUDA's default) changes
    only the model's own tensors (pixel_mean, no_mem_embed, ...): restore casts the originals
    too (they had stayed fp32 beside a bf16 model, which then failed)."""
    from tests.models.sam2.test_image_encoder import small_sam2

    model = small_sam() if kind == "sam" else small_sam2()
    fastsam_core.optimize(model, FastConfig(dtype=torch.bfloat16))
    model.to(torch.bfloat16)
    assert "bfloat16 (optimized as bfloat16, cast since)" in fastsam_core.report(model).model
    fastsam_core.restore(model)
    assert {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()} \
        == {torch.bfloat16}
    if kind == "sam":
        x = image_batch(batch=1).bfloat16()
        assert torch.equal(encode(model, x), encode(small_sam().bfloat16(), x))


@pytest.mark.parametrize("config", [FastConfig(dtype=torch.bfloat16),
                                    FastConfig(quantize="int8")], ids=["bf16", "int8"])
def test_requires_grad_set_while_optimized_reaches_the_originals(config):
    """`requires_grad_(False)` on an optimized model whose stages hold their own weights (a
    compute-dtype copy, int8 codes): after restore the originals are frozen too (they had
    come back trainable); a layer left trainable stays so."""
    sam = small_sam()
    fastsam_core.optimize(sam, config)
    sam.requires_grad_(False)
    sam.mask_decoder.iou_prediction_head.requires_grad_(True)
    fastsam_core.restore(sam)
    trainable = {name for name, p in sam.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in
                         sam.mask_decoder.iou_prediction_head.named_parameters(
                             prefix="mask_decoder.iou_prediction_head")}


def test_adopt_module_converts_floating_buffers_and_keeps_requires_grad():
    from fastsam_core.models.convert import adopt_module

    ref = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ref[0].bias.requires_grad_(False)
    assert adopt_module(ref, torch.float32) is ref
    copy = adopt_module(ref, torch.bfloat16)
    assert {t.dtype for t in (*copy.parameters(), copy[1].running_mean, copy[1].running_var)} \
        == {torch.bfloat16}
    assert copy[1].num_batches_tracked.dtype == torch.int64
    assert [p.requires_grad for p in copy.parameters()] == [True, False, True, True]
    assert ref[0].weight.dtype == torch.float32  # a copy


def test_dtype_default_follows_device_and_model_dtype():
    config = FastConfig()
    assert config.resolve_dtype(torch.device("cpu"), torch.float32) == torch.float32
    assert config.resolve_dtype(torch.device("cuda"), torch.float32) == torch.bfloat16
    assert config.resolve_dtype(torch.device("cpu"), torch.float16) == torch.float16
    assert FastConfig(dtype="fp16").resolve_dtype(torch.device("cuda"), torch.float32) \
        == torch.float16


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dtype="int8"), ValueError, "FastConfig.dtype"),
        (dict(dtype=torch.int8), ValueError, "FastConfig.dtype"),
        (dict(dtype=3), TypeError, "FastConfig.dtype"),
        (dict(attention="flash"), ValueError, "FastConfig.attention"),
        (dict(attention=None), TypeError, "FastConfig.attention"),
        (dict(compile="fast"), ValueError, "FastConfig.compile"),
        (dict(compile=True), TypeError, "FastConfig.compile"),
        (dict(originals="discard"), ValueError, "FastConfig.originals"),
    ],
)
def test_config_validation_names_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        FastConfig(**kwargs)


def test_dtype_default_is_fp32_off_cuda():
    """bfloat16 only for a model on a CUDA device: float32 on any other (meta, mps, xpu)."""
    config = FastConfig()
    for device in ("meta", "mps", "xpu"):
        assert config.resolve_dtype(torch.device(device), torch.float32) == torch.float32


def test_config_is_frozen_and_normalizes_dtype_names():
    config = FastConfig(dtype="bf16")
    assert config.dtype is torch.bfloat16
    assert config == FastConfig(dtype=torch.bfloat16)
    assert FastConfig(dtype="BF16").dtype is torch.bfloat16  # names in any case
    assert FastConfig(dtype="Float16").dtype is torch.float16
    with pytest.raises(AttributeError):
        config.dtype = torch.float32


def test_meta_encoder_builds_at_real_size():
    """from_reference on a real-size vit_h (meta device: no memory, no compute)."""
    with torch.device("meta"):
        ref = build_encoder("vit_h", 1024)
    fast = FastImageEncoderViT.from_reference(ref, FastConfig(), torch.bfloat16)
    assert [b.window_size for b in fast.blocks].count(0) == 4
    assert fast.blocks[7].attn.grid == (64, 64) and fast.blocks[0].attn.grid == (14, 14)


@pytest.mark.parametrize("originals", ["offload", "drop"])
def test_casting_the_model_to_the_fast_dtype_casts_restore_too_without_a_kept_original(
        originals):
    """The cast to the fast modules' own dtype (their tensors do not show it) with the
    originals offloaded or dropped (no kept reference whose pending cast would follow it):
    restore() still gives every original the model's dtype."""
    sam = small_sam()
    with warnings.catch_warnings():  # "drop": restored from the bf16 weights, warned
        warnings.simplefilter("ignore")
        fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16, originals=originals))
        sam.to(torch.bfloat16)
        fastsam_core.restore(sam)
    assert {t.dtype for t in (*sam.parameters(), *sam.buffers()) if t.is_floating_point()} \
        == {torch.bfloat16}


def test_a_fast_module_kept_after_restore_no_longer_writes_into_its_original():
    """restore() detaches each fast module from its original: a state dict loaded into a
    fast module the caller still holds (bf16: a copy with its own weights) leaves the
    restored model's weights alone."""
    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    fast = sam.mask_decoder
    fastsam_core.restore(sam)
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    fast.load_state_dict({k: torch.zeros_like(v) for k, v in fast.state_dict().items()})
    assert all(torch.equal(v, before[k]) for k, v in sam.state_dict().items())


def test_an_input_requiring_grad_falls_back_to_reference_on_a_frozen_model(sam):
    """Gradients for the input of a frozen model (saliency, adversarial examples): no
    parameter requires grad, the input does, so the reference runs and the input gets its
    gradient through it."""
    x = image_batch().requires_grad_()
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    sam.requires_grad_(False)
    with pytest.warns(UserWarning, match="autograd is recording"):
        out = sam.image_encoder(x)
    out.sum().backward()
    assert x.grad is not None and out.dtype == torch.float32
    assert set(sam.image_encoder.fallbacks) == {
        "autograd is recording (use torch.inference_mode() or no_grad())"}


def test_an_int8_fallback_says_the_reference_keeps_its_own_linear_weights(sam):
    """fp32 int8: the fast encoder shares every tensor with the original but the quantized
    linears' weights, so gradients through the fallback reach weights the model does not
    hold: the warning says so, though most tensors are shared."""
    fastsam_core.optimize(sam, FastConfig(dtype=torch.float32, quantize="int8"))
    with pytest.warns(UserWarning, match="autograd is recording.* keeps its own torch.float32 "
                      "weights: gradients reach those"):
        sam.image_encoder(image_batch(batch=1))


def test_a_fallback_after_moving_the_model_runs_the_reference_where_the_input_is():
    """bf16 (the kept original holds its own weights, which `.to()` does not move): moved
    after optimize(), the model's fallback moves its reference to the input's device first
    (the meta device here: no data, no second device needed)."""
    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    sam.to("meta")
    with pytest.warns(UserWarning, match="autograd is recording"):
        out = sam.image_encoder(image_batch(batch=1).to("meta"))
    assert out.device.type == "meta"
    assert {p.device.type for p in sam.image_encoder._reference.parameters()} == {"meta"}
