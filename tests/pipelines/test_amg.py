"""FastAutomaticMaskGenerator against segment_anything's SamAutomaticMaskGenerator (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import rle_to_mask

import fastsam_core
from fastsam_core.pipelines import FastAutomaticMaskGenerator
from tests import tolerances as tol
from tests.conftest import small_sam
from tests.models.sam.test_predictor_parity import smooth_image

# Random weights give predicted IoUs around -0.05 (SAM; measured 10/50/90th percentiles
# -0.08 / -0.05 / 0.03 for this model and image) and masks spanning the whole image, so every
# box is the image and any NMS below 1 keeps one mask (box NMS is tested on the tiny trained
# models: test_box_nms_removes_the_masks_the_reference_removes). These settings keep tens of
# masks (see the test output) through the score filters with NMS off; the "iou" case switches
# the IoU filter on (a positive threshold: the reference skips thresholds <= 0).
SETTINGS = dict(points_per_side=6, pred_iou_thresh=-0.05, stability_score_thresh=0.3,
                stability_score_offset=0.05, box_nms_thresh=1.0, crop_nms_thresh=1.0)
# The tiny trained models on a generated scene: boxes that differ, tens of overlapping masks
# with NMS off (points of one object give near-duplicates), a few with the default 0.7.
NMS_SETTINGS = dict(points_per_side=8, pred_iou_thresh=0.7, stability_score_thresh=0.85,
                    box_nms_thresh=0.7)


def box_iou(a, b) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    ix = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    iy = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = ix * iy
    union = aw * ah + bw * bh - inter
    return inter / union if union else 0.0


def to_mask(segmentation) -> np.ndarray:
    if isinstance(segmentation, np.ndarray):
        return segmentation
    if isinstance(segmentation.get("counts"), list):
        return rle_to_mask(segmentation)
    return mask_utils.decode(segmentation).astype(bool)


def borderline(ann, others, settings) -> bool:
    eps = tol.AMG_BORDERLINE_EPS
    if abs(ann["predicted_iou"] - settings.get("pred_iou_thresh", 0.88)) < eps:
        return True
    if abs(ann["stability_score"] - settings.get("stability_score_thresh", 0.95)) < eps:
        return True
    cuts = [c for c in (settings.get("box_nms_thresh", 0.7),
                        settings.get("crop_nms_thresh", 0.7)) if c < 1.0]  # >= 1: NMS off
    return any(abs(box_iou(ann["bbox"], o["bbox"]) - cut) < eps for o in others
               if o is not ann for cut in cuts)


def compare(ref: list[dict], got: list[dict], settings: dict) -> int:
    """Assert every mask of one side has its counterpart on the other, within tolerances;
    returns the number of borderline masks kept by one side only."""
    unmatched = 0
    for side, other in ((ref, got), (got, ref)):
        for ann in side:
            same_prompt = [o for o in other if o["point_coords"] == ann["point_coords"]
                           and o["crop_box"] == ann["crop_box"]]
            mask = to_mask(ann["segmentation"])
            best, best_iou = None, -1.0
            for o in same_prompt:
                m = to_mask(o["segmentation"])
                union = np.logical_or(mask, m).sum()
                iou = np.logical_and(mask, m).sum() / union if union else 1.0
                if iou > best_iou:
                    best, best_iou = o, iou
            if best is None or best_iou < tol.AMG_MASK_IOU:
                assert borderline(ann, ref + got, settings), (ann["bbox"], ann["predicted_iou"],
                                                              ann["stability_score"])
                unmatched += 1
                continue
            assert max(abs(a - b) for a, b in zip(ann["bbox"], best["bbox"],
                                                  strict=True)) <= tol.AMG_BBOX_PX
            # ints, or floats where a crop kept no mask (the reference's empty crop promotes)
            assert [type(v) for v in ann["crop_box"]] == [type(v) for v in best["crop_box"]]
            assert abs(ann["area"] - best["area"]) <= tol.AMG_AREA_REL * max(ann["area"], 1)
            assert abs(ann["predicted_iou"] - best["predicted_iou"]) <= \
                tol.FP32_STAGE_REL_L2 * abs(best["predicted_iou"]) + tol.AMG_PRED_IOU_ABS
            assert abs(ann["stability_score"] - best["stability_score"]) <= tol.AMG_SCORE_ABS
    assert unmatched <= tol.AMG_MAX_BORDERLINE, unmatched
    return unmatched


@pytest.mark.parametrize("extra", [
    {},
    dict(pred_iou_thresh=0.01),
    dict(crop_n_layers=1, crop_n_points_downscale_factor=2),
    dict(output_mode="uncompressed_rle"),
    dict(output_mode="coco_rle", min_mask_region_area=40),
], ids=["binary", "iou", "crops", "uncompressed_rle", "coco_rle+small_regions"])
def test_same_masks_as_the_reference(extra, capsys):
    sam = small_sam(seed=3)
    image = smooth_image(160, 200, 5)
    settings = {**SETTINGS, **extra}
    ref = SamAutomaticMaskGenerator(sam, **settings).generate(image)
    got = FastAutomaticMaskGenerator(sam, **settings).generate(image)
    assert len(ref) >= 5, "settings keep masks"
    assert set(got[0]) == set(ref[0])
    assert type(got[0]["segmentation"]) is type(ref[0]["segmentation"])
    borderline_cases = compare(ref, got, settings)
    with capsys.disabled():
        print(f"\n[amg parity {extra}] reference {len(ref)} masks, fast {len(got)}, "
              f"borderline (kept by one side only): {borderline_cases}")


def test_a_threshold_of_zero_switches_the_iou_filter_off():
    """The reference applies pred_iou_thresh only when it is positive: with 0.0 it keeps the
    masks whose predicted IoU is negative (random weights predict IoUs around 0), and so must
    the fast generator."""
    sam = small_sam(seed=3)
    image = smooth_image(160, 200, 5)
    settings = {**SETTINGS, "pred_iou_thresh": 0.0}
    ref = SamAutomaticMaskGenerator(sam, **settings).generate(image)
    got = FastAutomaticMaskGenerator(sam, **settings).generate(image)
    assert sum(a["predicted_iou"] < -tol.AMG_BORDERLINE_EPS for a in ref) \
        > tol.AMG_MAX_BORDERLINE, "masks the filter would drop"
    compare(ref, got, settings)


def test_bgr_model_same_masks_as_the_reference():
    """The reference generator feeds a model whose image_format is BGR the image reversed
    (SamPredictor.set_image); so does the fast one."""
    sam = small_sam(seed=3)
    sam.image_format = "BGR"
    image = smooth_image(160, 200, 5)
    ref = SamAutomaticMaskGenerator(sam, **SETTINGS).generate(image)
    got = FastAutomaticMaskGenerator(sam, **SETTINGS).generate(image)
    assert len(ref) >= 5, "settings keep masks"
    compare(ref, got, SETTINGS)


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_box_nms_removes_the_masks_the_reference_removes(kind, capsys):
    """Box NMS where it decides something: the reference keeps several masks, fewer than with
    NMS off, and the fast generator the same ones (tiny trained models, NMS_SETTINGS)."""
    from fastsam_core.models.tiny import tiny
    from fastsam_core.models.tiny_data import make_scenes
    from fastsam_core.pipelines import FastSam2AutomaticMaskGenerator

    model = tiny(kind)
    image = make_scenes(1, seed=777, height=128, width=160)[0].image  # a seed training never used
    reference, fast = ((SamAutomaticMaskGenerator, FastAutomaticMaskGenerator) if kind == "sam"
                       else (sam2_reference_generator, FastSam2AutomaticMaskGenerator))
    without = reference(model, **{**NMS_SETTINGS, "box_nms_thresh": 1.0}).generate(image)
    ref = reference(model, **NMS_SETTINGS).generate(image)
    got = fast(model, **NMS_SETTINGS).generate(image)
    assert 2 <= len(ref) < len(without), (len(ref), len(without))
    borderline_cases = compare(ref, got, NMS_SETTINGS)
    with capsys.disabled():
        print(f"\n[{kind} amg box nms] reference {len(ref)} masks ({len(without)} without NMS), "
              f"fast {len(got)}, borderline (kept by one side only): {borderline_cases}")


def test_optimize_a_reference_generator_in_place():
    sam = small_sam(seed=3)
    image = smooth_image(160, 200, 5)
    generator = SamAutomaticMaskGenerator(sam, **SETTINGS)
    ref = generator.generate(image)
    assert fastsam_core.optimize(generator) is generator
    assert isinstance(generator, FastAutomaticMaskGenerator) and fastsam_core.is_optimized(sam)
    got = generator.generate(image)
    compare(ref, got, SETTINGS)
    fastsam_core.restore(generator)
    assert type(generator) is SamAutomaticMaskGenerator and not fastsam_core.is_optimized(sam)
    assert not hasattr(generator, "max_chunk_bytes")
    with pytest.raises(ValueError, match="not optimized"):
        fastsam_core.restore(generator)


def test_restore_a_generator_after_its_model():
    sam = small_sam(seed=3)
    generator = fastsam_core.optimize(SamAutomaticMaskGenerator(sam, **SETTINGS))
    fastsam_core.restore(sam)
    assert isinstance(generator, FastAutomaticMaskGenerator)  # the model alone was restored
    fastsam_core.restore(generator)
    assert type(generator) is SamAutomaticMaskGenerator and not fastsam_core.is_optimized(sam)
    assert not hasattr(generator, "max_chunk_bytes")


def test_results_do_not_depend_on_point_batch_or_chunk_size():
    sam = small_sam(seed=3)
    fastsam_core.optimize(sam)
    image = smooth_image(160, 200, 5)
    a = FastAutomaticMaskGenerator(sam, **SETTINGS).generate(image)
    b = FastAutomaticMaskGenerator(sam, points_per_batch=7, max_chunk_bytes=1,
                                   **{k: v for k, v in SETTINGS.items()}).generate(image)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x["segmentation"], y["segmentation"])
        assert x["bbox"] == y["bbox"] and x["point_coords"] == y["point_coords"]


def test_chunk_size_respects_the_memory_budget():
    """Every full-resolution buffer counts: Sam.postprocess_masks' padded-size fp32 step,
    the crop-size fp32 logits and bool mask, and (for RLE) three image-size buffers."""
    sam = small_sam()  # 256 px input
    gen = FastAutomaticMaskGenerator(sam, max_chunk_bytes=1 << 30)
    h, w = 2160, 3840  # a 4k image
    chunks = []
    gen._upsample = lambda part, feature, size: chunks.append(len(part)) or part
    list(gen._upsampled(torch.zeros(1000, 4, 4), None, (h, w), extra_bytes_per_mask=3 * h * w))
    per_mask = 4 * 256 * 256 + 5 * h * w + 3 * h * w
    assert max(chunks) * per_mask <= 1 << 30 < (max(chunks) + 1) * per_mask
    assert sum(chunks) == 1000
    assert FastAutomaticMaskGenerator(sam, max_chunk_bytes=10)._chunk(per_mask) == 1


def test_nothing_survives():
    sam = small_sam()
    got = FastAutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0.99).generate(
        smooth_image(100, 120, 1))
    assert got == []


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_chunk_bytes=0), ValueError, "max_chunk_bytes must be positive"),
    (dict(points_per_batch=0), ValueError, "points_per_batch must be positive"),
    (dict(max_chunk_bytes=1e9), TypeError, "max_chunk_bytes must be an int, got float"),
    (dict(points_per_batch=None), TypeError, "points_per_batch must be an int, got NoneType"),
    (dict(points_per_batch="64"), TypeError, "points_per_batch must be an int, got str"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FastAutomaticMaskGenerator(small_sam(), **kwargs)


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_an_image_with_four_channels_is_named(kind):
    """RGBA: the reference fails inside its preprocessing (an assertion, a size mismatch)."""
    from fastsam_core.pipelines import FastSam2AutomaticMaskGenerator
    from tests.models.sam2.test_image_encoder import small_sam2

    generator = (FastAutomaticMaskGenerator(small_sam()) if kind == "sam"
                 else FastSam2AutomaticMaskGenerator(small_sam2()))
    with pytest.raises(ValueError, match=r"image: expected an H x W x 3 RGB array, got shape "
                       r"\(40, 50, 4\)"):
        generator.generate(np.zeros((40, 50, 4), np.uint8))


def test_generators_name_the_model_family_they_take():
    from fastsam_core.pipelines import FastSam2AutomaticMaskGenerator
    from tests.models.sam2.test_image_encoder import small_sam2

    with pytest.raises(TypeError, match="model must be a segment_anything.* got SAM2Base"):
        FastAutomaticMaskGenerator(small_sam2())
    with pytest.raises(TypeError, match="model must be a sam2.* got Sam$"):
        FastSam2AutomaticMaskGenerator(small_sam())


def sam2_reference_generator(model, **settings):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    generator = SAM2AutomaticMaskGenerator(model, **settings)
    generator.predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # 256 px (design.md)
    return generator


# crops: the shared core; mask_threshold: sam2's generator argument (binarization, stability)
@pytest.mark.parametrize("extra", [{}, dict(use_m2m=True), dict(multimask_output=False),
                                   dict(mask_threshold=0.1)],
                         ids=["default", "m2m", "single-mask", "mask-threshold"])
def test_sam2_same_masks_as_the_reference(extra, capsys):
    from fastsam_core.pipelines import FastSam2AutomaticMaskGenerator
    from tests.models.sam2.test_image_encoder import small_sam2

    model = small_sam2(seed=3)
    image = smooth_image(160, 200, 5)
    settings = {**SETTINGS, "pred_iou_thresh": 0.3, **extra}  # sam2 predicts IoU in (0, 1)
    ref = sam2_reference_generator(model, **settings).generate(image)
    got = FastSam2AutomaticMaskGenerator(model, **settings).generate(image)
    assert len(ref) >= 5, "settings should keep several masks"
    borderline_cases = compare(ref, got, settings)
    # sam2's records carry float boxes (its MaskData casts every tensor): json writes 12.0
    for name in ("bbox", "crop_box"):
        assert {type(v) for a in ref + got for v in a[name]} == {float}, name
    with capsys.disabled():
        print(f"\n[sam2 amg parity {extra}] reference {len(ref)} masks, fast {len(got)}, "
              f"borderline (kept by one side only): {borderline_cases}")


def test_optimize_a_sam2_generator_in_place():
    from fastsam_core.pipelines import FastSam2AutomaticMaskGenerator
    from tests.models.sam2.test_image_encoder import small_sam2

    model = small_sam2(seed=3)
    image = smooth_image(160, 200, 5)
    settings = {**SETTINGS, "points_per_side": 4, "pred_iou_thresh": 0.3}
    generator = sam2_reference_generator(model, **settings)
    ref = generator.generate(image)
    fastsam_core.optimize(generator)
    assert isinstance(generator, FastSam2AutomaticMaskGenerator)
    assert fastsam_core.report(generator).path_of("sam_mask_decoder") == "fast"
    compare(ref, generator.generate(image), settings)
    fastsam_core.restore(generator)
    assert type(generator).__name__ == "SAM2AutomaticMaskGenerator"
    assert not fastsam_core.is_optimized(model)


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_generate_leaves_the_predictor_without_an_image(kind):
    """The reference generators set each crop on their predictor and reset it: an image set
    before is gone after generate() (a predict() then raises). The fast ones left it set, so
    that predict() silently used it."""
    from fastsam_core.pipelines import FastSam2AutomaticMaskGenerator
    from tests.models.sam2.test_image_encoder import small_sam2

    image = smooth_image(100, 120, 1)
    settings = dict(points_per_side=4)
    if kind == "sam":
        model, is_set = small_sam(), lambda p: p.is_image_set
        generators = (SamAutomaticMaskGenerator(model, **settings),
                      FastAutomaticMaskGenerator(model, **settings))
    else:
        model, is_set = small_sam2(seed=3), lambda p: p._is_image_set
        generators = (sam2_reference_generator(model, **settings),
                      FastSam2AutomaticMaskGenerator(model, **settings))
        generators[1].predictor._bb_feat_sizes = generators[0].predictor._bb_feat_sizes
    for generator in generators:
        generator.predictor.set_image(image)
        assert is_set(generator.predictor)
        generator.generate(image)
        assert not is_set(generator.predictor), type(generator).__name__
    with pytest.raises(RuntimeError):
        generators[1].predictor.predict(point_coords=np.array([[10.0, 10.0]]),
                                        point_labels=np.array([1]))


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_positional_arguments_are_the_references(kind):
    """(model, points_per_side, points_per_batch, pred_iou_thresh, ...) in the reference's
    order: 4 is points_per_side (16 points), not points_per_batch."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from fastsam_core.pipelines import FastSam2AutomaticMaskGenerator
    from tests.models.sam2.test_image_encoder import small_sam2

    model = small_sam() if kind == "sam" else small_sam2()
    reference, fast = {"sam": (SamAutomaticMaskGenerator, FastAutomaticMaskGenerator),
                       "sam2": (SAM2AutomaticMaskGenerator, FastSam2AutomaticMaskGenerator)}[kind]
    args = (4, 16, 0.5, 0.6, 0.7)  # ... stability_score_thresh, stability_score_offset
    expected, got = reference(model, *args), fast(model, *args)
    assert got.point_grids[0].shape == expected.point_grids[0].shape == (16, 2)
    for name in ("points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                 "stability_score_offset"):
        assert getattr(got, name) == getattr(expected, name), name


def test_crop_features_are_freed_after_their_encoder_batch(monkeypatch):
    """The features of one encoder batch of crops exist at once (the README's memory bound),
    not those of every crop of the image until its masks are encoded: when a batch is
    encoded, no earlier batch's embeddings are alive."""
    import weakref

    import fastsam_core.pipelines.amg as fast_module

    monkeypatch.setattr(fast_module, "ENCODER_BATCH", 2)
    generator = FastAutomaticMaskGenerator(small_sam(seed=3), **{**SETTINGS,
                                                                 "crop_n_layers": 2})
    batches, alive_at_encode = [], []  # weak references to each batch's embeddings
    encode, decode = generator._encode, generator._crop_candidates
    decoded = []

    def tracked_encode(crops):
        alive_at_encode.append(sum(r() is not None for r in batches))
        features = encode(crops)
        batches.append(weakref.ref(features[0][0]._base))  # the batch behind the views
        return features

    def counted_decode(*args, **kwargs):
        decoded.append(1)
        return decode(*args, **kwargs)

    generator._encode, generator._crop_candidates = tracked_encode, counted_decode
    generator.generate(smooth_image(160, 200, 5))
    assert len(decoded) == 21 and len(batches) == 11  # 1 + 4 + 16 crops, 2 per batch
    assert alive_at_encode == [0] * 11, alive_at_encode


@pytest.mark.parametrize("encoder_batch", [8, 2])
def test_masks_of_every_crop_layer(monkeypatch, encoder_batch):
    """With random weights every crop-layer mask touches its crop's edge and is dropped; with
    that filter off (in both generators) the masks of all five crops reach the output, which
    exercises the crop NMS and the per-crop RLE bookkeeping; also with the crops encoded in
    batches of two (each mask must keep its crop's index across the batches)."""
    import segment_anything.automatic_mask_generator as reference_module

    import fastsam_core.pipelines.amg as fast_module

    def never_near(boxes, *args, **kwargs):
        return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)

    monkeypatch.setattr(reference_module, "is_box_near_crop_edge", never_near)
    monkeypatch.setattr(fast_module, "is_box_near_crop_edge", never_near)
    monkeypatch.setattr(fast_module, "ENCODER_BATCH", encoder_batch)
    sam = small_sam(seed=3)
    image = smooth_image(160, 200, 5)
    settings = {**SETTINGS, "crop_n_layers": 1, "crop_nms_thresh": 0.9}
    ref = SamAutomaticMaskGenerator(sam, **settings).generate(image)
    got = FastAutomaticMaskGenerator(sam, **settings).generate(image)
    assert len({tuple(a["crop_box"]) for a in ref}) >= 2, "masks from several crops"
    compare(ref, got, settings)
    assert [a["crop_box"] for a in got] == [a["crop_box"] for a in ref]  # the same order


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_box_nms_takes_its_own_threshold_not_the_crop_nms_one(kind):
    """One crop (no crop NMS runs): box_nms_thresh alone decides, whatever crop_nms_thresh
    says; here a crop_nms_thresh used in its place would remove more masks."""
    from fastsam_core.models.tiny import tiny
    from fastsam_core.models.tiny_data import make_scenes
    from fastsam_core.pipelines import FastSam2AutomaticMaskGenerator

    model = tiny(kind)
    image = make_scenes(1, seed=777, height=128, width=160)[0].image
    reference, fast = ((SamAutomaticMaskGenerator, FastAutomaticMaskGenerator) if kind == "sam"
                       else (sam2_reference_generator, FastSam2AutomaticMaskGenerator))
    settings = {**NMS_SETTINGS, "crop_nms_thresh": 0.3}
    ref = reference(model, **settings).generate(image)
    stricter = reference(model, **{**NMS_SETTINGS, "box_nms_thresh": 0.3}).generate(image)
    assert len(stricter) < len(ref), (len(stricter), len(ref))
    compare(ref, fast(model, **settings).generate(image), NMS_SETTINGS)


def test_sam2_m2m_on_trained_weights_same_masks_as_the_reference():
    """use_m2m refines each mask from its low-resolution logits clamped to +-32, as sam2's
    predictor returns them: the tiny trained model's logits reach beyond 100 (random
    weights' stay inside the clamp)."""
    from fastsam_core.models.tiny import tiny
    from fastsam_core.models.tiny_data import make_scenes
    from fastsam_core.pipelines import FastSam2AutomaticMaskGenerator

    model = tiny("sam2")
    image = make_scenes(1, seed=777, height=128, width=160)[0].image
    settings = {**NMS_SETTINGS, "use_m2m": True}
    ref = sam2_reference_generator(model, **settings).generate(image)
    got = FastSam2AutomaticMaskGenerator(model, **settings).generate(image)
    assert len(ref) >= 2, len(ref)
    compare(ref, got, settings)


def test_sam2_point_batches_of_two_and_single_mask_chunks_as_the_reference():
    """Point batches of two prompts (and one mask per chunk): the reference's masks, where
    a batch of several prompts decodes them against one image embedding."""
    from fastsam_core.pipelines import FastSam2AutomaticMaskGenerator
    from tests.models.sam2.test_image_encoder import small_sam2

    model = small_sam2(seed=3)
    image = smooth_image(160, 200, 5)
    settings = {**SETTINGS, "points_per_side": 4, "pred_iou_thresh": 0.3,
                "points_per_batch": 2}
    ref = sam2_reference_generator(model, **settings).generate(image)
    got = FastSam2AutomaticMaskGenerator(model, max_chunk_bytes=1, **settings).generate(image)
    assert len(ref) >= 2, len(ref)
    compare(ref, got, settings)


def test_a_stability_score_equal_to_its_threshold_is_kept():
    """The reference keeps a mask whose stability score equals stability_score_thresh (>=):
    scores are ratios of pixel counts, so a threshold can be met exactly (here the lowest
    score of the tiny trained model's masks, NMS off)."""
    from fastsam_core.models.tiny import tiny
    from fastsam_core.models.tiny_data import make_scenes

    model = tiny("sam")
    image = make_scenes(1, seed=777, height=128, width=160)[0].image
    settings = dict(points_per_side=8, pred_iou_thresh=0.7, box_nms_thresh=1.0,
                    stability_score_thresh=0.0)  # 0: the filter is off
    lowest = min(a["stability_score"]
                 for a in FastAutomaticMaskGenerator(model, **settings).generate(image))
    assert lowest > 0.0
    settings["stability_score_thresh"] = lowest
    ref = SamAutomaticMaskGenerator(model, **settings).generate(image)
    got = FastAutomaticMaskGenerator(model, **settings).generate(image)
    assert lowest in [a["stability_score"] for a in ref]
    assert lowest in [a["stability_score"] for a in got]
    compare(ref, got, settings)
