"""Batched prediction: several images, each with its own number of prompts, in two calls.

Replaces a loop of `SamPredictor.set_image` + `SamPredictor.predict_torch` per image: one image
encoder call for all images, one mask decoder call for all prompts of all images (prompts and
their tokens carried as jagged NestedTensors, see models/sam/transformer.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from fastsam_core.models.convert import to_device
from fastsam_core.models.fallback import fast_view
from fastsam_core.models.sam.mask_decoder import FastMaskDecoder
from fastsam_core.models.sam.prompt_encoder import FastPromptEncoder
from fastsam_core.pipelines.predict_sam2 import predict_batch_sam2

PROMPT_KEYS = ("point_coords", "point_labels", "boxes", "mask_input")


def predict_batch(
    model: Sam | SamPredictor | SAM2Base | SAM2ImagePredictor,
    images: Sequence[np.ndarray],
    prompts: Sequence[dict],
    multimask_output: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Masks for the prompts of several images, as `SamPredictor.predict_torch` per image (for
    SAM 2: as `SAM2ImagePredictor.predict` per image, with pixel coordinates).

    Args:
        model: a segment_anything `Sam` or `SamPredictor`, or a sam2 `SAM2Base` or
            `SAM2ImagePredictor` (optimized or not).
        images: H x W x 3 uint8 RGB arrays; sizes may differ.
        prompts: one dict per image, each key optional: `point_coords` K x P x 2 and
            `point_labels` K x P, `boxes` K x 4 (XYXY), in that image's pixel coordinates;
            `mask_input` K x 1 x 256 x 256 low-resolution logits. K (may be 0) and P may
            differ between images.
        multimask_output: 3 masks per prompt if True, else 1.

    Returns:
        Per image: `masks` K x M x H x W bool, `iou_predictions` K x M, `low_res_logits`
        K x M x 256 x 256 (M = 3 or 1), on the model's device.

    Raises:
        TypeError: `model` is not a SAM / SAM 2 model or image predictor.
        ValueError: bad images or prompts, naming the image and the key.
    """
    sam = model.model if isinstance(model, (SamPredictor, SAM2ImagePredictor)) else model
    if not isinstance(sam, (Sam, SAM2Base)):
        raise TypeError(f"model must be a segment_anything Sam / SamPredictor or a sam2 "
                        f"SAM2Base / SAM2ImagePredictor, got {type(model).__name__}")
    if isinstance(images, np.ndarray):
        raise ValueError("images: expected a list of H x W x 3 arrays, got one array (pass "
                         "[image] for one image, list(images) for a stacked batch)")
    if isinstance(prompts, dict):
        raise ValueError("prompts: expected a list of dicts, one per image, got one dict "
                         "(pass [prompts])")
    if len(images) != len(prompts):
        raise ValueError(f"images has {len(images)} entries but prompts has {len(prompts)}")
    for i, image in enumerate(images):
        _check_image(i, image)
    if not images:
        return []
    if isinstance(sam, SAM2Base):
        mask_size = sam.sam_prompt_encoder.mask_input_size
        parsed = [_parse_prompts(i, p, mask_size) for i, p in enumerate(prompts)]
        predictor = model if isinstance(model, SAM2ImagePredictor) else None
        return predict_batch_sam2(sam, images, parsed, multimask_output, predictor)
    prompt_encoder, decoder = fast_prompt_path(sam)
    device = sam.device
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    parsed = [_parse_prompts(i, p, prompt_encoder.mask_input_size) for i, p in enumerate(prompts)]

    with torch.no_grad():
        sparse, dense = [], []  # prompts first: their small copies never wait for the encoder
        for image, p in zip(images, parsed, strict=True):
            s, d = _embed(prompt_encoder, transform, image.shape[:2], p, device)
            sparse.append(s)
            dense.append(d)
        embeddings, input_sizes = encode_images(sam, images, transform)
        if all(d is None for d in dense):
            mask_embed = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            dense_all = mask_embed.expand(1, -1, *prompt_encoder.image_embedding_size)
        else:  # some images have mask inputs: one dense embedding per prompt
            no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            dense_all = torch.cat([
                d if d is not None else no_mask.expand(s.shape[0], -1,
                                                       *prompt_encoder.image_embedding_size)
                for s, d in zip(sparse, dense, strict=True)
            ])
        low_res, iou = decoder.decode_batch(embeddings, prompt_encoder.get_dense_pe(), sparse,
                                            dense_all, multimask_output)

        results, start = [], 0
        for image, s, input_size in zip(images, sparse, input_sizes, strict=True):
            k = s.shape[0]
            low = low_res[start:start + k]
            masks = sam.postprocess_masks(low, input_size, image.shape[:2]) > sam.mask_threshold
            results.append({"masks": masks, "iou_predictions": iou[start:start + k],
                            "low_res_logits": low})
            start += k
    return results


def encode_images(
    sam: Sam, images: Sequence[np.ndarray], transform: ResizeLongestSide
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One image-encoder call for `images` (RGB), transformed as `SamPredictor.set_image`
    does (channels reversed for a model whose `image_format` is BGR).

    Returns:
        n_img x C x h x w embeddings, and each image's size after resizing (the model input
        before padding).
    """
    inputs, input_sizes = [], []
    for image in images:
        if sam.image_format != "RGB":
            image = image[..., ::-1]
        resized = torch.as_tensor(transform.apply_image(image), device=sam.device)
        input_sizes.append(tuple(resized.shape[:2]))
        inputs.append(sam.preprocess(resized.permute(2, 0, 1).float()))  # 3 x S x S
    return sam.image_encoder(torch.stack(inputs)), input_sizes


def fast_prompt_path(sam: Sam) -> tuple[FastPromptEncoder, FastMaskDecoder]:
    """The model's fast prompt encoder and decoder, or fast views sharing its weights."""
    return (fast_view(sam.prompt_encoder, FastPromptEncoder, "prompt_encoder"),
            fast_view(sam.mask_decoder, FastMaskDecoder, "mask_decoder"))



def _check_image(i: int, image: object) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"images[{i}]: expected an H x W x 3 uint8 array, got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"images[{i}]: expected dtype uint8, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"images[{i}]: an empty image, shape {image.shape}")


def _parse_prompts(i: int, prompts: object, mask_size: tuple[int, int]) -> dict:
    """Validate one image's prompt dict; tensors on the CPU, K counted."""
    if not isinstance(prompts, dict):
        raise ValueError(f"prompts[{i}]: expected a dict, got {type(prompts).__name__}")
    unknown = set(prompts) - set(PROMPT_KEYS)
    if unknown:
        raise ValueError(f"prompts[{i}]: unknown key(s) {sorted(unknown)}; "
                         f"expected some of {PROMPT_KEYS}")
    out = {key: _as_real_tensor(i, key, prompts[key])
           for key in PROMPT_KEYS if prompts.get(key) is not None}
    if ("point_coords" in out) != ("point_labels" in out):
        have, missing = (("point_coords", "point_labels") if "point_coords" in out
                         else ("point_labels", "point_coords"))
        raise ValueError(f"prompts[{i}]['{have}'] given without '{missing}'")
    expected = {"point_coords": "K x P x 2", "point_labels": "K x P", "boxes": "K x 4",
                "mask_input": f"K x 1 x {mask_size[0]} x {mask_size[1]}"}
    shape_ok = {
        "point_coords": lambda s: len(s) == 3 and s[2] == 2,
        "point_labels": lambda s: len(s) == 2,
        "boxes": lambda s: len(s) == 2 and s[1] == 4,
        "mask_input": lambda s: len(s) == 4 and tuple(s[1:]) == (1, *mask_size),
    }
    for key, value in out.items():
        if not shape_ok[key](tuple(value.shape)):
            raise ValueError(f"prompts[{i}]['{key}']: expected {expected[key]}, "
                             f"got shape {tuple(value.shape)}")
    if "point_coords" in out and out["point_coords"].shape[:2] != out["point_labels"].shape:
        raise ValueError(f"prompts[{i}]['point_labels']: shape {tuple(out['point_labels'].shape)}"
                         f" does not match point_coords {tuple(out['point_coords'].shape)}")
    counts = {key: value.shape[0] for key, value in out.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"prompts[{i}]: keys disagree on the prompt count K: {counts}")
    out["count"] = next(iter(counts.values()), 0)
    return out


def _as_real_tensor(i: int, key: str, value: object) -> torch.Tensor:
    try:
        tensor = value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"prompts[{i}]['{key}']: not an array of numbers ({err})") from None
    if tensor.is_complex():  # bool passes: the reference predictors cast it, as we do
        raise ValueError(f"prompts[{i}]['{key}']: expected real numbers, got {tensor.dtype}")
    return tensor


def _embed(prompt_encoder: FastPromptEncoder, transform: ResizeLongestSide,
           original_size: tuple[int, int], p: dict, device: torch.device):
    """One image's prompts: K x T x C sparse embeddings and K x C x h x w dense (or None)."""
    k = p["count"]
    if k == 0:
        return torch.empty(0, 0, prompt_encoder.embed_dim, device=device), None
    points = boxes = masks = None
    if "point_coords" in p:
        coords = transform.apply_coords_torch(to_device(p["point_coords"], device),
                                              original_size)
        points = (coords, to_device(p["point_labels"].int(), device))
    if "boxes" in p:
        boxes = transform.apply_boxes_torch(to_device(p["boxes"].float(), device),
                                            original_size)
    if "mask_input" in p:
        masks = to_device(p["mask_input"].float(), device)
    sparse, dense = prompt_encoder(points, boxes, masks)
    return sparse, dense if masks is not None else None
