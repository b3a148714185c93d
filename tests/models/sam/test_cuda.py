"""GPU checks of the fast SAM image encoder (marked `cuda`: skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.sam.reference import build_sam
from tests.parity import assert_lowp_parity, in_dtype

pytestmark = pytest.mark.cuda


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_real_size_vit_b_low_precision_parity(dtype):
    sam = build_sam("vit_b", 1024).cuda()
    x = torch.randn(2, 3, 1024, 1024, device="cuda")
    ref = sam.image_encoder
    exact = in_dtype(ref, torch.float64)(x.double())
    naive = in_dtype(ref, dtype)(x.to(dtype))
    fastsam_core.optimize(sam, FastConfig(dtype=dtype))
    assert fastsam_core.report(sam).path_of("image_encoder") == "fast"
    assert_lowp_parity(sam.image_encoder(x), naive, exact)


@torch.inference_mode()
def test_default_dtype_on_cuda_is_bf16_and_forward_has_no_host_sync():
    sam = build_sam("vit_b", 1024).cuda()
    fastsam_core.optimize(sam)
    assert sam.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    x = torch.randn(1, 3, 1024, 1024, device="cuda")
    sam.image_encoder(x)  # warm-up (lazy initialization may synchronize)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sam.image_encoder(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.dtype == torch.float32 and out.shape == (1, 256, 64, 64)


@torch.inference_mode()
def test_compiled_encoder_on_cuda():
    sam = build_sam("vit_b", 1024).cuda()
    x = torch.randn(2, 3, 1024, 1024, device="cuda")
    naive = in_dtype(sam.image_encoder, torch.bfloat16)(x.to(torch.bfloat16))
    exact = in_dtype(sam.image_encoder, torch.float64)(x.double())
    # compile mode 'default': max-autotune would spend minutes of the GPU budget
    fastsam_core.optimize(sam, FastConfig(compile="default"))
    out = sam.image_encoder(x)
    assert sam.image_encoder._run_fast.status == "compiled"
    assert_lowp_parity(out, naive, exact)


@torch.inference_mode()
def test_prompt_path_has_no_host_sync():
    sam = build_sam("vit_b", 1024, depth=2, global_attn_indexes=(1,)).cuda()
    fastsam_core.optimize(sam)
    boxes = torch.tensor([[100.0, 120.0, 400.0, 500.0]] * 16, device="cuda")
    points = (torch.rand(16, 2, 2, device="cuda") * 1024,
              torch.ones(16, 2, dtype=torch.int, device="cuda"))
    embedding = torch.randn(1, 256, 64, 64, device="cuda")

    def run():
        sparse, dense = sam.prompt_encoder(points, boxes, None)
        return sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense,
                                True)

    run()  # warm-up: lazy initialization and the cached dense PE
    torch.cuda.set_sync_debug_mode("error")
    try:
        masks, iou = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert masks.shape == (16, 3, 256, 256) and iou.dtype == torch.float32
