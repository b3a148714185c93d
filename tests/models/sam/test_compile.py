"""FastConfig(compile=...): the encoder traces with fullgraph=True and keeps parity.

torch.compile costs ~30 s here (Inductor on 2 cores), so only this file compiles.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.compiled import LazyCompiled
from tests import tolerances as tol
from tests.conftest import image_batch, small_sam
from tests.parity import assert_close_fp32


@torch.inference_mode()
def test_compiled_encoder_matches_reference():
    sam = small_sam()
    x = image_batch()
    expected = sam.image_encoder(x)
    fastsam_core.optimize(sam, FastConfig(compile="default"))
    assert sam.image_encoder._run_fast.status == "pending first call"
    assert_close_fp32(sam.image_encoder(x), expected, tol.FP32_STAGE_REL_L2)
    assert sam.image_encoder._run_fast.status == "compiled"
    assert "compile: compiled" in str(fastsam_core.report(sam))
    assert_close_fp32(sam.image_encoder(x), expected, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_compile_failure_falls_back_to_eager_once():
    sam = small_sam()
    x = image_batch()
    expected = sam.image_encoder(x)
    fastsam_core.optimize(sam, FastConfig(compile="max-autotune-no-cudagraphs"))
    fast = sam.image_encoder

    def broken_compiler(_):
        raise RuntimeError("no C++ compiler")

    fast._run_fast.compiled = broken_compiler  # what a failing backend raises on first call
    with pytest.warns(UserWarning, match="failed, running eager"):
        out = fast(x)
    assert_close_fp32(out, expected, tol.FP32_STAGE_REL_L2)
    assert fast._run_fast.compiled is None and "no C++ compiler" in fast._run_fast.status
    assert "failed, running eager" in str(fastsam_core.report(sam))


def test_mask_decoder_compiles_once_for_all_prompt_counts():
    """The predictor's decoder path under torch.compile(dynamic=True): prompt counts 1..64
    and 1 or 3 points per prompt give at most two graphs (size 1 is specialized), counted
    with CompileCounter (the eager backend: Inductor on 2 cores would take minutes)."""
    sam = small_sam()
    fastsam_core.optimize(sam)
    decoder = sam.mask_decoder
    counter = CompileCounter()
    decoder._decode_dense = LazyCompiled(decoder.decode, "default", "mask decoder",
                                         backend=counter, dynamic=True)
    image = torch.randn(1, 256, 16, 16)
    image_pe = sam.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        for k in (1, 2, 3, 5, 8, 13, 21, 34, 55, 64):
            for p in (1, 3):
                points = (torch.rand(k, p, 2) * 256, torch.ones(k, p, dtype=torch.int))
                sparse, dense = sam.prompt_encoder(points, None, None)
                masks, iou = decoder(image, image_pe, sparse, dense, True)
                assert masks.shape == (k, 3, 64, 64)
    assert decoder._decode_dense.status == "compiled"
    assert counter.frame_count <= 2, counter.frame_count


class Scaled(torch.nn.Module):
    """A module whose compiled method reads its own weight (module level: picklable)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.run = LazyCompiled(self.scale, "default", "scaled", backend="eager")

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@torch.no_grad()
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("called", [False, True], ids=["before-first-call", "compiled"])
def test_a_copy_compiles_its_own_method(how, called):
    """A copy runs its own weights (a compiled function is bound to the original's method:
    a deepcopy ran the original's, and pickling failed); it compiles on its first call."""
    original = Scaled()
    x = torch.ones(3)
    if called:
        original.run(x)
    copy_ = copy.deepcopy(original) if how == "deepcopy" else pickle.loads(pickle.dumps(original))
    assert copy_.run.status == "pending first call"
    copy_.weight.fill_(2.0)
    assert torch.equal(copy_.run(x), torch.full((3,), 2.0))
    assert copy_.run.status == "compiled"
    assert torch.equal(original.run(x), torch.ones(3))


@torch.no_grad()
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_failed_compilation_stays_eager(how):
    """A copy of one whose first call failed to compile runs eagerly from its first call, its
    own weights, without compiling nor warning again."""
    original = Scaled()
    x = torch.ones(3)

    def broken_compiler(_):
        raise RuntimeError("no C++ compiler")

    original.run.compiled = broken_compiler
    with pytest.warns(UserWarning, match="failed, running eager"):
        original.run(x)
    copy_ = copy.deepcopy(original) if how == "deepcopy" else pickle.loads(pickle.dumps(original))
    assert copy_.run.compiled is None and "no C++ compiler" in copy_.run.status
    copy_.weight.fill_(2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(copy_.run(x), torch.full((3,), 2.0))
    assert copy_.run.compiled is None and copy_.run.status == original.run.status


def test_cuda_graph_modes_copy_their_outputs_out_of_the_graph_pool(monkeypatch):
    """Under the modes with CUDA graphs the next replay overwrites a graph's outputs: each
    call returns copies of its CUDA tensors, nested ones too (a CPU tensor stands for a CUDA
    one here); the other modes return the compiled outputs themselves."""
    pool = torch.arange(3.0)  # a graph's output memory
    runs = {mode: LazyCompiled(lambda t: t, mode, "graph") for mode in
            ("reduce-overhead", "max-autotune", "default", "max-autotune-no-cudagraphs")}
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    for mode, run in runs.items():
        run.compiled = lambda t: (pool, [pool])  # what a replay returns
        copied = mode in ("reduce-overhead", "max-autotune")
        for _ in range(2):  # the compiling call and a later one
            out, (nested,) = run(pool)
            assert torch.equal(out, pool) and torch.equal(nested, pool)
            assert (out is not pool, nested is not pool) == (copied, copied), mode


def test_an_encoder_optimized_with_compile_pickles_and_copies_bound_to_itself():
    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(compile="default"))
    for copy_ in (copy.deepcopy(sam), pickle.loads(pickle.dumps(sam))):
        for module, run in ((copy_.image_encoder, copy_.image_encoder._run_fast),
                            (copy_.mask_decoder, copy_.mask_decoder._decode_dense)):
            assert run.fn.__self__ is module
            assert run.compiled._torchdynamo_orig_callable.__self__ is module
