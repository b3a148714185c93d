"""`fastsam accuracy`: what each configuration costs in accuracy, on the tiny trained models.

For every configuration (dtype, quantization), against the fp32 reference model (a SAM
through `SamPredictor`, a SAM 2 through `SAM2ImagePredictor`):
- mask IoU of the predictor's masks for a point and a box on every object of generated scenes
  (all pixels, and outside the logit margin of tests/tolerances.py's policy);
- for quantized linears, the signal-to-quantization-noise ratio (dB) of every replaced layer
  on the activations those scenes produce.

    python -m fastsam_core accuracy --out bench/results/accuracy-tiny-sam-cpu.json
    python -m fastsam_core accuracy --model sam2 --out bench/results/accuracy-tiny-sam2-cpu.json
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from segment_anything import SamPredictor
from torch import nn

from fastsam_core.config import FastConfig
from fastsam_core.models.quant import Int8Linear, Sparse24Linear
from fastsam_core.ops.quant import sqnr_db
from fastsam_core.patch import optimize, restore

MARGIN = 0.05  # x std(reference logits): tests/tolerances.py MASK_LOGIT_MARGIN

CONFIGS = {
    "fp32": FastConfig(dtype=torch.float32),
    "bf16": FastConfig(dtype=torch.bfloat16),
    "int8": FastConfig(dtype=torch.float32, quantize="int8"),
    "int8-mlp": FastConfig(dtype=torch.float32, quantize="int8", quantize_layers="mlp"),
    "2:4": FastConfig(dtype=torch.float32, quantize="2:4"),
    "2:4-mlp": FastConfig(dtype=torch.float32, quantize="2:4", quantize_layers="mlp"),
}


def configs_for(device: torch.device) -> dict[str, FastConfig]:
    """CONFIGS as measured on `device`: on CUDA the quantized ones compute in bf16 (what the
    GPU runs them in: int_mm / sparse kernels take bf16 activations), elsewhere in fp32."""
    if device.type != "cuda":
        return CONFIGS
    return {name: config if config.quantize is None else config.replace(dtype=torch.bfloat16)
            for name, config in CONFIGS.items()}


@dataclass
class AccuracyRow:
    config: str
    mask_iou_mean: float  # all pixels
    mask_iou_min: float
    mask_iou_margin_min: float  # outside the logit margin
    sqnr_db: dict[str, float] = field(default_factory=dict)  # per replaced layer


def prompts_of(scenes, seed: int = 0) -> list[list[dict]]:
    from fastsam_core.models.tiny_data import mask_to_box, sample_point

    rng = np.random.default_rng(seed)
    return [[p for m in scene.masks for p in (
        dict(point_coords=sample_point(m, rng)[None], point_labels=np.array([1])),
        dict(box=mask_to_box(m)))] for scene in scenes]


def predictor_of(model: nn.Module):
    """The reference predictor of a SAM or SAM 2 model (SAM 2: its feature sizes set for the
    model's input size, which the predictor hard-codes for 1024 px; design.md section 8)."""
    if not hasattr(model, "sam_mask_decoder"):
        return SamPredictor(model)
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from fastsam_core.models.tiny import sam2_feature_sizes

    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = sam2_feature_sizes(model.image_size)
    return predictor


def predictions_of(sam, scenes, prompts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mask logits C x H x W, predicted IoUs C) per prompt, through the reference predictor."""
    predictor = predictor_of(sam)
    out = []
    with torch.inference_mode():
        for scene, scene_prompts in zip(scenes, prompts, strict=True):
            predictor.set_image(scene.image)
            for p in scene_prompts:
                logits, scores = predictor.predict(**p, return_logits=True)[:2]
                out.append((torch.from_numpy(logits).float(), torch.from_numpy(scores)))
    return out


def logits_of(sam, scenes, prompts) -> list[torch.Tensor]:
    """Mask logits (C x H x W) per prompt, through the reference predictor."""
    return [logits for logits, _ in predictions_of(sam, scenes, prompts)]


def ious(got: list[torch.Tensor], expected: list[torch.Tensor], margin: float | None):
    values = []
    for a, b in zip(got, expected, strict=True):
        for x, y in zip(a, b, strict=True):
            keep = torch.ones_like(y, dtype=torch.bool) if margin is None else \
                y.abs() > margin * y.std()
            inter = ((x > 0) & (y > 0) & keep).sum().item()
            union = (((x > 0) | (y > 0)) & keep).sum().item()
            values.append(1.0 if union == 0 else inter / union)
    return values


def layer_sqnr(sam, reference_encoder, scenes) -> dict[str, float]:
    """SQNR of each replaced linear of an optimized SAM / SAM 2 against the float layer at the
    same path of the reference encoder, on the inputs the scenes give it (mean over calls).
    The hooks make int8 MLPs (`Int8MLP`) and the LayerNorms deferred to an int8 qkv take
    their separate passes while measured."""
    encoder = sam.image_encoder
    results: dict[str, list[float]] = {}
    hooks = []
    for path, layer in encoder.named_modules():
        if not isinstance(layer, (Int8Linear, Sparse24Linear)):
            continue
        float_layer = reference_encoder.get_submodule(path)

        def hook(module, args, output, path=path, float_layer=float_layer):
            exact = float_layer(args[0].to(float_layer.weight.dtype))
            results.setdefault(path, []).append(sqnr_db(exact, output))

        hooks.append(layer.register_forward_hook(hook))
    predictor = predictor_of(sam)
    with torch.inference_mode():
        for scene in scenes:
            predictor.set_image(scene.image)
    for h in hooks:
        h.remove()
    return {path: statistics.fmean(v) for path, v in results.items()}


@contextlib.contextmanager
def cudnn_without_tf32():
    """cuDNN convolutions in full fp32 (on CUDA they default to TF32, 10 mantissa bits),
    so that the fp32 reference is one; the configurations run with the caller's setting."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def run_accuracy(sam, scenes, configs: dict[str, FastConfig] = CONFIGS,
                 log: Callable[[str], None] = lambda m: None) -> list[AccuracyRow]:
    """Each configuration against the fp32 reference (the model is restored after each)."""
    prompts = prompts_of(scenes)
    with cudnn_without_tf32():
        expected = logits_of(sam, scenes, prompts)
    reference_encoder = sam.image_encoder  # kept untouched while optimized
    rows = []
    for name, config in configs.items():
        log(name)
        optimize(sam, config)
        try:
            got = logits_of(sam, scenes, prompts)
            sqnr = layer_sqnr(sam, reference_encoder, scenes) if config.quantize else {}
        finally:
            restore(sam)
        all_px, margin = ious(got, expected, None), ious(got, expected, MARGIN)
        rows.append(AccuracyRow(name, statistics.fmean(all_px), min(all_px), min(margin),
                                sqnr))
    return rows


def format_rows(rows: list[AccuracyRow]) -> str:
    lines = [f"{'config':<10} {'IoU mean':>9} {'IoU min':>8} {'IoU min (margin)':>17} "
             f"{'SQNR dB min':>12} {'SQNR dB mean':>13}"]
    for r in rows:
        sq = list(r.sqnr_db.values())
        lo = f"{min(sq):.1f}" if sq else "-"
        mean = f"{statistics.fmean(sq):.1f}" if sq else "-"
        lines.append(f"{r.config:<10} {r.mask_iou_mean:>9.4f} {r.mask_iou_min:>8.4f} "
                     f"{r.mask_iou_margin_min:>17.4f} {lo:>12} {mean:>13}")
    return "\n".join(lines)


def as_dicts(rows: list[AccuracyRow]) -> list[dict]:
    return [asdict(r) for r in rows]
