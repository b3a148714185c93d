"""pytest-benchmark: SAM 2 video propagation, reference vs fast.

One `propagate_in_video` over a synthetic video after prompting every object with a point on
frame 0 (the prompting is not timed; each round starts from a fresh inference state), for
several object counts; with `staggered`, odd objects are prompted on frame 1 instead, so
their memory banks differ from the others' (the fast path batches them through padded banks
and a key mask). `img_s` in extra_info is frames per second of video (every object
tracked on each frame); on CUDA `peak_mem_mib` is the peak allocated device memory.

- CUDA: sam2.1 hiera_b+ at 1024 px, 16 frames, 1 / 4 / 8 / 16 objects (staggered: 8); the
  reference runs as its users run it, under bf16 autocast; the fast path is
  `optimize(FastConfig(dtype=bfloat16))`, eager (compiled: test_bench_video_compiled.py,
  against sam2's own compiled predictor).
- CPU: hiera_t at 256 px, 4 frames, 1 and 4 objects (staggered: 4), fp32 (the reference with
  its memories cast back to fp32, as tests/pipelines/test_video.py does).

    pytest bench/test_bench_video.py --benchmark-only
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.build_sam import build_sam2_video_predictor

import fastsam_core
from bench.common import DEVICE, fail_on_fallbacks, record, repeats
from fastsam_core import FastConfig
from fastsam_core.benchmark import synchronize
from fastsam_core.models.convert import dtype_name

CUDA = DEVICE.type == "cuda"
if CUDA:
    MODEL, IMAGE_SIZE, FRAMES, DTYPE = "hiera_b+", 1024, 16, torch.bfloat16
    OBJECTS, STAGGERED = (1, 4, 8, 16), (8,)
else:
    MODEL, IMAGE_SIZE, FRAMES, DTYPE = "hiera_t", 256, 4, torch.float32
    OBJECTS, STAGGERED = (1, 4), (4,)
SIDE = 256  # frames on disk; the loader resizes them to IMAGE_SIZE


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("bench_video"))


def write_video(root: Path) -> tuple[str, np.ndarray]:
    """FRAMES JPEG frames in `root`, discs drifting over a striped background, one per object
    slot: (the folder, the discs' centres on frame 0, objects x 2)."""
    yy, xx = np.mgrid[:SIDE, :SIDE]
    rng = np.random.default_rng(0)
    centres = rng.uniform(40, SIDE - 40, size=(max(OBJECTS), 2))
    for i in range(FRAMES):
        img = np.full((SIDE, SIDE, 3), 40, np.uint8)
        img[(xx // 8) % 2 == 0] = (60, 60, 70)
        for k, (cx, cy) in enumerate(centres):
            disc = (yy - cy) ** 2 + (xx - cx - 2 * i) ** 2 < 14**2
            img[disc] = (40 + 13 * k % 200, 200 - 11 * k % 150, 90)
        Image.fromarray(img).save(root / f"{i:05d}.jpg", quality=95)
    return str(root), centres


def build(model: str = MODEL, image_size: int = IMAGE_SIZE):
    overrides = [] if image_size == 1024 else [f"++model.image_size={image_size}"]
    return build_sam2_video_predictor(f"configs/sam2.1/sam2.1_{model}.yaml", None,
                                      device=DEVICE, hydra_overrides_extra=overrides)


def memory_in_fp32(module, args, kwargs):
    kwargs["memory"] = kwargs["memory"].float()
    return args, kwargs


@pytest.mark.parametrize("staggered", [False, True], ids=["frame0", "staggered"])
@pytest.mark.parametrize("objects", OBJECTS)
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_video_propagation(benchmark, video_dir, objects, impl, staggered):
    if staggered and objects not in STAGGERED:
        pytest.skip(f"staggered prompts: {STAGGERED} objects only")
    path, centres = video_dir
    group = f"sam2 video {MODEL}-{IMAGE_SIZE} {objects} obj{' staggered' if staggered else ''}"
    benchmark.group = group
    predictor = build()
    if impl == "fast":
        fastsam_core.optimize(predictor, FastConfig(dtype=DTYPE))
        autocast = contextlib.nullcontext
    elif CUDA:
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        predictor.memory_attention.register_forward_pre_hook(memory_in_fp32, with_kwargs=True)
        autocast = contextlib.nullcontext

    def setup():
        with torch.inference_mode(), autocast():
            state = predictor.init_state(path)
            for k in range(objects):
                predictor.add_new_points_or_box(
                    state, frame_idx=k % 2 if staggered else 0, obj_id=k,
                    points=centres[k : k + 1].astype(np.float32), labels=np.array([1], np.int32))
        synchronize(DEVICE)
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        return (state,), {}

    def run(state):
        with torch.inference_mode(), autocast():
            for _ in range(repeats(impl)):
                for _ in predictor.propagate_in_video(state):
                    pass
        synchronize(DEVICE)

    # two rounds on CUDA: the reference tracks objects one by one, so 16 objects x 16 frames
    # at design.md's ~14 frames/s for one object is ~18 s a round: keep the runner's budget
    benchmark.pedantic(run, setup=setup, rounds=2 if CUDA else 1, warmup_rounds=1 if CUDA else 0,
                       iterations=1)
    if impl == "fast":
        fail_on_fallbacks(predictor, impl)
    extra = {"peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20} if CUDA else {}
    record(benchmark, group, impl, items=FRAMES, model=f"sam2.1 {MODEL}", image_size=IMAGE_SIZE,
           frames=FRAMES, objects=objects, staggered=staggered,
           dtype=dtype_name(DTYPE), **extra)
