"""pytest-benchmark: memory of a long SAM 2 video session, reference vs fast.

One `propagate_in_video` of one object (prompted with a point on frame 0) over a long
synthetic video; `extra_info` holds what the session keeps: `frames_mib` (the video frames of
the inference state), `memories_mib` (every stored per-frame output: memory features, masks,
pointers) and, on CUDA, `peak_mem_mib` (peak allocated device memory over init_state and the
propagation), with `img_s` the frames per second of the propagation.

- CUDA: sam2.1 hiera_b+ at 1024 px, 200 frames (the issue's long-video case); the reference
  under bf16 autocast, the fast path in bf16, and the fast path with
  `init_state(offload_video_to_cpu=True)` (frames on the host, one on the device at a time).
- CPU: hiera_t at 256 px, 8 frames, fp32 (the CPU cannot run the real case in a test's time).
- CPU with FASTSAM_BENCH_LONG_VIDEO=full: the CUDA case (hiera_b+, 1024 px, 200 frames,
  bf16; the reference under CPU bf16 autocast) without the offload case, about 25 minutes
  per case on 2 cores. `extra_info` then holds `peak_rss_mib`, the process's resident set
  sampled every 10 ms over init_state and the propagation (model, libraries and allocator
  caches included), and `rss_at_start_mib` before them. Memory a case frees may stay
  resident, so run each case in its own process (`-k reference`, `-k "fast"`).
- CPU with FASTSAM_BENCH_LONG_VIDEO=init (or full): `test_init_state_memory` alone at that
  size, `init_state` only (the frames loaded, frame 0 encoded), a few minutes per case:
  `peak_rss_mib` over it, against `rss_at_start_mib`, and `frames_mib`. Again one case per
  process (`-k "init_state_memory and jpeg-reference"`, `-k "... and jpeg-async-fast"`, and
  so on). `source` is the video's form: the JPEG folder (`jpeg-async`: with
  `async_loading_frames=True`, measured until the loader's thread has loaded every frame),
  or the same frames as an MP4 file (read with decord).

    pytest bench/test_bench_video_memory.py --benchmark-only
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import fastsam_core
from bench.common import DEVICE, fail_on_fallbacks, record
from bench.test_bench_video import build, memory_in_fp32
from fastsam_core import FastConfig
from fastsam_core.benchmark import synchronize
from fastsam_core.models.convert import dtype_name

CUDA = DEVICE.type == "cuda"
LONG_VIDEO = os.environ.get("FASTSAM_BENCH_LONG_VIDEO", "")
FULL = CUDA or LONG_VIDEO in ("full", "init")
if FULL:
    MODEL, IMAGE_SIZE, FRAMES, DTYPE = "hiera_b+", 1024, 200, torch.bfloat16
else:
    MODEL, IMAGE_SIZE, FRAMES, DTYPE = "hiera_t", 256, 8, torch.float32
SIDE = 512  # frames on disk; the loader resizes them to IMAGE_SIZE


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """A disc circling over a striped background."""
    root = tmp_path_factory.mktemp("long_video")
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for i in range(FRAMES):
        img = np.full((SIDE, SIDE, 3), 40, np.uint8)
        img[(xx // 16) % 2 == 0] = (60, 60, 70)
        cx, cy = SIDE / 2 + SIDE / 4 * np.cos(i / 20), SIDE / 2 + SIDE / 4 * np.sin(i / 20)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (SIDE / 12) ** 2] = (200, 80, 60)
        Image.fromarray(img).save(root / f"{i:05d}.jpg", quality=90)
    return str(root), np.array([[SIDE / 2 + SIDE / 4, SIDE / 2]], np.float32)


@pytest.fixture(scope="module")
def long_video_file(long_video, tmp_path_factory):
    """The long video's frames as an MP4 file, which sam2 reads with decord."""
    pytest.importorskip("decord", reason="sam2 reads video files with decord")
    cv2 = pytest.importorskip("cv2")
    folder, _ = long_video
    path = str(tmp_path_factory.mktemp("long_video_file") / "video.mp4")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 24, (SIDE, SIDE))
    if not writer.isOpened():
        pytest.skip("this OpenCV cannot write mp4v video")
    for name in sorted(os.listdir(folder)):
        writer.write(cv2.imread(os.path.join(folder, name)))  # BGR in, BGR out
    writer.release()
    return path


def tensor_mib(*trees: object) -> float:
    """MiB held by the tensors in nested dicts / lists (each storage counted once)."""
    seen, total, stack = set(), 0, list(trees)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            key = (item.untyped_storage().data_ptr(), item.device)
            if key not in seen:
                seen.add(key)
                total += item.untyped_storage().nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total / 2**20


class PeakRss:
    """The largest resident set size of this process between `start()` and `stop()`, in MiB,
    sampled by a thread every `interval` seconds (Linux /proc); `start_mib` is the size at
    `start()`."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.start_mib, self.peak_mib = interval, 0.0, 0.0
        self._stop = threading.Event()

    @staticmethod
    def resident_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak_mib = max(self.peak_mib, self.resident_mib())

    def start(self):
        self.start_mib = self.peak_mib = self.resident_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.resident_mib())


CASES = ["reference", "fast"] + (["fast-offload"] if CUDA else [])


def predictor_for(impl: str):
    """The case's predictor and the autocast it runs under: the fast ones in DTYPE; the
    reference under bf16 autocast at full size, else in fp32 with its memories kept fp32."""
    predictor = build(MODEL, IMAGE_SIZE)
    if impl != "reference":
        fastsam_core.optimize(predictor, FastConfig(dtype=DTYPE))
    elif FULL:
        return predictor, lambda: torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    else:
        predictor.memory_attention.register_forward_pre_hook(memory_in_fp32, with_kwargs=True)
    return predictor, contextlib.nullcontext


@pytest.mark.parametrize("impl", CASES)
def test_long_video_memory(benchmark, long_video, impl):
    if LONG_VIDEO == "init" and not CUDA:
        pytest.skip("FASTSAM_BENCH_LONG_VIDEO=init: test_init_state_memory only")
    path, point = long_video
    group = f"sam2 long video {MODEL}-{IMAGE_SIZE} {FRAMES} frames"
    benchmark.group = group
    predictor, autocast = predictor_for(impl)
    sizes = {}
    host = PeakRss() if FULL and not CUDA else None

    def setup():
        if CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if host:
            host.start()
        with torch.inference_mode(), autocast():
            state = predictor.init_state(path, offload_video_to_cpu=impl == "fast-offload")
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=point,
                                            labels=np.array([1], np.int32))
        synchronize(DEVICE)
        return (state,), {}

    def run(state):
        with torch.inference_mode(), autocast():
            for _ in predictor.propagate_in_video(state):
                pass
        synchronize(DEVICE)
        sizes["frames_mib"] = tensor_mib(state["images"])
        sizes["memories_mib"] = tensor_mib(state["output_dict_per_obj"])
        if host:
            host.stop()

    benchmark.pedantic(run, setup=setup, rounds=1, iterations=1)
    if impl != "reference":
        fail_on_fallbacks(predictor, impl)
    if CUDA:
        sizes["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if host:
        sizes.update(peak_rss_mib=host.peak_mib, rss_at_start_mib=host.start_mib)
    record(benchmark, group, impl, items=FRAMES, model=f"sam2.1 {MODEL}", image_size=IMAGE_SIZE,
           frames=FRAMES, objects=1, dtype=dtype_name(DTYPE),
           offload_video_to_cpu=impl == "fast-offload", **sizes)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("source", ["jpeg", "jpeg-async", "mp4"])
def test_init_state_memory(benchmark, request, source, impl):
    """Host memory of `init_state` alone, where the frames are loaded (CPU, full size)."""
    if CUDA or not FULL:
        pytest.skip("host memory of init_state: CPU with FASTSAM_BENCH_LONG_VIDEO=init / full")
    path = request.getfixturevalue("long_video_file") if source == "mp4" \
        else request.getfixturevalue("long_video")[0]
    group = f"sam2 init_state {MODEL}-{IMAGE_SIZE} {FRAMES} frames ({source})"
    benchmark.group = group
    predictor, autocast = predictor_for(impl)
    host, sizes = PeakRss(), {}

    def run():
        host.start()
        with torch.inference_mode(), autocast():
            state = predictor.init_state(path, async_loading_frames=source == "jpeg-async")
        images = state["images"]
        if source == "jpeg-async":  # sam2's loader and the fast one: a thread, a frame list
            images.thread.join()
            images = images.images
        host.stop()
        sizes["frames_mib"] = tensor_mib(images)

    benchmark.pedantic(run, rounds=1, iterations=1)
    if impl != "reference":
        fail_on_fallbacks(predictor, impl)
    record(benchmark, group, impl, model=f"sam2.1 {MODEL}", image_size=IMAGE_SIZE,
           frames=FRAMES, source=source, dtype=dtype_name(DTYPE),
           peak_rss_mib=host.peak_mib, rss_at_start_mib=host.start_mib, **sizes)
