"""Train the tiny SAM / SAM 2 checkpoints of `fastsam_core/models/tiny_weights/`.

Trains the reference classes (`segment_anything` Sam, sam2 SAM2Base image path) on the
procedural shapes of `fastsam_core.models.tiny_data` (the SAM from scratch; the SAM 2 from the
shipped tiny SAM: its heads copied, its image embedding distilled into the SAM 2 image
encoder, `--teacher`), with point and box prompts whose
target is the visible mask of the shape under the prompt. Loss as in the SAM paper: focal +
dice on the mask logits (bilinearly upsampled to the image, as the predictors do), MSE of the
IoU head to the IoU each mask achieved; single points use the three-mask output and only the
best of the three masks is back-propagated, boxes use the single-mask output. At the end the
held-out IoU is measured through the reference predictors (`SamPredictor`,
`SAM2ImagePredictor`) on scenes never seen in training, and `<out>/<name>.pt` (state_dict)
and `<out>/<name>.json` (config, training record, held-out IoUs) are written.

Usage (scripts/TRAINING.md says what was tried and how long it takes on 2 CPU cores; options
left unset take the recipe of the shipped checkpoint, RECIPES below):

    python scripts/train_tiny.py --model sam --out fastsam_core/models/tiny_weights
    python scripts/train_tiny.py --model sam2 --out fastsam_core/models/tiny_weights
    python scripts/train_tiny.py --model sam2 --distill-steps 3 --steps 3 --eval-images 2 \
        --amg-images 0 --out /tmp/t
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastsam_core.models.tiny import (
    WEIGHTS_DIR,
    build_from_config,
    load_config,
    load_state,
    sam2_feature_sizes,
)
from fastsam_core.models.tiny_data import (
    Scene,
    jitter_box,
    make_scene,
    make_scenes,
    mask_iou,
    mask_to_box,
    sample_point,
)

# Constructor configs (the "model" entry of the json); `--set key=value` overrides entries.
SAM_MODEL: dict[str, Any] = {
    "image_size": 128,
    "patch_size": 8,
    "encoder_embed_dim": 128,
    "encoder_depth": 4,
    "encoder_num_heads": 4,
    "encoder_global_attn_indexes": [1, 3],
    "encoder_window_size": 8,
    "encoder_mlp_ratio": 4.0,
    "use_rel_pos": True,
    "prompt_embed_dim": 128,
    "decoder_depth": 2,
    "decoder_mlp_dim": 512,
    "decoder_num_heads": 4,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 128,
    "mask_in_chans": 16,
}
SAM2_MODEL: dict[str, Any] = {
    "image_size": 256,  # a 16 x 16 image embedding, the grid of the tiny SAM it learns from
    "trunk_embed_dim": 24,
    "trunk_num_heads": 1,
    "trunk_stages": [1, 1, 3, 1],
    "trunk_window_spec": [8, 4, 16, 8],
    "trunk_global_att_blocks": [4],
    "trunk_window_pos_embed_bkg_spatial_size": [8, 8],
    "scalp": 1,
    "d_model": 128,
    "fpn_top_down_levels": [2, 3],
    "mem_dim": 32,
    "memory_attention_layers": 1,
    "memory_attention_ffn_dim": 256,
    "num_maskmem": 7,
    "decoder_mlp_dim": 512,
    "decoder_num_heads": 4,
    "iou_head_hidden_dim": 128,
}
# What the shipped checkpoints were trained with (scripts/TRAINING.md): the defaults of the
# options that differ between the two models.
RECIPES: dict[str, dict[str, Any]] = {
    "sam": {
        "steps": 2400,
        "lr": 1e-3,
        "warmup": 100,
        "bce_steps": 0,
        "loss_size": 0,
        "logit_scale": 3.0,
        "amg_images": 4,
        "save_dtype": "float16",
    },
    "sam2": {
        "teacher": str(WEIGHTS_DIR / "sam"),  # the shipped tiny SAM
        "distill_steps": 600,
        "steps": 1000,
        "lr": 5e-4,
        "warmup": 50,
        "bce_steps": 0,
        "loss_size": 128,
        "logit_scale": 3.0,
        "amg_images": 4,
        "save_dtype": "float16",
    },
}
HELDOUT_SEED_OFFSET = 1_000_003  # held-out scenes: seed + offset, never used in training


# ----------------------------------------------------------------------------- prompts


@dataclass
class Prompts:
    """A batch of prompts of one type over the images of a step.

    Attributes:
        image_index: N long, the image each prompt belongs to.
        coords: N x K x 2 float pixel (x, y); K = 1 for a point, 2 (corners) for a box.
        targets: N x H x W float {0, 1}, the visible mask of the prompted shape.
        is_box: whether the prompts are boxes.
    """

    image_index: torch.Tensor
    coords: torch.Tensor
    targets: torch.Tensor
    is_box: bool

    def __len__(self) -> int:
        return len(self.image_index)


def sample_prompts(
    scenes: list[Scene], rng: np.random.Generator, n: int, is_box: bool, box_jitter: float
) -> Prompts:
    """`n` prompts per scene, each on an instance drawn uniformly (with replacement).

    Points are uniform inside the visible mask; boxes are the tight box of the visible mask,
    each side moved by N(0, box_jitter * side) pixels.
    """
    index, coords, targets = [], [], []
    for i, scene in enumerate(scenes):
        h, w = scene.masks.shape[1:]
        for k in rng.integers(len(scene.masks), size=n):
            mask = scene.masks[k]
            if is_box:
                box = mask_to_box(mask)
                if box_jitter > 0:
                    box = jitter_box(box, rng, box_jitter, h, w)
                coords.append(box.reshape(2, 2))
            else:
                coords.append(sample_point(mask, rng)[None])
            index.append(i)
            targets.append(mask)
    return Prompts(
        image_index=torch.tensor(index),
        coords=torch.from_numpy(np.stack(coords)),
        targets=torch.from_numpy(np.stack(targets)).float(),
        is_box=is_box,
    )


def heldout_prompts(scenes: list[Scene], seed: int) -> tuple[Prompts, Prompts]:
    """One uniform point and one tight box per instance of every scene (seeded)."""
    rng = np.random.default_rng(seed)
    index, points, boxes, targets = [], [], [], []
    for i, scene in enumerate(scenes):
        for mask in scene.masks:
            index.append(i)
            points.append(sample_point(mask, rng)[None])
            boxes.append(mask_to_box(mask).reshape(2, 2))
            targets.append(mask)
    idx = torch.tensor(index)
    tgt = torch.from_numpy(np.stack(targets)).float()
    return (
        Prompts(idx, torch.from_numpy(np.stack(points)), tgt, False),
        Prompts(idx, torch.from_numpy(np.stack(boxes)), tgt, True),
    )


# ----------------------------------------------------------------------------- models


class SamAdapter:
    """Batched training forward of a `segment_anything` Sam (the predictor's math)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: B x H x W x 3 uint8 at the model's size -> {"embed": B x C x h x w}."""
        x = images.permute(0, 3, 1, 2).float()  # B x 3 x H x W
        x = (x - self.model.pixel_mean) / self.model.pixel_std
        return {"embed": self.model.image_encoder(x)}

    def decode(
        self, feats: dict[str, torch.Tensor], prompts: Prompts, multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for every prompt: (N x M x 4h x 4w logits, N x M IoU predictions).

        Same computation as `MaskDecoder.predict_masks` for one image at a time, but with the
        image embedding gathered per prompt so that all images of a step go in one call.
        """
        pe, dec = self.model.prompt_encoder, self.model.mask_decoder
        n = len(prompts)
        if prompts.is_box:
            sparse, dense = pe(points=None, boxes=prompts.coords.reshape(n, 4), masks=None)
        else:
            labels = torch.ones(n, 1, dtype=torch.int)
            sparse, dense = pe(points=(prompts.coords, labels), boxes=None, masks=None)
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        src = feats["embed"][prompts.image_index] + dense  # N x C x h x w
        pos = pe.get_dense_pe().expand(n, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = dec.transformer(src, pos, tokens)
        mask_tokens = hs[:, 1 : 1 + dec.num_mask_tokens]  # N x 4 x C
        src = src.transpose(1, 2).reshape(b, c, h, w)
        up = dec.output_upscaling(src)  # N x C/8 x 4h x 4w
        hyper = torch.stack(
            [mlp(mask_tokens[:, i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], 1
        )  # N x 4 x C/8
        masks = (hyper @ up.flatten(2)).view(b, -1, *up.shape[2:])  # N x 4 x 4h x 4w
        iou = dec.iou_prediction_head(hs[:, 0])  # N x 4
        sel = slice(1, None) if multimask else slice(0, 1)
        return masks[:, sel], iou[:, sel]

    def aux_loss(self) -> torch.Tensor:
        return torch.zeros(())


class Sam2Adapter:
    """Batched training forward of a sam2 SAM2Base image path (`SAM2ImagePredictor`'s math)."""

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._obj_logits: torch.Tensor | None = None

    def embed(self, images: torch.Tensor) -> dict[str, Any]:
        """images: B x H x W x 3 uint8 -> image embedding B x C x h x w and high-res levels."""
        x = images.permute(0, 3, 1, 2).float() / 255.0  # B x 3 x H x W
        x = (x - self.mean) / self.std
        backbone_out = self.model.forward_image(x)
        _, feats, _, sizes = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + self.model.no_mem_embed
        b = x.shape[0]
        # HW x B x C -> B x C x H x W
        maps = [f.permute(1, 2, 0).reshape(b, -1, *s) for f, s in zip(feats, sizes, strict=True)]
        return {"embed": maps[-1], "high_res": maps[:-1]}

    def decode(
        self, feats: dict[str, Any], prompts: Prompts, multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for every prompt: (N x M x 4h x 4w logits, N x M IoU predictions)."""
        pe = self.model.sam_prompt_encoder
        n, idx = len(prompts), prompts.image_index
        if prompts.is_box:  # the predictor passes box corners as points labelled 2 and 3
            labels = torch.tensor([[2, 3]], dtype=torch.int).expand(n, 2)
        else:
            labels = torch.ones(n, 1, dtype=torch.int)
        sparse, dense = pe(points=(prompts.coords, labels), boxes=None, masks=None)
        masks, iou, _, obj = self.model.sam_mask_decoder(
            image_embeddings=feats["embed"][idx],
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=[f[idx] for f in feats["high_res"]],
        )
        self._obj_logits = obj if self._obj_logits is None else torch.cat([self._obj_logits, obj])
        return masks, iou

    def aux_loss(self) -> torch.Tensor:
        """Object-score loss: every prompt here is on an object (BCE towards "present")."""
        obj, self._obj_logits = self._obj_logits, None
        if obj is None or not self.model.pred_obj_scores:
            return torch.zeros(())
        return F.binary_cross_entropy_with_logits(obj, torch.ones_like(obj))


def make_adapter(kind: str, model: nn.Module) -> SamAdapter | Sam2Adapter:
    return SamAdapter(model) if kind == "sam" else Sam2Adapter(model)


# ----------------------------------------------------------------------------- loss


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x M x h x w low-res logits -> N x M x H x W, bilinear as the predictors do."""
    return F.interpolate(logits, size, mode="bilinear", align_corners=False)


def mask_losses(
    logits: torch.Tensor,
    target: torch.Tensor,
    focal_weight: float,
    dice_weight: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask loss and achieved IoU.

    Args:
        logits: N x M x H x W mask logits at the image resolution.
        target: N x H x W {0, 1}.
        alpha, gamma: focal loss parameters (alpha < 0: no class weighting; gamma 0: BCE).

    Returns:
        (N x M loss: focal_weight * focal + dice_weight * dice, N x M IoU of logits > 0).
    """
    t = target.unsqueeze(1).expand_as(logits)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    if gamma:
        p_t = p * t + (1 - p) * (1 - t)
        ce = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        ce = ce * (alpha * t + (1 - alpha) * (1 - t))
    focal = ce.flatten(2).mean(-1)
    inter = (p * t).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (p.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1)
    with torch.no_grad():
        hard = logits > 0
        tb = t > 0.5
        iou = (hard & tb).flatten(2).sum(-1) / (hard | tb).flatten(2).sum(-1).clamp(min=1)
    return focal_weight * focal + dice_weight * dice, iou.float()


def prompt_loss(
    adapter: SamAdapter | Sam2Adapter,
    feats: dict[str, Any],
    prompts: Prompts,
    args: argparse.Namespace,
    bce: bool = False,
    multimask: bool | None = None,
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Loss of one prompt batch; points: best-of-3 masks, boxes: the single-mask output
    (unless `multimask` says otherwise).

    The mask loss is args.focal_weight * focal + args.dice_weight * dice, or with `bce`
    (the first args.bce_steps steps) args.bce_weight * BCE + args.dice_weight * dice.

    Returns:
        (scalar loss, mean achieved IoU of the supervised masks, N: index of each prompt's
        supervised mask among the outputs).
    """
    multimask = not prompts.is_box if multimask is None else multimask
    logits, iou_pred = adapter.decode(feats, prompts, multimask)
    targets = prompts.targets
    if args.loss_size and args.loss_size < targets.shape[-1]:  # area-averaged soft targets
        targets = F.adaptive_avg_pool2d(targets.unsqueeze(1), args.loss_size).squeeze(1)
    logits = upsample(logits, targets.shape[-2:])
    if bce:
        loss, iou = mask_losses(logits, targets, args.bce_weight, args.dice_weight, -1.0, 0.0)
    else:
        loss, iou = mask_losses(
            logits, targets, args.focal_weight, args.dice_weight, args.alpha, args.gamma
        )
    best = loss.argmin(dim=1)  # N: only the best mask is back-propagated
    rows = torch.arange(len(best))
    mask_loss = loss[rows, best].mean()
    iou_loss = F.mse_loss(iou_pred, iou)
    return mask_loss + args.iou_weight * iou_loss, float(iou[rows, best].mean()), best


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def quick_eval(
    adapter: SamAdapter | Sam2Adapter, scenes: list[Scene], seed: int, chunk: int = 8
) -> dict[str, float]:
    """Held-out IoU with the batched forward (no predictor): point (mask with the highest
    predicted IoU of three), point oracle (best of three) and box (single mask)."""
    model = adapter.model
    was_training = model.training
    model.eval()
    res: dict[str, list[float]] = {"point": [], "point_oracle": [], "box": []}
    for start in range(0, len(scenes), chunk):
        part = scenes[start : start + chunk]
        images = torch.from_numpy(np.stack([s.image for s in part]))
        feats = adapter.embed(images)
        points, boxes = heldout_prompts(part, seed + start)
        size = points.targets.shape[-2:]
        logits, iou_pred = adapter.decode(feats, points, multimask=True)
        _, iou = mask_losses(upsample(logits, size), points.targets, 1.0, 1.0)
        chosen = iou[torch.arange(len(iou)), iou_pred.argmax(1)]
        res["point"] += chosen.tolist()
        res["point_oracle"] += iou.max(1).values.tolist()
        logits, _ = adapter.decode(feats, boxes, multimask=False)
        _, iou = mask_losses(upsample(logits, size), boxes.targets, 1.0, 1.0)
        res["box"] += iou[:, 0].tolist()
    adapter.aux_loss()  # drop the object scores collected here
    model.train(was_training)
    return {k: float(np.mean(v)) for k, v in res.items()}


def make_predictor(kind: str, model: nn.Module) -> Any:
    """The reference predictor for `model` (SAM 2: feature sizes set for its image size)."""
    if kind == "sam":
        from segment_anything import SamPredictor

        return SamPredictor(model)
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = sam2_feature_sizes(model.image_size)
    return predictor


@torch.no_grad()
def predictor_eval(kind: str, model: nn.Module, scenes: list[Scene], seed: int) -> dict:
    """Held-out IoU through the reference predictor, one prompt per call.

    Points: `multimask_output=True`, the mask with the highest predicted IoU; boxes:
    `multimask_output=False`. Also the mean predicted IoU of the chosen masks.
    """
    model.eval()
    predictor = make_predictor(kind, model)
    rng = np.random.default_rng(seed)
    res: dict[str, list[float]] = {"point": [], "box": [], "point_pred_iou": []}
    for scene in scenes:
        predictor.set_image(scene.image)
        for mask in scene.masks:
            point = sample_point(mask, rng)
            masks, scores, _ = predictor.predict(
                point_coords=point[None], point_labels=np.array([1]), multimask_output=True
            )
            best = int(np.argmax(scores))
            res["point"].append(mask_iou(masks[best] > 0, mask))
            res["point_pred_iou"].append(float(scores[best]))
            masks, _, _ = predictor.predict(box=mask_to_box(mask), multimask_output=False)
            res["box"].append(mask_iou(masks[0] > 0, mask))
    out = {k: float(np.mean(v)) for k, v in res.items()}
    out["instances"] = len(res["box"])
    return out


@torch.no_grad()
def amg_eval(kind: str, model: nn.Module, scenes: list[Scene]) -> dict[str, float]:
    """The automatic mask generator with its default thresholds: masks kept per image and
    the mean over ground-truth instances of the best IoU of a kept mask (0 if none)."""
    model.eval()
    if kind == "sam":
        from segment_anything import SamAutomaticMaskGenerator as Generator
    else:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as Generator
    generator = Generator(model)
    if kind == "sam2":
        generator.predictor._bb_feat_sizes = sam2_feature_sizes(model.image_size)
    kept, recall = [], []
    for scene in scenes:
        anns = generator.generate(scene.image)
        kept.append(len(anns))
        for mask in scene.masks:
            recall.append(max((mask_iou(a["segmentation"], mask) for a in anns), default=0.0))
    return {"masks_per_image": float(np.mean(kept)), "gt_best_iou": float(np.mean(recall))}


# ----------------------------------------------------------------------------- training


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to args.lr, then cosine decay to args.lr * args.min_lr_frac."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW, no weight decay on biases, norms and 1-D tables."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = dict(SAM_MODEL if args.model == "sam" else SAM2_MODEL)
    for item in args.set or []:
        key, _, value = item.partition("=")
        if key not in cfg:
            raise SystemExit(f"--set: unknown config key {key!r}; known: {sorted(cfg)}")
        cfg[key] = json.loads(value)
    return cfg


def image_size(cfg: dict[str, Any]) -> int:
    return int(cfg["image_size"])


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate, save; returns the json record."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = model_config(args)
    config = {"kind": args.model, "model": cfg}
    model = build_from_config(config).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f} M parameters, config {json.dumps(cfg)}", flush=True)
    adapter = make_adapter(args.model, model)
    size = image_size(cfg)
    heldout_seed = args.seed + HELDOUT_SEED_OFFSET
    quick_scenes = make_scenes(args.quick_eval_images, heldout_seed, size)
    history = []
    if args.teacher:
        if args.model != "sam2":
            raise SystemExit("--teacher: only for --model sam2")
        teacher = load_teacher(args.teacher)
        kept = warm_start_from_sam(model, teacher)
        print(f"heads warm-started from {args.teacher}; left as initialised: {kept}", flush=True)
        distill_image_encoder(adapter, teacher, rng, args)
        q = quick_eval(adapter, quick_scenes, heldout_seed)
        print(f"after distillation: held-out point {q['point']:.3f} (oracle "
              f"{q['point_oracle']:.3f}) box {q['box']:.3f}", flush=True)
        history.append({"step": 0, "after": "distillation", **q})
    optimizer = make_optimizer(model, args)
    t0, running = time.time(), []
    box_wins = torch.zeros(3, dtype=torch.long)  # which of the three masks fit boxes best
    for step in range(args.steps):
        if step == args.box_multimask_steps > 0:
            warm_start_single_mask(model, args.model, int(box_wins.argmax()))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        scenes = [make_scene(rng, size) for _ in range(args.batch)]
        images = torch.from_numpy(np.stack([s.image for s in scenes]))
        points = sample_prompts(scenes, rng, args.points, False, 0.0)
        boxes = sample_prompts(scenes, rng, args.boxes, True, args.box_jitter)
        feats = adapter.embed(images)
        bce = step < args.bce_steps
        loss_p, iou_p, _ = prompt_loss(adapter, feats, points, args, bce)
        boxes_multimask = step < args.box_multimask_steps
        loss_b, iou_b, best = prompt_loss(adapter, feats, boxes, args, bce, boxes_multimask)
        if boxes_multimask:
            box_wins += torch.bincount(best, minlength=3)
        loss = loss_p + loss_b + args.obj_weight * adapter.aux_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        running.append((loss.item(), iou_p, iou_b))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            m = np.mean(running, axis=0)
            running = []
            msg = (
                f"step {step + 1}/{args.steps} loss {m[0]:.4f} train-iou point {m[1]:.3f} "
                f"box {m[2]:.3f} lr {lr_at(step, args):.2e} {time.time() - t0:.0f}s"
            )
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                q = quick_eval(adapter, quick_scenes, heldout_seed)
                msg += f" | held-out point {q['point']:.3f} (oracle {q['point_oracle']:.3f})"
                msg += f" box {q['box']:.3f}"
                history.append({"step": step + 1, **q})
            print(msg, flush=True)
    train_record = {
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "set")},
        "wall_time_s": round(time.time() - t0, 1),
        "parameters": n_params,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {args.threads} threads",
        "history": history,
    }
    return finish(model, {**config, "training": train_record}, args)


# ------------------------------------------------------------------- SAM 2 from the tiny SAM


def load_teacher(stem: str) -> nn.Module:
    """A tiny SAM checkpoint (<stem>.pt / <stem>.json), eval mode, frozen."""
    record = load_config(stem + ".json")
    if record.get("kind") != "sam":
        raise SystemExit(f"--teacher {stem}: not a tiny SAM checkpoint (kind {record.get('kind')})")
    teacher = build_from_config(record)
    load_state(teacher, torch.load(stem + ".pt", weights_only=True))
    return teacher.eval().requires_grad_(False)


def sam2_key(sam_key: str) -> str | None:
    """The SAM 2 parameter name of a SAM prompt-encoder / mask-decoder parameter (the two
    share the architecture at equal widths; sam2's two-way blocks name their MLP layers
    `layers.0/1` where segment_anything's say `lin1/2`), or None."""
    for sam, sam2 in (("prompt_encoder.", "sam_prompt_encoder."),
                      ("mask_decoder.", "sam_mask_decoder.")):
        if sam_key.startswith(sam):
            name = sam2 + sam_key[len(sam):]
            return name.replace(".mlp.lin1.", ".mlp.layers.0.").replace(".mlp.lin2.",
                                                                        ".mlp.layers.1.")
    return None


@torch.no_grad()
def warm_start_from_sam(model: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy the tiny SAM's prompt encoder and mask decoder into the SAM 2 model's, and zero
    the high-resolution skip convolutions, so that the SAM 2 heads start as SAM's function
    (the IoU head then passes through a sigmoid: same ranking). Returns the SAM 2 head
    parameters left as initialised (object-score token and head, skip convolutions)."""
    own = model.state_dict()
    copied = set()
    for key, value in teacher.state_dict().items():
        name = sam2_key(key)
        if name in own and own[name].shape == value.shape:
            own[name].copy_(value)
            copied.add(name)
    decoder = model.sam_mask_decoder
    for conv in (decoder.conv_s0, decoder.conv_s1):
        conv.weight.zero_()
        conv.bias.zero_()
    heads = ("sam_prompt_encoder.", "sam_mask_decoder.")
    return sorted(k for k in own if k.startswith(heads) and k not in copied)


def distill_image_encoder(adapter: Sam2Adapter, teacher: nn.Module, rng: np.random.Generator,
                          args: argparse.Namespace) -> None:
    """Train the SAM 2 image encoder (trunk and neck) alone to reproduce the tiny SAM's image
    embedding: MSE between the SAM 2 image embedding of a scene and the teacher's embedding of
    the same scene area-downsampled to the teacher's input size (the two grids match when
    the SAM 2 model's stride-16 grid equals the teacher's stride-8 one: 256 vs 128 px).

    Learning image features through the mask decoder alone was what stalled the tiny SAM 2
    (scripts/TRAINING.md); a dense regression target gives the trunk a direct signal.
    """
    model = adapter.model
    size, teacher_size = model.image_size, teacher.image_encoder.img_size
    grid = teacher_size // teacher.image_encoder.patch_embed.proj.stride[0]
    width = teacher.prompt_encoder.embed_dim
    if (size // 16, model.hidden_dim) != (grid, width):
        raise SystemExit(f"--teacher: its image embedding is {grid} x {grid} x {width}, the "
                         f"SAM 2 model's {size // 16} x {size // 16} x {model.hidden_dim}: set "
                         f"image_size={16 * grid} and d_model={width}")
    params = list(model.image_encoder.parameters()) + [model.no_mem_embed]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    t0, running = time.time(), []
    for step in range(args.distill_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, argparse.Namespace(
                lr=args.lr, warmup=args.warmup, steps=args.distill_steps,
                min_lr_frac=args.min_lr_frac))
        scenes = [make_scene(rng, size) for _ in range(args.batch)]
        images = torch.from_numpy(np.stack([s.image for s in scenes]))
        with torch.no_grad():
            small = F.adaptive_avg_pool2d(images.permute(0, 3, 1, 2).float(), teacher_size)
            target = teacher.image_encoder((small - teacher.pixel_mean) / teacher.pixel_std)
        loss = F.mse_loss(adapter.embed(images)["embed"], target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.distill_steps:
            print(f"distill {step + 1}/{args.distill_steps} embedding mse {np.mean(running):.4f}"
                  f" (target variance {target.var().item():.3f}) {time.time() - t0:.0f}s",
                  flush=True)
            running = []


@torch.no_grad()
def warm_start_single_mask(model: nn.Module, kind: str, source: int) -> None:
    """Copy three-mask output `source` (0-2) into the single-mask output: its mask token,
    hypernetwork MLP and IoU-head row. Used after boxes were trained through the three-mask
    output (--box-multimask-steps): the single-mask output then starts from the mask that
    fit boxes best instead of from scratch."""
    decoder = model.mask_decoder if kind == "sam" else model.sam_mask_decoder
    j = 1 + source  # mask token 0 is the single-mask output
    decoder.mask_tokens.weight[0] = decoder.mask_tokens.weight[j]
    mlps = decoder.output_hypernetworks_mlps
    mlps[0].load_state_dict(mlps[j].state_dict())
    last = decoder.iou_prediction_head.layers[-1]
    last.weight[0] = last.weight[j]
    last.bias[0] = last.bias[j]
    print(f"single-mask output warm-started from three-mask output {source}", flush=True)


def finish(model: nn.Module, record: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Scale the mask logits, round to the storage dtype, measure on held-out scenes, save."""
    model.eval()
    kind, size = record["kind"], image_size(record["model"])
    if args.logit_scale != 1.0:
        scale_mask_logits(model, kind, args.logit_scale)
        record["logit_scale"] = record.get("logit_scale", 1.0) * args.logit_scale
    round_to_storage(model, args.save_dtype)  # measure the weights that are shipped
    heldout_seed = record["training"]["args"]["seed"] + HELDOUT_SEED_OFFSET
    scenes = make_scenes(args.eval_images, heldout_seed, size)
    final = predictor_eval(kind, model, scenes, heldout_seed)
    print(
        f"held-out IoU ({final['instances']} instances, reference predictor): "
        f"single point {final['point']:.3f}, box {final['box']:.3f} "
        f"(mean predicted IoU {final['point_pred_iou']:.3f})",
        flush=True,
    )
    record["heldout"] = {"seed": heldout_seed, "images": args.eval_images, **final}
    if args.amg_images:
        amg = amg_eval(kind, model, make_scenes(args.amg_images, heldout_seed + 1, size))
        print(f"automatic mask generator, default thresholds: {amg}", flush=True)
        record["heldout"]["amg_default"] = amg
    save(model, record, Path(args.out), args.name or kind, args.save_dtype)
    return record


@torch.no_grad()
def scale_mask_logits(model: nn.Module, kind: str, scale: float) -> None:
    """Multiply every mask logit by `scale`, folded into the last layer of the hypernetwork
    MLPs (mask = hyper_in @ upscaled embedding): masks at threshold 0 and IoU predictions are
    unchanged, the stability score (IoU of the masks at logit +1 and -1) rises."""
    decoder = model.mask_decoder if kind == "sam" else model.sam_mask_decoder
    for mlp in decoder.output_hypernetworks_mlps:
        mlp.layers[-1].weight.mul_(scale)
        mlp.layers[-1].bias.mul_(scale)


def from_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """No training: load <stem>.pt / <stem>.json and run `finish` on it (e.g. --logit-scale)."""
    torch.set_num_threads(args.threads)
    record = load_config(args.from_checkpoint + ".json")
    model = build_from_config(record)
    load_state(model, torch.load(args.from_checkpoint + ".pt", weights_only=True))
    record.pop("heldout", None)
    return finish(model, record, args)


@torch.no_grad()
def round_to_storage(model: nn.Module, dtype: str) -> None:
    """Round every floating tensor of the model through `dtype` (as saving then loading does)."""
    target = getattr(torch, dtype)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.copy_(t.to(target).to(t.dtype))


def save(model: nn.Module, record: dict[str, Any], out: Path, name: str, dtype: str) -> None:
    """Write <out>/<name>.pt (state_dict, floats in `dtype`) and <out>/<name>.json."""
    out.mkdir(parents=True, exist_ok=True)
    target = getattr(torch, dtype)
    state = {
        k: (v.to(target) if v.is_floating_point() else v).clone()
        for k, v in model.state_dict().items()
    }
    record["storage_dtype"] = dtype
    torch.save(state, out / f"{name}.pt")
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    check = build_from_config(record)
    load_state(check, torch.load(out / f"{name}.pt", weights_only=True))
    size_mb = (out / f"{name}.pt").stat().st_size / 2**20
    print(f"wrote {out / name}.pt ({size_mb:.2f} MiB, {dtype}) and {name}.json", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; options left unset take the shipped recipe of the model (RECIPES)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["sam", "sam2"], default="sam")
    p.add_argument("--out", required=True, help="directory for <name>.pt and <name>.json")
    p.add_argument("--name", default=None, help="file stem (default: the --model value)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--points", type=int, default=8, help="single-point prompts per image")
    p.add_argument("--boxes", type=int, default=8, help="box prompts per image")
    p.add_argument("--box-jitter", type=float, default=0.02, help="box side noise / side")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (recipe)")
    p.add_argument("--min-lr-frac", type=float, default=0.02, help="final lr / lr (cosine)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (recipe)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--focal-weight", type=float, default=20.0)
    p.add_argument("--alpha", type=float, default=0.25, help="focal alpha (<0: none)")
    p.add_argument("--gamma", type=float, default=2.0, help="focal gamma (0: plain BCE)")
    p.add_argument("--bce-steps", type=int, default=None, help="BCE + dice for N steps (recipe)")
    p.add_argument("--bce-weight", type=float, default=1.0)
    p.add_argument("--box-multimask-steps", type=int, default=0,
                   help="train boxes through the three-mask output for N steps, then copy "
                        "the best-fitting one into the single-mask output")
    p.add_argument("--teacher", default=None,
                   help="SAM 2 only: STEM of a tiny SAM checkpoint whose heads warm-start the "
                        "SAM 2 heads and whose image embedding is distilled into the SAM 2 "
                        "image encoder before the mask training (recipe: the shipped tiny "
                        "SAM; '' for none)")
    p.add_argument("--distill-steps", type=int, default=None, help="with --teacher (recipe)")
    p.add_argument("--dice-weight", type=float, default=1.0)
    p.add_argument("--iou-weight", type=float, default=1.0)
    p.add_argument("--loss-size", type=int, default=None, help="loss resolution, 0: image")
    p.add_argument("--obj-weight", type=float, default=0.1, help="SAM 2 object-score loss")
    p.add_argument("--set", action="append", help="model config override key=json-value")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=200, help="quick held-out eval (0: off)")
    p.add_argument("--quick-eval-images", type=int, default=32)
    p.add_argument("--eval-images", type=int, default=100, help="final predictor eval")
    p.add_argument("--amg-images", type=int, default=None, help="mask generator eval (recipe)")
    p.add_argument("--logit-scale", type=float, default=None, help="after training (recipe)")
    p.add_argument("--from-checkpoint", default=None, help="skip training: finish STEM.pt/json")
    p.add_argument("--save-dtype", choices=["float32", "float16"], default=None)
    args = p.parse_args(argv)
    for key, value in RECIPES[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_checkpoint:
        from_checkpoint(args)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
