"""The numbers behind tests/models/sam2/test_tiny_sam2.py's bf16 check: on the test's scenes,
the tiny SAM 2's masks through SAM2ImagePredictor in fp32 (reference), after optimize() in
bf16 (fast), and the reference under bf16 autocast; per mask (prompt x output) the IoU
outside the logit margin, for every output and for the output each prompt ranks first.
Machine-dependent (bf16 matmul rounding): see the header line.

    PYTHONPATH=. python scripts/runs/sam2_bf16_masks.py > scripts/runs/sam2_bf16_masks.txt
"""

import copy
import statistics

import torch

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.accuracy import predictions_of, prompts_of
from fastsam_core.benchmark import env_info
from fastsam_core.models.tiny import tiny
from fastsam_core.models.tiny_data import make_scenes
from fastsam_core.profiling import commit
from tests.parity import mask_iou_outside_margin

SCENES = make_scenes(3, seed=4242, height=256, width=320)  # the test's
print(env_info("cpu"), "commit", commit())
model = tiny("sam2")
prompts = prompts_of(SCENES)
expected = predictions_of(model, SCENES, prompts)
fast = copy.deepcopy(model)
fastsam_core.optimize(fast, FastConfig(dtype=torch.bfloat16))
runs = {"fast bf16": predictions_of(fast, SCENES, prompts)}
with torch.autocast("cpu", dtype=torch.bfloat16):
    runs["reference, bf16 autocast"] = predictions_of(model, SCENES, prompts)
first_std = [float(b[s.argmax()].std()) for b, s in expected]
print(f"ranked-first masks: median logit std {statistics.median(first_std):.1f}")
for name, got in runs.items():
    worst = (2.0, None)
    for i, ((a, _), (b, scores)) in enumerate(zip(got, expected, strict=True)):
        for c in range(b.shape[0]):
            iou = mask_iou_outside_margin(a[c], b[c])
            if iou < worst[0]:
                worst = (iou, (i, c, float(scores[c]), float(b[c].std()),
                               int(((a[c] > 0) != (b[c] > 0)).sum())))
    best = min(mask_iou_outside_margin(a[s.argmax()], b[s.argmax()])
               for (a, _), (b, s) in zip(got, expected, strict=True))
    iou, (i, c, score, std, flips) = worst
    print(f"{name}: lowest IoU outside the margin {iou:.3f} (prompt {i}, output {c}, "
          f"predicted IoU {score:.2f}, logit std {std:.1f}, {flips} pixels differ in all); "
          f"over ranked-first masks only {best:.3f}")
