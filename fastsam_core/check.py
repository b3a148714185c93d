"""`fastsam check`: does the fast path agree with the reference on *your* weights and images?

    python -m fastsam_core check --model vit_h --checkpoint sam_vit_h.pth photo1.jpg photo2.png
    python -m fastsam_core check --model sam2.1_hiera_l --checkpoint sam2.1_hiera_large.pt a.jpg

For every image, the reference model (fp32, unmodified) and the same model optimized with each
requested dtype answer the same prompts: a grid of single points (3 masks each) and boxes at
three scales around the centre (1 mask each). The table gives the mask IoU (binarized masks,
mean and worst), the largest predicted-IoU score difference and the image-encoder speedup.
The exit status is 1 when a dtype's mean IoU falls below MIN_MEAN_IOU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from segment_anything import SamPredictor

from fastsam_core.benchmark import synchronize
from fastsam_core.config import FastConfig
from fastsam_core.models.convert import dtype_name
from fastsam_core.patch import optimize, restore

# Mean mask IoU against the fp32 reference below which `fastsam check` fails: the numerics
# policy of ../shared/design.md (bf16 / fp16 >= 0.99; fp32 agrees but for pixels at the
# threshold, so 0.999).
MIN_MEAN_IOU = {torch.float32: 0.999, torch.bfloat16: 0.99, torch.float16: 0.99}


@dataclass
class CheckRow:
    dtype: torch.dtype
    mean_iou: float
    min_iou: float
    max_score_diff: float
    reference_ms: float
    fast_ms: float

    @property
    def passed(self) -> bool:
        return self.mean_iou >= MIN_MEAN_IOU[self.dtype]


def prompts_for(shape: tuple[int, int], grid: int) -> list[dict]:
    """A grid x grid lattice of single foreground points, and three centred boxes."""
    h, w = shape
    out = [dict(point_coords=np.array([[(i + 0.5) * w / grid, (j + 0.5) * h / grid]]),
                point_labels=np.array([1]), multimask_output=True)
           for j in range(grid) for i in range(grid)]
    for scale in (0.25, 0.5, 0.8):
        half_w, half_h = w * scale / 2, h * scale / 2
        box = np.array([w / 2 - half_w, h / 2 - half_h, w / 2 + half_w, h / 2 + half_h])
        out.append(dict(box=box, multimask_output=False))
    return out


def answers(predictor: SamPredictor | SAM2ImagePredictor, image: np.ndarray, prompts: list[dict],
            device: torch.device) -> tuple[list, float]:
    """(masks, scores) per prompt, and the seconds `set_image` took."""
    synchronize(device)
    start = time.perf_counter()
    predictor.set_image(image)
    synchronize(device)
    encode_s = time.perf_counter() - start
    out = [predictor.predict(**p)[:2] for p in prompts]
    return out, encode_s


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def run_check(
    sam: torch.nn.Module,
    images: Sequence[np.ndarray],
    dtypes: Sequence[torch.dtype],
    grid: int = 4,
    log: Callable[[str], None] = lambda msg: None,
) -> list[CheckRow]:
    """Compare the reference with the fast path per dtype on `images` (see the module doc).

    The first `set_image` of each path is a warm-up and is not timed."""
    device = next(sam.parameters()).device
    predictor = SAM2ImagePredictor(sam) if isinstance(sam, SAM2Base) else SamPredictor(sam)
    per_image_prompts = [prompts_for(img.shape[:2], grid) for img in images]
    with torch.inference_mode():
        predictor.set_image(images[0])  # warm-up
        log("reference (fp32)")
        expected, ref_times = [], []
        for image, prompts in zip(images, per_image_prompts, strict=True):
            out, seconds = answers(predictor, image, prompts, device)
            expected.append(out)
            ref_times.append(seconds)
    rows = []
    for dtype in dtypes:
        log(f"fast path, {dtype_name(dtype)}")
        optimize(sam, FastConfig(dtype=dtype))
        try:
            with torch.inference_mode():
                predictor.set_image(images[0])  # warm-up (compilation, kernel tuning)
                ious, diffs, times = [], [], []
                for image, prompts, ref in zip(images, per_image_prompts, expected,
                                               strict=True):
                    out, seconds = answers(predictor, image, prompts, device)
                    times.append(seconds)
                    for (masks, scores), (ref_masks, ref_scores) in zip(out, ref, strict=True):
                        ious.extend(mask_iou(m, r) for m, r in zip(masks, ref_masks,
                                                                   strict=True))
                        diffs.append(float(np.abs(scores - ref_scores).max()))
        finally:
            restore(sam)
        rows.append(CheckRow(dtype, statistics.fmean(ious), min(ious), max(diffs),
                             statistics.median(ref_times) * 1e3,
                             statistics.median(times) * 1e3))
    return rows


def format_rows(rows: list[CheckRow]) -> str:
    head = (f"{'dtype':<10} {'mean IoU':>9} {'min IoU':>8} {'max dscore':>10} "
            f"{'ref ms':>9} {'fast ms':>9} {'speedup':>8}  result (needs mean IoU >= ...)")
    lines = [head]
    for r in rows:
        name = dtype_name(r.dtype)
        verdict = "ok" if r.passed else "FAIL"
        lines.append(f"{name:<10} {r.mean_iou:>9.4f} {r.min_iou:>8.4f} {r.max_score_diff:>10.4f} "
                     f"{r.reference_ms:>9.1f} {r.fast_ms:>9.1f} "
                     f"{r.reference_ms / r.fast_ms:>7.2f}x  {verdict} "
                     f"(>= {MIN_MEAN_IOU[r.dtype]})")
    return "\n".join(lines)
