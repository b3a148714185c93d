"""SAM 2 video propagation with the objects of a video tracked as one batch.

`SAM2VideoPredictor.propagate_in_video` runs the whole per-frame step (memory attention,
heads, memory encoder) once per object with batch size 1, so its cost grows linearly with the
number of objects. `FastSam2VideoPredictor` (what `optimize()` turns a `SAM2VideoPredictor`
into) runs the objects whose memory banks have the same layout (the same conditioning frames
and the same tracked frames within the memory's reach: objects prompted on the same frames)
as one batch: their stored memories are concatenated along the batch dimension on access, the
step runs once, and its outputs are split back per object, so the inference state keeps the
reference's per-object layout and every other method works on it unchanged. Objects whose
layouts differ form separate batches. Results equal tracking each object alone up to
rounding (the per-object computations are independent; batched kernels may sum in another
order); the reference's own path is used when the model couples the objects of a batch
(`non_overlap_masks_for_mem_enc`). With a bf16 / fp16 image encoder, `init_state` keeps the
video frames in that dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from sam2.sam2_video_predictor import SAM2VideoPredictor
from tqdm import tqdm


class FastSam2VideoPredictor(SAM2VideoPredictor):
    """`SAM2VideoPredictor` with batched multi-object propagation (see the module docstring).
    `propagate_in_video` and `init_state` differ; their arguments and outputs are the
    reference's."""

    @torch.inference_mode()
    def init_state(self, video_path: str, offload_video_to_cpu: bool = False,
                   offload_state_to_cpu: bool = False,
                   async_loading_frames: bool = False) -> dict:
        """The reference's inference state, with the video frames (`state["images"]`) kept in
        the fast image encoder's dtype when it is bf16 / fp16: half the memory of the
        reference's fp32 frames, and the same results, as that encoder rounds its input to its
        dtype anyway. Frames loaded asynchronously (`async_loading_frames`) stay fp32. A state
        made here keeps its rounded frames after `fastsam_core.restore()`: make a new one for
        the reference model."""
        state = super().init_state(video_path, offload_video_to_cpu, offload_state_to_cpu,
                                   async_loading_frames)
        dtype = getattr(self.image_encoder, "dtype", None)  # None: the reference encoder
        if dtype in (torch.bfloat16, torch.float16) and isinstance(state["images"],
                                                                   torch.Tensor):
            state["images"] = state["images"].to(dtype)
        return state

    @torch.inference_mode()
    def propagate_in_video(self, inference_state: dict, start_frame_idx: int | None = None,
                           max_frame_num_to_track: int | None = None,
                           reverse: bool = False) -> Iterator[tuple[int, list, torch.Tensor]]:
        """Yields (frame index, object ids, N x 1 x H x W mask logits at video resolution)
        per frame, as the reference does."""
        if self.non_overlap_masks_for_mem_enc:
            yield from super().propagate_in_video(inference_state, start_frame_idx,
                                                  max_frame_num_to_track, reverse)
            return
        self.propagate_in_video_preflight(inference_state)
        obj_ids = inference_state["obj_ids"]
        per_obj = inference_state["output_dict_per_obj"]
        n_obj = self._get_obj_num(inference_state)
        order = _processing_order(inference_state, start_frame_idx, max_frame_num_to_track,
                                  reverse)
        for frame_idx in tqdm(order, desc="propagate in video"):
            pred_masks: list[torch.Tensor | None] = [None] * n_obj
            to_track: dict[tuple, list[int]] = {}  # memory layout -> objects
            for obj_idx in range(n_obj):
                out = per_obj[obj_idx]
                if frame_idx in out["cond_frame_outputs"]:  # prompted here: stored output
                    current = out["cond_frame_outputs"][frame_idx]
                    pred_masks[obj_idx] = current["pred_masks"].to(inference_state["device"],
                                                                   non_blocking=True)
                    if self.clear_non_cond_mem_around_input:
                        self._clear_obj_non_cond_mem_around_input(inference_state, frame_idx,
                                                                  obj_idx)
                else:
                    to_track.setdefault(self._memory_layout(out, frame_idx), []).append(obj_idx)
            for group in to_track.values():
                merged = {name: _BatchedOutputs([per_obj[i][name] for i in group])
                          for name in ("cond_frame_outputs", "non_cond_frame_outputs")}
                current, masks = self._run_single_frame_inference(
                    inference_state=inference_state, output_dict=merged, frame_idx=frame_idx,
                    batch_size=len(group), is_init_cond_frame=False, point_inputs=None,
                    mask_inputs=None, reverse=reverse, run_mem_encoder=True)
                for k, obj_idx in enumerate(group):
                    per_obj[obj_idx]["non_cond_frame_outputs"][frame_idx] = _slice(current, k)
                    pred_masks[obj_idx] = masks[k : k + 1]
            for obj_idx in range(n_obj):
                inference_state["frames_tracked_per_obj"][obj_idx][frame_idx] = {
                    "reverse": reverse}
            _, video_res_masks = self._get_orig_video_res_output(
                inference_state, torch.cat(pred_masks, dim=0))
            yield frame_idx, obj_ids, video_res_masks

    def _memory_layout(self, obj_output_dict: dict, frame_idx: int) -> tuple:
        """What decides which stored outputs the memory of `frame_idx` reads (SAM2Base.
        _prepare_memory_conditioned_features in eval): the conditioning frames, and the tracked
        frames within reach of the memory frames (num_maskmem, strided) and of the object
        pointers (max_obj_ptrs_in_encoder). Objects with equal layouts read equal frames."""
        stride = self.memory_temporal_stride_for_eval
        reach = max((self.num_maskmem + 1) * stride, self.max_obj_ptrs_in_encoder)
        tracked = obj_output_dict["non_cond_frame_outputs"]
        return (tuple(sorted(obj_output_dict["cond_frame_outputs"])),
                tuple(t for t in range(frame_idx - reach, frame_idx + reach + 1)
                      if t in tracked))


def _processing_order(inference_state: dict, start_frame_idx: int | None,
                      max_frame_num_to_track: int | None, reverse: bool) -> range | list:
    """The frames to visit, in order, as the reference chooses them."""
    num_frames = inference_state["num_frames"]
    if start_frame_idx is None:  # the earliest prompted frame
        start_frame_idx = min(t for out in inference_state["output_dict_per_obj"].values()
                              for t in out["cond_frame_outputs"])
    if max_frame_num_to_track is None:
        max_frame_num_to_track = num_frames
    if reverse:
        end = max(start_frame_idx - max_frame_num_to_track, 0)
        return range(start_frame_idx, end - 1, -1) if start_frame_idx > 0 else []
    end = min(start_frame_idx + max_frame_num_to_track, num_frames - 1)
    return range(start_frame_idx, end + 1)


class _BatchedOutputs(Mapping):
    """Frame index -> the stored outputs of several objects for that frame, each field
    concatenated along the batch dimension when first read (the objects share their frame
    indices; the memory reads a few fields of a few frames, so only those are copied)."""

    def __init__(self, per_object: list[dict]) -> None:
        self._per_object = per_object
        self._frames: dict[int, _BatchedFrame] = {}

    def __getitem__(self, frame_idx: int) -> _BatchedFrame:
        if frame_idx not in self._frames:
            self._frames[frame_idx] = _BatchedFrame([d[frame_idx] for d in self._per_object])
        return self._frames[frame_idx]

    def __iter__(self) -> Iterator[int]:
        return iter(self._per_object[0])

    def __len__(self) -> int:
        return len(self._per_object[0])


class _BatchedFrame(Mapping):
    """Field name -> that field of several objects' outputs for one frame, concatenated."""

    def __init__(self, outputs: list[dict]) -> None:
        self._outputs = outputs
        self._merged: dict[str, object] = {}

    def __getitem__(self, name: str) -> object:
        if name not in self._merged:
            self._merged[name] = _cat([out[name] for out in self._outputs])
        return self._merged[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs[0])

    def __len__(self) -> int:
        return len(self._outputs[0])


def _cat(values: list) -> object:
    """Concatenate one stored field of several objects: tensors along dim 0, lists of
    tensors element-wise; None stays None."""
    if values[0] is None:
        return None
    if isinstance(values[0], list):
        return [torch.cat(parts, dim=0) for parts in zip(*values, strict=True)]
    return torch.cat(values, dim=0)


def _slice(output: dict, k: int) -> dict:
    """Object k's part of a batched compact output (the reference's per-object layout): its
    own copy of each tensor; the position encodings stay views of the shared constant, as
    the reference stores them."""
    def part(value: object) -> object:
        if value is None:
            return None
        if isinstance(value, list):
            return [v[k : k + 1] for v in value]
        return value[k : k + 1].clone()

    return {name: part(value) for name, value in output.items()}
