"""Short full-recipe runs of the tiny SAM 2 with one change each (scripts/TRAINING.md), a record.

    python scripts/runs/sam2_ablation.py VARIANT [train_tiny options...]

VARIANT: base (as built), nohr (use_high_res_features_in_sam=False: the decoder without the
high-resolution skips), hr0 (skip convolutions zeroed at init, still trained), hrfreeze
(zeroed and frozen for --hr-freeze-steps, default 400, then trained); two hybrids that tell
the encoder from the heads: vit_enc (the tiny SAM's ViT encoder, 16 x 16 embedding, feeding the
SAM 2 prompt encoder and decoder without skips) and sam_heads (the Hiera trunk and neck feeding
the tiny SAM's prompt encoder and decoder); posrand (the Hiera's position embeddings, zeros
as sam2 builds them, drawn from N(0, 0.02) instead); neckscale (the FPN neck's lateral
convolutions initialised 3x larger, --neck-scale S); lnembed (diagnostic, not a sam2
architecture: the image embedding layer-normalised over channels before the decoder);
neckinit (data-dependent init: each lateral convolution of the neck rescaled and its bias
set so its output channels have zero mean and unit variance over 16 training scenes). Runs
`train_tiny.train` with the model built through the variant; everything else comes from the
options (e.g. --steps 300 --bce-steps 0 --eval-images 8 --amg-images 0 --out /tmp/x).
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

tiny = importlib.import_module("fastsam_core.models.tiny")

variant = sys.argv[1]
argv = sys.argv[2:]
freeze_steps = 400
neck_scale = 3.0
if "--neck-scale" in argv:
    i = argv.index("--neck-scale")
    neck_scale = float(argv[i + 1])
    del argv[i : i + 2]
if "--hr-freeze-steps" in argv:
    i = argv.index("--hr-freeze-steps")
    freeze_steps = int(argv[i + 1])
    del argv[i : i + 2]
if variant in ("nohr", "vit_enc", "sam_heads"):
    tiny.SAM2_FLAGS["use_high_res_features_in_sam"] = False
build = m.build_from_config


def skip_convs(model):
    dec = model.sam_mask_decoder
    return [dec.conv_s0.weight, dec.conv_s0.bias, dec.conv_s1.weight, dec.conv_s1.bias]


@torch.no_grad()
def normalise_neck(model):
    rng = np.random.default_rng(12345)  # scenes apart from the training stream
    size = model.image_size
    images = torch.from_numpy(np.stack([m.make_scene(rng, size).image for _ in range(16)]))
    x = (images.permute(0, 3, 1, 2).float() / 255.0 - m.Sam2Adapter.mean) / m.Sam2Adapter.std
    levels = model.image_encoder.trunk(x)
    neck = model.image_encoder.neck
    n = len(neck.convs) - 1
    for i, level in enumerate(levels):
        conv = neck.convs[n - i].conv
        out = conv(level)  # B x C x H x W
        mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))
        conv.weight /= std.view(-1, 1, 1, 1)
        conv.bias.copy_((conv.bias - mean) / std)


def build_variant(config):
    model = build(config)
    if variant == "neckscale":
        with torch.no_grad():
            for conv in model.image_encoder.neck.convs:
                for p in conv.parameters():
                    p.mul_(neck_scale)
    if variant == "neckinit":
        normalise_neck(model)
    if variant == "posrand":
        trunk = model.image_encoder.trunk
        with torch.no_grad():
            torch.nn.init.trunc_normal_(trunk.pos_embed, std=0.02)
            torch.nn.init.trunc_normal_(trunk.pos_embed_window, std=0.02)
    if variant in ("hr0", "hrfreeze") and config["kind"] == "sam2":
        with torch.no_grad():
            for p in skip_convs(model):
                p.zero_()
        if variant == "hrfreeze":  # zero gradients (so zero Adam updates) until unfrozen
            build_variant.frozen = True
            for p in skip_convs(model):
                p.register_hook(lambda g: g * 0 if build_variant.frozen else g)
    return model


m.build_from_config = build_variant


class LnEmbedAdapter(m.Sam2Adapter):
    def embed(self, images):
        feats = super().embed(images)
        e = feats["embed"]
        feats["embed"] = torch.nn.functional.layer_norm(e.permute(0, 2, 3, 1), e.shape[1:2])
        feats["embed"] = feats["embed"].permute(0, 3, 1, 2)
        return feats


class VitEncAdapter(m.Sam2Adapter):
    def embed(self, images):
        x = images.permute(0, 3, 1, 2).float()
        x = (x - self.model.vit_mean) / self.model.vit_std
        return {"embed": self.model.vit(x), "high_res": []}


class SamHeadsAdapter(m.Sam2Adapter):
    def decode(self, feats, prompts, multimask):
        return m.SamAdapter.decode(self, feats, prompts, multimask)


def hybrid(config):
    model = build(config)
    sam = build({"kind": "sam", "model": dict(m.SAM_MODEL)})
    if variant == "vit_enc":
        model.vit = sam.image_encoder
        model.register_buffer("vit_mean", sam.pixel_mean)
        model.register_buffer("vit_std", sam.pixel_std)
        model.sam_prompt_encoder.image_embedding_size = (16, 16)
        del model.image_encoder
    else:
        sam.prompt_encoder.image_embedding_size = (8, 8)
        model.prompt_encoder, model.mask_decoder = sam.prompt_encoder, sam.mask_decoder
        del model.sam_mask_decoder
        model.pred_obj_scores = False
    return model


if variant in ("vit_enc", "sam_heads"):
    m.build_from_config = hybrid
    m.make_adapter = lambda kind, model: (
        VitEncAdapter(model) if variant == "vit_enc" else SamHeadsAdapter(model)
    )
    m.finish = lambda model, record, args: record
if variant == "lnembed":
    m.make_adapter = lambda kind, model: LnEmbedAdapter(model)
    m.finish = lambda model, record, args: record
if variant == "hrfreeze":  # unfreeze after freeze_steps: wrap the per-step lr schedule
    lr_at = m.lr_at

    def lr_and_unfreeze(step, args):
        if step == freeze_steps and build_variant.frozen:
            build_variant.frozen = False
            print(f"skip convolutions unfrozen at step {step}", flush=True)
        return lr_at(step, args)

    m.lr_at = lr_and_unfreeze
m.train(m.parse_args(["--model", "sam2"] + argv))
