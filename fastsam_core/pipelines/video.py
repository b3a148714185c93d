"""SAM 2 video propagation with the objects of a video tracked as one batch.

`SAM2VideoPredictor.propagate_in_video` runs the whole per-frame step (memory attention,
heads, memory encoder) once per object with batch size 1, so its cost grows linearly with the
number of objects. `FastSam2VideoPredictor` (what `optimize()` turns a `SAM2VideoPredictor`
into) runs all the objects tracked on a frame as one batch through the whole per-frame step
(memory attention, heads, memory encoder), and splits its outputs back per object, so the
inference state keeps the reference's per-object layout and every other method works on it
unchanged. Two ways to batch the memories:

- objects whose memory banks have the same layout (the same conditioning frames and the same
  tracked frames within the memory's reach: objects prompted on the same frames) read their
  stored memories concatenated along the batch dimension;
- objects whose layouts differ (prompted on different frames, corrected apart) each gather
  their own bank with the reference's selection, and the banks are padded to one layout with
  a key mask (`pad_memory_banks`): the fast memory attention lets each object attend only to
  its own memories. (With the reference memory attention, which takes no mask, such objects
  form one batch per layout instead.)

Results equal tracking each object alone up to rounding (the per-object computations are
independent; batched kernels may sum in another order); the reference's own path is used when
the model couples the objects of a batch (`non_overlap_masks_for_mem_enc`). With a bf16 /
fp16 image encoder, `init_state` keeps the video frames in that dtype.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from sam2.sam2_video_predictor import SAM2VideoPredictor
from sam2.utils.misc import fill_holes_in_mask_scores
from torch import nn
from tqdm import tqdm

from fastsam_core.models.sam2.memory_attention import FastMemoryAttention
from fastsam_core.pipelines.video_frames import frames_loaded_in


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
        dtype anyway. A JPEG folder or an MP4 file (decoded with decord, as the reference
        does) is read frame by frame, each computed in fp32 as the reference computes it and
        then rounded, so neither the host nor the device holds the fp32 video
        (`pipelines.video_frames`). With `async_loading_frames` a JPEG folder's frames are
        loaded in a background thread as the reference loads them, into that dtype
        (`AsyncJpegFrames`; sam2 ignores the flag for a video file). A state made here keeps
        its rounded frames after `fastsam_core.restore()`: make a new one for the reference
        model."""
        dtype = getattr(self.image_encoder, "dtype", None)  # None: the reference encoder
        if dtype not in (torch.bfloat16, torch.float16):
            return super().init_state(video_path, offload_video_to_cpu, offload_state_to_cpu,
                                      async_loading_frames)
        device = torch.device("cpu") if offload_video_to_cpu else self.device
        with frames_loaded_in(dtype, device):
            return super().init_state(video_path, offload_video_to_cpu, offload_state_to_cpu,
                                      async_loading_frames)

    @torch.inference_mode()
    def propagate_in_video(self, inference_state: dict, start_frame_idx: int | None = None,
                           max_frame_num_to_track: int | None = None,
                           reverse: bool = False) -> Iterator[tuple[int, list, torch.Tensor]]:
        """Yields (frame index, object ids, N x 1 x H x W mask logits at video resolution)
        per frame, as the reference does."""
        for _, frame_idx, obj_ids, masks in self.propagate_in_videos(
                [inference_state], start_frame_idx, max_frame_num_to_track, reverse):
            yield frame_idx, obj_ids, masks

    @torch.inference_mode()
    def propagate_in_videos(self, inference_states: Sequence[dict],
                            start_frame_idx: int | Sequence[int | None] | None = None,
                            max_frame_num_to_track: int | None = None, reverse: bool = False
                            ) -> Iterator[tuple[int, int, list, torch.Tensor]]:
        """Propagate several videos (inference states of this predictor, each prompted as
        for `propagate_in_video`) at once: step t tracks the t-th frame of every video's
        processing order: the frames of the step go through the image encoder as one batch
        (each cached in its own state, as the reference caches a frame), and the objects of
        all the videos through the per-frame step as one batch. Each video gets what
        `propagate_in_video` alone gives it.

        Args:
            inference_states: distinct states from `init_state` (videos may differ in
                length and resolution: frames are resized to the model's size).
            start_frame_idx: one start for all videos, one per video, or None (each video's
                earliest prompted frame).
            max_frame_num_to_track, reverse: as `propagate_in_video`, for every video.

        Yields:
            (video index into `inference_states`, frame index, object ids, N x 1 x H x W mask
            logits at that video's resolution), per step in the order of the states; a
            video whose frames have run out is skipped. With
            `non_overlap_masks_for_mem_enc` (it couples a video's objects) the videos run one
            after the other through the reference's propagation.
        """
        states, starts = _check_videos_args(inference_states, start_frame_idx)
        for v, state in enumerate(states):
            if len(states) > 1 and self._get_obj_num(state) == 0:  # one: sam2's own error
                raise RuntimeError(f"propagate_in_videos: inference_states[{v}] has no input "
                                   "points or masks for any object; please add inputs first")
        if self.non_overlap_masks_for_mem_enc:
            for v, (state, start) in enumerate(zip(states, starts, strict=True)):
                for frame_idx, obj_ids, masks in super().propagate_in_video(
                        state, start, max_frame_num_to_track, reverse):
                    yield v, frame_idx, obj_ids, masks
            return
        orders, objects = [], []
        for state, start in zip(states, starts, strict=True):
            self.propagate_in_video_preflight(state)
            orders.append(list(_processing_order(state, start, max_frame_num_to_track,
                                                 reverse)))
            # as the reference: the objects of the preflight, whatever is prompted meanwhile
            # (a copy: reset_state, and remove_object of the last object, clear the list)
            objects.append(list(state["obj_ids"]))
        desc = "propagate in video" + ("s" if len(states) > 1 else "")
        for step in tqdm(range(max(map(len, orders), default=0)), desc=desc):
            frames = [(v, order[step]) for v, order in enumerate(orders) if step < len(order)]
            for v, _ in frames:
                _check_objects_kept(states[v], objects[v], v)
            pred_masks = {v: self._prompted_outputs(states[v], t, len(objects[v]))
                          for v, t in frames}
            tracked = [_Entry(states[v], v, t, obj_idx) for v, t in frames
                       for obj_idx, mask in enumerate(pred_masks[v]) if mask is None]
            self._encode_frames(tracked)
            for batch, uniform in self._batches(tracked):
                for entry, masks in zip(batch, self._track_batch(batch, uniform, reverse),
                                        strict=True):
                    pred_masks[entry.video][entry.obj_idx] = masks
            for v, t in frames:  # every video's outputs of the step are stored: tracked, also
                for obj_idx in range(len(pred_masks[v])):  # if the caller stops before its turn
                    states[v]["frames_tracked_per_obj"][obj_idx][t] = {"reverse": reverse}
            for v, t in frames:
                _, video_res_masks = self._get_orig_video_res_output(
                    states[v], torch.cat(pred_masks[v], dim=0))
                yield v, t, objects[v], video_res_masks

    def _encode_frames(self, entries: list[_Entry]) -> None:
        """Encode the frames that `entries` need and their states have not cached, several
        videos' frames in one image-encoder call, and cache each in its own state as
        `_get_image_feature` does (a lone frame is left to it)."""
        todo: dict[int, _Entry] = {}
        for e in entries:
            if e.video not in todo and e.frame_idx not in e.state["cached_features"]:
                todo[e.video] = e
        if len(todo) < 2:
            return
        # B x 3 x S x S, each frame as _get_image_feature loads it
        images = torch.cat([e.state["images"][e.frame_idx].to(e.state["device"]).float()[None]
                            for e in todo.values()])
        backbone_out = self.forward_image(images)
        for k, e in enumerate(todo.values()):
            own = {name: _rows(value, slice(k, k + 1)) for name, value in backbone_out.items()}
            e.state["cached_features"] = {e.frame_idx: (images[k : k + 1], own)}

    def _prompted_outputs(self, state: dict, frame_idx: int, n_objects: int
                          ) -> list[torch.Tensor | None]:
        """Per object of the first `n_objects`: its stored mask if it was prompted on
        `frame_idx` (to be tracked: None), clearing the memory around the prompt if the model
        says so."""
        masks: list[torch.Tensor | None] = []
        for obj_idx in range(n_objects):
            cond = state["output_dict_per_obj"][obj_idx]["cond_frame_outputs"]
            if frame_idx in cond:
                masks.append(cond[frame_idx]["pred_masks"].to(state["device"],
                                                              non_blocking=True))
                if self.clear_non_cond_mem_around_input:
                    self._clear_obj_non_cond_mem_around_input(state, frame_idx, obj_idx)
            else:
                masks.append(None)
        return masks

    def _batches(self, entries: list[_Entry]) -> list[tuple[list[_Entry], bool]]:
        """The batches of one step, each with whether it is uniform: entries (objects to
        track) of one video with one memory layout read their memories concatenated; all
        entries go in one batch if the memory attention takes a key mask, else one uniform
        batch per video and layout."""
        by_layout: dict[tuple, list[_Entry]] = {}
        for e in entries:
            out = e.state["output_dict_per_obj"][e.obj_idx]
            by_layout.setdefault((e.video, self._memory_layout(out, e.frame_idx)), []).append(e)
        if len(by_layout) > 1 and isinstance(self.memory_attention, FastMemoryAttention):
            return [([e for group in by_layout.values() for e in group], False)]
        return [(group, True) for group in by_layout.values()]

    def _track_batch(self, batch: list[_Entry], uniform: bool,
                     reverse: bool) -> list[torch.Tensor]:
        """Run the per-frame step once for `batch` (entries grouped by video; `uniform`: one
        video, one memory layout), store each object's compact output as
        `_run_single_frame_inference` does, and return each object's 1 x 1 x h x w
        low-resolution mask logits."""
        parts = _by_video(batch)
        # per video: (vision feats, their position encodings, feature sizes), HW x B_v x C
        feats = [self._get_image_feature(p[0].state, p[0].frame_idx, len(p))[2:] for p in parts]
        first = batch[0]
        per_obj = [e.state["output_dict_per_obj"][e.obj_idx] for e in batch]
        if uniform:
            output_dict: object = {
                name: _BatchedOutputs([o[name] for o in per_obj])
                for name in ("cond_frame_outputs", "non_cond_frame_outputs")}
        else:
            output_dict = _JaggedOutputs(per_obj, [e.frame_idx for e in batch],
                                         [e.state["num_frames"] for e in batch])
        current = self.track_step(
            frame_idx=first.frame_idx, is_init_cond_frame=False,
            current_vision_feats=_cat_levels([f[0] for f in feats]),
            current_vision_pos_embeds=_cat_levels([f[1] for f in feats]),
            feat_sizes=feats[0][2], point_inputs=None, mask_inputs=None,
            output_dict=output_dict, num_frames=first.state["num_frames"],
            track_in_reverse=reverse, run_mem_encoder=True, prev_sam_mask_logits=None)
        masks, row = [], 0
        for part in parts:
            rows = slice(row, row + len(part))
            row += len(part)
            compact, pred = self._compact_output(part[0].state, current, rows)
            for k, e in enumerate(part):
                out = e.state["output_dict_per_obj"][e.obj_idx]
                out["non_cond_frame_outputs"][e.frame_idx] = _slice(compact, k)
                masks.append(pred[k : k + 1])
        return masks

    def _compact_output(self, state: dict, current: dict, rows: slice
                        ) -> tuple[dict, torch.Tensor]:
        """The tail of the reference's `_run_single_frame_inference` for one video's rows of
        a step's output: the compact output it stores (memories in bf16 on the state's
        storage device, holes filled, the shared position encoding) and the mask logits."""
        current = {name: _rows(current[name], rows) for name in (
            "maskmem_features", "maskmem_pos_enc", "pred_masks", "obj_ptr",
            "object_score_logits")}
        storage = state["storage_device"]
        maskmem = current["maskmem_features"]
        if maskmem is not None:
            maskmem = maskmem.to(torch.bfloat16).to(storage, non_blocking=True)
        pred = current["pred_masks"]
        if self.fill_hole_area > 0:
            pred = fill_holes_in_mask_scores(pred, self.fill_hole_area)
        compact = {"maskmem_features": maskmem,
                   "maskmem_pos_enc": self._get_maskmem_pos_enc(state, current),
                   "pred_masks": pred.to(storage, non_blocking=True),
                   "obj_ptr": current["obj_ptr"],
                   "object_score_logits": current["object_score_logits"]}
        return compact, pred

    def _prepare_memory_conditioned_features(
            self, frame_idx: int, is_init_cond_frame: bool, current_vision_feats: list,
            current_vision_pos_embeds: list, feat_sizes: list, output_dict: object,
            num_frames: int, track_in_reverse: bool = False) -> torch.Tensor:
        """The reference's, except for a `_JaggedOutputs` batch: each object's bank is
        gathered by the reference's own selection (run per object, with its own frame index
        and video length, the memory attention swapped for a recorder), the banks are padded
        to one layout, and the memory attention runs once with the key mask. Returns
        B x C x H x W as the reference does (without memory, `num_maskmem` 0, the frame's
        own features: the reference reads no stored output then)."""
        if not isinstance(output_dict, _JaggedOutputs) or is_init_cond_frame \
                or self.num_maskmem == 0:
            return super()._prepare_memory_conditioned_features(
                frame_idx, is_init_cond_frame, current_vision_feats,
                current_vision_pos_embeds, feat_sizes, output_dict, num_frames,
                track_in_reverse)
        attention, recorder = self.memory_attention, _MemoryRecorder()
        self.memory_attention = recorder
        try:
            for k, (own, t, n) in enumerate(zip(output_dict.per_object,
                                                output_dict.frame_idx,
                                                output_dict.num_frames, strict=True)):
                super()._prepare_memory_conditioned_features(
                    t, False, [f[:, k : k + 1] for f in current_vision_feats],
                    [p[:, k : k + 1] for p in current_vision_pos_embeds], feat_sizes, own,
                    n, track_in_reverse)
        finally:
            self.memory_attention = attention
        (h, w), curr = feat_sizes[-1], current_vision_feats[-1]  # curr: HW x B x C
        memory, memory_pos, mask, n_ptr = pad_memory_banks(recorder.banks, h * w)
        pix_feat = attention(curr=current_vision_feats, curr_pos=current_vision_pos_embeds,
                             memory=memory, memory_pos=memory_pos, num_obj_ptr_tokens=n_ptr,
                             memory_mask=mask)
        return pix_feat.permute(1, 2, 0).view(curr.shape[1], self.hidden_dim, h, w)

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


def _check_videos_args(inference_states: object, start_frame_idx: object
                       ) -> tuple[list[dict], list[int | None]]:
    """`propagate_in_videos`' states and one start per state, or a clear error."""
    if isinstance(inference_states, dict) or not isinstance(inference_states, Sequence):
        raise TypeError("propagate_in_videos: inference_states must be a list of states from "
                        f"init_state (one video: propagate_in_video), got "
                        f"{type(inference_states).__name__}")
    states = list(inference_states)
    for v, state in enumerate(states):
        if not isinstance(state, dict):
            raise TypeError(f"propagate_in_videos: inference_states[{v}] must be a state from "
                            f"init_state, got {type(state).__name__}")
    if len({id(s) for s in states}) != len(states):
        raise ValueError("propagate_in_videos: inference_states holds the same state twice")
    if isinstance(start_frame_idx, Sequence) and not isinstance(start_frame_idx, (str, bytes)):
        starts = list(start_frame_idx)
    else:
        starts = [start_frame_idx] * len(states)
    if len(starts) != len(states):
        raise ValueError(f"propagate_in_videos: start_frame_idx has {len(starts)} entries "
                         f"for {len(states)} inference_states")
    for v, start in enumerate(starts):
        if start is None:
            continue
        try:
            starts[v] = operator.index(start)  # an int, numpy or 0-d tensor integer
        except TypeError:
            starts[v] = None
        if starts[v] is None or isinstance(start, bool):
            raise TypeError("propagate_in_videos: start_frame_idx must be an int, None or a "
                            f"list of them, got {type(start).__name__} for video {v}") from None
    return states, starts


def _check_objects_kept(state: dict, obj_ids: list, video: int) -> None:
    """Raise if an object of a propagation under way was removed (`remove_object` or
    `reset_state` while its generator was paused: the objects' indices have moved; the
    reference fails on a KeyError). Objects added meanwhile wait for the next propagation,
    as in the reference."""
    moved = [i for k, i in enumerate(obj_ids) if state["obj_id_to_idx"].get(i) != k]
    if moved:
        raise RuntimeError(f"propagate_in_video: objects of inference_states[{video}] were "
                           f"removed (remove_object or reset_state) while its propagation was "
                           f"under way: ids {moved} lost or renumbered; start a new "
                           f"propagate_in_video")


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


def pad_memory_banks(banks: list[tuple[torch.Tensor, torch.Tensor, int]], frame_tokens: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One padded batch from the memory banks of several objects.

    Args:
        banks: per object (memory M_i x 1 x C, its position encoding M_i x 1 x C, P_i): as
            SAM2Base passes them to the memory attention, F_i whole frames of
            `frame_tokens` tokens followed by P_i object-pointer tokens.
        frame_tokens: tokens per memory frame (H x W of the image embedding).

    Returns:
        (memory M x B x C, position encoding M x B x C, mask B x M bool, P): every bank's
        frames first, padded with zeros to F = max F_i frames, then its pointers, padded to
        P = max P_i tokens; M = F * frame_tokens + P; the mask is True on real tokens.
    """
    frames = [(mem.shape[0] - n_ptr) // frame_tokens for mem, _, n_ptr in banks]
    n_frame_tokens = max(frames) * frame_tokens
    n_ptr = max(n for _, _, n in banks)
    first, first_pos, _ = banks[0]
    shape = (n_frame_tokens + n_ptr, len(banks), first.shape[-1])
    memory = first.new_zeros(shape)
    memory_pos = first_pos.new_zeros(shape)
    mask = torch.zeros(shape[1], shape[0], dtype=torch.bool, device=first.device)
    for b, ((mem, pos, p), f) in enumerate(zip(banks, frames, strict=True)):
        n = f * frame_tokens
        # frames to the front, pointers to the pointer block after the padded frames
        for dst, src in ((slice(0, n), slice(0, n)),
                         (slice(n_frame_tokens, n_frame_tokens + p), slice(n, n + p))):
            memory[dst, b] = mem[src, 0]
            memory_pos[dst, b] = pos[src, 0]
            mask[b, dst] = True
    return memory, memory_pos, mask, n_ptr


class _Entry(NamedTuple):
    """One object to track on one frame of one video."""

    state: dict
    video: int
    frame_idx: int
    obj_idx: int


def _by_video(batch: list[_Entry]) -> list[list[_Entry]]:
    """Consecutive entries of the same video, grouped (a batch lists each video's together)."""
    parts: list[list[_Entry]] = []
    for e in batch:
        if parts and parts[-1][0].video == e.video:
            parts[-1].append(e)
        else:
            parts.append([e])
    return parts


def _cat_levels(per_video: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-level features of several videos, each HW x B_v x C -> HW x (sum B_v) x C."""
    if len(per_video) == 1:
        return per_video[0]
    return [torch.cat(level, dim=1) for level in zip(*per_video, strict=True)]


def _rows(value: object, rows: slice) -> object:
    """Rows of one field of a step's output (tensors and lists of tensors; None stays)."""
    if isinstance(value, list):
        return [v[rows] for v in value]
    return None if value is None else value[rows]


class _JaggedOutputs:
    """The per-object output dicts of a batch whose memory layouts differ (objects prompted
    apart, or of different videos), with each object's current frame index and video
    length, passed where the reference passes one output dict (only
    `_prepare_memory_conditioned_features` reads it)."""

    def __init__(self, per_object: list[dict], frame_idx: list[int],
                 num_frames: list[int]) -> None:
        self.per_object, self.frame_idx, self.num_frames = per_object, frame_idx, num_frames


class _MemoryRecorder(nn.Module):
    """Stands in for the memory attention while the reference gathers one object's bank:
    records (memory, memory_pos, num_obj_ptr_tokens) and returns the features unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.banks: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def forward(self, curr: list, curr_pos: list, memory: torch.Tensor,
                memory_pos: torch.Tensor, num_obj_ptr_tokens: int = 0) -> torch.Tensor:
        self.banks.append((memory, memory_pos, num_obj_ptr_tokens))
        return curr[0]


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
