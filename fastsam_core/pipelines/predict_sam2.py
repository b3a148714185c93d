"""`predict_batch` for SAM 2 models: several images with their own prompt counts, two calls.

Replaces a loop of `SAM2ImagePredictor.set_image` + `predict` per image (pixel coordinates,
`normalize_coords=True`, no hole filling): one `forward_image` for all images, one mask
decoder call for all prompts (jagged NestedTensors, as for SAM), each prompt reading its own
image's embedding and high-resolution features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2.utils.transforms import SAM2Transforms

from fastsam_core.models.convert import to_device
from fastsam_core.models.fallback import fast_view
from fastsam_core.models.sam.prompt_encoder import FastPromptEncoder
from fastsam_core.models.sam2.mask_decoder import FastSam2MaskDecoder


def predict_batch_sam2(model: SAM2Base, images: Sequence[np.ndarray], parsed: list[dict],
                       multimask_output: bool, predictor: SAM2ImagePredictor | None = None
                       ) -> list[dict[str, torch.Tensor]]:
    """See `fastsam_core.pipelines.predict_batch`; `parsed` as its `_parse_prompts` returns.
    A `predictor`'s mask threshold and hole / sprinkle settings apply, as in its `predict`."""
    prompt_encoder, decoder = fast_sam2_heads(model)
    device = model.device
    if predictor is not None:
        transforms, threshold = predictor._transforms, predictor.mask_threshold
    else:
        transforms, threshold = SAM2Transforms(model.image_size, mask_threshold=0.0), 0.0
    with torch.no_grad():
        sparse, dense = [], []  # prompts first: their small copies never wait for the encoder
        for image, p in zip(images, parsed, strict=True):
            s, d = _embed(prompt_encoder, transforms, image.shape[:2], p, device)
            sparse.append(s)
            dense.append(d)
        image_embed, high_res = _encode(model, images, transforms)
        size = prompt_encoder.image_embedding_size
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        if all(d is None for d in dense):
            dense_all = no_mask.expand(1, -1, *size)
        else:  # some images have mask inputs: one dense embedding per prompt
            dense_all = torch.cat([d if d is not None else no_mask.expand(s.shape[0], -1, *size)
                                   for s, d in zip(sparse, dense, strict=True)])
        low_res, iou, _, _ = decoder.decode_batch(image_embed, prompt_encoder.get_dense_pe(),
                                                  sparse, dense_all, multimask_output, high_res)
        results, start = [], 0
        for image, s in zip(images, sparse, strict=True):
            k = s.shape[0]
            low = low_res[start:start + k]
            masks = transforms.postprocess_masks(low, image.shape[:2]) > threshold
            results.append({"masks": masks, "iou_predictions": iou[start:start + k],
                            "low_res_logits": torch.clamp(low, -32.0, 32.0)})
            start += k
    return results


def fast_sam2_heads(model: SAM2Base) -> tuple[FastPromptEncoder, FastSam2MaskDecoder]:
    """The model's fast prompt encoder and decoder, or fast views sharing its weights."""
    return (fast_view(model.sam_prompt_encoder, FastPromptEncoder, "sam_prompt_encoder"),
            fast_view(model.sam_mask_decoder, FastSam2MaskDecoder, "sam_mask_decoder"))


def _encode(model: SAM2Base, images: Sequence[np.ndarray], transforms: SAM2Transforms):
    """`SAM2ImagePredictor.set_image_batch`'s features: the image embedding n x C x h x w and
    the high-resolution features [n x C/8 x 4h x 4w, n x C/4 x 2h x 2w]."""
    batch = torch.stack([transforms(image) for image in images]).to(model.device)
    backbone_out = model.forward_image(batch)
    _, feats, _, sizes = model._prepare_backbone_features(backbone_out)
    if model.directly_add_no_mem_embed:
        feats[-1] = feats[-1] + model.no_mem_embed
    n = batch.shape[0]
    # HW x n x C -> n x C x H x W per level
    maps = [f.permute(1, 2, 0).reshape(n, -1, *hw) for f, hw in zip(feats, sizes, strict=True)]
    return maps[-1], maps[:-1]


def _embed(prompt_encoder, transforms, original_size, p, device):
    """One image's prompts as `SAM2ImagePredictor._predict` embeds them: boxes become two
    corner points (labels 2, 3) before the clicks."""
    k = p["count"]
    if k == 0:
        return torch.empty(0, 0, prompt_encoder.embed_dim, device=device), None
    coords = labels = masks = None
    if "point_coords" in p:
        coords = transforms.transform_coords(to_device(p["point_coords"].float(), device),
                                             normalize=True, orig_hw=original_size)
        labels = to_device(p["point_labels"].int(), device)
    if "boxes" in p:
        corners = transforms.transform_boxes(to_device(p["boxes"].float(), device),
                                             normalize=True, orig_hw=original_size)  # K x 2 x 2
        corner_labels = to_device(torch.tensor([[2, 3]], dtype=torch.int), device).expand(k, 2)
        coords = corners if coords is None else torch.cat([corners, coords], dim=1)
        labels = corner_labels if labels is None else torch.cat([corner_labels, labels], dim=1)
    if "mask_input" in p:
        masks = to_device(p["mask_input"].float(), device)
    points = None if coords is None else (coords, labels)
    sparse, dense = prompt_encoder(points, None, masks)
    return sparse, dense if masks is not None else None
