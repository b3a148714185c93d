"""Parity of the fast SAM 2 prompt encoder and mask decoder with sam2's."""

from __future__ import annotations

import pytest
import torch

from fastsam_core import FastConfig
from fastsam_core.models.sam.prompt_encoder import FastPromptEncoder
from fastsam_core.models.sam2.mask_decoder import FastSam2MaskDecoder
from tests import tolerances as tol
from tests.models.sam2.test_image_encoder import small_sam2
from tests.parity import assert_close_fp32, assert_lowp_parity, in_dtype

SIZE = 256  # small_sam2: 16 x 16 image embedding, high-res features 64 x 64 and 32 x 32


@pytest.fixture(scope="module")
def model():
    return small_sam2()


def prompts(k=4, p=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    coords = torch.rand(k, p, 2, generator=gen) * SIZE
    labels = torch.randint(-1, 4, (k, p), generator=gen)  # sam2 uses 2 and 3 for box corners
    boxes = torch.sort(torch.rand(k, 2, 2, generator=gen) * SIZE, dim=1).values.reshape(k, 4)
    masks = torch.randn(k, 1, 64, 64, generator=gen) * 4
    return coords, labels, boxes, masks


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["points", "boxes", "masks", "all"])
def test_prompt_encoder_fp32(model, kind):
    ref = model.sam_prompt_encoder
    fast = FastPromptEncoder.from_reference(ref, FastConfig(), torch.float32).eval()
    coords, labels, boxes, masks = prompts()
    args = {"points": ((coords, labels), None, None), "boxes": (None, boxes, None),
            "masks": (None, None, masks), "all": ((coords, labels), boxes, masks)}[kind]
    for got, expected in zip(fast(*args), ref(*args), strict=True):
        assert got.shape == expected.shape
        if got.numel():
            assert_close_fp32(got, expected, tol.FP32_OP_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_point_labels_bool_and_uint8(model, dtype):
    """The padding point of bool / uint8 labels gets label -1 (True, or a failed conversion,
    before), as the reference's float padding label promotes them; the dense PE is a copy."""
    ref = model.sam_prompt_encoder
    fast = FastPromptEncoder.from_reference(ref, FastConfig(), torch.float32).eval()
    coords = prompts()[0]
    labels = torch.tensor([[1, 0, 1]] * len(coords)).to(dtype)
    expected, _ = ref((coords, labels), None, None)
    assert_close_fp32(fast((coords, labels), None, None)[0], expected, tol.FP32_OP_REL_L2)
    fast.get_dense_pe().mul_(0)
    assert_close_fp32(fast.get_dense_pe(), ref.get_dense_pe(), tol.FP32_OP_REL_L2)


@torch.inference_mode()
def test_padding_points_ignore_their_coordinates(model):
    """sam2 zeroes the positional encoding of label -1: NaN coordinates there change nothing."""
    ref = model.sam_prompt_encoder
    fast = FastPromptEncoder.from_reference(ref, FastConfig(), torch.float32).eval()
    coords, labels, _, _ = prompts()
    labels[:, -1] = -1
    coords[:, -1] = float("nan")
    expected, _ = ref((coords, labels), None, None)
    got, _ = fast((coords, labels), None, None)
    assert torch.isfinite(expected).all()
    assert_close_fp32(got, expected, tol.FP32_OP_REL_L2)


@torch.inference_mode()
def test_prompt_shapes_sam2_takes_and_refuses(model):
    """sam2 selects by label with torch.where, so labels 1 x P broadcast over K prompts
    there (unlike segment_anything); coordinates must still be K x P x 2."""
    ref = model.sam_prompt_encoder
    fast = FastPromptEncoder.from_reference(ref, FastConfig(), torch.float32).eval()
    coords, labels, boxes, _ = prompts()
    shared = ((coords, labels[:1]), None, None)
    assert_close_fp32(fast(*shared)[0], ref(*shared)[0], tol.FP32_OP_REL_L2)
    one_row = ((coords, labels[0]), boxes, None)  # 1-D labels: no padding label with boxes
    assert_close_fp32(fast(*one_row)[0], ref(*one_row)[0], tol.FP32_OP_REL_L2)
    three_columns = ((torch.cat([coords, coords[..., :1]], -1), labels), None, None)
    with pytest.raises(RuntimeError):
        ref(*three_columns)
    with pytest.raises(ValueError, match="^points: coordinates must be B x N x 2"):
        fast(*three_columns)


@torch.inference_mode()
def test_one_prompt_over_several_mask_inputs_runs_the_reference(model):
    ref = model.sam_mask_decoder
    fast = FastSam2MaskDecoder.from_reference(ref, FastConfig(), torch.float32).eval()
    fast.set_reference(ref)
    image, pe, _, _, high_res = decoder_inputs(model, 1, True)
    coords, labels, _, _ = prompts(k=1)
    sparse, dense = model.sam_prompt_encoder((coords, labels.clamp(0, 1)), None,
                                             prompts(k=2)[3])
    assert (sparse.shape[0], dense.shape[0]) == (1, 2)
    expected = ref(image, pe, sparse, dense, True, True, high_res)
    with pytest.warns(UserWarning, match="dense_prompt_embeddings batch 2 for 1 prompts"):
        got = fast(image, pe, sparse, dense, True, True, high_res)
    assert got[0].shape == expected[0].shape == (2, 3, 64, 64)
    for g, e in zip(got, expected, strict=True):
        assert_close_fp32(g, e, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("high_res", [None, "one level"])
@pytest.mark.parametrize("mode", ["eval", "train"])  # train: the reference fallback's call
def test_mask_decoder_needs_its_high_res_features(model, high_res, mode):
    fast = FastSam2MaskDecoder.from_reference(model.sam_mask_decoder, FastConfig(),
                                              torch.float32).train(mode == "train")
    fast.set_reference(model.sam_mask_decoder)
    image, pe, sparse, dense, features = decoder_inputs(model, 2, True)
    features = None if high_res is None else features[:1]
    with pytest.raises(ValueError, match="high_res_features"):
        fast(image, pe, sparse, dense, True, True, features)


def decoder_inputs(model, k, repeat_image, seed=1):
    gen = torch.Generator().manual_seed(seed)
    b = 1 if repeat_image else k
    image = torch.randn(b, 256, 16, 16, generator=gen)
    high_res = [torch.randn(b, 32, 64, 64, generator=gen), torch.randn(b, 64, 32, 32,
                                                                       generator=gen)]
    coords, labels, boxes, masks = prompts(k)
    sparse, dense = model.sam_prompt_encoder((coords, labels.clamp(0, 1)), None, masks)
    return image, model.sam_prompt_encoder.get_dense_pe(), sparse, dense, high_res


@pytest.mark.parametrize("needs_grad", ["image_pe", "high_res_features"])
def test_mask_decoder_runs_the_reference_for_any_input_needing_a_gradient(needs_grad):
    """Also the positional encoding and the high-resolution features (the check had missed
    them: the bf16 fast path ran under autograd): the reference runs, with its gradients."""
    model = small_sam2()
    model.requires_grad_(False)
    ref = model.sam_mask_decoder
    fast = FastSam2MaskDecoder.from_reference(ref, FastConfig(), torch.bfloat16).eval()
    fast.set_reference(ref)
    image, pe, sparse, dense, high_res = decoder_inputs(model, 3, True)
    grads = []
    for decoder in (ref, fast):
        inputs = [pe.clone(), [t.clone() for t in high_res]]
        leaf = inputs[0] if needs_grad == "image_pe" else inputs[1][0]
        leaf.requires_grad_(True)
        if decoder is fast:
            with pytest.warns(UserWarning, match="autograd is recording"):
                masks = decoder(image, inputs[0], sparse, dense, True, True, inputs[1])[0]
        else:
            masks = decoder(image, inputs[0], sparse, dense, True, True, inputs[1])[0]
        masks.square().mean().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[1], grads[0])


@torch.inference_mode()
@pytest.mark.parametrize("repeat_image", [True, False])
@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder_fp32(model, repeat_image, multimask):
    ref = model.sam_mask_decoder
    assert ref.pred_obj_scores and ref.use_high_res_features
    assert ref.dynamic_multimask_via_stability  # sam2.1 with apply_postprocessing
    fast = FastSam2MaskDecoder.from_reference(ref, FastConfig(), torch.float32).eval()
    image, pe, sparse, dense, high_res = decoder_inputs(model, 5, repeat_image)
    expected = ref(image, pe, sparse, dense, multimask, repeat_image, high_res)
    got = fast(image, pe, sparse, dense, multimask, repeat_image, high_res)
    assert len(got) == len(expected) == 4
    for name, a, b in zip(("masks", "iou", "tokens", "object scores"), got, expected,
                          strict=True):
        assert a.shape == b.shape, name
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("repeat_image", [True, False])
def test_mask_decoder_fp32_without_mask_inputs(model, repeat_image):
    """Prompts without a mask input get the no-mask embedding broadcast over the batch (a
    stride-0 view shared by all prompts), as SAM2Base's tracking step calls the decoder: one
    image per prompt (repeat_image=False, one object per batch element) or one for all."""
    ref = model.sam_mask_decoder
    fast = FastSam2MaskDecoder.from_reference(ref, FastConfig(), torch.float32).eval()
    image, pe, _, _, high_res = decoder_inputs(model, 3, repeat_image)
    coords, labels, _, _ = prompts(3)
    sparse, dense = model.sam_prompt_encoder((coords, labels.clamp(0, 1)), None, None)
    assert dense.shape[0] == 3 and dense.stride(0) == 0
    for multimask in (True, False):
        expected = ref(image, pe, sparse, dense, multimask, repeat_image, high_res)
        got = fast(image, pe, sparse, dense, multimask, repeat_image, high_res)
        for name, a, b in zip(("masks", "iou", "tokens", "object scores"), got, expected,
                              strict=True):
            assert a.shape == b.shape, name
            assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_dynamic_multimask_takes_both_branches(model):
    """Single-mask output picks the single-mask token's mask when stable, else the best of
    the three: with the threshold at 0 and at 1.01 both branches are exercised."""
    fast = FastSam2MaskDecoder.from_reference(model.sam_mask_decoder, FastConfig(),
                                              torch.float32).eval()
    ref = model.sam_mask_decoder
    image, pe, sparse, dense, high_res = decoder_inputs(model, 3, True)
    for threshold in (0.0, 1.01):
        ref.dynamic_multimask_stability_thresh = fast.dynamic_multimask_stability_thresh = \
            threshold
        try:
            expected = ref(image, pe, sparse, dense, False, True, high_res)
            got = fast(image, pe, sparse, dense, False, True, high_res)
        finally:
            ref.dynamic_multimask_stability_thresh = 0.98
        assert_close_fp32(got[0], expected[0], tol.FP32_STAGE_REL_L2)
        assert_close_fp32(got[1], expected[1], tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_stability_selection_is_the_references(model):
    """The single-mask choice against the reference's, on logits made to test its edges: an
    empty single mask (the reference counts it stable), pixels between 0 and +delta or
    -delta (each counts in one of the two areas only), a mask just stable, a clean one."""
    ref = model.sam_mask_decoder
    fast = FastSam2MaskDecoder.from_reference(ref, FastConfig(), torch.float32).eval()
    delta = ref.dynamic_multimask_stability_delta
    gen = torch.Generator().manual_seed(0)
    masks = torch.randn(5, 4, 16, 16, generator=gen) * 10
    single = torch.full((5, 256), -10.0)
    single[1:, :100] = 10.0
    single[1, 100:150] = delta / 2
    single[2, 100:150] = -delta / 2
    single[3, 100:102] = delta / 2  # stability 100 / 102, just above sam2.1's 0.98
    masks[:, 0] = single.view(5, 16, 16)
    iou = torch.rand(5, 4, generator=gen)
    expected = ref._dynamic_multimask_via_stability(masks, iou)
    stable = [torch.equal(expected[0][i], masks[i, :1]) for i in range(5)]
    assert stable == [True, False, False, True, True]  # both branches taken
    got = fast.stable_or_best(masks, iou)
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


@torch.inference_mode()
def test_stability_selection_at_its_exact_edges(model):
    """Logits exactly at +delta or -delta, and a stability exactly at the threshold, decided
    as the reference decides them: strictly above +-delta counts, a stability equal to the
    threshold is stable. Rows: 3 pixels at +delta (100 / 103, unstable), 3 at -delta
    (100 / 100, stable), 98 / 100 = sam2.1's threshold 0.98 (stable)."""
    ref = model.sam_mask_decoder
    fast = FastSam2MaskDecoder.from_reference(ref, FastConfig(), torch.float32).eval()
    delta = ref.dynamic_multimask_stability_delta
    assert ref.dynamic_multimask_stability_thresh == 0.98
    gen = torch.Generator().manual_seed(0)
    masks = torch.randn(3, 4, 16, 16, generator=gen) * 10
    single = torch.full((3, 256), -10.0)
    single[:2, :100] = 10.0
    single[0, 100:103] = delta
    single[1, 100:103] = -delta
    single[2, :98] = 10.0
    single[2, 98:100] = delta / 2
    masks[:, 0] = single.view(3, 16, 16)
    iou = torch.rand(3, 4, generator=gen)
    expected = ref._dynamic_multimask_via_stability(masks, iou)
    stable = [torch.equal(expected[0][i], masks[i, :1]) for i in range(3)]
    assert stable == [False, True, True]
    got = fast.stable_or_best(masks, iou)
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


@torch.inference_mode()
def test_object_pointer_tokens_follow_use_multimask_token_for_obj_ptr(model):
    """Off (SAM2Base's default), the object pointer is the single-mask token's output even
    with multimask output."""
    ref = model.sam_mask_decoder
    image, pe, sparse, dense, high_res = decoder_inputs(model, 3, True)
    kept = ref.use_multimask_token_for_obj_ptr
    ref.use_multimask_token_for_obj_ptr = False
    try:
        fast = FastSam2MaskDecoder.from_reference(ref, FastConfig(), torch.float32).eval()
        expected = ref(image, pe, sparse, dense, True, True, high_res)
    finally:
        ref.use_multimask_token_for_obj_ptr = kept
    got = fast(image, pe, sparse, dense, True, True, high_res)
    assert got[2].shape == expected[2].shape == (3, 1, 256)
    for a, b in zip(got, expected, strict=True):
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_mask_decoder_bf16(model):
    ref = model.sam_mask_decoder
    fast = FastSam2MaskDecoder.from_reference(ref, FastConfig(), torch.bfloat16).eval()
    image, pe, sparse, dense, high_res = decoder_inputs(model, 4, True)
    got = fast(image, pe, sparse, dense, True, True, high_res)
    low = [image.bfloat16(), pe.bfloat16(), sparse.bfloat16(), dense.bfloat16()]
    naive = in_dtype(ref, torch.bfloat16)(*low, True, True, [h.bfloat16() for h in high_res])
    exact = in_dtype(ref, torch.float64)(image.double(), pe.double(), sparse.double(),
                                         dense.double(), True, True,
                                         [h.double() for h in high_res])
    for a, b, c in zip(got, naive, exact, strict=True):
        assert_lowp_parity(a, b, c)


LEAN = ("++model.use_high_res_features_in_sam=false", "++model.pred_obj_scores=false",
        "++model.pred_obj_scores_mlp=false", "++model.fixed_no_obj_ptr=false")


@pytest.mark.parametrize("dtype, overrides", [(torch.float32, ()), (torch.bfloat16, ()),
                                              (torch.float32, LEAN)],
                         ids=["fp32", "bf16", "fp32-no-high-res-no-object-scores"])
def test_predict_batch_matches_the_image_predictor_per_image(dtype, overrides):
    """fastsam_core.pipelines.predict_batch on a SAM 2 model against SAM2ImagePredictor.predict
    looped per image: different image sizes, prompt counts and prompt kinds."""
    import numpy as np
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    import fastsam_core
    from fastsam_core.pipelines import predict_batch
    from tests.models.sam.test_predictor_parity import smooth_image
    from tests.parity import mask_iou_outside_margin

    model = small_sam2(overrides=overrides)
    assert model.use_high_res_features_in_sam == (not overrides)
    gen = np.random.default_rng(0)
    images = [smooth_image(180, 240, 0), smooth_image(120, 150, 1), smooth_image(200, 200, 2)]
    prompts = [
        dict(point_coords=gen.uniform(0, 120, (2, 2, 2)), point_labels=np.array([[1, 0], [1, 1]])),
        {},
        dict(point_coords=gen.uniform(0, 150, (3, 1, 2)), point_labels=np.ones((3, 1)),
             boxes=np.array([[10, 10, 90, 100], [0, 0, 149, 119], [40, 30, 140, 110.0]])),
    ]
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # 256 px (design.md, sec. 8)
    expected = []
    for image, p in zip(images, prompts, strict=True):
        if not p:
            expected.append(None)
            continue
        predictor.set_image(image)
        expected.append(predictor.predict(p.get("point_coords"), p.get("point_labels"),
                                          p.get("boxes"), multimask_output=True,
                                          return_logits=True))
    fastsam_core.optimize(model, FastConfig(dtype=dtype))
    got = predict_batch(model, images, prompts)
    assert got[1]["masks"].shape == (0, 3, 120, 150)
    nothing, = predict_batch(model, images[1:2], [{}])  # no image with prompts at all
    assert nothing["masks"].shape == (0, 3, 120, 150)
    assert nothing["iou_predictions"].shape == (0, 3)
    for result, ref, image in zip(got, expected, images, strict=True):
        if ref is None:
            continue
        logits, scores, low = (torch.as_tensor(a) for a in ref)
        if logits.dim() == 3:  # the predictor drops K when it is 1
            logits, scores, low = logits[None], scores[None], low[None]
        assert result["masks"].shape == logits.shape == (len(logits), 3, *image.shape[:2])
        iou = mask_iou_outside_margin(result["masks"].float() - 0.5, logits)
        if dtype == torch.float32:
            assert_close_fp32(result["low_res_logits"], low, tol.FP32_STAGE_REL_L2)
            assert_close_fp32(result["iou_predictions"], scores, tol.FP32_STAGE_REL_L2)
            assert iou >= tol.MASK_IOU_FP32
        else:
            assert iou >= tol.MASK_IOU_BF16, iou


def test_predict_batch_with_an_image_predictor_takes_its_threshold_and_clamps():
    """Given a SAM2ImagePredictor, predict_batch binarizes at its mask_threshold and returns
    low-resolution logits clamped to +-32, as its predict() does (fp32). The decoder's logits
    are scaled up so that some pass 32 and some lie between 0 and the threshold."""
    import numpy as np
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from fastsam_core.pipelines import predict_batch
    from tests.models.sam.test_predictor_parity import smooth_image
    from tests.parity import mask_iou_outside_margin

    model = small_sam2()
    with torch.no_grad():  # logits 50x: tens, not tenths
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(50)
            mlp.layers[-1].bias.mul_(50)
    threshold = 4.0
    predictor = SAM2ImagePredictor(model, mask_threshold=threshold)
    predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # 256 px (design.md, sec. 8)
    image = smooth_image(180, 240, 0)
    coords = np.random.default_rng(0).uniform(0, 180, (3, 1, 2))
    labels = np.ones((3, 1))
    with torch.no_grad():
        predictor.set_image(image)
        logits, scores, low = (torch.as_tensor(a) for a in predictor.predict(
            coords, labels, multimask_output=True, return_logits=True))
        got, = predict_batch(predictor, [image], [dict(point_coords=coords,
                                                       point_labels=labels)])
    assert (low.abs() == 32).any(), "logits the clamp cuts"
    assert ((logits > 0) & (logits < threshold)).float().mean() > 0.01, "pixels it decides"
    assert_close_fp32(got["low_res_logits"], low, tol.FP32_STAGE_REL_L2)
    assert_close_fp32(got["iou_predictions"], scores, tol.FP32_STAGE_REL_L2)
    # the masks as logits around the predictor's threshold
    iou = mask_iou_outside_margin(got["masks"].float() - 0.5, logits - threshold)
    assert iou >= tol.MASK_IOU_FP32, iou


def test_predict_batch_with_mask_inputs_matches_the_image_predictor():
    """Mask inputs (K x 1 x 64 x 64 low-resolution logits) reach SAM 2's prompt encoder as
    SAM2ImagePredictor.predict's `mask_input` does, next to an image without mask inputs
    (whose prompts take the no-mask embedding), fp32, image by image; the mask inputs do
    change the answer (else this test could not tell them dropped)."""
    import numpy as np
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from fastsam_core.numerics import rel_l2
    from fastsam_core.pipelines import predict_batch
    from tests.models.sam.test_predictor_parity import smooth_image

    model = small_sam2()
    gen = np.random.default_rng(3)
    images = [smooth_image(180, 240, 0), smooth_image(200, 200, 2)]
    prompts = [
        dict(point_coords=gen.uniform(0, 180, (2, 1, 2)), point_labels=np.ones((2, 1)),
             mask_input=gen.normal(0, 8, (2, 1, 64, 64)).astype(np.float32)),
        dict(boxes=np.array([[20.0, 30.0, 150.0, 180.0]])),
    ]
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # 256 px (design.md, sec. 8)
    expected = []
    with torch.no_grad():
        for image, p in zip(images, prompts, strict=True):
            predictor.set_image(image)
            expected.append(predictor.predict(p.get("point_coords"), p.get("point_labels"),
                                              p.get("boxes"), p.get("mask_input"),
                                              multimask_output=True, return_logits=True))
        got = predict_batch(model, images, prompts)
        no_mask_prompt = {k: v for k, v in prompts[0].items() if k != "mask_input"}
        unmasked, = predict_batch(model, images[:1], [no_mask_prompt])
    for result, (logits, scores, low), image in zip(got, expected, images, strict=True):
        logits, scores, low = (torch.as_tensor(a) for a in (logits, scores, low))
        if logits.dim() == 3:  # the predictor drops K when it is 1
            logits, scores, low = logits[None], scores[None], low[None]
        assert result["masks"].shape == logits.shape == (len(logits), 3, *image.shape[:2])
        assert_close_fp32(result["low_res_logits"], low, tol.FP32_STAGE_REL_L2)
        assert_close_fp32(result["iou_predictions"], scores, tol.FP32_STAGE_REL_L2)
    # the mask inputs move the logits far beyond the parity tolerance
    assert rel_l2(unmasked["low_res_logits"], got[0]["low_res_logits"]) > tol.FP32_STAGE_REL_L2


@torch.inference_mode()
@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder_without_object_scores_or_high_res_features(multimask):
    """A decoder built without the object-score head and the high-resolution features (LEAN):
    all four outputs are the reference's, the object score logits its constant 10 (object
    present)."""
    model = small_sam2(overrides=LEAN)
    ref = model.sam_mask_decoder
    assert not ref.pred_obj_scores and not ref.use_high_res_features
    fast = FastSam2MaskDecoder.from_reference(ref, FastConfig(), torch.float32).eval()
    image, pe, sparse, dense, _ = decoder_inputs(model, 3, True)
    expected = ref(image, pe, sparse, dense, multimask, True)
    got = fast(image, pe, sparse, dense, multimask, True)
    for name, a, b in zip(("masks", "iou", "tokens", "object scores"), got, expected,
                          strict=True):
        assert a.shape == b.shape, name
        assert_close_fp32(a, b, tol.FP32_STAGE_REL_L2)
