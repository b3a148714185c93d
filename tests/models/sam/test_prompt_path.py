"""Parity of the fast prompt encoder, two-way transformer and mask decoder with the reference,
and the predictor's outputs with mask inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sam2.modeling.sam.prompt_encoder import PromptEncoder as Sam2PromptEncoder
from segment_anything import SamPredictor
from segment_anything.modeling.prompt_encoder import PromptEncoder

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.sam.mask_decoder import FastMaskDecoder
from fastsam_core.models.sam.prompt_encoder import FastPromptEncoder
from fastsam_core.models.sam.transformer import FastTwoWayTransformer, PromptGroups
from tests import tolerances as tol
from tests.conftest import small_sam
from tests.models.sam.test_predictor_parity import smooth_image
from tests.parity import (
    assert_close_fp32,
    assert_lowp_parity,
    in_dtype,
    mask_iou_outside_margin,
)

SIZE = 256  # small_sam's input size; its image embedding is 16 x 16, mask inputs 64 x 64


def prompts(k=5, p=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    coords = torch.rand(k, p, 2, generator=gen) * SIZE
    labels = torch.randint(-1, 2, (k, p), generator=gen)
    boxes = torch.sort(torch.rand(k, 2, 2, generator=gen) * SIZE, dim=1).values.reshape(k, 4)
    masks = torch.randn(k, 1, 64, 64, generator=gen) * 4
    return coords, labels, boxes, masks


KINDS = {
    "points": lambda c, lab, b, m: ((c, lab), None, None),
    "boxes": lambda c, lab, b, m: (None, b, None),
    "points+boxes": lambda c, lab, b, m: ((c, lab), b, None),
    "points+masks": lambda c, lab, b, m: ((c, lab), None, m),
    "masks": lambda c, lab, b, m: (None, None, m),
    "nothing": lambda c, lab, b, m: (None, None, None),
}


def fast_parts(sam, dtype=torch.float32):
    config = FastConfig(dtype=dtype)
    pe = FastPromptEncoder.from_reference(sam.prompt_encoder, config, dtype).eval()
    dec = FastMaskDecoder.from_reference(sam.mask_decoder, config, dtype).eval()
    return pe, dec


def embedding(seed=1):
    return torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
@pytest.mark.parametrize("kind", list(KINDS))
def test_prompt_encoder_fp32(kind):
    sam = small_sam()
    pe, _ = fast_parts(sam)
    args = KINDS[kind](*prompts())
    sparse_ref, dense_ref = sam.prompt_encoder(*args)
    sparse, dense = pe(*args)
    assert sparse.dtype == dense.dtype == torch.float32
    assert sparse.shape == sparse_ref.shape and dense.shape == dense_ref.shape
    if sparse.numel():
        assert_close_fp32(sparse, sparse_ref, tol.FP32_OP_REL_L2)
    assert_close_fp32(dense, dense_ref, tol.FP32_OP_REL_L2)
    assert_close_fp32(pe.get_dense_pe(), sam.prompt_encoder.get_dense_pe(), tol.FP32_OP_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.float32])
@pytest.mark.parametrize("boxes", [False, True], ids=["padded", "with-boxes"])
def test_point_labels_of_any_dtype(dtype, boxes):
    """Labels as bool / uint8 / int32 / float, as `predict_torch` and `Sam.forward` pass them
    on: without boxes the padding point got label True (a foreground click at (0, 0)) or
    failed to convert -1 to uint8; the reference's float padding label promotes them."""
    sam = small_sam()
    pe, _ = fast_parts(sam)
    coords, _, box, _ = prompts()
    labels = torch.tensor([[1, 0, 1]] * len(coords)).to(dtype)
    args = ((coords, labels), box if boxes else None, None)
    assert_close_fp32(pe(*args)[0], sam.prompt_encoder(*args)[0], tol.FP32_OP_REL_L2)


@torch.inference_mode()
def test_dense_pe_is_a_copy():
    """A caller writing to `get_dense_pe()`'s result in place does not change later ones (it
    was the cache itself; the reference computes a new tensor per call)."""
    sam = small_sam()
    pe, _ = fast_parts(sam)
    pe.get_dense_pe().mul_(0)
    assert_close_fp32(pe.get_dense_pe(), sam.prompt_encoder.get_dense_pe(), tol.FP32_OP_REL_L2)


@torch.inference_mode()
def test_prompt_encoder_mask_embedding_low_precision():
    sam = small_sam()
    pe, _ = fast_parts(sam, torch.bfloat16)
    masks = prompts()[3]
    out = pe(None, None, masks)[1]
    naive = in_dtype(sam.prompt_encoder.mask_downscaling, torch.bfloat16)(masks.bfloat16())
    exact = in_dtype(sam.prompt_encoder.mask_downscaling, torch.float64)(masks.double())
    assert_lowp_parity(out, naive, exact)


@torch.inference_mode()
def test_dense_pe_is_recomputed_after_loading_weights():
    sam, other = small_sam(), small_sam(seed=5)
    pe, _ = fast_parts(sam)
    before = pe.get_dense_pe()
    pe.load_state_dict(other.prompt_encoder.state_dict())
    after = pe.get_dense_pe()
    assert not torch.equal(before, after)
    assert_close_fp32(after, other.prompt_encoder.get_dense_pe(), tol.FP32_OP_REL_L2)


def test_dense_pe_follows_an_in_place_edit_of_the_gaussian_matrix():
    sam = small_sam()  # built outside inference_mode: its tensors track in-place writes
    pe, _ = fast_parts(sam)
    with torch.inference_mode():
        before = pe.get_dense_pe()
        pe.pe_layer.positional_encoding_gaussian_matrix.mul_(2)
        after = pe.get_dense_pe()
        expected = sam.prompt_encoder.get_dense_pe()
    assert not torch.equal(before, after)
    assert_close_fp32(after, expected, tol.FP32_OP_REL_L2)


def non_square_encoder(package):
    """A reference prompt encoder (random weights) for a 192 x 128 (W x H) input frame and a
    12 x 8 embedding grid: every model config is square, where x / w and y / h cannot be told
    apart from x / h and y / w."""
    cls = {"segment_anything": PromptEncoder, "sam2": Sam2PromptEncoder}[package]
    torch.manual_seed(0)
    return cls(embed_dim=64, image_embedding_size=(8, 12), input_image_size=(128, 192),
               mask_in_chans=16).eval()


@torch.inference_mode()
@pytest.mark.parametrize("package", ["segment_anything", "sam2"])
def test_prompt_encoder_non_square_frame(package):
    """Points, boxes, masks and the dense positional encoding on a frame wider than high:
    x is normalized by the width, y by the height, the grid is h x w."""
    ref = non_square_encoder(package)
    pe = FastPromptEncoder.from_reference(ref, FastConfig(), torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    k = 3
    coords = torch.rand(k, 2, 2, generator=gen) * torch.tensor([192.0, 128.0])
    labels = torch.tensor([[1, 0]] * k)
    boxes = torch.sort(torch.rand(k, 2, 2, generator=gen) * torch.tensor([192.0, 128.0]),
                       dim=1).values.reshape(k, 4)
    masks = torch.randn(k, 1, 32, 48, generator=gen) * 4
    for args in (((coords, labels), None, None), ((coords, labels), boxes, masks)):
        got, expected = pe(*args), ref(*args)
        for a, b in zip(got, expected, strict=True):
            assert a.shape == b.shape
            assert_close_fp32(a, b, tol.FP32_OP_REL_L2)
    dense_pe = pe.get_dense_pe()
    assert dense_pe.shape == (1, 64, 8, 12)
    assert_close_fp32(dense_pe, ref.get_dense_pe(), tol.FP32_OP_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("package", ["segment_anything", "sam2"])
def test_point_labels_outside_the_codes_keep_the_bare_encoding(package):
    """Labels other than -1, 0, 1 (and sam2's box corners 2, 3) get the positional encoding
    alone, as in the reference: -2 is not padding, and segment_anything has no corner labels
    for points (2 and 3 there are bare too)."""
    ref = non_square_encoder(package)
    pe = FastPromptEncoder.from_reference(ref, FastConfig(), torch.float32).eval()
    coords = torch.rand(2, 6, 2, generator=torch.Generator().manual_seed(1)) * 128
    labels = torch.tensor([[-2, 5, 2, 3, 1, -1], [3, 2, 0, -2, -1, 7]])
    for boxes in (None, torch.tensor([[10.0, 20.0, 100.0, 90.0], [0.0, 0.0, 191.0, 127.0]])):
        got, expected = pe((coords, labels), boxes, None)[0], ref((coords, labels), boxes, None)[0]
        assert got.shape == expected.shape
        assert_close_fp32(got, expected, tol.FP32_OP_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", ["points", "boxes", "points+boxes", "points+masks"])
def test_mask_decoder_fp32(kind, multimask):
    sam = small_sam()
    pe, dec = fast_parts(sam)
    sparse, dense = sam.prompt_encoder(*KINDS[kind](*prompts()))
    image_pe = sam.prompt_encoder.get_dense_pe()
    masks_ref, iou_ref = sam.mask_decoder(embedding(), image_pe, sparse, dense, multimask)
    masks, iou = dec(embedding(), image_pe, sparse, dense, multimask)
    assert masks.shape == masks_ref.shape == (5, 3 if multimask else 1, 64, 64)
    assert_close_fp32(masks, masks_ref, tol.FP32_STAGE_REL_L2)
    assert_close_fp32(iou, iou_ref, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("k", [1, 2, 3])
def test_mask_decoder_per_prompt_mask_inputs_any_prompt_count(k):
    """A mask input per prompt makes the image side per prompt: whatever the prompt count
    (one prompt reads the image either way, two is the smallest batch)."""
    sam = small_sam()
    _, dec = fast_parts(sam)
    sparse, dense = sam.prompt_encoder(*KINDS["points+masks"](*prompts(k=k)))
    assert dense.shape[0] == k
    image_pe = sam.prompt_encoder.get_dense_pe()
    masks_ref, iou_ref = sam.mask_decoder(embedding(), image_pe, sparse, dense, True)
    masks, iou = dec(embedding(), image_pe, sparse, dense, True)
    assert_close_fp32(masks, masks_ref, tol.FP32_STAGE_REL_L2)
    assert_close_fp32(iou, iou_ref, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["points+boxes", "points+masks"])
def test_mask_decoder_bf16(kind):
    sam = small_sam()
    _, dec = fast_parts(sam, torch.bfloat16)
    sparse, dense = sam.prompt_encoder(*KINDS[kind](*prompts()))
    image_pe = sam.prompt_encoder.get_dense_pe()
    args = (embedding(), image_pe, sparse, dense)
    masks, iou = dec(*args, True)
    assert masks.dtype == torch.float32
    naive = in_dtype(sam.mask_decoder, torch.bfloat16)(*(a.bfloat16() for a in args), True)
    exact = in_dtype(sam.mask_decoder, torch.float64)(*(a.double() for a in args), True)
    assert_lowp_parity(masks, naive[0], exact[0])
    assert_lowp_parity(iou, naive[1], exact[1])


@torch.inference_mode()
def test_two_way_transformer_per_image_equals_reference_repeat():
    """One image, K prompts: the image side kept once per image (no repeat) gives the
    reference's output, where the image was repeated per prompt."""
    sam = small_sam()
    ref = sam.mask_decoder.transformer
    fast = FastTwoWayTransformer.from_reference(ref, torch.float32)
    k, t = 4, 7
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 256, 16, 16, generator=gen)
    pe = torch.randn(1, 256, 16, 16, generator=gen)
    tokens = torch.randn(k, t, 256, generator=gen)
    q_ref, k_ref = ref(image.expand(k, -1, -1, -1), pe.expand(k, -1, -1, -1), tokens)
    groups = PromptGroups(torch.zeros(k, dtype=torch.long), n_images=1)
    q, keys = fast(image.flatten(2).transpose(1, 2), pe.flatten(2).transpose(1, 2), tokens,
                   groups)
    assert_close_fp32(q, q_ref, tol.FP32_STAGE_REL_L2)
    assert_close_fp32(keys, k_ref, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_two_way_transformer_jagged_prompts_of_several_images():
    """Prompts with different token counts on different images, in one jagged batch, against
    the reference run prompt by prompt."""
    sam = small_sam()
    ref = sam.mask_decoder.transformer
    fast = FastTwoWayTransformer.from_reference(ref, torch.float32)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 256, 16, 16, generator=gen)
    pe = torch.randn(1, 256, 16, 16, generator=gen)
    lengths = [[6, 6], [8], [7, 9, 7]]  # tokens per prompt, per image
    tokens = [torch.randn(n, 256, generator=gen) for per_image in lengths for n in per_image]
    image_index = torch.tensor([i for i, per_image in enumerate(lengths) for _ in per_image])
    groups = PromptGroups(image_index, n_images=3, prompt_lengths=lengths)
    queries, keys = fast(images.flatten(2).transpose(1, 2), pe.flatten(2).transpose(1, 2),
                         groups.tokens(torch.cat(tokens)), groups)
    assert queries.is_nested
    for i, (tok, img) in enumerate(zip(tokens, image_index, strict=True)):
        q_ref, k_ref = ref(images[img][None], pe, tok[None])
        assert_close_fp32(queries[i], q_ref[0], tol.FP32_STAGE_REL_L2)
        assert_close_fp32(keys[i], k_ref[0], tol.FP32_STAGE_REL_L2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_predictor_with_mask_input_and_batched_prompts(dtype):
    """SamPredictor.predict with a mask input, and predict_torch with several boxes."""
    sam = small_sam()
    predictor = SamPredictor(sam)
    image = smooth_image()
    point = dict(point_coords=np.array([[70.0, 95.0]]), point_labels=np.array([1]))

    def run():
        predictor.set_image(image)
        first = predictor.predict(**point, multimask_output=True, return_logits=True)
        refined = predictor.predict(**point, mask_input=first[2][:1], multimask_output=False,
                                    return_logits=True)
        boxes = predictor.transform.apply_boxes_torch(
            torch.tensor([[10.0, 20.0, 150.0, 160.0], [60.0, 30.0, 230.0, 170.0]]),
            image.shape[:2])
        with torch.no_grad():
            many = predictor.predict_torch(None, None, boxes, multimask_output=True,
                                           return_logits=True)
        return [torch.as_tensor(x) for x in (*refined, *many)]

    expected = run()
    fastsam_core.optimize(sam, FastConfig(dtype=dtype))
    assert fastsam_core.report(sam).path_of("mask_decoder") == "fast"
    got = run()
    for logits, ref in ((got[0], expected[0]), (got[3], expected[3])):
        if dtype == torch.float32:
            assert_close_fp32(logits, ref, tol.FP32_STAGE_REL_L2)
        assert mask_iou_outside_margin(logits, ref) >= (
            tol.MASK_IOU_FP32 if dtype == torch.float32 else tol.MASK_IOU_BF16)
    if dtype == torch.float32:
        assert_close_fp32(got[1], expected[1], tol.FP32_STAGE_REL_L2)  # scores
        assert_close_fp32(got[4], expected[4], tol.FP32_STAGE_REL_L2)


def test_decoder_falls_back_for_a_batch_of_images_and_autograd():
    sam = small_sam()
    fastsam_core.optimize(sam)
    dec = sam.mask_decoder
    sparse, dense = sam.prompt_encoder(None, prompts(k=2)[2], None)
    image_pe = sam.prompt_encoder.get_dense_pe()
    with torch.no_grad(), pytest.warns(UserWarning, match="image_embeddings batch 2"):
        with pytest.raises(RuntimeError):  # the reference cannot take it either
            dec(embedding().expand(2, -1, -1, -1), image_pe, sparse, dense, True)
    with pytest.warns(UserWarning, match="autograd is recording"):
        masks, _ = dec(embedding(), image_pe, sparse, dense, True)
    assert masks.requires_grad  # the reference ran, with autograd
    sam.requires_grad_(False)  # the positional encoding alone needs a gradient (was missed)
    reason = next(why for why in dec.fallbacks if why.startswith("autograd"))
    masks, _ = dec(embedding(), image_pe.clone().requires_grad_(True), sparse.detach(),
                   dense.detach(), True)
    assert masks.requires_grad and dec.fallbacks[reason] == 2


MISFIT_PROMPTS = {  # prompts whose shapes do not fit together: the argument each error names
    "coords x 3": (lambda c, lab, b: ((torch.cat([c, c[..., :1]], -1), lab), None), "points"),
    "coords x 3 + boxes": (lambda c, lab, b: ((torch.cat([c, c[..., :1]], -1), lab), b),
                           "points"),
    "fewer labels": (lambda c, lab, b: ((c, lab[:, :-1]), None), "points"),
    "one label per prompt": (lambda c, lab, b: ((c, lab[:, :1]), b), "points"),
    "two boxes per prompt": (lambda c, lab, b: (None, b.reshape(1, -1, 4)), "boxes"),
    "more boxes than points": (lambda c, lab, b: ((c[:2], lab[:2]), b), "boxes"),
}


@torch.inference_mode()
@pytest.mark.parametrize("case", list(MISFIT_PROMPTS))
def test_misfit_prompt_shapes_raise_as_the_reference_does(case):
    """The reference fails on these; the fast encoder's broadcasts would silently drop or
    share prompts, so it raises, naming the argument."""
    sam = small_sam()
    pe, _ = fast_parts(sam)
    make, argument = MISFIT_PROMPTS[case]
    coords, labels, boxes, _ = prompts()
    points, boxes = make(coords, labels, boxes)
    with pytest.raises((RuntimeError, IndexError)):
        sam.prompt_encoder(points, boxes, None)
    with pytest.raises(ValueError, match=f"^{argument}: "):
        pe(points, boxes, None)


@torch.no_grad()
def test_dense_pe_traces_into_a_users_compiled_function():
    """Code a user compiles (fullgraph) may call get_dense_pe, as SamPredictor.predict_torch
    does: the cache's identity check must not break the trace."""
    sam = small_sam()
    expected = sam.prompt_encoder.get_dense_pe()  # the reference's
    fastsam_core.optimize(sam)
    pe = sam.prompt_encoder
    traced = torch.compile(lambda: pe.get_dense_pe() * 1, backend="eager", fullgraph=True)
    torch._dynamo.reset()
    assert_close_fp32(traced(), expected, tol.FP32_OP_REL_L2)


@torch.inference_mode()
def test_predictor_with_two_boxes_raises_as_the_reference_does():
    """SamPredictor.predict takes one box: given two, the fast model must not answer for the
    first one only."""
    image = smooth_image(SIZE, SIZE)
    boxes = np.array([[20.0, 15.0, 120.0, 100.0], [0.0, 0.0, 60.0, 60.0]])
    reference = SamPredictor(small_sam())
    reference.set_image(image)
    with pytest.raises(RuntimeError):
        reference.predict(box=boxes)
    sam = small_sam()
    fastsam_core.optimize(sam)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    with pytest.raises(ValueError, match="^boxes: .* 2 boxes for a batch of 1 prompts"):
        predictor.predict(box=boxes)


@torch.inference_mode()
def test_one_prompt_over_several_mask_inputs_runs_the_reference():
    """The reference broadcasts one prompt over several mask inputs (a result per mask): the
    fast decoder pairs them row by row, so it hands this case to the reference."""
    sam = small_sam()
    coords, labels, boxes, masks = prompts()
    sparse, dense = sam.prompt_encoder(None, boxes[:1], masks[:3])
    assert (sparse.shape[0], dense.shape[0]) == (1, 3)
    image_pe = sam.prompt_encoder.get_dense_pe()
    expected = sam.mask_decoder(embedding(), image_pe, sparse, dense, True)
    fastsam_core.optimize(sam)
    with pytest.warns(UserWarning, match="dense_prompt_embeddings batch 3 for 1 prompts"):
        got = sam.mask_decoder(embedding(), image_pe, sparse, dense, True)
    assert got[0].shape == expected[0].shape == (3, 3, 64, 64)
    for g, e in zip(got, expected, strict=True):
        assert_close_fp32(g, e, tol.FP32_STAGE_REL_L2)


@torch.inference_mode()
def test_prompt_path_ignores_autocast():
    """The fast prompt encoder and decoder compute in their own dtype under autocast too."""
    sam = small_sam()
    fastsam_core.optimize(sam)
    args = KINDS["points+masks"](*prompts())
    image_pe = sam.prompt_encoder.get_dense_pe()

    def run():
        sparse, dense = sam.prompt_encoder(*args)
        return sam.mask_decoder(embedding(), image_pe, sparse, dense, True)

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = run()
    for a, b in zip(under_autocast, plain, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)

