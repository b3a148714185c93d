"""FastConfig(compile=...): the encoder traces with fullgraph=True and keeps parity.

torch.compile costs ~30 s here (Inductor on 2 cores), so only this file compiles.
"""

from __future__ import annotations

import pytest
import torch

import fastsam_core
from fastsam_core import FastConfig
from tests import tolerances as tol
from tests.conftest import image_batch, small_sam
from tests.parity import assert_close_fp32


@torch.inference_mode()
def test_compiled_encoder_matches_reference():
    sam = small_sam()
    x = image_batch()
    expected = sam.image_encoder(x)
    fastsam_core.optimize(sam, FastConfig(compile="default"))
    assert sam.image_encoder.compile_status == "pending first call"
    assert_close_fp32(sam.image_encoder(x), expected, tol.FP32_STAGE_REL_L2)
    assert sam.image_encoder.compile_status == "compiled"
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

    fast._compiled = broken_compiler  # what a failing backend raises on the first call
    with pytest.warns(UserWarning, match="failed, running eager"):
        out = fast(x)
    assert_close_fp32(out, expected, tol.FP32_STAGE_REL_L2)
    assert fast._compiled is None and "no C++ compiler" in fast.compile_status
    assert "failed, running eager" in str(fastsam_core.report(sam))
