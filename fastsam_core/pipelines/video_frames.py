"""A video's frames in the fast image encoder's dtype, without an fp32 copy of the video.

`SAM2VideoPredictor.init_state` loads every frame into one fp32 tensor (sam2's
`load_video_frames`: resized to the model's size, divided by 255, normalized by the ImageNet
mean and std). A bf16 / fp16 encoder rounds its input to its dtype anyway, so the fast
predictor keeps the frames in that dtype: `frames_loaded_in(dtype, device)` makes
`init_state` load a JPEG folder frame by frame (a few frames decoded at once, in threads),
each frame computed in fp32 exactly as the reference computes it and then rounded, so
neither the host nor the device ever holds the fp32 video. With `async_loading_frames`,
the folder's frames are loaded as sam2's `AsyncVideoFrameLoader` loads them (frame 0 at
once, the rest in a background thread, any frame on demand), rounded the same way
(`AsyncJpegFrames`). A video file (an MP4 path, or bytes as sam2 allows) is decoded frame by
frame with decord, sam2's own video reader, in the same way. Anything else (other
normalizations, which `init_state` never asks for) goes through the reference loader on the
host, synchronously, and reaches the device a few frames at a time (`frames_in`).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import sam2.sam2_video_predictor as sam2_video_predictor
import torch
from sam2.utils.misc import load_video_frames
from tqdm import tqdm

try:  # sam2's per-frame reader (private): without it the reference loader runs
    from sam2.utils.misc import _load_img_as_tensor
except ImportError:  # pragma: no cover - a sam2 that renamed it
    _load_img_as_tensor = None

JPEG_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")  # the frames sam2 reads from a folder
VIDEO_SUFFIXES = (".mp4", ".MP4")  # the paths sam2 reads as a video file
_DEFAULTS = inspect.signature(load_video_frames).parameters
IMG_MEAN = _DEFAULTS["img_mean"].default  # what init_state normalizes with
IMG_STD = _DEFAULTS["img_std"].default
_PATCH_LOCK = threading.Lock()  # one init_state at a time swaps the predictor's loader


def frames_in(frames: torch.Tensor, dtype: torch.dtype, device: torch.device,
              chunk: int = 8) -> torch.Tensor:
    """N x 3 x S x S frames in `dtype` on `device`, copied `chunk` frames at a time, so that
    whatever temporary a copy that changes device and dtype makes holds a few frames only."""
    out = torch.empty(frames.shape, dtype=dtype, device=device)
    for start in range(0, frames.shape[0], chunk):
        out[start:start + chunk].copy_(frames[start:start + chunk])
    return out


def jpeg_frame_paths(folder: str) -> list[str]:
    """The folder's JPEG frames in the order sam2 reads them ("<frame index>.jpg")."""
    names = [n for n in os.listdir(folder) if os.path.splitext(n)[1] in JPEG_SUFFIXES]
    if not names:
        raise RuntimeError(f"no images found in {folder}")
    names.sort(key=lambda n: int(os.path.splitext(n)[0]))
    return [os.path.join(folder, n) for n in names]


def normalized_frame(path: str, image_size: int) -> tuple[np.ndarray, int, int]:
    """One frame as sam2's loader computes it: read and resized by sam2's reader (float64 in
    [0, 1]), rounded to fp32, minus the mean, over the std, in fp32 (numpy's and torch's
    fp32 arithmetic round alike): (3 x S x S fp32, video height, video width)."""
    frame, height, width = _load_img_as_tensor(path, image_size)  # 3 x S x S float64 view
    chw = frame.numpy().astype(np.float32, order="C")  # the fp32 frame, channels apart
    chw -= np.asarray(IMG_MEAN, dtype=np.float32)[:, None, None]
    chw /= np.asarray(IMG_STD, dtype=np.float32)[:, None, None]
    return chw, height, width


def load_jpeg_frames(folder: str, image_size: int, dtype: torch.dtype, device: torch.device,
                     workers: int | None = None) -> tuple[torch.Tensor, int, int]:
    """A JPEG folder's frames as sam2's loader makes them, in `dtype` on `device`:
    (N x 3 x image_size x image_size, video height, video width).

    `workers` threads (default: the CPU count, at most 8) compute the fp32 frames
    (`normalized_frame`: PIL and numpy release the GIL, and numpy adds no threads of its own),
    at most `workers` + 1 in flight; this thread rounds each into place in frame order."""
    paths = jpeg_frame_paths(folder)
    workers = workers or min(8, os.cpu_count() or 1)
    frames = torch.empty(len(paths), 3, image_size, image_size, dtype=dtype, device=device)
    pending: collections.deque = collections.deque()  # futures of the frames, in order
    done = 0

    def store_first() -> tuple[int, int]:
        nonlocal done
        chw, height, width = pending.popleft().result()
        frames[done].copy_(torch.from_numpy(chw))
        done += 1
        progress.update()
        return height, width

    with ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(paths), desc="frame loading (JPEG)") as progress:
        for path in paths:
            pending.append(pool.submit(normalized_frame, path, image_size))
            if len(pending) > workers:
                height, width = store_first()
        while pending:
            height, width = store_first()
    return frames, height, width


class AsyncJpegFrames:
    """A JPEG folder's frames, loaded as sam2's `AsyncVideoFrameLoader` loads them (the
    object `init_state(..., async_loading_frames=True)` stores as `state["images"]`), in
    `dtype` on `device`: frame 0 at once (it fills `video_height` and `video_width`), the
    others in one background thread, and any frame not reached yet loaded when asked for. A
    failure in the thread is raised by the next frame asked for, as sam2's loader raises it.
    Of that loader's attributes it has `images`, `img_paths`, `image_size`, `video_height`,
    `video_width`, `exception` and `thread`.

    sam2's loader keeps each frame in float64 (8 bytes per value, normalized in float64),
    which the predictor rounds to fp32 for the image encoder; here each is normalized in fp32
    (`normalized_frame`) and kept in `dtype` (2 bytes). The two round alike to bf16 and fp16
    for every value a JPEG frame can hold (k / 255, tested), though not always to fp32."""

    def __init__(self, folder: str, image_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.img_paths = jpeg_frame_paths(folder)
        self.image_size, self.dtype, self.device = image_size, dtype, device
        self.images: list[torch.Tensor | None] = [None] * len(self.img_paths)  # 3 x S x S
        self.exception: BaseException | None = None
        self.video_height = self.video_width = None
        self[0]
        self.thread = threading.Thread(target=self._load_all, daemon=True)
        self.thread.start()

    def _load_all(self) -> None:
        try:
            for index in tqdm(range(len(self.images)), desc="frame loading (JPEG)"):
                self[index]
        except Exception as err:  # handed to the next reader, as sam2 does
            self.exception = err

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.exception is not None:
            raise RuntimeError("Failure in frame loading thread") from self.exception
        image = self.images[index]
        if image is None:
            chw, self.video_height, self.video_width = normalized_frame(
                self.img_paths[index], self.image_size)
            image = torch.from_numpy(chw).to(self.device, self.dtype)
            self.images[index] = image
        return image

    def __len__(self) -> int:
        return len(self.images)


def is_video_file(video_path) -> bool:
    """Whether sam2's `load_video_frames` reads `video_path` as a video file (decord)."""
    return isinstance(video_path, bytes) or (
        isinstance(video_path, str) and os.path.splitext(video_path)[1] in VIDEO_SUFFIXES)


def load_video_file_frames(video_path, image_size: int, dtype: torch.dtype,
                           device: torch.device) -> tuple[torch.Tensor, int, int]:
    """A video file's frames as sam2's loader makes them, in `dtype` on `device`:
    (N x 3 x image_size x image_size, video height, video width).

    decord decodes and resizes the frames as it does for sam2 (which stacks them all as
    uint8 and then makes the fp32 video); here each frame is divided by 255, normalized in
    fp32 on the host, as sam2 does, and rounded into place. decord decodes ahead of its
    reader and buffers the decoded uint8 frames, the more the slower each frame is consumed
    (at most the uint8 video, which sam2's loader holds whole), so the per-frame work stays
    lean: one reused fp32 frame, computed in place."""
    try:
        import decord  # sam2's video reader, which sam2 also imports only for video files
    except ImportError as err:
        raise ModuleNotFoundError(
            f"video_path={video_path!r:.80} is a video file: reading it needs decord "
            "(pip install decord, or the fastsam-core[video] extra), as sam2's loader does; "
            "a folder of JPEG frames needs nothing more") from err
    decord.bridge.set_bridge("torch")  # as sam2 sets it: frames come as uint8 tensors
    height, width, _ = decord.VideoReader(video_path).next().shape
    reader = decord.VideoReader(video_path, width=image_size, height=image_size)
    mean = torch.tensor(IMG_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMG_STD, dtype=torch.float32)[:, None, None]
    frames = torch.empty(len(reader), 3, image_size, image_size, dtype=dtype, device=device)
    chw = torch.empty(3, image_size, image_size)  # one fp32 frame, reused: no temporaries
    count = 0
    for frame in tqdm(reader, total=len(reader), desc="frame loading (video)"):
        chw.copy_(frame.permute(2, 0, 1))  # S x S x 3 uint8 -> 3 x S x S fp32
        chw /= 255.0
        chw -= mean
        chw /= std
        frames[count].copy_(chw)
        count += 1
    return frames[:count], height, width


@contextlib.contextmanager
def frames_loaded_in(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Within the block, `SAM2VideoPredictor.init_state` loads the frames in `dtype` on
    `device` (the state's `offload_video_to_cpu` flag stays the caller's). The block swaps
    the name `load_video_frames` in `sam2.sam2_video_predictor`, under a lock: one block at a
    time, and only the thread that entered it gets such frames (another thread's predictor,
    a reference one say, calling that name meanwhile gets sam2's loader, its fp32 frames).
    Where the caller has put a loader of their own under that name, theirs runs, unchanged."""
    with _PATCH_LOCK:
        reference_load = sam2_video_predictor.load_video_frames
        if reference_load is not load_video_frames:
            yield
            return
        owner = threading.get_ident()

        def load(*args, **kwargs):
            if threading.get_ident() != owner:
                return reference_load(*args, **kwargs)
            return own_load(*args, **kwargs)

        def own_load(video_path, image_size, offload_video_to_cpu, img_mean=IMG_MEAN,
                     img_std=IMG_STD, async_loading_frames=False, compute_device=None):
            if (img_mean, img_std) == (IMG_MEAN, IMG_STD):  # sam2's tests, in its order
                if is_video_file(video_path):
                    return load_video_file_frames(video_path, image_size, dtype, device)
                if _load_img_as_tensor is not None and isinstance(video_path, str) \
                        and os.path.isdir(video_path):
                    if async_loading_frames:
                        frames = AsyncJpegFrames(video_path, image_size, dtype, device)
                        return frames, frames.video_height, frames.video_width
                    return load_jpeg_frames(video_path, image_size, dtype, device)
            frames, height, width = reference_load(
                video_path, image_size, offload_video_to_cpu=True, img_mean=img_mean,
                img_std=img_std, compute_device=compute_device)
            return frames_in(frames, dtype, device), height, width

        sam2_video_predictor.load_video_frames = load
        try:
            yield
        finally:
            sam2_video_predictor.load_video_frames = reference_load
