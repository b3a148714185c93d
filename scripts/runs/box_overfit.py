"""The 200-step box diagnostics of scripts/TRAINING.md (tiny SAM 2 section), a record.

    python scripts/runs/box_overfit.py VARIANT [sam|sam2] [train_tiny options...]

VARIANT: box (boxes, single-mask output), boxmulti (boxes, best of the three-mask output),
boxboth (both losses), mix (boxes + points through the single-mask output), box_bce (BCE +
dice), box_hr0 (high-resolution skip convolutions zeroed at init). 8 fresh scenes, 8 boxes
each per step, lr 1e-3 without warmup; prints the loss and the boxes' train IoU every 25 steps.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

script = Path(__file__).parents[1] / "train_tiny.py"
spec = importlib.util.spec_from_file_location("train_tiny", script)
m = importlib.util.module_from_spec(spec)
sys.modules["train_tiny"] = m
spec.loader.exec_module(m)
torch.set_num_threads(1)
variant = sys.argv[1]
kind = sys.argv[2] if len(sys.argv) > 2 else "sam2"
extra = sys.argv[3:]
base = "--out /tmp/x --bce-steps 0 --loss-size 0".split()  # the 128 px configurations
args = m.parse_args(["--model", kind] + base + extra)
torch.manual_seed(0)
model = m.build_from_config({"kind": kind, "model": m.model_config(args)}).train()
if variant == "box_hr0":
    torch.nn.init.zeros_(model.sam_mask_decoder.conv_s0.weight)
    torch.nn.init.zeros_(model.sam_mask_decoder.conv_s0.bias)
    torch.nn.init.zeros_(model.sam_mask_decoder.conv_s1.weight)
    torch.nn.init.zeros_(model.sam_mask_decoder.conv_s1.bias)
ad = m.make_adapter(kind, model)
opt = m.make_optimizer(model, args)
rng = np.random.default_rng(0)
for step in range(200):
    scenes = [m.make_scene(rng, 128) for _ in range(8)]
    imgs = torch.from_numpy(np.stack([s.image for s in scenes]))
    feats = ad.embed(imgs)
    pr = m.sample_prompts(scenes, rng, 8, variant != "point", 0.0)
    if variant == "boxmulti":
        logits, iou_pred = ad.decode(feats, pr, True)
        tg = pr.targets
        logits = m.upsample(logits, tg.shape[-2:])
        loss, iou = m.mask_losses(logits, tg, 20, 1)
        best = loss.argmin(1)
        r = torch.arange(len(best))
        L = loss[r, best].mean()
        iou_mean = float(iou[r, best].mean())
    elif variant == "boxboth":
        L, iou_mean, _ = m.prompt_loss(ad, feats, pr, args)
        logits, _ = ad.decode(feats, pr, True)
        loss, _ = m.mask_losses(
            m.upsample(logits, pr.targets.shape[-2:]),
            pr.targets,
            args.focal_weight,
            args.dice_weight,
        )
        L = L + loss.min(1).values.mean()
    elif variant == "mix":
        L, iou_mean, _ = m.prompt_loss(ad, feats, pr, args)
        pp = m.sample_prompts(scenes, rng, 8, False, 0.0)
        logits, _ = ad.decode(feats, pp, False)
        loss, _ = m.mask_losses(
            m.upsample(logits, pp.targets.shape[-2:]),
            pp.targets,
            args.focal_weight,
            args.dice_weight,
        )
        L = L + loss.mean()
    else:
        L, iou_mean, _ = m.prompt_loss(ad, feats, pr, args, bce=(variant == "box_bce"))
    ad.aux_loss()
    opt.zero_grad()
    L.backward()
    opt.step()
    if step % 25 == 24:
        print(variant, step + 1, float(L), iou_mean, flush=True)
