"""Would 'int8+2:4' (2:4-pruned weights, then int8 per channel) pay? Its accuracy cost on the
tiny trained SAM and SAM 2, next to 2:4 alone, as `fastsam accuracy` measures it (8 scenes,
a point and a box per object, mask IoU against the fp32 reference, all pixels and outside the
logit margin). Not a FastConfig mode: this measurement is why (see README, Compression).

    python scripts/int8_2_4_accuracy.py > bench/results/accuracy-int8-2of4-tiny-cpu.txt
"""

import statistics

import torch

from fastsam_core import FastConfig
from fastsam_core.accuracy import MARGIN, ious, logits_of, prompts_of
from fastsam_core.benchmark import env_info
from fastsam_core.models.quant import Int8Linear, Sparse24Linear, _replace
from fastsam_core.models.tiny import tiny
from fastsam_core.models.tiny_data import make_scenes
from fastsam_core.patch import optimize, restore
from fastsam_core.profiling import commit

print(env_info("cpu"), "commit", commit())
for kind in ("sam", "sam2"):
    model = tiny(kind)
    size = model.image_encoder.img_size if kind == "sam" else model.image_size
    scenes = make_scenes(8, seed=4242, height=size, width=size * 5 // 4)
    prompts = prompts_of(scenes)
    expected = logits_of(model, scenes, prompts)
    for layers in ("all", "mlp"):
        for then_int8 in (False, True):
            optimize(model, FastConfig(dtype=torch.float32, quantize="2:4",
                                       quantize_layers=layers))
            if then_int8:  # each pruned linear quantized to int8 in place of its float weight
                encoder = model.image_encoder
                for path, module in list(encoder.named_modules()):
                    if isinstance(module, Sparse24Linear):
                        _replace(encoder, path, Int8Linear(module))
            got = logits_of(model, scenes, prompts)
            restore(model)
            all_px, margin = ious(got, expected, None), ious(got, expected, MARGIN)
            print(f"tiny {kind}, layers {layers}, {'int8+2:4' if then_int8 else '2:4'}: mask "
                  f"IoU mean {statistics.fmean(all_px):.3f} min {min(all_px):.3f} min outside "
                  f"the margin {min(margin):.3f}")
