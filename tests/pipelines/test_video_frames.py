"""Video frames in the compute dtype (`pipelines.video_frames`): equal to sam2's fp32 frames
rounded, and loaded without an fp32 copy of the video in memory."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import sam2.sam2_video_predictor as sam2_video_predictor
import torch
from PIL import Image
from sam2.utils.misc import load_video_frames

from fastsam_core.pipelines.video_frames import (
    IMG_MEAN,
    IMG_STD,
    AsyncJpegFrames,
    frames_in,
    frames_loaded_in,
    is_video_file,
    load_jpeg_frames,
    load_video_file_frames,
)


@pytest.fixture(scope="module")
def jpeg_video(tmp_path_factory):
    """64 small noisy JPEG frames, 48 x 64 (sam2 resizes them to the model's size)."""
    root = tmp_path_factory.mktemp("jpegs")
    gen = np.random.default_rng(0)
    for i in range(64):
        image = gen.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / f"{i}.jpg", quality=90)  # unpadded names sort too
    return str(root)


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    """The same kind of video as an MP4 file (48 x 64, 128 frames), written with OpenCV."""
    pytest.importorskip("decord", reason="sam2 reads video files with decord")
    cv2 = pytest.importorskip("cv2")
    path = str(tmp_path_factory.mktemp("mp4") / "video.mp4")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 24, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV cannot write mp4v video")
    gen = np.random.default_rng(1)
    for _ in range(128):
        writer.write(gen.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    return path


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM": the peak), in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the resident-set high-water mark to the current RSS
    except OSError as err:
        pytest.skip(f"cannot reset the peak resident set here: {err}")


@pytest.mark.parametrize("dtype, workers", [(torch.bfloat16, None), (torch.float16, 1),
                                            (torch.bfloat16, 5)])
def test_jpeg_frames_equal_the_reference_frames_rounded(jpeg_video, dtype, workers):
    """In frame order whatever the number of reader threads."""
    frames, height, width = load_jpeg_frames(jpeg_video, 96, dtype, torch.device("cpu"),
                                             workers)
    reference, ref_height, ref_width = load_video_frames(jpeg_video, 96, True)
    assert (height, width) == (ref_height, ref_width) == (48, 64)
    assert frames.dtype == dtype and frames.shape == reference.shape == (64, 3, 96, 96)
    assert torch.equal(frames, reference.to(dtype))


def test_jpeg_frames_never_hold_the_fp32_video(jpeg_video):
    """Peak resident memory while loading 64 frames at 512 px in bf16 (100 MiB) stays well
    under the bf16 frames plus an fp32 copy (300 MiB): the frames are converted one by one."""
    size = 512
    bf16_bytes, fp32_bytes = 64 * 3 * size * size * 2, 64 * 3 * size * size * 4
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    frames, _, _ = load_jpeg_frames(jpeg_video, size, torch.bfloat16, torch.device("cpu"))
    growth = _status_bytes("VmHWM") - before
    assert frames.numel() * 2 == bf16_bytes
    assert growth < bf16_bytes + fp32_bytes // 2, (growth / 2**20, "MiB")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_normalization_rounds_as_the_float64_one(dtype):
    """Every value a JPEG frame can hold (k / 255 in each channel), normalized as sam2's
    asynchronous loader does it (float64, then rounded to fp32 by the predictor) and as
    `normalized_frame` does it (fp32), rounds to the same `dtype` value, though the two
    differ in fp32: why AsyncJpegFrames may normalize in fp32."""
    k = (torch.arange(256, dtype=torch.float64) / 255.0).expand(3, 256)  # sam2's reader
    mean = torch.tensor(IMG_MEAN, dtype=torch.float32)[:, None]  # as sam2 makes them
    std = torch.tensor(IMG_STD, dtype=torch.float32)[:, None]
    via_float64 = ((k - mean) / std).float()  # float64 arithmetic (type promotion)
    via_fp32 = (k.float() - mean) / std
    assert not torch.equal(via_float64, via_fp32)
    assert torch.equal(via_float64.to(dtype), via_fp32.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_async_jpeg_frames_equal_the_reference_async_frames_rounded(jpeg_video, dtype):
    """Each frame equals what sam2's asynchronous loader gives the image encoder (its
    float64 frame rounded to fp32 by the predictor) rounded, also a frame asked for before
    the background thread reached it; the loaded video holds `dtype` frames where sam2's
    holds float64 ones."""
    cpu = torch.device("cpu")
    frames = AsyncJpegFrames(jpeg_video, 96, dtype, cpu)
    late = frames[63]  # likely not loaded by the thread yet: loaded on demand
    reference, ref_height, ref_width = load_video_frames(
        jpeg_video, 96, True, async_loading_frames=True, compute_device=cpu)
    frames.thread.join()
    reference.thread.join()
    assert (frames.video_height, frames.video_width) == (ref_height, ref_width) == (48, 64)
    assert len(frames) == len(reference) == 64 and frames[63] is late
    assert all(image is not None for image in frames.images)
    assert reference[0].dtype == torch.float64
    for i in range(64):
        assert frames[i].dtype == dtype and frames[i].shape == (3, 96, 96)
        assert torch.equal(frames[i], reference[i].float().to(dtype)), i


def test_async_jpeg_frames_raise_the_threads_failure(tmp_path):
    """A frame the background thread cannot read fails the next frame asked for, as in
    sam2's loader (RuntimeError, from the reader's error)."""
    for i in range(3):
        Image.new("RGB", (16, 12), (i, 2 * i, 3 * i)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "3.jpg").write_bytes(b"not a jpeg")
    frames = AsyncJpegFrames(str(tmp_path), 32, torch.bfloat16, torch.device("cpu"))
    frames.thread.join()
    with pytest.raises(RuntimeError, match="Failure in frame loading thread") as caught:
        frames[1]
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_video_file_frames_equal_the_reference_frames_rounded(video_file, dtype):
    frames, height, width = load_video_file_frames(video_file, 96, dtype, torch.device("cpu"))
    reference, ref_height, ref_width = load_video_frames(video_file, 96, True)
    assert (height, width) == (ref_height, ref_width) == (48, 64)
    assert frames.dtype == dtype and frames.shape == reference.shape == (128, 3, 96, 96)
    assert torch.equal(frames, reference.to(dtype))


def test_video_file_frames_never_hold_the_fp32_video(video_file):
    """128 frames at 512 px in bf16 (192 MiB), never with their fp32 copy (768 MiB, which
    sam2's loader makes after stacking the uint8 frames): under the bf16 frames, the uint8
    video (96 MiB; decord may buffer every decoded frame ahead of its reader) and a quarter
    of the fp32 copy for decord's own buffers (about 100 MiB here)."""
    size = 512
    uint8_bytes = 128 * 3 * size * size
    bf16_bytes, fp32_bytes = 2 * uint8_bytes, 4 * uint8_bytes
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    frames, _, _ = load_video_file_frames(video_file, size, torch.bfloat16,
                                          torch.device("cpu"))
    growth = _status_bytes("VmHWM") - before
    assert frames.numel() * 2 == bf16_bytes
    assert growth < bf16_bytes + uint8_bytes + fp32_bytes // 4, (growth / 2**20, "MiB")


def test_video_file_without_decord_names_the_argument(monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord: ImportError
    with pytest.raises(ModuleNotFoundError, match=r"video_path='clip.mp4'.*needs decord"):
        load_video_file_frames("clip.mp4", 64, torch.bfloat16, torch.device("cpu"))


def test_missing_frames_are_named(tmp_path):
    with pytest.raises(RuntimeError, match="no images found in"):
        load_jpeg_frames(str(tmp_path), 64, torch.bfloat16, torch.device("cpu"))


def test_other_threads_keep_the_reference_loader_meanwhile(jpeg_video):
    """While a fast init_state loads its frames in bf16 (the swapped loader), a predictor in
    another thread (a reference one, say) starting a session meanwhile gets sam2's fp32
    frames, not bf16 ones."""
    cpu = torch.device("cpu")
    other = {}

    def other_init_state():  # the call SAM2VideoPredictor.init_state makes
        other["frames"] = sam2_video_predictor.load_video_frames(
            video_path=jpeg_video, image_size=96, offload_video_to_cpu=True,
            async_loading_frames=False, compute_device=cpu)[0]

    with frames_loaded_in(torch.bfloat16, cpu):
        own = sam2_video_predictor.load_video_frames(jpeg_video, 96, True)[0]
        thread = threading.Thread(target=other_init_state)
        thread.start()
        thread.join()
    reference = load_video_frames(jpeg_video, 96, True)[0]
    assert own.dtype == torch.bfloat16 and torch.equal(own, reference.bfloat16())
    assert other["frames"].dtype == torch.float32 and torch.equal(other["frames"], reference)
    assert sam2_video_predictor.load_video_frames is load_video_frames  # swapped back


def test_a_callers_own_frame_loader_runs_unchanged(jpeg_video, monkeypatch):
    """A pipeline that put its own loader under the name init_state calls keeps it: the
    block neither bypasses it nor changes what it returns."""
    calls = []

    def own_loader(*args, **kwargs):
        calls.append(args)
        return load_video_frames(*args, **kwargs)

    monkeypatch.setattr(sam2_video_predictor, "load_video_frames", own_loader)
    with frames_loaded_in(torch.bfloat16, torch.device("cpu")):
        frames = sam2_video_predictor.load_video_frames(jpeg_video, 96, True)[0]
    assert calls == [(jpeg_video, 96, True)]
    assert frames.dtype == torch.float32
    assert torch.equal(frames, load_video_frames(jpeg_video, 96, True)[0])
    assert sam2_video_predictor.load_video_frames is own_loader


@pytest.mark.cuda
def test_async_jpeg_frames_on_the_gpu(jpeg_video):
    """Frames written to the GPU from the background thread equal the CPU ones."""
    frames = AsyncJpegFrames(jpeg_video, 96, torch.bfloat16, torch.device("cuda"))
    frames.thread.join()
    on_cpu = load_jpeg_frames(jpeg_video, 96, torch.bfloat16, torch.device("cpu"))[0]
    assert all(frames[i].device.type == "cuda" for i in range(len(frames)))
    assert torch.equal(torch.stack([frames[i] for i in range(len(frames))]).cpu(), on_cpu)


@pytest.mark.cuda
def test_frames_reach_the_gpu_without_an_fp32_copy_there():
    """CUDA: moving 64 host fp32 frames to the GPU in bf16 allocates the bf16 frames plus at
    most a chunk's temporary on the device, never the fp32 video (200 MiB here)."""
    frames = torch.randn(64, 3, 512, 512)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = frames_in(frames, torch.bfloat16, torch.device("cuda"), chunk=8)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    chunk_fp32 = frames[:8].numel() * 4
    assert peak <= out.numel() * 2 + chunk_fp32, (peak, frames.numel() * 4)
    assert torch.equal(out.cpu(), frames.bfloat16())


def test_frames_in_copies_in_chunks():
    frames = torch.randn(11, 3, 4, 4)
    out = frames_in(frames, torch.float16, torch.device("cpu"), chunk=4)
    assert out.dtype == torch.float16 and torch.equal(out, frames.half())


def test_other_normalizations_get_the_reference_frames_rounded(jpeg_video):
    """A mean and std other than init_state's go through sam2's loader (the fast JPEG reader
    normalizes with init_state's only): frames normalized as asked, then rounded."""
    cpu = torch.device("cpu")
    mean, std = (0.5, 0.25, 0.75), (0.125, 0.5, 0.25)
    with frames_loaded_in(torch.bfloat16, cpu):
        frames, height, width = sam2_video_predictor.load_video_frames(
            jpeg_video, 96, True, img_mean=mean, img_std=std, compute_device=cpu)
    reference, ref_height, ref_width = load_video_frames(jpeg_video, 96, True, img_mean=mean,
                                                         img_std=std)
    assert (height, width) == (ref_height, ref_width) == (48, 64)
    assert frames.dtype == torch.bfloat16 and torch.equal(frames, reference.bfloat16())


def test_async_loading_answers_the_video_size_at_once(jpeg_video):
    """init_state(..., async_loading_frames=True) takes the video's height and width from the
    loader's answer, before the background thread has run: like sam2's loader, the block's
    loads frame 0 first and answers its size, with frame 0 in place."""
    cpu = torch.device("cpu")
    with frames_loaded_in(torch.bfloat16, cpu):
        frames, height, width = sam2_video_predictor.load_video_frames(
            jpeg_video, 96, True, async_loading_frames=True, compute_device=cpu)
        assert (height, width) == (48, 64)
        assert frames.images[0] is not None
    frames.thread.join()
    reference = load_video_frames(jpeg_video, 96, True, async_loading_frames=True,
                                  compute_device=cpu)[0]
    reference.thread.join()
    assert isinstance(frames, AsyncJpegFrames)
    assert torch.equal(frames[0], reference[0].float().bfloat16())


@pytest.mark.parametrize("video_path, expected", [
    (b"\x00\x00\x00\x18ftypmp42", True), ("clip.mp4", True), ("CLIP.MP4", True),
    ("clip.avi", False), ("frames", False), ("frames/0.jpg", False), (None, False),
])
def test_video_file_paths_are_those_sam2_reads_as_video(video_path, expected):
    """As sam2's `load_video_frames` decides: bytes, or a path ending in .mp4 / .MP4."""
    assert is_video_file(video_path) is expected


def test_jpeg_reader_holds_at_most_workers_plus_one_frames(jpeg_video, monkeypatch):
    """Decoded frames wait for their turn at most `workers` + 1 at a time, however fast
    they decode: each worker starts a frame only once the frames more than `workers` ahead
    of it are stored (an instant stand-in decoder; the real one rarely runs ahead)."""
    import fastsam_core.pipelines.video_frames as video_frames

    stored, ahead = [], []

    class Progress:  # the tqdm bar: one update per frame stored
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            stored.append(n)

    started = []

    def instant_frame(path, image_size):
        started.append(path)
        ahead.append(len(started) - len(stored))  # decoded (this one too), not yet stored
        return np.zeros((3, image_size, image_size), np.float32), 48, 64

    monkeypatch.setattr(video_frames, "tqdm", Progress)
    monkeypatch.setattr(video_frames, "normalized_frame", instant_frame)
    workers = 2
    frames, _, _ = load_jpeg_frames(jpeg_video, 8, torch.bfloat16, torch.device("cpu"), workers)
    assert len(stored) == len(started) == frames.shape[0] == 64
    assert max(ahead) <= workers + 1, max(ahead)
