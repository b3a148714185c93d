"""Forward hooks through optimize(): a hook on a module the fast stages hold keeps running,
also where a fast forward fuses that module (it calls the module instead while the hook is
there) or holds a copy of it in the compute dtype; hooks that cannot run are named in one
warning."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.fallback import ReferenceFallback, shown_paths
from tests import tolerances as tol
from tests.conftest import image_batch, small_sam
from tests.models.sam2.test_heads import decoder_inputs
from tests.models.sam2.test_image_encoder import images, small_sam2
from tests.models.sam2.test_memory import encoder_inputs
from tests.parity import assert_close_fp32

# modules that the fast stages use without calling them where they can (fused, batched or
# cached), and that are called while hooks sit on them: containers and single children
SAM_FUSED = ["image_encoder.neck", "image_encoder.neck.0", "image_encoder.neck.3",
             "prompt_encoder.pe_layer", "prompt_encoder.mask_downscaling.1",
             "mask_decoder.output_upscaling", "mask_decoder.output_upscaling.1",
             "mask_decoder.output_hypernetworks_mlps.2.layers.0"]
SAM2_FUSED = ["image_encoder.neck.position_encoding", "sam_prompt_encoder.mask_downscaling.4",
              "sam_mask_decoder.output_upscaling.1", "sam_mask_decoder.output_hypernetworks_mlps.0",
              "memory_encoder.mask_downsampler", "memory_encoder.mask_downsampler.encoder.1",
              "memory_encoder.fuser.layers.0", "memory_encoder.fuser.layers.1.norm",
              "memory_encoder.position_encoding"]


class Recorder:
    """Forward hooks that record each output: callable objects holding the recorder, which a
    deep copy of the module would have copied along with it."""

    def __init__(self, model: torch.nn.Module, paths: list[str]):
        self.seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        for path in paths:
            model.get_submodule(path).register_forward_hook(_Hook(self, path))

    def take(self) -> dict[str, list[torch.Tensor]]:
        seen, self.seen = self.seen, {p: [] for p in self.seen}
        return seen


class _Hook:
    def __init__(self, recorder: Recorder, path: str):
        self.recorder, self.path = recorder, path

    def __call__(self, module, args, out):
        out = out if isinstance(out, torch.Tensor) else out[0]
        self.recorder.seen[self.path].append(out.detach().float().clone())


def run_sam(sam) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    coords = torch.rand(3, 2, 2, generator=gen) * 256
    labels = torch.ones(3, 2, dtype=torch.int64)
    masks = torch.randn(3, 1, 64, 64, generator=gen) * 4
    with torch.inference_mode():
        embedding = sam.image_encoder(image_batch(batch=1))
        sparse, dense = sam.prompt_encoder((coords, labels), None, masks)
        out = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense,
                               multimask_output=True)
    return [embedding, *out]


def run_sam2(model) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = model.image_encoder(images(size=256))
        image, pe, sparse, dense, high_res = decoder_inputs(model, 3, repeat_image=True)
        masks = model.sam_mask_decoder(image, pe, sparse, dense, True, True, high_res)
        memory = model.memory_encoder(*encoder_inputs())
    return [out["vision_features"], *out["vision_pos_enc"], masks[0], masks[1],
            memory["vision_features"], memory["vision_pos_enc"][0]]


CASES = {"sam": (small_sam, run_sam), "sam2": (small_sam2, run_sam2)}


def no_fallbacks(model) -> bool:
    return not any(m.fallbacks for m in model.modules() if isinstance(m, ReferenceFallback))


@pytest.mark.parametrize("model_name, path", [("sam", p) for p in SAM_FUSED]
                         + [("sam2", p) for p in SAM2_FUSED])
def test_hooks_on_fused_modules_run_on_the_fast_path(model_name, path):
    """fp32: the hooked module fires as often as in the reference, with the reference's
    output, the results do not change, the fast stages ran (no fallback), and the report
    names the hooked module."""
    build, run = CASES[model_name]
    model = build()
    recorder = Recorder(model, [path])
    expected_out, (expected,) = run(model), recorder.take().values()
    assert expected, "a hooked module the reference does not call"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hook reported as left behind, no fallback
        fastsam_core.optimize(model, FastConfig(dtype=torch.float32))
        got_out, (got,) = run(model), recorder.take().values()
    assert no_fallbacks(model)
    stage, child = path.split(".")[:2]
    details = [s.detail for s in fastsam_core.report(model).stages
               if s.stage.split(".")[0] == stage]
    assert any(f"forward hooks on {child}" in d for d in details), details
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)
    for a, b in zip(got_out, expected_out, strict=True):
        assert_close_fp32(a.float(), b.float(), tol.FP32_STAGE_REL_L2)
    if path.startswith("image_encoder.neck") and model_name == "sam":
        assert fastsam_core.report(model).path_of("image_encoder.neck") == "reference"
    fastsam_core.restore(model)
    run(model)
    assert len(recorder.take()[path]) == len(expected)


def test_a_hook_added_after_compilation_runs_the_stage_eagerly():
    """A hook that the fullgraph compilation could not trace (it breaks the graph), added on
    the fused neck after the encoder compiled: the encoder runs eagerly while it is there,
    compiled again after."""
    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(compile="default"))
    x = image_batch(batch=1)
    with torch.inference_mode():
        expected = sam.image_encoder(x)
    assert sam.image_encoder._run_fast.status == "compiled"
    means = []

    def hook(module, args, out):
        torch._dynamo.graph_break()
        means.append(out.mean().item())

    handle = sam.image_encoder.neck[1].register_forward_hook(hook)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            hooked = sam.image_encoder(x)
        handle.remove()
        with torch.inference_mode():
            again = sam.image_encoder(x)
    assert len(means) == 1 and sam.image_encoder._run_fast.status == "compiled"
    assert_close_fp32(hooked, expected, tol.FP32_STAGE_REL_L2)
    assert_close_fp32(again, expected, tol.FP32_STAGE_REL_L2)


def test_hooks_on_the_compute_dtype_copies_keep_running():
    """bf16: the fast stages hold bf16 copies of the shared modules; they share the
    originals' hook registries, so hooks registered before optimize() (not copied with the
    module) and after it, on either module, run; a handle removes its hook from both."""
    sam = small_sam()
    recorder = Recorder(sam, ["image_encoder.blocks.1.norm2", "image_encoder.neck.1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastsam_core.optimize(sam, FastConfig(dtype=torch.bfloat16))
    fast_norm = sam.image_encoder.blocks[1].norm2
    assert fast_norm.weight.dtype == torch.bfloat16
    late = []
    handle = fast_norm.register_forward_hook(lambda m, args, out: late.append(out.dtype))
    run_sam(sam)
    seen = recorder.take()
    assert [len(v) for v in seen.values()] == [1, 1] and late == [torch.bfloat16]
    fastsam_core.restore(sam)
    run_sam(sam)
    assert late == [torch.bfloat16, torch.float32]  # the original runs the late hook too
    handle.remove()
    run_sam(sam)
    assert len(late) == 2 and [len(v) for v in recorder.take().values()] == [2, 2]


def test_hooks_on_modules_the_fast_stages_drop_or_replace_are_named():
    """bf16: sam2's memory attention layers' dropouts are not kept (identities at inference),
    so a hook on one is named; a hook on a kept module of the same layer (a bf16 copy) is
    not. int8: a hooked linear is replaced by an int8 one, and named."""
    model = small_sam2()
    layer = model.memory_attention.layers[0]
    layer.dropout1.register_forward_hook(lambda m, args, out: None)
    layer.norm1.register_forward_hook(lambda m, args, out: None)
    with pytest.warns(UserWarning) as caught:
        fastsam_core.optimize(model, FastConfig(dtype=torch.bfloat16))
    (message,) = [str(w.message) for w in caught if "forward hooks" in str(w.message)]
    assert "memory_attention.layers.0.dropout1 do not run" in message
    assert "norm1" not in message
    assert model.memory_attention.layers[0].norm1.weight.dtype == torch.bfloat16

    sam = small_sam()
    sam.image_encoder.blocks[0].mlp.lin1.register_forward_hook(lambda m, args, out: None)
    sam.image_encoder.blocks[0].norm1.register_forward_hook(lambda m, args, out: None)
    with pytest.warns(UserWarning) as caught:
        fastsam_core.optimize(sam, FastConfig(quantize="int8", quantize_layers="mlp"))
    (message,) = [str(w.message) for w in caught if "forward hooks" in str(w.message)]
    assert "forward hooks on image_encoder.blocks.0.mlp.lin1 do not run" in message


def test_batched_prediction_names_the_hooks_it_does_not_run():
    """predict_batch decodes all images in one `decode_batch` call: a hook on the decoder
    itself does not run and is named (SAM and SAM 2); hooks on the prompt encoder and on a
    fused decoder submodule run. A model that is not optimized runs fast views of its heads:
    a hook on a module the view replaces (the decoder's transformer) is named."""
    from fastsam_core.pipelines import predict_batch
    from tests.pipelines.test_predict_batch import batch

    images, prompts = batch()
    for build, prefix in ((small_sam, ""), (small_sam2, "sam_")):
        model = build()
        fastsam_core.optimize(model)
        recorder = Recorder(model, [f"{prefix}prompt_encoder",
                                    f"{prefix}mask_decoder.output_upscaling.1"])
        model.get_submodule(f"{prefix}mask_decoder").register_forward_hook(
            lambda m, args, out: None)
        with pytest.warns(UserWarning, match="hooks on the mask decoder do not run in "
                                             "decode_batch"):
            predict_batch(model, images, prompts)
        assert all(recorder.take().values())

    sam = small_sam()
    sam.mask_decoder.transformer.register_forward_hook(lambda m, args, out: None)
    recorder = Recorder(sam, ["prompt_encoder.pe_layer"])
    with pytest.warns(UserWarning) as caught:
        predict_batch(sam, images, prompts)
    (message,) = [str(w.message) for w in caught if "forward hooks" in str(w.message)]
    assert message.startswith("fastsam_core: forward hooks on mask_decoder.transformer do not "
                              "run: the model is not optimized")
    assert recorder.take()["prompt_encoder.pe_layer"]


@pytest.mark.parametrize("model_name", ["sam", "sam2"])
def test_global_module_hooks_see_every_module_the_reference_calls(model_name):
    """A global forward hook (`register_module_forward_hook`) counts as a hook on every
    module: each module that the fast stages fuse, batch or cache is called as often as in the
    reference, and a hook changing every linear's output changes the fast results as it
    changes the reference's (fp32; the fused hypernetwork MLPs had skipped it)."""
    build, run = CASES[model_name]
    model = build()
    fused = {id(model.get_submodule(p)): p for p in (SAM_FUSED if model_name == "sam"
                                                        else SAM2_FUSED)}
    calls = []

    def hook(module, args, out):
        if id(module) in fused:
            calls.append(fused[id(module)])
        return out * 1.01 if isinstance(module, torch.nn.Linear) else None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        expected = run(model)
        expected_calls, calls[:] = sorted(calls), []
        fastsam_core.optimize(model, FastConfig(dtype=torch.float32))
        got = run(model)
    finally:
        handle.remove()
    assert no_fallbacks(model)
    assert sorted(calls) == expected_calls and set(expected_calls) == set(fused.values())
    for a, b in zip(got, expected, strict=True):
        assert_close_fp32(a.float(), b.float(), tol.FP32_STAGE_REL_L2)


def test_warnings_name_eight_paths_then_count_the_rest():
    """The hook warnings name up to eight module paths, then say how many more."""
    paths = [f"image_encoder.blocks.{i}" for i in range(9)]
    assert shown_paths(paths[:8]) == ", ".join(paths[:8])  # all named: nothing "more"
    assert shown_paths(paths) == ", ".join(paths[:8]) + " and 1 more"


@pytest.mark.parametrize("model_name", ["sam", "sam2"])
def test_a_global_forward_pre_hook_alone_sees_every_module_the_reference_calls(model_name):
    """A global forward pre-hook alone (`register_module_forward_pre_hook`, no global
    forward hook) counts as a hook on every module too: each module that the fast stages
    fuse, batch or cache is called as often as in the reference."""
    build, run = CASES[model_name]
    model = build()
    fused = {id(model.get_submodule(p)): p for p in (SAM_FUSED if model_name == "sam"
                                                        else SAM2_FUSED)}
    calls = []

    def pre_hook(module, args):
        if id(module) in fused:
            calls.append(fused[id(module)])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    try:
        run(model)
        expected_calls, calls[:] = sorted(calls), []
        fastsam_core.optimize(model, FastConfig(dtype=torch.float32))
        run(model)
    finally:
        handle.remove()
    assert no_fallbacks(model)
    assert sorted(calls) == expected_calls and set(expected_calls) == set(fused.values())
