"""Automatic mask generation ("segment everything"), fast and memory-bounded.

Replaces the mask-generation core (`_generate_masks`, `_process_crop`, `_process_batch`) of
`segment_anything.SamAutomaticMaskGenerator` and `sam2.automatic_mask_generator.
SAM2AutomaticMaskGenerator`; their `generate()` (small-region removal, output modes, the
annotation records) runs unchanged on our results, so the constructor arguments and the output
are the reference's. Differences, all exact in fp32:

- the crops of an image go through the image encoder in batches of up to 8 (`ENCODER_BATCH`);
- point batches are large (`points_per_batch`, default 256) and decoded through the fast
  prompt path;
- the predicted-IoU filter runs before any upsampling (it does not depend on the masks);
  the stability score, binarization and boxes of the survivors are computed on the device
  from full-resolution logits made by the reference's own upsampling, a bounded chunk of
  masks at a time (`max_chunk_bytes` counts every full-resolution buffer of a chunk), and
  only their low-resolution logits are kept;
- after NMS, the kept masks are upsampled again, chunk by chunk, and run-length encoded on the
  device: the host receives the change positions of all masks in one copy per image instead
  of the reference's one per mask. Filtering still synchronizes (twice per point batch and
  once per NMS: the surviving counts decide the shapes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.modeling.sam2_base import SAM2Base
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    MaskData,
    batched_mask_to_box,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
    uncrop_points,
)
from torchvision.ops.boxes import batched_nms, box_area

from fastsam_core.pipelines.predict import encode_images, fast_prompt_path
from fastsam_core.pipelines.predict_sam2 import _encode as encode_images_sam2
from fastsam_core.pipelines.predict_sam2 import fast_sam2_heads

DEFAULT_MAX_CHUNK_BYTES = 1 << 30  # full-resolution logits + masks upsampled at once: 1 GiB
ENCODER_BATCH = 8  # crops per image-encoder call


class _FastGeneration:
    """The model-independent core; the model families supply `_encode`, `_decode`,
    `_upsampling_of`, `_upsample`, `_threshold` and `_reset_predictor` (see the two
    generators below)."""

    max_chunk_bytes: int

    def _check_fast_args(self, model: object, family: type, points_per_batch: object,
                         max_chunk_bytes: object) -> None:
        if not isinstance(model, family):
            raise TypeError(f"{type(self).__name__}: model must be a {family.__module__}."
                            f"{family.__name__}, got {type(model).__name__}")
        for name, value in (("points_per_batch", points_per_batch),
                            ("max_chunk_bytes", max_chunk_bytes)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")

    @torch.no_grad()
    def _generate_masks(self, image: np.ndarray) -> MaskData:
        if getattr(image, "ndim", None) == 3 and image.shape[2] != 3:  # RGBA, ...
            raise ValueError(f"image: expected an H x W x 3 RGB array, got shape {image.shape}")
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(
            orig_size, self.crop_n_layers, self.crop_overlap_ratio
        )
        crops = [image[y0:y1, x0:x1, :] for x0, y0, x1, y1 in crop_boxes]
        data = MaskData()
        upsampling = []  # per crop: what _upsample needs, kept once its features are freed
        for start in range(0, len(crops), ENCODER_BATCH):
            # the features of one encoder batch at a time: the crops' masks only need them
            # until their candidates are decoded
            for i, feature in enumerate(self._encode(crops[start:start + ENCODER_BATCH]),
                                        start):
                upsampling.append(self._upsampling_of(feature))
                crop_data = self._crop_candidates(feature, crops[i].shape[:2], crop_boxes[i],
                                                  layer_idxs[i], orig_size)
                crop_data["crop_index"] = torch.full_like(crop_data["iou_preds"], i,
                                                          dtype=torch.long)
                data.cat(crop_data)
            del feature  # a view of the whole batch: freed before the next one is encoded

        if len(crop_boxes) > 1:
            scores = 1 / box_area(data["crop_boxes"])
            keep = batched_nms(data["boxes"].float(), scores.to(data["boxes"].device),
                               torch.zeros_like(scores), iou_threshold=self.crop_nms_thresh)
            data.filter(keep)
        data["rles"] = self._encode_rles(data, crop_boxes, upsampling, crops, orig_size)
        del data["low_res"], data["crop_index"]
        self._to_numpy(data)
        self._reset_predictor()
        return data

    def _reset_predictor(self) -> None:
        """No image set on the predictor after generating, as the reference leaves it (it
        sets each crop on the predictor and resets it): a predict() on an image set before
        raises there, where it would silently use that image."""
        raise NotImplementedError

    def _to_numpy(self, data: MaskData) -> None:
        data.to_numpy()

    def _crop_candidates(self, feature, crop_size: tuple[int, int], crop_box: list[int],
                         layer_idx: int, orig_size: tuple[int, int]) -> MaskData:
        """Decode the crop's grid points, filter, NMS: the crop's surviving masks, kept as
        low-resolution logits with their scores and boxes (in image coordinates)."""
        device = self.predictor.model.device
        points_scale = np.array(crop_size)[None, ::-1]
        points_for_image = self.point_grids[layer_idx] * points_scale
        orig_h, orig_w = orig_size
        data = MaskData()
        for start in range(0, len(points_for_image), self.points_per_batch):
            points = points_for_image[start:start + self.points_per_batch]
            low_res, iou_preds, point_rows = self._decode(feature, points, crop_size)
            batch = MaskData(low_res=low_res, iou_preds=iou_preds, points=point_rows)
            if self.pred_iou_thresh > 0.0:  # exact before upsampling: scores only
                _keep(batch, batch["iou_preds"] > self.pred_iou_thresh)
            batch["stability_score"], batch["boxes"] = self._score_and_box(
                batch["low_res"], self._upsampling_of(feature), crop_size)
            keep = ~is_box_near_crop_edge(batch["boxes"], crop_box, [0, 0, orig_w, orig_h])
            if self.stability_score_thresh > 0.0:
                keep &= batch["stability_score"] >= self.stability_score_thresh
            _keep(batch, keep)
            data.cat(batch)
        keep = batched_nms(data["boxes"].float(), data["iou_preds"],
                           torch.zeros_like(data["iou_preds"]), iou_threshold=self.box_nms_thresh)
        data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        if len(keep):
            data["crop_boxes"] = torch.tensor(crop_box, device=device).expand(len(keep), 4)
        else:  # the reference's torch.tensor([]): float32, so joining the crops' results
            data["crop_boxes"] = torch.empty(0, device=device)  # makes every crop_box float
        return data

    def _chunk(self, bytes_per_mask: int) -> int:
        """Masks per chunk under max_chunk_bytes (at least one)."""
        return max(1, self.max_chunk_bytes // bytes_per_mask)

    def _upsampled(self, low_res: torch.Tensor, upsampling, crop_size: tuple[int, int],
                   extra_bytes_per_mask: int = 0) -> Iterator[torch.Tensor]:
        """Full-resolution logits of `low_res` (M x h x w), a bounded chunk at a time: the
        upsampling's own buffers, the fp32 logits, a boolean mask, plus what the caller
        allocates per mask."""
        h, w = crop_size
        chunk = self._chunk(self._upsampling_bytes(crop_size) + 5 * h * w
                            + extra_bytes_per_mask)
        for start in range(0, low_res.shape[0], chunk):
            yield self._upsample(low_res[start:start + chunk], upsampling, crop_size)

    def _score_and_box(self, low_res: torch.Tensor, upsampling, crop_size: tuple[int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stability scores (M) and XYXY boxes (M x 4, crop coordinates) of the masks."""
        threshold = self._threshold()
        scores, boxes = [low_res.new_empty(0)], [low_res.new_empty(0, 4, dtype=torch.long)]
        for logits in self._upsampled(low_res, upsampling, crop_size):
            scores.append(calculate_stability_score(logits, threshold,
                                                    self.stability_score_offset))
            boxes.append(batched_mask_to_box(logits > threshold))
        return torch.cat(scores), torch.cat(boxes)

    def _encode_rles(self, data: MaskData, crop_boxes: list[list[int]], upsampling: list,
                     crops: list[np.ndarray], orig_size: tuple[int, int]) -> list[dict]:
        """Uncompressed RLEs of the kept masks, in image coordinates: upsampled again per crop
        and chunk, encoded on the device, copied to the host once."""
        crop_index = data["crop_index"].cpu().numpy()  # which crop made each kept mask
        h, w = orig_size
        threshold = self._threshold()
        firsts, changes, order = [], [], []
        done = 0
        for crop in np.unique(crop_index):
            members = np.flatnonzero(crop_index == crop)
            order.extend(members)
            x0, y0, _, _ = crop_boxes[crop]
            crop_size = crops[crop].shape[:2]
            pad = (x0, w - x0 - crop_size[1], y0, h - y0 - crop_size[0])
            low_res = data["low_res"][torch.as_tensor(members, device=data["low_res"].device)]
            # per mask and image pixel: the padded mask, its column-major copy, the XOR
            for logits in self._upsampled(low_res, upsampling[crop], crop_size, 3 * h * w):
                masks = torch.nn.functional.pad(logits > threshold, pad)  # m x h x w
                first, change = _rle_changes(masks)
                change[:, 0] += done
                done += masks.shape[0]
                firsts.append(first)
                changes.append(change)
        if not firsts:
            return []
        rles = _rles_from_changes(torch.cat(firsts).cpu().numpy(),
                                  torch.cat(changes).cpu().numpy(), h, w)
        out: list[dict] = [{}] * len(rles)
        for rle, index in zip(rles, order, strict=True):
            out[index] = rle
        return out


class FastAutomaticMaskGenerator(_FastGeneration, SamAutomaticMaskGenerator):
    """`SamAutomaticMaskGenerator` with a fast, memory-bounded core (see the module docstring).

    Args:
        model: a segment_anything `Sam`, optimized or not.
        points_per_side: as the reference's.
        points_per_batch: grid points decoded per mask-decoder call (default 256; the results
            do not depend on it).
        *args, **kwargs: every other argument of `SamAutomaticMaskGenerator`, in its order,
            same meaning.
        max_chunk_bytes (keyword only): at most this many bytes of full-resolution buffers
            exist at once: the upsampling's intermediates, fp32 logits, boolean masks and,
            for the RLE, three image-size copies (default 1 GiB; at least one mask is always
            processed).
    """

    def __init__(self, model: Sam, points_per_side: int | None = 32,
                 points_per_batch: int = 256, *args: Any,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, **kwargs: Any) -> None:
        self._check_fast_args(model, Sam, points_per_batch, max_chunk_bytes)
        super().__init__(model, points_per_side, int(points_per_batch), *args, **kwargs)
        self.max_chunk_bytes = int(max_chunk_bytes)

    def _threshold(self) -> float:
        return self.predictor.model.mask_threshold

    def _reset_predictor(self) -> None:
        self.predictor.reset_image()

    def _upsampling_bytes(self, crop_size: tuple[int, int]) -> int:
        size = self.predictor.model.image_encoder.img_size  # Sam.postprocess_masks goes
        return 4 * size * size  # through the padded input size in fp32 first

    def _upsampling_of(self, feature: tuple) -> tuple[int, int]:
        return feature[1]  # the crop's input size

    def _encode(self, crops: list[np.ndarray]) -> list[tuple]:
        embeddings, input_sizes = encode_images(self.predictor.model, crops,
                                                self.predictor.transform)
        return [(e[None], s) for e, s in zip(embeddings, input_sizes, strict=True)]

    def _decode(self, feature, points: np.ndarray, crop_size: tuple[int, int]):
        """(points x 3) low-res logits and IoU predictions, and each mask's point."""
        embedding, _ = feature
        device = embedding.device
        prompt_encoder, decoder = fast_prompt_path(self.predictor.model)
        coords = torch.as_tensor(self.predictor.transform.apply_coords(points, crop_size),
                                 device=device)
        labels = torch.ones(len(points), 1, dtype=torch.int, device=device)
        sparse, dense = prompt_encoder((coords[:, None, :], labels), None, None)
        low_res, iou = decoder(embedding, prompt_encoder.get_dense_pe(), sparse, dense, True)
        rows = torch.as_tensor(points.repeat(low_res.shape[1], axis=0), device=device)
        return low_res.flatten(0, 1), iou.flatten(0, 1), rows

    def _upsample(self, low_res: torch.Tensor, input_size: tuple[int, int],
                  crop_size: tuple[int, int]):
        sam = self.predictor.model  # m x h x w -> m x H x W, as Sam.postprocess_masks does
        return sam.postprocess_masks(low_res[:, None], input_size, crop_size)[:, 0]


class FastSam2AutomaticMaskGenerator(_FastGeneration, SAM2AutomaticMaskGenerator):
    """`SAM2AutomaticMaskGenerator` with the same fast, memory-bounded core.

    Args:
        model: a sam2 `SAM2Base`, optimized or not.
        points_per_side, points_per_batch, max_chunk_bytes: as for
            `FastAutomaticMaskGenerator`.
        *args, **kwargs: every other argument of `SAM2AutomaticMaskGenerator` (`use_m2m` and
            `multimask_output` included), in its order, same meaning.
    """

    def __init__(self, model: SAM2Base, points_per_side: int | None = 32,
                 points_per_batch: int = 256, *args: Any,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, **kwargs: Any) -> None:
        self._check_fast_args(model, SAM2Base, points_per_batch, max_chunk_bytes)
        super().__init__(model, points_per_side, int(points_per_batch), *args, **kwargs)
        self.max_chunk_bytes = int(max_chunk_bytes)

    def _threshold(self) -> float:
        return self.mask_threshold

    def _reset_predictor(self) -> None:
        self.predictor.reset_predictor()

    def _upsampling_bytes(self, crop_size: tuple[int, int]) -> int:
        return 0  # SAM2Transforms.postprocess_masks interpolates straight to the crop size

    def _upsampling_of(self, feature: tuple) -> None:
        return None  # the crop size is all it needs

    def _to_numpy(self, data: MaskData) -> None:
        # sam2's MaskData.to_numpy casts every tensor to float: its records carry float boxes
        for key, value in list(data.items()):
            if isinstance(value, torch.Tensor):
                data[key] = value.float()
        data.to_numpy()

    def _encode(self, crops: list[np.ndarray]) -> list[tuple]:
        embed, high_res = encode_images_sam2(self.predictor.model, crops,
                                             self.predictor._transforms)
        return [(embed[i:i + 1], [f[i:i + 1] for f in high_res]) for i in range(len(crops))]

    def _decode(self, feature, points: np.ndarray, crop_size: tuple[int, int]):
        """As the reference's `_process_batch` (and `refine_with_m2m` with use_m2m): low-res
        logits and IoU predictions per mask, and each mask's point."""
        embedding, high_res = feature
        device = embedding.device
        points = torch.as_tensor(points, dtype=torch.float32, device=device)
        coords = self.predictor._transforms.transform_coords(points, normalize=True,
                                                             orig_hw=crop_size)
        labels = torch.ones(len(points), 1, dtype=torch.int, device=device)
        low_res, iou = self._predict(feature, coords[:, None, :], labels, None,
                                     self.multimask_output)
        n_masks = low_res.shape[1]
        rows = points.repeat_interleave(n_masks, dim=0)
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)
        if self.use_m2m:  # one refinement step, from each mask's own (clamped) logits
            coords = coords.repeat_interleave(n_masks, dim=0)
            labels = labels.repeat_interleave(n_masks, dim=0)
            mask_input = torch.clamp(low_res, -32.0, 32.0)[:, None]
            refined = [self._predict(feature, coords[i:i + self.points_per_batch, None, :],
                                     labels[i:i + self.points_per_batch],
                                     mask_input[i:i + self.points_per_batch], False)
                       for i in range(0, len(coords), self.points_per_batch)]
            low_res = torch.cat([r[0][:, 0] for r in refined])
            iou = torch.cat([r[1][:, 0] for r in refined])
        return low_res, iou, rows

    def _predict(self, feature, coords, labels, mask_input, multimask_output):
        embedding, high_res = feature
        prompt_encoder, decoder = fast_sam2_heads(self.predictor.model)
        sparse, dense = prompt_encoder((coords, labels), None, mask_input)
        repeat_image = coords.shape[0] > 1  # as the predictor: one image for all prompts
        low_res, iou, _, _ = decoder(embedding, prompt_encoder.get_dense_pe(), sparse, dense,
                                     multimask_output, repeat_image, high_res)
        return low_res, iou

    def _upsample(self, low_res: torch.Tensor, upsampling: None, crop_size: tuple[int, int]):
        # m x h x w -> m x H x W through SAM2Transforms.postprocess_masks, as the predictor
        return self.predictor._transforms.postprocess_masks(low_res[:, None], crop_size)[:, 0]


def _keep(data: MaskData, keep: torch.Tensor) -> None:
    """Filter every entry with one boolean-to-index conversion (one sync, not one per key)."""
    data.filter(keep.nonzero().squeeze(1))


def _rle_changes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First pixel and change positions of M x h x w boolean masks in column-major order.

    Returns:
        first: M bool; changes: N x 2 (mask, index i where pixel i + 1 differs from pixel i).
    """
    flat = masks.transpose(1, 2).flatten(1)  # Fortran order, as COCO's RLE
    return flat[:, 0], (flat[:, 1:] ^ flat[:, :-1]).nonzero()


def _rles_from_changes(first: np.ndarray, changes: np.ndarray, h: int, w: int) -> list[dict]:
    """COCO uncompressed RLEs from the `_rle_changes` of all masks (host side)."""
    bounds = np.searchsorted(changes[:, 0], np.arange(len(first) + 1))
    rles = []
    for i, starts_on in enumerate(first):
        edges = np.concatenate([[0], changes[bounds[i]:bounds[i + 1], 1] + 1, [h * w]])
        rles.append({"size": [h, w], "counts": ([0] if starts_on else []) + np.diff(edges)
                     .tolist()})
    return rles
