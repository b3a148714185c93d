"""SAM2VideoPredictor end to end: the optimized model against the reference on a short
synthetic video (frames written by the test), with points, a box, a mask, a correction
mid-video, forward and reverse propagation."""

from __future__ import annotations

import numpy as np
import pytest
import sam2.utils.misc as sam2_misc
import torch
from PIL import Image
from sam2.build_sam import build_sam2_video_predictor

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.fallback import fallbacks_of
from fastsam_core.pipelines.video_frames import AsyncJpegFrames
from tests import tolerances as tol
from tests.models.sam2.test_image_encoder import randomize_pos_embeds
from tests.parity import assert_close_fp32, mask_iou_outside_margin

FRAMES, H, W = 16, 120, 160


def synthetic_frames() -> list[np.ndarray]:
    """H x W x 3 RGB frames: a disc moving right and a square moving down over a striped
    background."""
    yy, xx = np.mgrid[:H, :W]
    frames = []
    for i in range(FRAMES):
        img = np.full((H, W, 3), 40, np.uint8)
        img[(xx // 8) % 2 == 0] = (60, 60, 70)
        img[(yy - 60) ** 2 + (xx - 40 - 4 * i) ** 2 < 20**2] = (200, 80, 60)
        img[(abs(yy - 25 - 3 * i) < 12) & (abs(xx - 120) < 12)] = (50, 180, 90)
        frames.append(img)
    return frames


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """The synthetic video as a folder of JPEG frames."""
    root = tmp_path_factory.mktemp("video")
    for i, img in enumerate(synthetic_frames()):
        Image.fromarray(img).save(root / f"{i:05d}.jpg", quality=95)
    return str(root)


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    """The synthetic video as an MP4 file (sam2 reads it with decord)."""
    pytest.importorskip("decord", reason="sam2 reads video files with decord")
    cv2 = pytest.importorskip("cv2")
    path = str(tmp_path_factory.mktemp("video_file") / "video.mp4")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 24, (W, H))
    if not writer.isOpened():
        pytest.skip("this OpenCV cannot write mp4v video")
    for img in synthetic_frames():
        writer.write(img[..., ::-1].copy())  # OpenCV writes BGR
    writer.release()
    return path


def video_predictor(device: str = "cpu", overrides: tuple[str, ...] = ()):
    """sam2.1 hiera_t's video predictor at 256 px, random weights, pos embeds filled (and
    hydra `overrides` of its configuration)."""
    torch.manual_seed(0)
    predictor = build_sam2_video_predictor(
        "configs/sam2.1/sam2.1_hiera_t.yaml", None, device=device,
        hydra_overrides_extra=["++model.image_size=256", *overrides])
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


def fp32_predictors():
    """The reference video predictor (its memory attention given fp32 memories) and one
    optimized in fp32."""
    reference = video_predictor()
    reference.memory_attention.register_forward_pre_hook(memory_in_fp32, with_kwargs=True)
    predictor = video_predictor()
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.float32))
    return reference, predictor


def reference(video_dir, full, device="cpu"):
    predictor = video_predictor(device)
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
    """fp32: the reference's results (which tracks each object alone), frame by frame. All
    objects tracked on a frame form one batch: objects 1 and 2 (prompted on frame 0) read
    their memories concatenated; object 3 (prompted on frame 2) joins them through padded
    banks with a key mask."""
    from fastsam_core.pipelines import FastSam2VideoPredictor

    predictor = video_predictor()
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.float32))
    assert type(predictor) is FastSam2VideoPredictor
    stages = {s.stage: s.path for s in fastsam_core.report(predictor).stages}
    assert stages["memory_attention"] == stages["memory_encoder"] == "fast"
    calls = []  # memory attention (batch size, masked), and "prompt" per point / box prompt
    predictor.memory_attention.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(
            (kwargs["memory"].shape[1], kwargs.get("memory_mask") is not None)),
        with_kwargs=True)
    add_prompt = predictor.add_new_points_or_box

    def marked(*args, **kwargs):
        calls.append("prompt")
        return add_prompt(*args, **kwargs)

    predictor.add_new_points_or_box = marked
    with torch.inference_mode():
        got = track(predictor, video_dir)
    first = calls[2 : calls.index("prompt", 2)]
    # the first pass: frame 0 tracks object 3 alone (1 and 2 are prompted there), frame 2
    # objects 1 and 2 (3 is prompted there), every other frame all three, masked.
    assert first == [(1, False), (3, True), (2, False)] + [(3, True)] * (FRAMES - 3), first
    assert not fallbacks_of(predictor), fallbacks_of(predictor)
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
    assert not fallbacks_of(predictor), fallbacks_of(predictor)
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


@pytest.fixture(scope="module")
def short_video_dir(tmp_path_factory):
    """A second, shorter video at another resolution: a disc moving left."""
    root = tmp_path_factory.mktemp("video2")
    h, w = 96, 128
    yy, xx = np.mgrid[:h, :w]
    for i in range(6):
        img = np.full((h, w, 3), 90, np.uint8)
        img[(yy - 48) ** 2 + (xx - 100 + 6 * i) ** 2 < 15**2] = (30, 60, 200)
        Image.fromarray(img).save(root / f"{i:05d}.jpg", quality=95)
    return str(root)


def prompt_two_videos(predictor, video_dir, short_video_dir):
    """Video A: objects 1 (point) and 2 (box) on frame 0; video B: object 7 on frame 1."""
    a, b = predictor.init_state(video_dir), predictor.init_state(short_video_dir)
    predictor.add_new_points_or_box(a, frame_idx=0, obj_id=1,
                                    points=np.array([[40, 60]], np.float32),
                                    labels=np.array([1], np.int32))
    predictor.add_new_points_or_box(a, frame_idx=0, obj_id=2,
                                    box=np.array([106, 11, 134, 39], np.float32))
    predictor.add_new_points_or_box(b, frame_idx=1, obj_id=7,
                                    points=np.array([[94, 48]], np.float32),
                                    labels=np.array([1], np.int32))
    return a, b


@pytest.fixture(scope="module")
def two_videos_reference(video_dir, short_video_dir):
    reference = video_predictor()
    reference.memory_attention.register_forward_pre_hook(memory_in_fp32, with_kwargs=True)
    with torch.inference_mode():
        return [[(t, list(ids), m) for t, ids, m in
                 reference.propagate_in_video(state, max_frame_num_to_track=5)]
                for state in prompt_two_videos(reference, video_dir, short_video_dir)]


@pytest.mark.parametrize("masked", [True, False], ids=["fast-memory", "reference-memory"])
def test_two_videos_in_one_batch_equal_each_alone(video_dir, short_video_dir,
                                                  two_videos_reference, masked):
    """propagate_in_videos on two videos of different lengths, sizes and start frames gives
    each what the reference gives it alone (fp32); their frames share one image-encoder batch
    and their objects one batch per step. With the reference memory attention (it takes no
    key mask) each video's objects form their own batch, with the same results."""
    expected = two_videos_reference
    predictor = video_predictor()
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.float32))
    if not masked:  # the kept reference module in place of the fast one
        predictor.memory_attention = predictor.memory_attention.__dict__["_reference"]
        predictor.memory_attention.register_forward_pre_hook(memory_in_fp32,
                                                             with_kwargs=True)
    calls = []
    predictor.memory_attention.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(
            (kwargs["memory"].shape[1], kwargs.get("memory_mask") is not None)),
        with_kwargs=True)
    encoded = []  # image encoder batch sizes
    predictor.image_encoder.register_forward_pre_hook(
        lambda module, args: encoded.append(args[0].shape[0]))
    got = [[], []]
    with torch.inference_mode():
        states = prompt_two_videos(predictor, video_dir, short_video_dir)
        calls.clear()
        encoded.clear()
        for v, t, ids, masks in predictor.propagate_in_videos(states, max_frame_num_to_track=5):
            got[v].append((t, list(ids), masks))
    # step 0: A's frame 0 and B's frame 1 are prompted (stored outputs, B's frame cached); steps
    # 1-4: frames 1-4 of A (2 objects) with frames 2-5 of B; step 5: A's frame 5 alone
    per_step = [(3, True)] if masked else [(2, False), (1, False)]
    assert calls == per_step * 4 + [(2, False)], calls
    assert encoded == [2] * 4 + [1], encoded
    assert not fallbacks_of(predictor), fallbacks_of(predictor)
    for mine, theirs in zip(got, expected, strict=True):
        assert [m[:2] for m in mine] == [e[:2] for e in theirs]
        for (t, _, a), (_, _, b) in zip(mine, theirs, strict=True):
            assert a.shape == b.shape, t
            assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


def test_a_step_left_early_leaves_every_stored_output_marked_tracked(video_dir,
                                                                     short_video_dir):
    """propagate_in_videos stores the outputs of all the videos of a step before yielding
    the first: a caller stopping after video 0's result finds video 1's stored frame marked
    tracked too (sam2's invariant: a stored tracked output's frame is a tracked frame; a
    later prompt there would otherwise be taken for a first one)."""
    predictor = video_predictor()
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.float32))
    with torch.inference_mode():
        a, b = prompt_two_videos(predictor, video_dir, short_video_dir)
        generator = predictor.propagate_in_videos([a, b])
        assert next(generator)[:2] == (0, 0) and next(generator)[:2] == (1, 1)
        assert next(generator)[:2] == (0, 1)  # step 1: A's frame 1, then B's frame 2
        generator.close()
    stored = b["output_dict_per_obj"][0]["non_cond_frame_outputs"]
    assert sorted(stored) == [2]
    assert set(stored) <= set(b["frames_tracked_per_obj"][0])


def paused_session(predictor, video_dir):
    """Object 7 tracked; after two frames, with the generator paused, object 8 is prompted:
    the rest of that propagation tracks object 7 only (the reference fixes its objects at
    the start), the next one both."""
    state = predictor.init_state(video_dir)
    predictor.add_new_points_or_box(state, frame_idx=1, obj_id=7,
                                    points=np.array([[94, 48]], np.float32),
                                    labels=np.array([1], np.int32))
    generator = predictor.propagate_in_video(state)
    out = [next(generator), next(generator)]
    predictor.add_new_points_or_box(state, frame_idx=4, obj_id=8,
                                    points=np.array([[30, 30]], np.float32),
                                    labels=np.array([1], np.int32))
    out += list(generator)
    out += list(predictor.propagate_in_video(state))
    return [(t, list(ids), m) for t, ids, m in out]


def test_an_object_prompted_while_propagation_is_paused_waits_for_the_next(short_video_dir):
    reference, predictor = fp32_predictors()
    with torch.inference_mode():
        expected = paused_session(reference, short_video_dir)
        got = paused_session(predictor, short_video_dir)
    assert [e[:2] for e in expected] == [(t, [7]) for t in range(1, 6)] + [
        (t, [7, 8]) for t in range(1, 6)]
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    for (_, _, a), (_, _, b) in zip(got, expected, strict=True):
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)
    # an object removed while paused: the objects' indices have moved, the rest cannot run
    state = predictor.init_state(short_video_dir)
    for obj_id, x in ((7, 94), (8, 30)):
        predictor.add_new_points_or_box(state, frame_idx=1, obj_id=obj_id,
                                        points=np.array([[x, 48]], np.float32),
                                        labels=np.array([1], np.int32))
    with torch.inference_mode():
        generator = predictor.propagate_in_video(state)
        next(generator)
        predictor.remove_object(state, 7)
        with pytest.raises(RuntimeError, match=r"objects of inference_states\[0\] were "
                           r"removed .* ids \[7, 8\] lost or renumbered"):
            next(generator)
        # the only object removed, or the state reset: the same error (the objects' list
        # was cleared in place, and the step then failed inside torch.cat)
        for stop in ("remove_object", "reset_state"):
            predictor.add_new_points_or_box(state, frame_idx=1, obj_id=8,
                                            points=np.array([[30, 48]], np.float32),
                                            labels=np.array([1], np.int32))
            generator = predictor.propagate_in_video(state)
            next(generator)
            if stop == "remove_object":
                predictor.remove_object(state, 8)
            else:
                predictor.reset_state(state)
            with pytest.raises(RuntimeError, match=r"removed .* ids \[8\] lost"):
                next(generator)


def prompted_apart(predictor, video_dir):
    """Objects 7 and 8 prompted on frames 1 and 2 (memory banks of two layouts), tracked."""
    state = predictor.init_state(video_dir)
    for frame, obj_id, x in ((1, 7, 94), (2, 8, 30)):
        predictor.add_new_points_or_box(state, frame_idx=frame, obj_id=obj_id,
                                        points=np.array([[x, 48]], np.float32),
                                        labels=np.array([1], np.int32))
    return [(t, list(ids), m) for t, ids, m in predictor.propagate_in_video(state)]


def test_a_model_without_memory_tracks_objects_prompted_apart(short_video_dir):
    """num_maskmem=0 (no memory: SAM2Base conditions each frame on nothing, reading no stored
    output): objects prompted on different frames go through the step as one batch and get
    the reference's masks (fp32). The padded-banks path used to gather the banks anyway,
    found none and failed."""
    overrides = ("++model.num_maskmem=0",)
    reference = video_predictor(overrides=overrides)
    predictor = video_predictor(overrides=overrides)
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.float32))
    with torch.inference_mode():
        expected = prompted_apart(reference, short_video_dir)
        got = prompted_apart(predictor, short_video_dir)
    assert [g[:2] for g in got] == [e[:2] for e in expected] == [
        (t, [7, 8]) for t in range(1, 6)]
    assert not fallbacks_of(predictor), fallbacks_of(predictor)
    for (t, _, a), (_, _, b) in zip(got, expected, strict=True):
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)
        assert mask_iou_outside_margin(a, b) >= tol.MASK_IOU_FP32, t


def test_propagate_in_videos_checks_its_arguments(video_dir):
    predictor = video_predictor()
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.float32))
    with torch.inference_mode():
        state = predictor.init_state(video_dir)
        with pytest.raises(ValueError, match="same state twice"):
            next(predictor.propagate_in_videos([state, state]))
        other = predictor.init_state(video_dir)
        with pytest.raises(ValueError, match="start_frame_idx has 1 entries for 2"):
            next(predictor.propagate_in_videos([state, other], start_frame_idx=[0]))
        with pytest.raises(TypeError, match="inference_states must be a list .* got dict"):
            next(predictor.propagate_in_videos(state))
        with pytest.raises(TypeError, match=r"inference_states\[1\] must be a state"):
            next(predictor.propagate_in_videos([state, "video.mp4"]))
        for bad in ("0", np.array([0, 0]), 1.0):
            with pytest.raises(TypeError, match="start_frame_idx must be an int, None or a"):
                next(predictor.propagate_in_videos([state, other], start_frame_idx=bad))
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1,
                                        points=np.array([[30.0, 30.0]], np.float32),
                                        labels=np.array([1], np.int32))
        with pytest.raises(RuntimeError, match=r"inference_states\[1\] has no input points"):
            next(predictor.propagate_in_videos([state, other]))
        frame, _, _ = next(predictor.propagate_in_video(state, torch.tensor(1)))  # as range()
        assert frame == 1


def test_compiled_step_does_not_recompile_as_the_memory_bank_fills(video_dir, monkeypatch,
                                                                    capsys):
    """FastConfig(compile=...) compiles the image encoder, heads, memory attention (dynamic
    shapes) and memory encoder. Over one propagation the memory bank grows on every frame
    (memory frames up to frame 7, object pointers all 16 frames) while the batch is the same
    from frame 3 on (all three objects): no compilation from frame 3 on. Counted with
    CompileCounter (the eager backend: Inductor on 2 cores would take minutes); masks as
    without compilation."""
    from torch._dynamo.testing import CompileCounter

    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kw: compile_(fn, **{**kw, "backend": counter}))
    torch._dynamo.reset()
    predictor = video_predictor()
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.float32, compile="default"))
    eager = video_predictor()
    fastsam_core.optimize(eager, FastConfig(dtype=torch.float32))
    runs = []
    for model in (predictor, eager):
        with torch.inference_mode():
            state = model.init_state(video_dir)
            model.add_new_points_or_box(state, frame_idx=0, obj_id=1,
                                        points=np.array([[40, 60]], np.float32),
                                        labels=np.array([1], np.int32))
            model.add_new_points_or_box(state, frame_idx=0, obj_id=2,
                                        box=np.array([106, 11, 134, 39], np.float32))
            model.add_new_points_or_box(state, frame_idx=2, obj_id=3,
                                        points=np.array([[48, 60]], np.float32),
                                        labels=np.array([1], np.int32))
            counts, masks = [], []
            for frame, _, m in model.propagate_in_video(state):
                counts.append((frame, counter.frame_count))
                masks.append(m)
        runs.append((counts, masks))
    (counts, compiled), (_, plain) = runs
    stages = {s.stage: s.detail for s in fastsam_core.report(predictor).stages}
    for stage in ("memory_attention", "memory_encoder"):
        assert "compile: compiled" in stages[stage], stages[stage]
    settled = {c for f, c in counts if f >= 2}  # the count after frame 2 is the last one
    assert len(settled) == 1 and counts[-1][1] > 0, counts
    with capsys.disabled():
        print(f"\n[video compile] (frame, graphs compiled so far): {counts}")
    for a, b in zip(compiled, plain, strict=True):
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


@pytest.mark.parametrize("source, offload, async_loading", [
    ("video_dir", False, False), ("video_dir", True, False), ("video_dir", False, True),
    ("video_dir", True, True), ("video_file", False, False), ("video_file", True, False),
    ("video_file", False, True)])
def test_frames_reach_the_device_in_the_encoder_dtype(source, offload, async_loading, request,
                                                      monkeypatch):
    """bf16 frames equal the frames the reference's image encoder gets rounded (its fp32
    frames; with async_loading_frames, its asynchronous loader's frames as the predictor
    rounds them to fp32), with the caller's offload_video_to_cpu kept in the state; neither a
    JPEG folder nor a video file is read by the reference's loader (both are read frame by
    frame; sam2 ignores async_loading_frames for a video file)."""
    video = request.getfixturevalue(source)
    predictor = video_predictor()
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.bfloat16))
    whole_video_loads = []

    def counting(load):
        def counted(*args, **kwargs):
            whole_video_loads.append(args or kwargs)
            return load(*args, **kwargs)
        return counted

    with torch.inference_mode():
        for name in ("load_video_frames_from_jpg_images", "load_video_frames_from_video_file"):
            # the readers of sam2's loader (a loader put in its place would run instead)
            monkeypatch.setattr(sam2_misc, name, counting(getattr(sam2_misc, name)))
        state = predictor.init_state(video, offload_video_to_cpu=offload,
                                     async_loading_frames=async_loading)
        assert not whole_video_loads
        full = video_predictor().init_state(video, offload_video_to_cpu=offload,
                                            async_loading_frames=async_loading)["images"]
        assert len(whole_video_loads) == 1  # the reference's
    assert state["num_frames"] == FRAMES and (state["video_height"], state["video_width"]) == (H, W)
    assert state["offload_video_to_cpu"] is offload
    lazy = async_loading and source == "video_dir"  # sam2 loads a video file whole
    assert isinstance(state["images"], AsyncJpegFrames if lazy else torch.Tensor)
    images = torch.stack([state["images"][i] for i in range(FRAMES)])
    assert images.device == (torch.device("cpu") if offload else state["device"])
    encoder_input = torch.stack([full[i].float() for i in range(FRAMES)])  # as sam2 reads it
    assert torch.equal(images, encoder_input.to(torch.bfloat16))


@pytest.fixture(scope="module")
def cuda_reference_run(video_dir):
    return reference(video_dir, full=True, device="cuda")


def syncs_raise_inside(*modules: torch.nn.Module) -> list:
    """Hooks making any host-device sync an error while one of `modules` runs."""
    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(
            lambda *args: torch.cuda.set_sync_debug_mode("error")))
        handles.append(module.register_forward_hook(
            lambda *args: torch.cuda.set_sync_debug_mode("default"), always_call=True))
    return handles


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_video_predictor_on_cuda(video_dir, cuda_reference_run, dtype):
    """The whole session of `track` (points, box, mask, a correction mid-video, forward,
    reverse, removal) on CUDA: fp32 in parity with the reference there, bf16 masks within the
    bf16 IoU. Run twice, the second time (caches filled) with host syncs made errors inside
    the fast memory attention and memory encoder: the per-frame step of each object batch."""
    predictor = video_predictor("cuda")
    fastsam_core.optimize(predictor, FastConfig(dtype=dtype))
    with torch.inference_mode():
        first = track(predictor, video_dir)
        handles = syncs_raise_inside(predictor.memory_attention, predictor.memory_encoder)
        try:
            again = track(predictor, video_dir)
        finally:
            for handle in handles:
                handle.remove()
            torch.cuda.set_sync_debug_mode("default")
    assert not fallbacks_of(predictor), fallbacks_of(predictor)
    compare(first, cuda_reference_run, dtype)
    compare(again, cuda_reference_run, dtype)


def tracked_both_ways(predictor, video_dir):
    """Object 7 clicked on frame 2 and tracked forward; object 8 clicked on frame 2 too, and
    both tracked in reverse (object 7 reads its forward-tracked frames 3-5 there, object 8
    has none: the same prompted frames, different memories); then a click for object 7 on
    frame 0, a frame tracked in reverse, which sam2 conditions on the memories in reverse
    order (`frames_tracked_per_obj` says so). Every output, and the state's per-object
    records."""
    state = predictor.init_state(video_dir)
    out = []
    for obj_id, x in ((7, 88), (8, 30)):
        _, ids, masks = predictor.add_new_points_or_box(
            state, frame_idx=2, obj_id=obj_id, points=np.array([[x, 48]], np.float32),
            labels=np.array([1], np.int32))
        out.append((f"click {obj_id}", 2, list(ids), masks))
        out += [("propagate", t, list(ids), m) for t, ids, m in
                predictor.propagate_in_video(state, reverse=obj_id == 8)]
    _, ids, masks = predictor.add_new_points_or_box(
        state, frame_idx=0, obj_id=7, points=np.array([[100, 48]], np.float32),
        labels=np.array([1], np.int32))
    out.append(("click on a reverse-tracked frame", 0, list(ids), masks))
    return out, state


def stored_layout(state):
    """Per object: each frame's tracked direction, and each stored output's fields with their
    dtypes and shapes."""
    def layout(value):
        if isinstance(value, list):
            return [layout(v) for v in value]
        return None if value is None else (value.dtype, tuple(value.shape))

    return [(state["frames_tracked_per_obj"][obj_idx],
             {kind: {t: {name: layout(v) for name, v in out.items()}
                     for t, out in outputs.items()}
              for kind, outputs in state["output_dict_per_obj"][obj_idx].items()})
            for obj_idx in sorted(state["output_dict_per_obj"])]


def test_objects_tracked_both_ways_and_a_click_on_a_reverse_tracked_frame(short_video_dir):
    """fp32, against the reference: objects with the same prompted frames but different
    tracked frames ahead of a reverse pass (their memory layouts differ), and a click that
    must read the reverse memory; the state keeps the reference's records (memories stored
    in bf16, each frame's direction)."""
    reference, predictor = fp32_predictors()
    with torch.inference_mode():
        expected, expected_state = tracked_both_ways(reference, short_video_dir)
        got, state = tracked_both_ways(predictor, short_video_dir)
    assert stored_layout(state) == stored_layout(expected_state)
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    for (call, t, _, a), (_, _, _, b) in zip(got, expected, strict=True):
        assert a.shape == b.shape, (call, t)
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


def connected_components_on_the_cpu(mask):
    """sam2's `get_connected_components` (8-connectivity: each pixel's component label and
    area, 0 on the background) without its CUDA extension, so that hole filling runs."""
    import cv2

    labels = torch.zeros(mask.shape, dtype=torch.int32)
    areas = torch.zeros(mask.shape, dtype=torch.int32)
    for i, m in enumerate(mask.cpu().numpy().astype(np.uint8)[:, 0]):
        _, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        area = stats[:, cv2.CC_STAT_AREA].copy()
        area[0] = 0
        labels[i, 0] = torch.from_numpy(lab)
        areas[i, 0] = torch.from_numpy(area[lab])
    return labels.to(mask.device), areas.to(mask.device)


def test_tracked_masks_get_their_small_holes_filled(short_video_dir, monkeypatch):
    """fill_hole_area (8, as build_sam2_video_predictor sets it) fills small holes of the
    tracked masks as the reference does. sam2 fills them only where its CUDA extension is
    built: a CPU stand-in here, for both predictors."""
    holes = []

    def recorded(mask):
        labels, areas = connected_components_on_the_cpu(mask)
        holes.append(int(((labels > 0) & (areas <= 8)).sum()))
        return labels, areas

    monkeypatch.setattr(sam2_misc, "get_connected_components", recorded)
    reference, predictor = fp32_predictors()
    with torch.inference_mode():
        expected = prompted_apart(reference, short_video_dir)
        filled = sum(holes)
        got = prompted_apart(predictor, short_video_dir)
    assert filled > 0, "the reference filled holes"
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    for (t, _, a), (_, _, b) in zip(got, expected, strict=True):
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


def reverse_frame_orders(predictor, video_dir):
    """Object 7 clicked on frame 3; the frames reverse propagation visits from frame 0 (none:
    nothing before it) and from frame 3 for two frames more (3, 2, 1)."""
    state = predictor.init_state(video_dir)
    predictor.add_new_points_or_box(state, frame_idx=3, obj_id=7,
                                    points=np.array([[76, 48]], np.float32),
                                    labels=np.array([1], np.int32))
    return [[(t, list(ids), m) for t, ids, m in predictor.propagate_in_video(
        state, start_frame_idx=start, max_frame_num_to_track=n, reverse=True)]
        for start, n in ((0, None), (3, 2))]


def test_reverse_propagation_visits_the_references_frames(short_video_dir):
    """Reverse propagation stops where the reference does: from frame 0 it visits nothing,
    and max_frame_num_to_track counts the frames after the start (fp32 masks as the
    reference's)."""
    reference, predictor = fp32_predictors()
    with torch.inference_mode():
        expected = reverse_frame_orders(reference, short_video_dir)
        got = reverse_frame_orders(predictor, short_video_dir)
    assert [[e[:2] for e in run] for run in expected] == [[], [(3, [7]), (2, [7]), (1, [7])]]
    assert [[g[:2] for g in run] for run in got] == [[e[:2] for e in run] for run in expected]
    for (_, _, a), (_, _, b) in zip(got[1], expected[1], strict=True):
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


def test_restore_gives_a_video_predictor_its_class_back():
    """optimize() turns a SAM2VideoPredictor into a FastSam2VideoPredictor; restore() puts
    its own class back (and the model can be optimized again)."""
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    from fastsam_core.pipelines import FastSam2VideoPredictor

    predictor = video_predictor()
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.float32))
    assert type(predictor) is FastSam2VideoPredictor
    fastsam_core.restore(predictor)
    assert type(predictor) is SAM2VideoPredictor and not fastsam_core.is_optimized(predictor)
    assert "_fastsam_swapped_class" not in vars(predictor)
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.float32))
    assert type(predictor) is FastSam2VideoPredictor


def test_a_frame_cached_by_a_prompt_is_not_encoded_again(video_dir, short_video_dir):
    """propagate_in_videos encodes together only the frames their states have not cached:
    video A's frame 3, cached by the click there, is read from the cache while video B's
    frame 1 goes through the encoder alone; the next step's two frames go together."""
    predictor = video_predictor()
    fastsam_core.optimize(predictor, FastConfig(dtype=torch.float32))
    encoded = []  # image encoder batch sizes
    predictor.image_encoder.register_forward_pre_hook(
        lambda module, args: encoded.append(args[0].shape[0]))
    with torch.inference_mode():
        a, b = predictor.init_state(video_dir), predictor.init_state(short_video_dir)
        for state, frame, obj_id in ((a, 0, 1), (a, 3, 2), (b, 0, 7)):
            predictor.add_new_points_or_box(state, frame_idx=frame, obj_id=obj_id,
                                            points=np.array([[40, 48]], np.float32),
                                            labels=np.array([1], np.int32))
        for state in (a, b):  # consolidates the clicks (it may encode their frames again)
            predictor.propagate_in_video_preflight(state)
        encoded.clear()
        steps = [(v, t) for v, t, _, _ in predictor.propagate_in_videos(
            [a, b], start_frame_idx=[3, 1], max_frame_num_to_track=1)]
    assert steps == [(0, 3), (1, 1), (0, 4), (1, 2)]
    assert encoded == [1, 2], encoded
