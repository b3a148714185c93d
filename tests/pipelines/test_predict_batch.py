"""fastsam_core.pipelines.predict_batch against the reference SamPredictor, image by image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.sam.mask_decoder import FastMaskDecoder
from fastsam_core.pipelines import predict_batch
from tests import tolerances as tol
from tests.conftest import small_sam
from tests.models.sam.test_predictor_parity import smooth_image
from tests.parity import assert_close_fp32, mask_iou_outside_margin


def batch():
    """Three images of different sizes: K = 2 (points, 2 each), 0, 3 (1 point and a box each,
    plus mask inputs) and 1 (a box only): prompt and token counts differ between images."""
    gen = np.random.default_rng(0)
    images = [smooth_image(180, 240, 0), smooth_image(256, 200, 1), smooth_image(120, 150, 2),
              smooth_image(200, 200, 3)]
    prompts = [
        dict(point_coords=gen.uniform(0, 180, (2, 2, 2)), point_labels=np.array([[1, 0], [1, 1]])),
        {},
        dict(point_coords=gen.uniform(0, 120, (3, 1, 2)), point_labels=np.ones((3, 1)),
             boxes=np.array([[10, 10, 90, 100], [0, 0, 149, 119], [40, 30, 140, 110.0]]),
             mask_input=gen.normal(0, 3, (3, 1, 64, 64)).astype(np.float32)),
        dict(boxes=np.array([[20.0, 30.0, 150.0, 180.0]])),
    ]
    return images, prompts


def reference(sam, images, prompts, multimask):
    """The reference: set_image and predict_torch per image, coordinates transformed with
    apply_coords_torch / apply_boxes_torch."""
    predictor = SamPredictor(sam)
    out = []
    for image, p in zip(images, prompts, strict=True):
        if not p:
            out.append(None)
            continue
        predictor.set_image(image)
        size = image.shape[:2]
        coords = labels = boxes = masks = None
        if "point_coords" in p:
            coords = predictor.transform.apply_coords_torch(
                torch.as_tensor(p["point_coords"]), size)
            labels = torch.as_tensor(p["point_labels"], dtype=torch.int)
        if "boxes" in p:
            boxes = predictor.transform.apply_boxes_torch(torch.as_tensor(p["boxes"]), size)
        if "mask_input" in p:
            masks = torch.as_tensor(p["mask_input"])
        logits, iou, low = predictor.predict_torch(coords, labels, boxes, masks, multimask,
                                                   return_logits=True)
        out.append((logits, iou, low))
    return out


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("setting", ["plain", "optimized-fp32", "optimized-bf16"])
def test_matches_reference_per_image(setting, multimask):
    sam = small_sam()
    images, prompts = batch()
    expected = reference(sam, images, prompts, multimask)
    if setting != "plain":
        dtype = torch.bfloat16 if setting.endswith("bf16") else torch.float32
        fastsam_core.optimize(sam, FastConfig(dtype=dtype))
    got = predict_batch(sam, images, prompts, multimask_output=multimask)
    m = 3 if multimask else 1
    for i, (image, result, ref) in enumerate(zip(images, got, expected, strict=True)):
        k = len(next(iter(prompts[i].values()))) if prompts[i] else 0
        assert result["masks"].shape == (k, m, *image.shape[:2])
        assert result["masks"].dtype == torch.bool
        assert result["iou_predictions"].shape == (k, m)
        assert result["low_res_logits"].shape == (k, m, 64, 64)
        if ref is None:
            continue
        ref_logits, ref_iou, ref_low = ref
        masks_as_logits = result["masks"].float() - 0.5  # > 0 where the mask is set
        if setting == "optimized-bf16":
            assert mask_iou_outside_margin(masks_as_logits, ref_logits) >= tol.MASK_IOU_BF16
            continue
        assert_close_fp32(result["low_res_logits"], ref_low, tol.FP32_STAGE_REL_L2)
        assert_close_fp32(result["iou_predictions"], ref_iou, tol.FP32_STAGE_REL_L2)
        assert mask_iou_outside_margin(masks_as_logits, ref_logits) >= tol.MASK_IOU_FP32


def test_one_encoder_call_and_one_decoder_call(monkeypatch):
    sam = small_sam()
    fastsam_core.optimize(sam)
    images, prompts = batch()
    calls = {"encoder": 0, "decoder": 0}
    sam.image_encoder.register_forward_hook(
        lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    decode = FastMaskDecoder.decode

    def counting_decode(self, *args):
        calls["decoder"] += 1
        return decode(self, *args)

    monkeypatch.setattr(FastMaskDecoder, "decode", counting_decode)
    predict_batch(sam, images, prompts)
    assert calls == {"encoder": 1, "decoder": 1}


@pytest.mark.parametrize("multimask", [True, False])
def test_all_images_without_prompts_and_predictor_input(multimask):
    sam = small_sam()
    images = [smooth_image(100, 120, 0), smooth_image(90, 60, 1)]
    results = predict_batch(SamPredictor(sam), images, [{}, {"boxes": np.zeros((0, 4))}],
                            multimask_output=multimask)
    m = 3 if multimask else 1
    for image, result in zip(images, results, strict=True):
        assert result["masks"].shape == (0, m, *image.shape[:2])
        assert result["iou_predictions"].shape == (0, m)
        assert result["low_res_logits"].shape == (0, m, 64, 64)
    assert predict_batch(sam, [], []) == []


@pytest.mark.parametrize("setting", ["plain", "optimized"])
def test_padding_points_ignore_their_coordinates(setting):
    """Label -1 marks padding: the reference zeroes its positional encoding, so even NaN
    coordinates (a common filler) leave the masks as they are."""
    sam = small_sam()
    image = smooth_image(180, 240, 0)
    prompt = dict(point_coords=np.array([[[90.0, 60.0], [np.nan, np.nan]]]),
                  point_labels=np.array([[1, -1]]))
    (ref_logits, ref_iou, ref_low), = reference(sam, [image], [prompt], True)
    assert torch.isfinite(ref_low).all()
    if setting == "optimized":
        fastsam_core.optimize(sam)
    got, = predict_batch(sam, [image], [prompt])
    assert_close_fp32(got["low_res_logits"], ref_low, tol.FP32_STAGE_REL_L2)
    assert_close_fp32(got["iou_predictions"], ref_iou, tol.FP32_STAGE_REL_L2)


@pytest.mark.parametrize("setting", ["plain", "optimized"])
def test_bgr_model_gets_its_channel_order(setting):
    """Images are RGB; a model with image_format "BGR" is fed them reversed, as
    SamPredictor.set_image does."""
    sam = small_sam()
    sam.image_format = "BGR"
    image = smooth_image(180, 240, 0)
    prompt = dict(boxes=np.array([[20.0, 30.0, 150.0, 170.0]]))
    (ref_logits, ref_iou, ref_low), = reference(sam, [image], [prompt], True)
    if setting == "optimized":
        fastsam_core.optimize(sam)
    got, = predict_batch(sam, [image], [prompt])
    assert_close_fp32(got["low_res_logits"], ref_low, tol.FP32_STAGE_REL_L2)


def test_under_inference_mode():
    sam = small_sam()
    fastsam_core.optimize(sam)
    images, prompts = batch()
    expected = predict_batch(sam, images, prompts)
    with torch.inference_mode():
        got = predict_batch(sam, images, prompts)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["masks"], b["masks"])


def test_boolean_labels_as_the_reference_predictor_takes_them():
    sam = small_sam()
    image = smooth_image(180, 240, 0)
    coords = np.array([[[60.0, 50.0], [100.0, 90.0]]])
    labels = np.array([[1, 0]])
    expected = predict_batch(sam, [image], [dict(point_coords=coords, point_labels=labels)])
    got = predict_batch(sam, [image], [dict(point_coords=coords, point_labels=labels == 1)])
    assert torch.equal(got[0]["low_res_logits"], expected[0]["low_res_logits"])


def test_fractional_labels_are_truncated_as_the_reference_predictor_does():
    """SamPredictor.predict casts labels to int (0.7 -> 0, a negative point)."""
    sam = small_sam()
    image = smooth_image(180, 240, 0)
    coords = np.array([[60.0, 50.0], [100.0, 90.0]])
    labels = np.array([1.0, 0.7])
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    _, iou, low = predictor.predict(coords, labels, multimask_output=True, return_logits=True)
    (got,) = predict_batch(sam, [image], [dict(point_coords=coords[None],
                                               point_labels=labels[None])])
    assert_close_fp32(got["low_res_logits"][0], torch.as_tensor(low), tol.FP32_STAGE_REL_L2)
    assert_close_fp32(got["iou_predictions"][0], torch.as_tensor(iou), tol.FP32_STAGE_REL_L2)


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_leaves_the_modes_of_a_plain_model_as_they_were(kind):
    """A plain (not optimized) model in training mode: the fast view that predict_batch and
    the mask generators run shares the model's modules and must not put them in eval mode."""
    from tests.models.sam2.test_image_encoder import small_sam2

    model = (small_sam() if kind == "sam" else small_sam2()).train()
    model.image_encoder.eval()  # a mix, as a user fine-tuning the heads has
    before = {name: m.training for name, m in model.named_modules()}
    images, prompts = batch()
    with torch.no_grad():
        predict_batch(model, images[:1], prompts[:1])
    assert {name: m.training for name, m in model.named_modules()} == before


@pytest.mark.parametrize("optimized", [False, True])
def test_sam2_heads_in_training_mode_select_single_masks_as_the_reference(optimized):
    """SAM 2's decoder picks a single mask by stability only in eval mode: with the heads in
    training mode (a user fine-tuning them), predict_batch's single masks are the reference
    predictor's (the stability selection had run anyway)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from fastsam_core.models.tiny import sam2_feature_sizes
    from tests.models.sam2.test_image_encoder import small_sam2

    model = small_sam2()
    if optimized:
        fastsam_core.optimize(model, FastConfig(dtype=torch.float32))
    model.train()
    model.image_encoder.eval()
    image = smooth_image()
    coords = np.random.default_rng(0).uniform(0, 180, (6, 1, 2))
    labels = np.ones((6, 1))
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = sam2_feature_sizes(model.image_size)
    with torch.no_grad(), pytest.warns(UserWarning, match="training mode"):
        predictor.set_image(image)
        _, iou, low_res = predictor.predict(coords, labels, multimask_output=False,
                                            return_logits=True)
        (got,) = predict_batch(model, [image], [dict(point_coords=coords, point_labels=labels)],
                               multimask_output=False)
    assert_close_fp32(got["low_res_logits"], torch.as_tensor(low_res), tol.FP32_STAGE_REL_L2)
    assert_close_fp32(got["iou_predictions"], torch.as_tensor(iou), tol.FP32_STAGE_REL_L2)


@pytest.mark.parametrize(
    "images, prompts, match",
    [
        ([smooth_image()], [{}, {}], "images has 1 entries but prompts has 2"),
        ([smooth_image()[..., :2]], [{}], r"images\[0\]: expected an H x W x 3"),
        ([smooth_image().astype(np.float32)], [{}], r"images\[0\]: expected dtype uint8"),
        ([smooth_image()], ["box"], r"prompts\[0\]: expected a dict"),
        ([smooth_image()] * 2, [{}, {"point_coords": np.zeros((1, 1, 2))}],
         r"prompts\[1\]\['point_coords'\] given without 'point_labels'"),
        ([smooth_image()], [{"point_labels": np.zeros((1, 1))}],
         r"prompts\[0\]\['point_labels'\] given without 'point_coords'"),
        ([smooth_image()], [{"boxes": np.zeros((2, 3))}],
         r"prompts\[0\]\['boxes'\]: expected K x 4"),
        ([smooth_image()], [{"point_coords": np.zeros((2, 1, 2)),
                             "point_labels": np.zeros((2, 2))}],
         r"prompts\[0\]\['point_labels'\]: shape \(2, 2\) does not match"),
        ([smooth_image()], [{"point_coords": np.zeros((2, 1, 2)),
                             "point_labels": np.zeros((2, 1)), "boxes": np.zeros((3, 4))}],
         r"prompts\[0\]: keys disagree on the prompt count"),
        ([smooth_image()], [{"mask_input": np.zeros((1, 1, 256, 256))}],
         r"prompts\[0\]\['mask_input'\]: expected K x 1 x 64 x 64"),
        ([smooth_image()], [{"box": np.zeros((1, 4))}], r"prompts\[0\]: unknown key"),
        (smooth_image(), [{}], "images: expected a list of H x W x 3 arrays, got one array"),
        ([smooth_image()], {"boxes": np.zeros((1, 4))},
         "prompts: expected a list of dicts, one per image, got one dict"),
        ([smooth_image()[:0]], [{}], r"images\[0\]: an empty image"),
        ([smooth_image()[:, :0]], [{}], r"images\[0\]: an empty image"),
        ([smooth_image()], [{"mask_input": np.zeros((1, 2, 64, 64))}],
         r"prompts\[0\]\['mask_input'\]: expected K x 1 x 64 x 64"),
        ([smooth_image()], [{"point_coords": np.array([[["a", "b"]]]),
                             "point_labels": np.ones((1, 1))}],
         r"prompts\[0\]\['point_coords'\]: not an array of numbers"),
        ([smooth_image()], [{"boxes": [[0, 0, 10, 10], [0, 0, 5]]}],
         r"prompts\[0\]\['boxes'\]: not an array of numbers"),
        ([smooth_image()], [{"boxes": np.zeros((1, 4), complex)}],
         r"prompts\[0\]\['boxes'\]: expected real numbers, got torch.complex128"),
    ],
)
def test_bad_input_names_the_image_and_key(images, prompts, match):
    with pytest.raises(ValueError, match=match):
        predict_batch(small_sam(), images, prompts)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_on_cuda(dtype):
    """The jagged decoder path compiled for the GPU (SDPA on nested tensors there)."""
    sam = small_sam().cuda()
    images, prompts = batch()
    expected = reference(sam, images, prompts, True)
    fastsam_core.optimize(sam, FastConfig(dtype=dtype))
    got = predict_batch(sam, images, prompts)
    for result, ref in zip(got, expected, strict=True):
        if ref is None:
            continue
        masks_as_logits = result["masks"].float() - 0.5
        if dtype == torch.float32:
            assert_close_fp32(result["low_res_logits"], ref[2], tol.FP32_STAGE_REL_L2)
            assert mask_iou_outside_margin(masks_as_logits, ref[0]) >= tol.MASK_IOU_FP32
        else:
            assert mask_iou_outside_margin(masks_as_logits, ref[0]) >= tol.MASK_IOU_BF16

