"""SAM2VideoPredictor end to end: the optimized model against the reference on a short
synthetic video (frames written by the test), with points, a box, a mask, a correction
mid-video, forward and reverse propagation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.build_sam import build_sam2_video_predictor

import fastsam_core
from fastsam_core import FastConfig
from tests import tolerances as tol
from tests.models.sam2.test_image_encoder import randomize_pos_embeds
from tests.parity import assert_close_fp32, mask_iou_outside_margin

FRAMES, H, W = 16, 120, 160


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """A disc moving right and a square moving down over a striped background."""
    root = tmp_path_factory.mktemp("video")
    yy, xx = np.mgrid[:H, :W]
    for i in range(FRAMES):
        img = np.full((H, W, 3), 40, np.uint8)
        img[(xx // 8) % 2 == 0] = (60, 60, 70)
        img[(yy - 60) ** 2 + (xx - 40 - 4 * i) ** 2 < 20**2] = (200, 80, 60)
        img[(abs(yy - 25 - 3 * i) < 12) & (abs(xx - 120) < 12)] = (50, 180, 90)
        Image.fromarray(img).save(root / f"{i:05d}.jpg", quality=95)
    return str(root)


def video_predictor():
    """sam2.1 hiera_t's video predictor at 256 px, random weights, pos embeds filled."""
    torch.manual_seed(0)
    predictor = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", None,
                                           device="cpu",
                                           hydra_overrides_extra=["++model.image_size=256"])
    randomize_pos_embeds(predictor.image_encoder, 0)
    return predictor


def track(predictor, video_dir, full=True) -> list[tuple[str, int, list[int], torch.Tensor]]:
    """Every output of a session: (call, frame, object ids, mask logits at video size).
    Not `full`: the first two objects and one forward pass only (bf16 is slow on CPUs)."""
    out = []
    state = predictor.init_state(video_dir)
    _, ids, masks = predictor.add_new_points_or_box(
        state, frame_idx=0, obj_id=1, points=np.array([[40, 60]], np.float32),
        labels=np.array([1], np.int32))
    out.append(("points", 0, list(ids), masks))
    _, ids, masks = predictor.add_new_points_or_box(
        state, frame_idx=0, obj_id=2, box=np.array([106, 11, 134, 39], np.float32))
    out.append(("box", 0, list(ids), masks))
    if not full:
        out += [("forward", f, list(ids), m) for f, ids, m in predictor.propagate_in_video(state)]
        return out
    mask = np.zeros((H, W), bool)
    mask[5:30, 5:30] = True
    _, ids, masks = predictor.add_new_mask(state, frame_idx=2, obj_id=3, mask=mask)
    out.append(("mask", 2, list(ids), masks))
    out += [("forward", f, list(ids), m) for f, ids, m in predictor.propagate_in_video(state)]
    # a correction mid-video, then part of the video forward again and back
    _, ids, masks = predictor.add_new_points_or_box(
        state, frame_idx=4, obj_id=1, points=np.array([[56, 60], [90, 60]], np.float32),
        labels=np.array([1, 0], np.int32))
    out.append(("correction", 4, list(ids), masks))
    out += [("forward2", f, list(ids), m) for f, ids, m in
            predictor.propagate_in_video(state, start_frame_idx=4, max_frame_num_to_track=6)]
    out += [("reverse", f, list(ids), m) for f, ids, m in
            predictor.propagate_in_video(state, start_frame_idx=8, reverse=True)]
    predictor.remove_object(state, 3)
    out += [("after removal", f, list(ids), m) for f, ids, m in
            predictor.propagate_in_video(state, start_frame_idx=10, max_frame_num_to_track=3)]
    predictor.reset_state(state)
    return out


def memory_in_fp32(module, args, kwargs):
    """SAM2VideoPredictor stores memories in bf16 and the fp32 reference then fails on them
    unless autocast is on (design.md, section 8): hand the reference memory attention the
    same bf16-rounded values in fp32. The fast path gets them as they are."""
    kwargs["memory"] = kwargs["memory"].float()
    return args, kwargs


def reference(video_dir, full):
    predictor = video_predictor()
    predictor.memory_attention.register_forward_pre_hook(memory_in_fp32, with_kwargs=True)
    with torch.inference_mode():
        return track(predictor, video_dir, full)


@pytest.fixture(scope="module")
def reference_run(video_dir):
    return reference(video_dir, full=True)


@pytest.fixture(scope="module")
def short_reference_run(video_dir):
    return reference(video_dir, full=False)


def compare(got, expected, dtype):
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    threshold = tol.MASK_IOU_FP32 if dtype == torch.float32 else tol.MASK_IOU_BF16
    ious = []
    for (call, frame, _, a), (_, _, _, b) in zip(got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (call, frame)
        if dtype == torch.float32:
            assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)
        for k in range(len(a)):
            ious.append(mask_iou_outside_margin(a[k : k + 1], b[k : k + 1]))
            assert ious[-1] >= threshold, (call, frame, k, ious[-1])
    return ious


def test_video_predictor_fp32_parity_and_object_batches(video_dir, reference_run):
    """fp32: the reference's results, frame by frame. Objects 1 and 2 (prompted on frame 0)
    share a batch until object 1 is corrected on frame 4; object 3 (prompted on frame 2) is
    tracked apart."""
    from fastsam_core.pipelines import FastSam2VideoPredictor

    predictor = video_predictor()
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.float32))
    assert type(predictor) is FastSam2VideoPredictor
    stages = {s.stage: s.path for s in fastsam_core.report(predictor).stages}
    assert stages["memory_attention"] == stages["memory_encoder"] == "fast"
    calls = []  # memory attention batch sizes, and "prompt" for each point / box prompt
    predictor.memory_attention.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["memory"].shape[1]), with_kwargs=True)
    add_prompt = predictor.add_new_points_or_box

    def marked(*args, **kwargs):
        calls.append("prompt")
        return add_prompt(*args, **kwargs)

    predictor.add_new_points_or_box = marked
    with torch.inference_mode():
        got = track(predictor, video_dir)
    first = calls[2 : calls.index("prompt", 2)]
    # the first pass: objects 1 and 2 together on every frame after 0, object 3 (prompted on
    # frame 2) alone on every other frame. (The correction on frame 4 is stored as a tracked
    # frame, not a conditioning one: add_all_frames_to_correct_as_cond is off, so objects 1
    # and 2 keep one layout afterwards, in the reference's bookkeeping too.)
    assert first.count(2) == FRAMES - 1 and first.count(1) == FRAMES - 1, first
    compare(got, reference_run, torch.float32)
    fastsam_core.restore(predictor)
    assert type(predictor).__name__ == "SAM2VideoPredictor"


@pytest.mark.parametrize("autocast", [False, True])
def test_video_predictor_bf16(video_dir, short_reference_run, autocast):
    """bf16 masks against the fp32 reference; the fast path keeps its dtype whatever the
    caller's autocast state."""
    predictor = video_predictor()
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.bfloat16))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = track(predictor, video_dir, full=False)
    compare(got, short_reference_run, torch.bfloat16)


def test_patched_leaves_a_vos_predictor_as_built():
    with fastsam_core.patched(), pytest.warns(UserWarning, match="left as built"):
        predictor = build_sam2_video_predictor(
            "configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", vos_optimized=True,
            hydra_overrides_extra=["++model.image_size=256"])
    assert not fastsam_core.is_optimized(predictor)


def test_vos_optimized_predictor_is_refused():
    from sam2.sam2_video_predictor import SAM2VideoPredictorVOS

    predictor = video_predictor()
    predictor.__class__ = SAM2VideoPredictorVOS  # what vos_optimized=True builds (compiled)
    with pytest.raises(TypeError, match="vos_optimized"):
        fastsam_core.optimize(predictor)


def test_frames_kept_in_the_encoder_dtype_without_changing_features(video_dir):
    predictor = video_predictor()
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.bfloat16))
    with torch.inference_mode():
        state = predictor.init_state(video_dir)
        assert state["images"].dtype == torch.bfloat16
        frame = state["images"][1].float()[None]
        full = video_predictor().init_state(video_dir)["images"][1][None]  # fp32, as loaded
        assert frame.dtype == full.dtype == torch.float32
        stored = predictor.forward_image(frame)["vision_features"]
        loaded = predictor.forward_image(full)["vision_features"]
    assert torch.equal(stored, loaded)  # the encoder rounds its input to bf16 either way


def test_memory_layout_ignores_frames_out_of_the_memorys_reach():
    """Objects tracked over different stretches far from the current frame still batch; a
    difference within reach of the memory frames or object pointers separates them."""
    from types import SimpleNamespace

    from fastsam_core.pipelines.video import FastSam2VideoPredictor

    model = SimpleNamespace(memory_temporal_stride_for_eval=1, num_maskmem=7,
                            max_obj_ptrs_in_encoder=16)

    def layout(tracked, frame=100, cond=(0,)):
        out = {"cond_frame_outputs": dict.fromkeys(cond), "non_cond_frame_outputs":
               dict.fromkeys(tracked)}
        return FastSam2VideoPredictor._memory_layout(model, out, frame)

    near = range(80, 100)
    assert layout([*near, 5, 6]) == layout(near)  # frames 5, 6: 94 frames before
    assert layout(near) == layout(range(81, 100))  # frame 80: 20 before, out of reach
    assert layout(near) != layout([t for t in near if t != 90])  # within the pointers' reach
    assert layout(near) != layout(near, cond=(0, 50))
