"""GPU checks of the fast SAM 2 image path and memory modules (marked `cuda`: skipped
without a CUDA device)."""

from __future__ import annotations

import math

import pytest
import torch
from sam2.build_sam import build_sam2

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.sam2.memory_attention import FastMemoryAttention
from fastsam_core.models.sam2.memory_encoder import FastMemoryEncoder
from fastsam_core.pipelines.video import pad_memory_banks
from tests.models.sam2.test_image_encoder import randomize_pos_embeds
from tests.models.sam2.test_memory import rope_tables_in
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
    got = sync_free(lambda: model.image_encoder(x))  # the warm-up fills the position caches
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



def sync_free(run):
    """run() with every host-device synchronization an error (after a warm-up call that
    fills the caches: rotary tables and position encodings are made on the host once)."""
    run()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def feature_side(model) -> int:
    """Tokens per side of the model's memory grid (64 at 1024 px)."""
    return math.isqrt(model.memory_attention.layers[0].self_attn.freqs_cis.shape[0])


@torch.inference_mode()
@pytest.mark.parametrize("masked", [False, True])
def test_memory_attention_b_plus_bf16_parity_and_no_host_sync(masked):
    """hiera_b+'s memory attention at 1024 px (64 x 64 tokens) with a full bank (7 frames and
    16 object pointers) in bf16, against the naive bf16 and the float64 reference; masked:
    the same bank in a padded batch beside a shorter one (the multi-object path), whose
    first element must be as close. No host sync in either."""
    model = real_size()
    ref, hw = model.memory_attention, feature_side(model) ** 2
    frames, pointers = 7, 16
    gen = torch.Generator(device=model.device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=model.device, generator=gen)

    m = frames * hw + pointers
    args = dict(curr=randn(hw, 1, 256), memory=randn(m, 1, 64), curr_pos=randn(hw, 1, 256),
                memory_pos=randn(m, 1, 64), num_obj_ptr_tokens=pointers)
    fast = FastMemoryAttention.from_reference(ref, FastConfig(), torch.bfloat16).eval()
    call = args
    if masked:  # a second object with 2 frames and 4 pointers, padded to the first's layout
        memory, memory_pos, mask, n_ptr = pad_memory_banks(
            [(args["memory"], args["memory_pos"], pointers),
             (randn(2 * hw + 4, 1, 64), randn(2 * hw + 4, 1, 64), 4)], hw)
        assert n_ptr == pointers and memory.shape[0] == m
        call = dict(curr=args["curr"].repeat(1, 2, 1), memory=memory,
                    curr_pos=args["curr_pos"].repeat(1, 2, 1), memory_pos=memory_pos,
                    num_obj_ptr_tokens=n_ptr, memory_mask=mask)
    got = sync_free(lambda: fast(**call))[:, :1]
    low = {k: v.bfloat16() if torch.is_tensor(v) else v for k, v in args.items()}
    wide = {k: v.double() if torch.is_tensor(v) else v for k, v in args.items()}
    side = feature_side(model)
    naive = rope_tables_in(in_dtype(ref, torch.bfloat16), torch.complex64, side)(**low)
    exact = rope_tables_in(in_dtype(ref, torch.float64), torch.complex128, side)(**wide)
    assert_lowp_parity(got.double(), naive.double(), exact)


@torch.inference_mode()
def test_memory_encoder_b_plus_bf16_parity_and_no_host_sync():
    """hiera_b+'s memory encoder at 1024 px (a 64 x 64 feature map, 1024 x 1024 mask logits)
    for 2 objects in bf16, against the naive bf16 and the float64 reference; no host sync."""
    model = real_size()
    ref, side = model.memory_encoder, feature_side(model)
    gen = torch.Generator(device=model.device).manual_seed(0)
    pix = torch.randn(2, 256, side, side, device=model.device, generator=gen)
    masks = 4 * torch.randn(2, 1, 16 * side, 16 * side, device=model.device, generator=gen)
    fast = FastMemoryEncoder.from_reference(ref, FastConfig(), torch.bfloat16).eval()
    got = sync_free(lambda: fast(pix, masks))["vision_features"]
    naive = in_dtype(ref, torch.bfloat16)(pix.bfloat16(), masks.bfloat16())["vision_features"]
    exact = in_dtype(ref, torch.float64)(pix.double(), masks.double())["vision_features"]
    assert_lowp_parity(got.double(), naive.double(), exact)
