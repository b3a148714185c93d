"""pytest-benchmark: loading a video's JPEG frames, reference vs fast.

The reference is sam2's `load_video_frames` (what `SAM2VideoPredictor.init_state` runs: the
whole video in fp32, one frame after the other); the fast case is
`pipelines.video_frames.load_jpeg_frames` in bf16 (what the fast `init_state` runs with a
bf16 encoder: frames decoded in threads, normalized and rounded one by one). Both on the
host, to the model's 1024 px from 1280 x 720 JPEGs; `img_s` is frames loaded per second.
On CUDA 64 frames, on the CPU 16.

    pytest bench/test_bench_video_frames.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.utils.misc import load_video_frames

from bench.common import DEVICE, record
from fastsam_core.pipelines.video_frames import load_jpeg_frames

FRAMES = 64 if DEVICE.type == "cuda" else 16
IMAGE_SIZE, HEIGHT, WIDTH = 1024, 720, 1280


@pytest.fixture(scope="module")
def jpeg_video(tmp_path_factory):
    """Smooth gradients with a moving disc: JPEGs of a realistic size to decode."""
    root = tmp_path_factory.mktemp("frames")
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    for i in range(FRAMES):
        img = np.stack([xx * 255 // WIDTH, yy * 255 // HEIGHT, (xx + yy + 8 * i) % 256], -1)
        img[(yy - 360) ** 2 + (xx - 200 - 10 * i) ** 2 < 80**2] = (200, 80, 60)
        Image.fromarray(img.astype(np.uint8)).save(root / f"{i:05d}.jpg", quality=90)
    return str(root)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_frame_loading(benchmark, jpeg_video, impl):
    group = f"video frames {FRAMES} x {WIDTH}x{HEIGHT} jpeg -> {IMAGE_SIZE}"
    benchmark.group = group
    cpu = torch.device("cpu")

    def run():
        if impl == "reference":
            return load_video_frames(jpeg_video, IMAGE_SIZE, offload_video_to_cpu=True)
        return load_jpeg_frames(jpeg_video, IMAGE_SIZE, torch.bfloat16, cpu)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    record(benchmark, group, impl, items=FRAMES, frames=FRAMES, image_size=IMAGE_SIZE,
           dtype="float32" if impl == "reference" else "bfloat16")
