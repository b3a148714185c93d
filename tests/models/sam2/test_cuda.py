"""GPU checks of the fast SAM 2 image path (marked `cuda`: skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch
from sam2.build_sam import build_sam2

import fastsam_core
from fastsam_core import FastConfig
from tests.models.sam2.test_image_encoder import randomize_pos_embeds
from tests.parity import assert_lowp_parity, in_dtype

pytestmark = pytest.mark.cuda


def real_size(size: str = "b+"):
    model = build_sam2(f"configs/sam2.1/sam2.1_hiera_{size}.yaml", None, device="cuda")
    randomize_pos_embeds(model.image_encoder)
    return model


@torch.inference_mode()
def test_hiera_b_plus_bf16_parity_and_no_host_sync():
    model = real_size()
    x = torch.randn(2, 3, 1024, 1024, device="cuda")
    ref = model.image_encoder
    exact = in_dtype(ref, torch.float64)(x.double())
    naive = in_dtype(ref, torch.bfloat16)(x.bfloat16())
    fastsam_core.optimize(model, FastConfig(dtype=torch.bfloat16))
    model.image_encoder(x)  # warm-up: the position-embedding caches are filled here
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = model.image_encoder(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for level in range(3):
        assert_lowp_parity(got["backbone_fpn"][level], naive["backbone_fpn"][level],
                           exact["backbone_fpn"][level])


@torch.inference_mode()
def test_compiled_sam2_encoder_on_cuda():
    model = real_size()
    x = torch.randn(2, 3, 1024, 1024, device="cuda")
    naive = in_dtype(model.image_encoder, torch.bfloat16)(x.bfloat16())
    exact = in_dtype(model.image_encoder, torch.float64)(x.double())
    # compile mode 'default': max-autotune would spend minutes of the GPU budget
    fastsam_core.optimize(model, FastConfig(compile="default"))
    got = model.image_encoder(x)
    assert model.image_encoder._run_fast.status == "compiled"
    assert_lowp_parity(got["vision_features"], naive["vision_features"],
                       exact["vision_features"])
