"""pytest-benchmark: SAM 2's memory attention alone, reference vs fast, with TFLOP/s.

One call as the video predictor makes it for each frame: the current frame's tokens attend
to themselves and to a full memory bank (`num_maskmem` frames of memory features and
`max_obj_ptrs_in_encoder` object pointers, each split into hidden_dim / mem_dim tokens, as
sam2 splits them), for a batch of objects. FLOPs from `fastsam_core.benchmark.
memory_attention_flops` (the projections, q k^T and the weighted sum of v).

- CUDA: sam2.1 hiera_b+ at 1024 px: 64 x 64 tokens, 7 frames + 16 pointers x 4 tokens =
  28 736 memory tokens, 1 and 8 objects; the reference under bf16 autocast (as users run
  SAM2VideoPredictor), the fast module in bf16.
- CPU: the same module on a 16 x 16 grid (256 px), fp32, 1 and 2 objects.

    pytest bench/test_bench_memory_attention.py --benchmark-only
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from sam2.build_sam import build_sam2

from bench.common import DEVICE, fail_on_fallbacks, record, repeats
from fastsam_core import FastConfig
from fastsam_core.benchmark import memory_attention_flops, synchronize
from fastsam_core.models.convert import dtype_name
from fastsam_core.models.sam2.memory_attention import FastMemoryAttention

CUDA = DEVICE.type == "cuda"
if CUDA:
    MODEL, IMAGE_SIZE, OBJECTS, DTYPE, ROUNDS = "hiera_b+", 1024, (1, 8), torch.bfloat16, 10
else:
    MODEL, IMAGE_SIZE, OBJECTS, DTYPE, ROUNDS = "hiera_t", 256, (1, 2), torch.float32, 2


@pytest.fixture(scope="module")
def model():
    overrides = [] if IMAGE_SIZE == 1024 else [f"++model.image_size={IMAGE_SIZE}"]
    return build_sam2(f"configs/sam2.1/sam2.1_{MODEL}.yaml", None, device=str(DEVICE),
                      hydra_overrides_extra=overrides)


def full_bank_inputs(model, objects: int) -> dict:
    """curr / curr_pos HW x B x hidden_dim, memory / memory_pos M x B x mem_dim for a full
    bank; random values (the cost does not depend on them)."""
    side = IMAGE_SIZE // 16
    hw = side * side
    pointers = model.max_obj_ptrs_in_encoder * (model.hidden_dim // model.mem_dim)
    m = model.num_maskmem * hw + pointers
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, generator=gen)

    return dict(curr=randn(hw, objects, model.hidden_dim), memory=randn(m, objects, model.mem_dim),
                curr_pos=randn(hw, objects, model.hidden_dim),
                memory_pos=randn(m, objects, model.mem_dim), num_obj_ptr_tokens=pointers)


@pytest.mark.parametrize("objects", OBJECTS)
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_memory_attention(benchmark, model, objects, impl):
    group = f"sam2 memory_attention {MODEL}-{IMAGE_SIZE} {objects} obj"
    benchmark.group = group
    inputs = full_bank_inputs(model, objects)
    hw, m = inputs["curr"].shape[0], inputs["memory"].shape[0]
    if impl == "fast":
        module = FastMemoryAttention.from_reference(model.memory_attention, FastConfig(),
                                                    DTYPE).eval()
        autocast = contextlib.nullcontext
    else:
        module = model.memory_attention
        if CUDA:
            def autocast():
                return torch.autocast("cuda", dtype=torch.bfloat16)
        else:
            autocast = contextlib.nullcontext

    def run():
        with torch.inference_mode(), autocast():
            for _ in range(repeats(impl)):
                module(**inputs)
        synchronize(DEVICE)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if impl == "fast":
        fail_on_fallbacks(module, impl)
    record(benchmark, group, impl, items=objects,
           flops=memory_attention_flops(model.memory_attention, hw, m, objects),
           model=f"sam2.1 {MODEL}", image_size=IMAGE_SIZE, objects=objects,
           memory_tokens=m, dtype=dtype_name(DTYPE))
