"""pytest-benchmark: SAM 2 video propagation compiled, sam2's own compiled predictor vs fast.

The comparison point beyond the eager reference of test_bench_video.py: sam2's
`build_sam2_video_predictor(vos_optimized=True)`, a `SAM2VideoPredictorVOS` whose image
encoder, memory attention, memory encoder, prompt encoder and mask decoder sam2 compiles
with `torch.compile(mode="max-autotune")` (impl "reference", under bf16 autocast as its users
run it), against the fast path compiled (`FastConfig(dtype=bfloat16, compile=MODE)`, impl
"fast"; MODE from FASTSAM_BENCH_VIDEO_COMPILE, default "default"). The same video, prompts
and timing as test_bench_video.py (one `propagate_in_video` after prompting every object
with a point on frame 0), for 1, 8 and 16 objects. Each predictor is built and compiled once
for the file; `extra_info["compile_s"]` is its first `init_state`, prompt and propagation of
one object (the compilation included), before its cases: cold only where Inductor's cache
is (a fresh machine, or TORCHINDUCTOR_CACHE_DIR set to an empty folder).

- CUDA: sam2.1 hiera_b+ at 1024 px, 16 frames, bf16 (minutes of compilation: the runner
  starts it last).
- CPU: skipped, unless FASTSAM_BENCH_COMPILED_VIDEO=1: then test_bench_video.py's CPU size
  (hiera_t, 256 px, 4 frames) in fp32, 1 object (Inductor's compilation on 2 cores takes
  minutes).

    pytest bench/test_bench_video_compiled.py --benchmark-only
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import pytest
import torch
from sam2.build_sam import build_sam2_video_predictor
from sam2.sam2_video_predictor import SAM2VideoPredictorVOS

import fastsam_core
from bench.common import DEVICE, fail_on_fallbacks, record, repeats
from bench.test_bench_video import FRAMES, IMAGE_SIZE, MODEL, memory_in_fp32, write_video
from fastsam_core import FastConfig
from fastsam_core.benchmark import synchronize
from fastsam_core.models.convert import dtype_name

CUDA = DEVICE.type == "cuda"
MODE = os.environ.get("FASTSAM_BENCH_VIDEO_COMPILE", "default")
OBJECTS = (1, 8, 16) if CUDA else (1,)
DTYPE = torch.bfloat16 if CUDA else torch.float32


def propagate(predictor, autocast, path: str, centres: np.ndarray, objects: int):
    """An inference state with `objects` objects prompted on frame 0, and a function that
    propagates them once over the whole video."""
    with torch.inference_mode(), autocast():
        state = predictor.init_state(path)
        for k in range(objects):
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=k,
                                            points=centres[k : k + 1].astype(np.float32),
                                            labels=np.array([1], np.int32))
    synchronize(DEVICE)

    def run(impl: str):
        with torch.inference_mode(), autocast():
            for _ in range(repeats(impl)):
                for _ in predictor.propagate_in_video(state):
                    pass
        synchronize(DEVICE)

    return state, run


def compiled(impl: str, video_dir):
    """(predictor, autocast, compile_s) of a case, its compilation done by one propagation."""
    overrides = [] if IMAGE_SIZE == 1024 else [f"++model.image_size={IMAGE_SIZE}"]
    predictor = build_sam2_video_predictor(f"configs/sam2.1/sam2.1_{MODEL}.yaml", None,
                                           device=DEVICE, hydra_overrides_extra=overrides,
                                           vos_optimized=impl == "reference")
    if impl == "fast":
        fastsam_core.optimize(predictor, FastConfig(dtype=DTYPE, compile=MODE))
        autocast = contextlib.nullcontext
    else:
        assert isinstance(predictor, SAM2VideoPredictorVOS)
        if CUDA:
            def autocast():
                return torch.autocast("cuda", dtype=torch.bfloat16)
        else:  # fp32 on the CPU, its memories cast back to fp32 (test_bench_video.py)
            predictor.memory_attention.register_forward_pre_hook(memory_in_fp32,
                                                                 with_kwargs=True)
            autocast = contextlib.nullcontext
    start = time.perf_counter()
    propagate(predictor, autocast, *video_dir, objects=1)[1](impl)
    return predictor, autocast, time.perf_counter() - start


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("bench_video_compiled"))


@pytest.fixture(scope="module", params=["reference", "fast"])
def case(request, video_dir):
    if not CUDA and os.environ.get("FASTSAM_BENCH_COMPILED_VIDEO") != "1":
        pytest.skip("compiled video: CUDA, or the CPU with FASTSAM_BENCH_COMPILED_VIDEO=1")
    torch._dynamo.reset()
    return (request.param, *compiled(request.param, video_dir))


@pytest.mark.parametrize("objects", OBJECTS)
def test_compiled_video_propagation(benchmark, video_dir, case, objects):
    impl, predictor, autocast, compile_s = case
    group = f"sam2 video {MODEL}-{IMAGE_SIZE} {objects} obj compiled"
    benchmark.group = group

    def setup():
        state, run = propagate(predictor, autocast, *video_dir, objects=objects)
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        return (run,), {}

    # a warm-up round also on the CPU: sam2's memory attention recompiles on the first
    # propagation after the one that compiled it (seen here with TORCH_LOGS=recompiles)
    benchmark.pedantic(lambda run: run(impl), setup=setup, rounds=2 if CUDA else 1,
                       warmup_rounds=1, iterations=1)
    if impl == "fast":
        fail_on_fallbacks(predictor, impl)
    extra = {"peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20} if CUDA else {}
    record(benchmark, group, impl, items=FRAMES, model=f"sam2.1 {MODEL}", image_size=IMAGE_SIZE,
           frames=FRAMES, objects=objects, dtype=dtype_name(DTYPE),
           predictor=type(predictor).__name__,
           compile="max-autotune (sam2's)" if impl == "reference" else MODE,
           compile_s=compile_s, **extra)
