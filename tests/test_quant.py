"""int8 and 2:4 linears: the ops, the modules, and their use through FastConfig.quantize."""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch
from sam2.modeling.backbones.hieradet import MultiScaleBlock
from segment_anything.modeling.common import MLPBlock
from torch import nn

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.quant import (
    DeferredLayerNorm,
    Int8Linear,
    Int8MLP,
    Int8Tokens,
    Sparse24Linear,
    fusable_mlp,
)
from fastsam_core.numerics import rel_l2
from fastsam_core.ops.quant import (
    int8_linear,
    int_mm_supported,
    is_2_4_sparse,
    prune_2_4,
    quantize_per_row,
    sqnr_db,
)
from tests import tolerances as tol
from tests.conftest import image_batch, small_sam

# the fused paths run Triton kernels: in the interpreter on CPU tensors here, compiled on
# CUDA tensors where a GPU is present ("auto" picks them only there, by measurement)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_quantize_per_row_round_trip():
    x = torch.randn(32, 64) * torch.logspace(-2, 2, 32)[:, None]  # rows of very different range
    x_q, scale = quantize_per_row(x)
    assert x_q.dtype == torch.int8 and x_q.abs().max() <= 127
    err = (x_q.float() * scale - x).abs()
    assert (err <= scale / 2 + tol.FP32_ROUNDING_REL * x.abs()).all()  # half a step of its row
    zero_q, zero_scale = quantize_per_row(torch.zeros(2, 8))
    assert (zero_q == 0).all() and (zero_scale == 1).all()


def test_int8_linear_is_the_integer_product():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(40, 96, generator=gen), torch.randn(48, 96, generator=gen), \
        torch.randn(48, generator=gen)
    w_q, w_scale = quantize_per_row(w)
    x_q, x_scale = quantize_per_row(x)
    exact = (x_q.double() @ w_q.double().t()) * x_scale.double() * w_scale.double().t() + b
    out = int8_linear(x, w_q, w_scale[:, 0], b, "dequant")
    assert torch.allclose(out.double(), exact, rtol=tol.FP32_ROUNDING_REL,
                          atol=tol.FP32_ROUNDING_ABS)
    assert sqnr_db(x @ w.t() + b, out) > tol.INT8_LINEAR_MIN_SQNR_DB
    with pytest.raises(ValueError, match="backend"):
        int8_linear(x, w_q, w_scale[:, 0], b, "fast")


def test_prune_2_4_keeps_the_two_largest_of_every_four():
    w = torch.tensor([[0.1, -4.0, 3.0, 0.2, 5.0, 0.0, -0.3, 0.4]])
    pruned = prune_2_4(w)
    assert torch.equal(pruned, torch.tensor([[0.0, -4.0, 3.0, 0.0, 5.0, 0.0, 0.0, 0.4]]))
    assert is_2_4_sparse(pruned) and not is_2_4_sparse(w)
    big = prune_2_4(torch.randn(64, 128))
    assert is_2_4_sparse(big) and (big != 0).sum() == 64 * 128 // 2
    with pytest.raises(ValueError, match="divisible by 4"):
        prune_2_4(torch.randn(4, 6))


def test_sqnr():
    ref = torch.ones(100)
    assert sqnr_db(ref, ref) == float("inf")
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)


def test_prune_2_4_with_infinities_and_bad_shapes():
    """Zeroed, not multiplied by 0: a dropped inf or NaN became NaN, a third non-zero in its
    group; a weight that is not M x K raises naming it."""
    inf, nan = float("inf"), float("nan")
    w = torch.tensor([[inf, inf, -inf, 1.0, nan, nan, nan, 1.0, 0.5, -2.0, 3.0, 0.1]])
    pruned = prune_2_4(w)
    assert is_2_4_sparse(pruned) and ((pruned != 0).sum(-1) == 6).all()
    assert pruned[0, 3] == 0 and pruned[0, 7] == 0
    assert torch.equal(pruned[0, 8:], torch.tensor([0.0, -2.0, 3.0, 0.0]))
    with pytest.raises(ValueError, match="weight must be M x K"):
        prune_2_4(torch.randn(8))


@pytest.mark.parametrize("reference, approximation, expected", [
    ([1.0, 1.0], [1.0, 1.0], math.inf),  # no noise
    ([0.0, 0.0], [0.0, 0.0], math.inf),
    ([0.0, 0.0], [1.0, 1.0], -math.inf),  # noise without signal
    ([1.0, 1.0], [1.0, math.inf], -math.inf),  # infinite noise
    ([1.0, 1.0], [1.0, math.nan], math.nan),
    ([3.0, 4.0], [3.0, 4.5], 20.0),
], ids=["equal", "both-zero", "zero-reference", "inf", "nan", "finite"])
def test_sqnr_edge_cases(reference, approximation, expected):
    got = sqnr_db(torch.tensor(reference), torch.tensor(approximation))
    assert got == pytest.approx(expected, nan_ok=True)


def test_sqnr_needs_one_shape():
    """No broadcasting: (4, 1) against (4,) compared 16 pairs."""
    with pytest.raises(ValueError, match="reference and approximation must have one shape"):
        sqnr_db(torch.arange(4.0).reshape(4, 1), torch.arange(4.0))


@torch.inference_mode()
def test_a_nan_activation_makes_its_output_row_nan():
    """As nn.Linear: a NaN in an input row makes that output row NaN (its scale was 1, and
    the NaN a code of 0), the other rows stay as accurate as int8 makes them."""
    linear = nn.Linear(64, 32)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    x[1, 5] = float("nan")
    linear, x = linear.to(DEVICE), x.to(DEVICE)
    expected = linear(x)
    assert expected[1].isnan().all()
    w_q, w_scale = quantize_per_row(linear.weight)
    rest = torch.arange(6, device=DEVICE) != 1
    for y in (Int8Linear(linear)(x), int8_linear(x, w_q, w_scale[:, 0], linear.bias)):
        assert y[1].isnan().all()
        assert sqnr_db(expected[rest], y[rest]) > tol.INT8_LINEAR_MIN_SQNR_DB


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8])
def test_int8_linears_take_only_float_activations(dtype):
    """Integer activations raise, as nn.Linear's do (they returned the float result
    truncated to integers)."""
    linear = nn.Linear(16, 8)
    w_q, w_scale = quantize_per_row(linear.weight.detach())
    x = torch.randint(-3, 4, (3, 16)).to(dtype)
    with pytest.raises(TypeError, match="x must be floating point"):
        Int8Linear(linear)(x)
    with pytest.raises(TypeError, match="x must be floating point"):
        int8_linear(x, w_q, w_scale[:, 0], linear.bias.detach())


@pytest.mark.parametrize("layer", ["linear", "mlp-separate", "mlp-fused", "norm-fused"])
def test_int8_layers_are_inference_only(layer):
    """Rounding has no gradient: an input (or a LayerNorm weight before the codes) requiring
    grad while autograd records raises, on every path (the output required grad through a
    bias while the input silently got none); under no_grad the same input runs."""
    x = torch.randn(3, 32, requires_grad=True)
    if layer == "linear":
        run = Int8Linear(nn.Linear(32, 8))
    elif layer.startswith("mlp"):
        mlp = int8_mlp()
        run = functools.partial(mlp.run, layer.removeprefix("mlp-"))
    else:
        qkv = Int8Linear(nn.Linear(32, 96))
        norm = DeferredLayerNorm(nn.LayerNorm(32))  # its weight requires grad

        def run(x):
            return qkv(norm(x.detach()).laid_out("fused", 0))
    with pytest.raises(RuntimeError, match="inference-only"):
        run(x)
    with torch.no_grad():
        assert torch.equal(run(x), run(x.detach()))


@torch.inference_mode()
def test_modules_match_the_linear_they_replace():
    linear = nn.Linear(64, 96)
    x = torch.randn(5, 7, 64)
    assert sqnr_db(linear(x), Int8Linear(linear)(x)) > tol.INT8_LINEAR_MIN_SQNR_DB
    sparse = Sparse24Linear(linear)
    assert torch.equal(sparse.weight, prune_2_4(linear.weight))
    assert rel_l2(sparse(x), x @ sparse.weight.t() + linear.bias) < tol.FP32_OP_REL_L2
    assert set(Int8Linear(linear).state_dict()) == {"weight_int8", "weight_scale", "bias"}
    assert set(sparse.state_dict()) == {"weight", "bias"}


@torch.inference_mode()
def test_int8_weights_are_scaled_per_output_channel():
    linear = nn.Linear(64, 32)
    with torch.no_grad():  # rows three decades apart: one scale for all would zero the small
        linear.weight.mul_(torch.logspace(-3, 0, 32)[:, None])
    layer = Int8Linear(linear)
    scale = linear.weight.abs().amax(dim=1) / 127
    assert torch.allclose(layer.weight_scale, scale, rtol=tol.FP32_OP_REL_L2, atol=0)
    err = (layer.dequantized_weight() - linear.weight).abs()
    assert (err <= scale[:, None] / 2 * (1 + tol.FP32_OP_REL_L2)).all()  # half a row's step
    x = torch.randn(8, 64)
    assert sqnr_db(linear(x) - linear.bias, layer(x) - linear.bias) \
        > tol.INT8_LINEAR_MIN_SQNR_DB


@torch.inference_mode()
def test_int8_scales_stay_fp32_through_a_cast():
    """`.half()` / `.to(bf16)` after optimize(quantize="int8"): the scales follow the device
    but stay fp32, so the dequantized weights are unchanged by the cast."""
    cast = small_sam()
    fastsam_core.optimize(cast, FastConfig(quantize="int8"))
    before = {name: m.dequantized_weight() for name, m in cast.image_encoder.named_modules()
              if isinstance(m, Int8Linear)}
    cast.half()
    after = {name: m for name, m in cast.image_encoder.named_modules()
             if isinstance(m, Int8Linear)}
    for name, module in after.items():
        assert module.weight_scale.dtype == torch.float32, name
        assert torch.equal(module.dequantized_weight(), before[name]), name
        assert module.bias.dtype == torch.float16, name


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["int8", "2:4"])
def test_checkpoint_loads_into_a_quantized_model(mode):
    config = FastConfig(quantize=mode)
    x = image_batch()
    expected = small_sam(seed=3)
    fastsam_core.optimize(expected, config)
    sam = small_sam(seed=0)
    fastsam_core.optimize(sam, config)
    sam.load_state_dict(small_sam(seed=3).state_dict())  # the reference's float weights
    assert torch.equal(sam.image_encoder(x), expected.image_encoder(x))
    saved = small_sam(seed=0)
    fastsam_core.optimize(saved, config)
    saved.load_state_dict(sam.state_dict())  # an optimized model's own state_dict
    assert torch.equal(saved.image_encoder(x), expected.image_encoder(x))
    fastsam_core.restore(sam)  # the checkpoint reached the originals too
    assert torch.equal(sam.image_encoder(x), small_sam(seed=3).image_encoder(x))


@torch.inference_mode()
def test_float_checkpoint_loads_into_a_bf16_int8_model_as_optimize_quantizes():
    """In a bf16 int8 model a reference (fp32) checkpoint's weights are rounded to bf16, then
    quantized, as optimize() quantizes the bf16 copies: the same codes and scales as
    optimizing the checkpoint's model (quantized from fp32 directly, scales and codes at a
    rounding boundary differed)."""
    config = FastConfig(dtype=torch.bfloat16, quantize="int8")
    expected = fastsam_core.optimize(small_sam(seed=3), config)
    sam = fastsam_core.optimize(small_sam(seed=0), config)
    sam.load_state_dict(small_sam(seed=3).state_dict())
    got, want = sam.image_encoder.state_dict(), expected.image_encoder.state_dict()
    assert got.keys() == want.keys()
    quantized = [k for k in got if k.endswith((".weight_int8", ".weight_scale"))]
    assert quantized
    for key in quantized:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("mode", ["int8", "2:4"])
def test_a_checkpoint_loaded_with_assign_is_not_written(mode):
    """`load_state_dict(..., assign=True)` takes the checkpoint's tensors as the model's own:
    a 2:4 layer pruned its weight in place after loading, which pruned the tensor of the
    model the checkpoint came from; it prunes a copy, as optimize() does (int8 layers, which
    quantize into their own tensors, checked alike)."""
    from tests.models.sam2.test_image_encoder import images, small_encoder, small_sam2

    def quantized(seed):
        model = small_sam2(seed)
        model.image_encoder = small_encoder(seed)
        return fastsam_core.optimize(model, FastConfig(quantize=mode))

    source = small_sam2(seed=3)
    source.image_encoder = small_encoder(seed=3)
    before = {name: t.clone() for name, t in source.state_dict().items()}
    model = quantized(0)
    model.load_state_dict(source.state_dict(), assign=True)
    for name, t in source.state_dict().items():
        assert torch.equal(t, before[name]), name
    x = images(batch=1)
    expected = quantized(3)
    with torch.inference_mode():
        assert torch.equal(model.image_encoder(x)["vision_features"],
                           expected.image_encoder(x)["vision_features"])


def test_a_2_4_model_assigned_a_checkpoint_takes_its_dtype():
    """`load_state_dict(..., assign=True)` of an fp16 checkpoint into an fp32 2:4 model:
    every tensor takes the checkpoint's dtype, the pruned weights too (they were converted
    to the layer's fp32 beside fp16 biases, and the forward failed)."""
    from tests.models.sam2.test_image_encoder import images, small_encoder, small_sam2

    def small(seed):
        model = small_sam2(seed)
        model.image_encoder = small_encoder(seed)
        return model

    model = fastsam_core.optimize(small(0), FastConfig(quantize="2:4"))
    model.load_state_dict(small(3).half().state_dict(), assign=True)
    assert {p.dtype for p in model.image_encoder.parameters()} == {torch.float16}
    expected = fastsam_core.optimize(small(3).half(), FastConfig(quantize="2:4"))
    x = images(batch=1).half()
    with torch.inference_mode():
        assert torch.equal(model.image_encoder(x)["vision_features"],
                           expected.image_encoder(x)["vision_features"])


@pytest.mark.parametrize("kind", ["sam", "sam2"])
@torch.inference_mode()
def test_compiled_2_4_encoder_uses_sparse_weights_built_before_the_call(kind, monkeypatch):
    """FastConfig.compile: the 2:4 layers' semi-structured weights are built before the
    compiled call, once per weight, and the trace uses them (built in the traced forward,
    `tensor_identity` broke the fullgraph trace and the whole encoder ran eager, with a
    warning). A caller's own torch.compile builds them too, in a graph break (it had taken
    the dense weight of a fresh layer). CUDA stands in: every layer runs "sparse", its
    semi-structured weight standing in as the pruned weight doubled, so that its use shows."""
    import fastsam_core.models.quant as quant
    from fastsam_core.models.compiled import LazyCompiled
    from tests.models.sam2.test_image_encoder import images, small_encoder, small_sam2

    built = []
    monkeypatch.setattr(Sparse24Linear, "runs_sparse", lambda self, x: True)
    monkeypatch.setattr(quant, "semi_structured", lambda w: built.append(w) or w * 2)

    def fresh_encoder():
        if kind == "sam":
            model, x = small_sam(), image_batch(batch=1)
        else:
            model, x = small_sam2(), images(batch=1)
            model.image_encoder = small_encoder()
        fastsam_core.optimize(model, FastConfig(quantize="2:4"))
        return model.image_encoder, x

    def features(encoder, x):
        out = encoder(x)
        return out if kind == "sam" else out["vision_features"]

    encoder, x = fresh_encoder()
    layers = [m for m in encoder.modules() if isinstance(m, Sparse24Linear)]
    eager = features(encoder, x)
    assert len(built) == len(layers) > 0
    encoder, x = fresh_encoder()  # not built yet
    built.clear()
    encoder._run_fast = LazyCompiled(encoder._forward_fast, "default", "image encoder",
                                     backend="eager", fullgraph=True, dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compile failure warns and runs eager
        compiled = features(encoder, x)
        assert torch.equal(features(encoder, x), compiled)
    assert encoder._run_fast.status == "compiled"
    assert torch.equal(compiled, eager) and len(built) == len(layers)

    encoder, x = fresh_encoder()
    built.clear()
    assert torch.equal(features(torch.compile(encoder, backend="eager"), x), eager)
    assert len(built) == len(layers)

    monkeypatch.setattr(Sparse24Linear, "runs_sparse", lambda self, x: False)
    assert not torch.equal(features(encoder, x), eager)  # the doubled weights made `eager`


@torch.no_grad()  # inference mode would make `.to("cuda")` a real copy, even in fake mode
def test_2_4_layer_of_a_shape_the_sparse_kernels_refuse_runs_dense():
    """A CUDA fp16 2:4 layer of 24 input features (this package's tiny SAM 2): torch's
    sparse backends take multiples of 16 x 16 or more only; the layer multiplies by its
    pruned weight densely, with a warning (it raised). Fake CUDA tensors: no GPU needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = Sparse24Linear(nn.Linear(24, 72).half())
    with FakeTensorMode(allow_non_fake_inputs=True):
        layer.to("cuda")
        x = torch.randn(2, 64, 24, dtype=torch.float16, device="cuda")
        with pytest.warns(UserWarning, match=r"\(72, 24\) weight runs as a dense product"):
            y = layer(x)
    assert y.shape == (2, 64, 72) and y.device.type == "cuda"
    assert layer._sparse[1] is None  # remembered: not tried again on every call


@pytest.mark.parametrize("mode", ["int8", "2:4"])
def test_quantized_linears_share_their_bias_with_the_original(mode):
    """fp32: in-place edits of model.parameters() reach the originals, biases of the
    quantized linears included (only their weights are the fast module's own)."""
    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(quantize=mode))
    with torch.no_grad():
        for p in sam.image_encoder.parameters():
            p.add_(1)
    fastsam_core.restore(sam)
    edited = dict(sam.image_encoder.named_parameters())
    for name, p in small_sam().image_encoder.named_parameters():
        if name.endswith(".bias"):
            assert torch.equal(edited[name], p + 1), name


def test_an_int8_checkpoint_reaches_the_originals_dequantized():
    """An int8 model's own state_dict loaded into another int8 model: its originals (the
    fallbacks, restore()) get the dequantized weights, with a warning, not their old ones."""
    config = FastConfig(quantize="int8")
    source = small_sam(seed=3)
    fastsam_core.optimize(source, config)
    sam = small_sam(seed=0)
    fastsam_core.optimize(sam, config)
    with pytest.warns(UserWarning, match=r"int8 weights \(16 linears\): the kept originals"):
        sam.load_state_dict(source.state_dict())
    fastsam_core.restore(sam)
    restored = dict(sam.image_encoder.named_parameters())
    for name, module in source.image_encoder.named_modules():
        if isinstance(module, Int8Linear):
            assert torch.equal(restored[name + ".weight"], module.dequantized_weight()), name
            assert torch.equal(restored[name + ".bias"], module.bias), name
    assert torch.equal(restored["blocks.0.norm1.weight"],
                       small_sam(seed=3).image_encoder.blocks[0].norm1.weight)


@torch.inference_mode()
@pytest.mark.parametrize("mode, layers, count", [("int8", "all", 16), ("int8", "mlp", 8),
                                                 ("2:4", "all", 16), ("2:4", "mlp", 8)])
def test_optimize_quantizes_the_encoder_and_restore_is_exact(mode, layers, count):
    sam = small_sam()
    x = image_batch()
    before = sam.image_encoder(x)
    fastsam_core.optimize(sam, FastConfig(quantize=mode, quantize_layers=layers))
    replaced = [m for m in sam.image_encoder.modules()
                if isinstance(m, (Int8Linear, Sparse24Linear))]
    assert len(replaced) == count  # 4 blocks: qkv, proj, lin1, lin2
    assert fastsam_core.report(sam).path_of("image_encoder.linears") == mode
    out = sam.image_encoder(x)
    assert out.shape == before.shape and torch.isfinite(out).all()
    if mode == "int8":
        assert sqnr_db(before, out) > tol.INT8_ENCODER_MIN_SQNR_DB
    fastsam_core.restore(sam)
    assert torch.equal(sam.image_encoder(x), before)
    assert not any(isinstance(m, (Int8Linear, Sparse24Linear)) for m in sam.modules())


@torch.inference_mode()
def test_sam2_encoder_quantized():
    from tests.models.sam2.test_image_encoder import images, small_encoder, small_sam2

    model = small_sam2()
    model.image_encoder = small_encoder()
    x = images()
    before = model.image_encoder(x)["vision_features"]
    fastsam_core.optimize(model, FastConfig(quantize="int8"))
    blocks = model.image_encoder.trunk.blocks
    assert all(isinstance(b.attn.qkv, Int8Linear) for b in blocks)
    # norm1 deferred to qkv where the block keeps its width; at a stage change it also
    # feeds the shortcut's projection, so it stays a LayerNorm
    assert [type(b.norm1) for b in blocks] == [
        DeferredLayerNorm if b.dim == b.dim_out else nn.LayerNorm for b in blocks]
    assert sum(b.dim != b.dim_out for b in blocks) == 3
    # a stage change's projection of norm1's output for the shortcut is quantized too
    assert all(isinstance(b.proj, Int8Linear) for b in blocks if b.dim != b.dim_out)
    assert "4 norm1 LayerNorms can feed their int8 qkv" in str(fastsam_core.report(model))
    out = model.image_encoder(x)["vision_features"]
    assert sqnr_db(before, out) > tol.INT8_ENCODER_MIN_SQNR_DB
    fastsam_core.restore(model)
    assert torch.equal(model.image_encoder(x)["vision_features"], before)


@pytest.mark.parametrize("mode", ["int8", "2:4"])
def test_a_quantized_model_moved_after_optimize_restores_on_one_device(mode):
    """fp32: the kept originals share every tensor with the fast encoder but the quantized
    linears' weights, and `.cuda()` moves shared parameters in place (`param.data`), so it
    moves the originals in part. The reference fallback and restore() must move the rest:
    they looked at the first parameter only, and the linears stayed behind. Here the
    in-place move is torch's swap-on-conversion to "meta"."""
    from tests.models.sam2.test_image_encoder import small_sam2

    model = small_sam2()
    fastsam_core.optimize(model, FastConfig(quantize=mode))
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    original = model.image_encoder._reference
    assert {p.device.type for p in original.parameters()} == {"cpu", "meta"}  # in part
    model.train()
    with torch.no_grad(), pytest.warns(UserWarning, match="training mode"):
        out = model.image_encoder(torch.zeros(1, 3, 64, 64, device="meta"))
    assert out["vision_features"].device.type == "meta"
    assert {p.device.type for p in original.parameters()} == {"meta"}  # moved whole
    model.eval()
    fastsam_core.restore(model)
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}


@pytest.mark.parametrize("mode", ["int8", "2:4"])
def test_a_quantized_model_cast_after_optimize_falls_back_in_the_cast_dtype(mode):
    """fp32, then `.half()`: the cast reaches the originals' shared tensors but not the
    quantized linears' float weights; the reference fallback (autograd recording) ran that
    half-cast original and failed on a dtype mismatch, where an fp32 model optimized
    without quantize falls back fine. It runs the original cast throughout, as restore()
    gives it back; cast back with `.float()`, the fallback and restore() have the original
    in fp32 throughout again (not the fallback's fp16 linears beside fp32 shared tensors)."""
    from tests.models.sam2.test_image_encoder import images, small_encoder, small_sam2

    model = small_sam2()
    model.image_encoder = small_encoder()
    fastsam_core.optimize(model, FastConfig(quantize=mode))
    model.half()
    x = images(batch=1).half()
    with pytest.warns(UserWarning, match="autograd is recording"):
        got = model.image_encoder(x)["vision_features"]  # parameters require grad
    expected = small_encoder().half()(x)["vision_features"]
    assert torch.equal(got.detach(), expected.detach())
    model.float()
    got = model.image_encoder(x.float())["vision_features"]
    expected = small_encoder().half().float()(x.float())["vision_features"]
    assert torch.equal(got.detach(), expected.detach())
    fastsam_core.restore(model)
    assert {p.dtype for p in model.image_encoder.parameters()} == {torch.float32}
    with torch.inference_mode():
        assert torch.equal(model.image_encoder(x.float())["vision_features"], expected)


def test_quantize_config_validation():
    with pytest.raises(ValueError, match="FastConfig.quantize"):
        FastConfig(quantize="int4")
    with pytest.raises(ValueError, match="FastConfig.quantize_layers"):
        FastConfig(quantize="int8", quantize_layers="attn")
    with pytest.raises(ValueError, match="FastConfig.quantize_layers='mlp' needs"):
        FastConfig(quantize_layers="mlp")
    with pytest.raises(ValueError, match="cannot be combined"):
        FastConfig(quantize="int8", originals="drop")


@pytest.mark.cuda
@torch.inference_mode()
def test_int_mm_and_semi_structured_on_cuda():
    linear = nn.Linear(256, 512).cuda().half()
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    assert sqnr_db(linear(x), Int8Linear(linear)(x)) > tol.INT8_LINEAR_MIN_SQNR_DB
    sparse = Sparse24Linear(linear)
    tokens = x.view(4, 16, 256)  # B x N x C, as the encoders' linears take them
    dense = tokens @ sparse.weight.t() + linear.bias
    out = sparse(tokens)
    assert out.shape == dense.shape and out.stride(-1) == 1  # row-major, as nn.Linear
    assert sqnr_db(dense, out) > tol.SPARSE_MATMUL_MIN_SQNR_DB
    other = nn.Linear(256, 512).cuda().half()
    sparse.load_state_dict(other.state_dict())  # same storage, new values: not the old cache
    dense = tokens @ prune_2_4(other.weight).t() + other.bias
    assert sqnr_db(dense, sparse(tokens)) > tol.SPARSE_MATMUL_MIN_SQNR_DB


def mlps_of(encoder) -> list[Int8MLP]:
    return [m for m in encoder.modules() if isinstance(m, Int8MLP)]


def set_mlp_paths(encoder, path: str) -> None:
    for mlp in mlps_of(encoder):
        mlp.path = path


def set_norm1_paths(encoder, path: str) -> None:
    for block in encoder.blocks:
        block.norm1.path = path


def assert_fused_mlps_match(encoder, run) -> None:
    """Every Int8MLP of `encoder`, on the input it gets in `run()`: the fused path (the
    Triton interpreter here) equals the separate one but for rare one-code flips at rounding
    ties (whole encoders are compared against the float reference instead: a flip moves the
    next layers' inputs, which then flip codes of their own)."""
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0])))
             for m in mlps_of(encoder)]
    run()
    for h in hooks:
        h.remove()
    assert len(inputs) == len(mlps_of(encoder))
    for mlp, x in inputs:
        assert sqnr_db(mlp.run("separate", x), mlp.run("fused", x)) \
            >= tol.INT8_TIE_FLIP_MIN_SQNR_DB


@torch.inference_mode()
def test_int8_mlps_fused_equal_separate_and_keep_the_keys():
    """optimize(quantize="int8") makes each block's MLP an Int8MLP after a deferred norm2,
    and its norm1 deferred to the int8 qkv, with the state_dict keys of plain int8 linears;
    on the CPU ("auto") the separate paths run, as before (and trace under torch.compile);
    forced through the fused kernels each MLP gives what the separate path gives, and the
    encoder (fused norm1s and MLPs) stays as close to the float one as int8 must."""
    sam = small_sam()
    x = image_batch(batch=1)  # the interpreter runs the fused kernels program by program
    before = sam.image_encoder(x)
    keys = set(sam.image_encoder.state_dict())
    fastsam_core.optimize(sam, FastConfig(quantize="int8"))
    encoder = sam.image_encoder
    assert len(mlps_of(encoder)) == 4
    assert all(type(b.norm1) is DeferredLayerNorm and type(b.norm2) is DeferredLayerNorm
               for b in encoder.blocks)
    report = str(fastsam_core.report(sam))
    assert "4 MLPs can run as fused kernels" in report
    assert "4 norm1 LayerNorms can feed their int8 qkv" in report
    quantized = {k for k in keys if ".attn.qkv.weight" in k or ".attn.proj.weight" in k
                 or ".mlp.lin" in k and k.endswith(".weight")}
    assert set(encoder.state_dict()) == (keys - quantized) | {
        k.replace(".weight", ".weight_int8") for k in quantized} | {
        k.replace(".weight", ".weight_scale") for k in quantized}
    separate = encoder(x)
    traced = torch.compile(encoder._forward_fast, fullgraph=True, backend="eager")
    assert torch.equal(traced(x), separate)  # the deferred norms trace, on separate paths
    assert [m.choose_path(torch.zeros(1)) for m in mlps_of(encoder)] == ["separate"] * 4
    encoder.to(DEVICE)
    x, before = x.to(DEVICE), before.to(DEVICE)
    set_mlp_paths(encoder, "separate")
    set_norm1_paths(encoder, "separate")
    separate = encoder(x)
    assert_fused_mlps_match(encoder, lambda: encoder(x))
    set_mlp_paths(encoder, "fused")
    set_norm1_paths(encoder, "fused")
    assert sqnr_db(before, encoder(x)) > tol.INT8_ENCODER_MIN_SQNR_DB
    set_mlp_paths(encoder, "separate")
    set_norm1_paths(encoder, "separate")
    assert torch.equal(encoder(x), separate)
    fastsam_core.restore(sam)
    assert not any(isinstance(m, (Int8MLP, DeferredLayerNorm)) for m in sam.modules())


@torch.inference_mode()
def test_int8_mlp_without_a_deferred_norm_and_on_sam2():
    """An MLP whose input is a plain tensor (quantized in one pass, no LayerNorm fused), and
    SAM 2's Hiera blocks (sam2 MLP, MultiScaleBlock's norm2 deferred)."""
    from tests.models.sam2.test_image_encoder import images, small_encoder, small_sam2

    mlp = Int8MLP(MLPBlock(48, 96).eval())
    assert not fusable_mlp(MLPBlock(48, 96))  # float linears: not an int8 MLP
    mlp.lin1, mlp.lin2 = Int8Linear(mlp.lin1), Int8Linear(mlp.lin2)
    mlp.to(DEVICE)
    h = torch.randn(3, 5, 48, device=DEVICE)
    expected = mlp.run("separate", h)
    assert expected.shape == (3, 5, 48)
    assert sqnr_db(expected, mlp.run("fused", h)) >= tol.INT8_TIE_FLIP_MIN_SQNR_DB

    model = small_sam2()
    model.image_encoder = small_encoder()
    x = images(batch=1, size=64).to(DEVICE)  # the interpreter runs the kernels program by program
    fastsam_core.optimize(model, FastConfig(quantize="int8", quantize_layers="mlp"))
    encoder = model.image_encoder.to(DEVICE)
    mlps = mlps_of(encoder)
    assert len(mlps) == len(encoder.trunk.blocks)
    assert all(type(b.norm2) is DeferredLayerNorm for b in encoder.trunk.blocks)
    assert_fused_mlps_match(encoder, lambda: encoder(x))
    set_mlp_paths(encoder, "bogus")
    with pytest.raises(ValueError, match="Int8MLP.path"):
        encoder(x)
    fastsam_core.restore(model)


def test_int8_mlp_path_chosen_by_measurement_and_kept(tmp_path, monkeypatch):
    """ops.quant.int8_mlp_path / layer_norm_linear_path: both paths run on the real input,
    the faster one matching the separate path wins and is kept; a fused path that does not
    match is never picked; with FASTSAM_DISABLE_TRITON: separate. Fake timings (the real
    ones need a GPU)."""
    from fastsam_core.kernels.tuning import Tuner
    from fastsam_core.ops.quant import int8_mlp_path, layer_norm_linear_path

    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTSAM_DISABLE_TRITON", raising=False)
    fake_ms = {"fused": 1.0, "separate": 2.0}
    timed = []

    def timer(run):
        timed.append(run.args[0])  # partial(run, path)
        return fake_ms[run.args[0]]

    tuner = Tuner("int8_mlp_test", timer=timer)
    x = torch.randn(40, 16)
    outputs = {"fused": x * 2, "separate": x * 2}
    run = outputs.__getitem__
    assert int8_mlp_path(x, 64, True, run, tuner) == "fused"
    assert sorted(timed) == ["fused", "separate"]
    assert int8_mlp_path(x, 64, True, run, tuner) == "fused" and len(timed) == 2  # kept
    assert tuner.cache_entries() == 1
    assert layer_norm_linear_path(x, 64, 14, run, tuner) == "fused" and len(timed) == 4
    assert tuner.cache_entries() == 2  # the norm -> linear choice has a key of its own
    outputs["fused"] = torch.zeros_like(x)  # a wrong fused result, however fast
    assert int8_mlp_path(x, 64, False, run, tuner) == "separate"  # another key
    monkeypatch.setenv("FASTSAM_DISABLE_TRITON", "1")
    assert int8_mlp_path(x, 128, True, run, tuner) == "separate"


def test_fused_paths_are_not_measured_with_triton_disabled(tmp_path, monkeypatch):
    """FASTSAM_DISABLE_TRITON: "separate" for MLPs and norm1 -> qkv without running either
    path, though the fused one matches and would measure faster; nothing is kept."""
    from fastsam_core.kernels.tuning import Tuner
    from fastsam_core.ops.quant import int8_mlp_path, layer_norm_linear_path

    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTSAM_DISABLE_TRITON", "1")
    tuner = Tuner("int8_mlp_test", timer=lambda run: {"fused": 1.0, "separate": 2.0}[
        run.args[0]])
    x = torch.randn(40, 16)
    ran = []

    def run(path):
        ran.append(path)
        return x * 2

    assert int8_mlp_path(x, 64, True, run, tuner) == "separate"
    assert layer_norm_linear_path(x, 64, 14, run, tuner) == "separate"
    assert ran == [] and tuner.cache_entries() == 0


def test_norm_linear_choices_are_kept_per_token_count(tmp_path, monkeypatch):
    """A norm1 -> qkv choice stands for the tokens of the B x H x W grid (rounded up to a
    power of two), not its batch: one 8 x 8 and one 16 x 16 grid are measured apart, two
    8 x 8 grids share the choice of one 16 x 8 grid. Fake timings."""
    from fastsam_core.kernels.tuning import Tuner
    from fastsam_core.ops.quant import layer_norm_linear_path

    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTSAM_DISABLE_TRITON", raising=False)
    timed = []
    tuner = Tuner("int8_norm_test", timer=lambda run: timed.append(run.args[0]) or 1.0)

    def measured(*grid):
        x = torch.randn(*grid, 16)
        before = len(timed)
        layer_norm_linear_path(x, 48, 0, lambda path: x * 2, tuner)
        return len(timed) > before

    assert measured(1, 8, 8) and measured(1, 16, 16)
    assert measured(1, 16, 8) and not measured(2, 8, 8)


def test_int_mm_takes_only_the_shapes_torch_int_mm_takes():
    """torch._int_mm (CUDA only) needs more than 16 rows and K and M multiples of 8: exactly
    16 tokens, or a K or M of 8n + 4, take the "dequant" path instead."""
    cuda = torch.device("cuda")
    assert int_mm_supported(17, 64, 32, cuda) and int_mm_supported(4096, 768, 2304, cuda)
    assert not int_mm_supported(16, 64, 32, cuda)
    assert not int_mm_supported(17, 68, 32, cuda) and not int_mm_supported(17, 64, 36, cuda)
    assert not int_mm_supported(4096, 768, 2304, torch.device("cpu"))


@torch.inference_mode()
@pytest.mark.parametrize("grid, window", [((6, 5), 4), ((4, 4), 0), ((7, 7), 7)])
def test_norm1_feeds_the_int8_qkv_its_codes(grid, window):
    """A deferred LayerNorm into an int8 qkv (`PendingLayerNorm.for_linear`): the fused path
    (LayerNorm + codes in one kernel, the codes window-partitioned) gives the separate
    path's qkv output but for rounding-tie flips, padded tokens the bias exactly (a zero
    input, as the reference's padding), in the layout the separate path gives."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(48)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.1)
    qkv = Int8Linear(nn.Linear(48, 144))
    x = torch.randn(2, *grid, 48) * 2 + 0.3
    pending = DeferredLayerNorm(norm)(x)
    assert torch.equal(pending.for_linear(qkv, window),  # "auto" on the CPU
                       pending.laid_out("separate", window))
    qkv.to(DEVICE)
    pending = DeferredLayerNorm(norm.to(DEVICE))(x.to(DEVICE))
    separate = pending.laid_out("separate", window)
    fused = pending.laid_out("fused", window)
    assert isinstance(fused, Int8Tokens) and fused.codes.dtype == torch.int8
    assert fused.shape == separate.shape
    assert fused.scales.shape == (*separate.shape[:-1], 1)
    y_separate, y_fused = qkv(separate), qkv(fused)
    assert y_fused.shape == (*separate.shape[:-1], 144)
    assert sqnr_db(y_separate, y_fused) >= tol.INT8_TIE_FLIP_MIN_SQNR_DB
    if window and (grid[0] % window or grid[1] % window):
        windows_w = -(-grid[1] // window)
        last = y_fused.view(2, -1, windows_w, window, window, 144)[:, -1, -1]  # padded corner
        assert torch.equal(last[:, -1, -1], qkv.bias.expand(2, 144))
    pending.norm.path = "fused"
    with pytest.raises(ValueError, match="needs an Int8Linear"):
        pending.for_linear(nn.Linear(48, 144), window)
    pending.norm.path = "bogus"
    with pytest.raises(ValueError, match="DeferredLayerNorm.path"):
        pending.for_linear(qkv, window)


@torch.inference_mode()
def test_fused_norm1_in_the_encoder_blocks():
    """A whole optimized encoder with padded windows at batch 2 and norm1 forced "fused":
    each block's attention gets the codes (`Int8Tokens`), and each block gives what it gives
    with norm1 separate but for rounding-tie flips."""
    sam = small_sam("win5-padded")  # 16 x 16 tokens in 5 x 5 windows: padded
    fastsam_core.optimize(sam, FastConfig(quantize="int8", quantize_layers="all"))
    encoder = sam.image_encoder.to(DEVICE)
    set_mlp_paths(encoder, "separate")
    set_norm1_paths(encoder, "separate")
    inputs, attn_inputs = [], []
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0])))
             for b in encoder.blocks]
    encoder(image_batch(batch=2).to(DEVICE))
    for h in hooks:
        h.remove()
    assert len(inputs) == len(encoder.blocks) == 4
    for block, x in inputs:
        separate = block(x)
        block.norm1.path = "fused"
        handle = block.attn.register_forward_pre_hook(
            lambda m, args: attn_inputs.append(type(args[0])))
        fused = block(x)
        handle.remove()
        assert sqnr_db(separate, fused) >= tol.INT8_TIE_FLIP_MIN_SQNR_DB
    assert attn_inputs == [Int8Tokens] * 4


@torch.inference_mode()
def test_fused_norm1_in_the_hiera_blocks():
    """SAM 2's Hiera at 96 px (a 6 x 6 stage in 4 x 4 windows: padded) with norm1 forced
    "fused", in each width-keeping block: qkv gets the codes (`Int8Tokens`, padded tokens
    code 0) and gives what it gives on the separate path but for rounding-tie flips; the
    block differs from its separate path only by qkv's input; the separate path is what the
    reference block computes with a plain LayerNorm."""
    from tests.models.sam2.test_image_encoder import images, small_encoder, small_sam2

    model = small_sam2()
    model.image_encoder = small_encoder()
    fastsam_core.optimize(model, FastConfig(quantize="int8"))
    trunk = model.image_encoder.to(DEVICE).trunk
    set_mlp_paths(model.image_encoder, "separate")
    deferred = [b for b in trunk.blocks if type(b.norm1) is DeferredLayerNorm]
    for block in deferred:
        block.norm1.path = "separate"
    assert any(b.window_size == 0 for b in deferred) and any(b.window_size for b in deferred)
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0])))
             for b in deferred]
    model.image_encoder(images(batch=2, size=96).to(DEVICE))
    for h in hooks:
        h.remove()
    assert len(inputs) == len(deferred) == 4
    padded = 0
    for block, x in inputs:
        qkv_inputs = []
        handle = block.attn.qkv.register_forward_pre_hook(
            lambda m, args: qkv_inputs.append(args[0]))
        separate = block(x)
        block.norm1.path = "fused"
        fused = block(x)
        block.norm1.path = "separate"
        handle.remove()
        floats, codes = qkv_inputs
        assert type(floats) is torch.Tensor and isinstance(codes, Int8Tokens)
        assert codes.shape == floats.shape
        assert sqnr_db(block.attn.qkv(floats), block.attn.qkv(codes)) \
            >= tol.INT8_TIE_FLIP_MIN_SQNR_DB
        pad = (floats == 0).all(-1)  # the window partition's zero padding
        assert (codes.codes[pad] == 0).all()
        padded += int(pad.any())
        handle = block.attn.qkv.register_forward_pre_hook(lambda m, args: (codes,))
        assert torch.equal(block(x), fused)  # separate, but qkv fed the codes
        handle.remove()
        reference = copy.copy(block)  # the same children but norm1 a plain LayerNorm
        reference._modules = dict(block._modules, drop_path=nn.Identity(),
                                  norm1=nn.LayerNorm(block.dim, eps=block.norm1.eps,
                                                     device=DEVICE))
        reference.norm1.weight, reference.norm1.bias = block.norm1.weight, block.norm1.bias
        assert torch.equal(MultiScaleBlock.forward(reference, x), separate)
    assert padded == 1  # the 6 x 6 stage's windowed block


def test_norm1_path_separate_for_hooks_float_linears_and_compile(monkeypatch):
    """"auto" for a deferred norm1 measures only where it may (the CPU standing in for
    CUDA, the measurement faked to prefer fused): not for a float linear, not while the qkv
    or the module carrying the codes to it has forward hooks (they would see codes), and
    torch.compile traces the separate path."""
    import fastsam_core.models.quant as quant

    monkeypatch.setattr(quant, "layer_norm_linear_path", lambda *args: "fused")
    norm = DeferredLayerNorm(nn.LayerNorm(32))
    qkv = Int8Linear(nn.Linear(32, 96))
    x = torch.randn(1, 5, 5, 32)
    assert norm.choose_path(norm(x), qkv, 4) == "separate"  # not a measured device
    norm.measured_devices = ("cpu",)
    assert norm.choose_path(norm(x), qkv, 4) == "fused"
    with torch.no_grad():  # codes carry no gradient (the norm's weight requires grad)
        assert isinstance(norm(x).for_linear(qkv, 4), Int8Tokens)
    assert norm.choose_path(norm(x), nn.Linear(32, 96), 4) == "separate"
    for hooked in (qkv, attention := nn.Module()):
        handle = hooked.register_forward_pre_hook(lambda m, args: None)
        assert norm.choose_path(norm(x), qkv, 4, carriers=(attention,)) == "separate"
        handle.remove()
    assert norm.choose_path(norm(x), qkv, 4, carriers=(attention,)) == "fused"
    with torch.inference_mode():
        eager = qkv(norm(x).laid_out("separate", 4))

    def attention_input(t):
        return qkv(norm(t).for_linear(qkv, 4))

    compiled = torch.compile(attention_input, fullgraph=True, backend="eager")
    with torch.inference_mode():
        assert torch.equal(compiled(x), eager)


def int8_mlp(k=32, hidden=64) -> Int8MLP:
    mlp = Int8MLP(MLPBlock(k, hidden).eval())
    mlp.lin1, mlp.lin2 = Int8Linear(mlp.lin1), Int8Linear(mlp.lin2)
    return mlp


def test_int8_mlp_runs_separately_for_hooks_and_compile(monkeypatch):
    """"auto" measures only where it may (here: the CPU stands in for CUDA, the measurement
    faked to prefer fused): forward hooks on fc1 / act / fc2 keep the separate path (they
    fire only on module calls), and torch.compile traces the separate one (no Triton launch;
    fullgraph: the pending LayerNorm object traces)."""
    import fastsam_core.models.quant as quant

    monkeypatch.setattr(quant, "int8_mlp_path", lambda *args: "fused")
    mlp = int8_mlp()
    x = torch.randn(4, 32)
    assert mlp.choose_path(x) == "separate"  # not a measured device
    mlp.measured_devices = ("cpu",)
    assert mlp.choose_path(x) == "fused"
    norm = DeferredLayerNorm(nn.LayerNorm(32))
    for module in (mlp.lin1, mlp.act, mlp.lin2):
        seen = []
        handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
        assert mlp.choose_path(norm(x)) == "separate"
        with torch.inference_mode():
            eager = mlp(norm(x))
        assert seen == [(4, 32) if module is mlp.lin1 else (4, 64)]
        handle.remove()
    assert mlp.choose_path(norm(x)) == "fused"

    def block(t):
        return t + mlp(norm(t))

    # under compile: the separate path (`eager` above), whatever the measurement says
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    with torch.inference_mode():
        assert torch.equal(compiled(x), x + eager)


def test_the_real_fused_paths_pass_the_match(tmp_path, monkeypatch):
    """The path measurement's tolerance admits the fused kernels' real result (rounding-tie
    flips, in fp32 and fp16; an MLP, and a norm1 into a linear through padded windows):
    both paths measured, fake timings."""
    from fastsam_core.kernels.tuning import Tuner
    from fastsam_core.ops.quant import int8_mlp_path, layer_norm_linear_path

    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTSAM_DISABLE_TRITON", raising=False)
    for dtype in (torch.float32, torch.float16):
        mlp = int8_mlp(48, 96).to(DEVICE, dtype)
        norm = DeferredLayerNorm(nn.LayerNorm(48).to(DEVICE, dtype))
        x = torch.randn(64, 48).to(DEVICE, dtype)
        tuner = Tuner("int8_mlp_test", timer=lambda run: {"fused": 1.0, "separate": 2.0}[
            run.args[0]])
        with torch.inference_mode():
            assert int8_mlp_path(x, 96, True, lambda p: mlp.run(p, norm(x)), tuner) == "fused"
        assert set(tuner.last_measurements) == {"fused", "separate"}
        qkv, grid = mlp.lin1, x.view(1, 8, 8, 48)
        with torch.inference_mode():
            assert layer_norm_linear_path(grid, 96, 3, lambda p: qkv(
                norm(grid).laid_out(p, 3)), tuner) == "fused"
        assert set(tuner.last_measurements) == {"fused", "separate"}


@pytest.mark.cuda
@torch.inference_mode()
@pytest.mark.parametrize("k, hidden", [(768, 3072), (1280, 5120)])
def test_int8_mlp_bf16_real_widths(k, hidden, tmp_path, monkeypatch):
    """The compiled fused kernels at vit_b / vit_h MLP widths in bf16: both paths as close to
    the float MLP (fp32) as two int8 layers allow, and both pass the path measurement's
    match (a fused result it rejected would never be chosen)."""
    from fastsam_core.kernels.tuning import Tuner
    from fastsam_core.ops.quant import int8_mlp_path

    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))  # measured here, not remembered
    monkeypatch.delenv("FASTSAM_DISABLE_TRITON", raising=False)
    torch.manual_seed(0)
    norm, mlp = nn.LayerNorm(k).cuda(), MLPBlock(k, hidden).eval().cuda()
    x = torch.randn(1024, k, device="cuda")
    exact = mlp(norm(x))
    norm16, mlp16 = DeferredLayerNorm(norm.bfloat16()), copy.deepcopy(mlp).bfloat16()
    int8 = Int8MLP(mlp16)
    int8.lin1, int8.lin2 = Int8Linear(mlp16.lin1), Int8Linear(mlp16.lin2)
    x16 = x.bfloat16()
    for path in ("separate", "fused"):
        assert sqnr_db(exact, int8.run(path, norm16(x16))) > tol.INT8_LINEAR_MIN_SQNR_DB, path
    tuner = Tuner("int8_mlp_cuda_test")
    int8_mlp_path(x16, hidden, True, lambda p: int8.run(p, norm16(x16)), tuner)
    assert set(tuner.last_measurements) == {"fused", "separate"}


@pytest.mark.cuda
@torch.inference_mode()
@pytest.mark.parametrize("k, window", [(768, 14), (1280, 0), (112, 8)])
def test_norm1_into_int8_qkv_bf16_real_widths(k, window, tmp_path, monkeypatch):
    """The compiled LayerNorm + codes kernel feeding an int8 qkv at vit_b (windowed, padded
    64x64 grid) / vit_h (global) / hiera_b+'s first stage (windows of 8) widths in bf16:
    both paths as close to the float layers (fp32) as an int8 linear allows, and both pass
    the path measurement's match."""
    from segment_anything.modeling.image_encoder import window_partition

    from fastsam_core.kernels.tuning import Tuner
    from fastsam_core.ops.quant import layer_norm_linear_path

    monkeypatch.setenv("FASTSAM_CACHE_DIR", str(tmp_path))  # measured here, not remembered
    monkeypatch.delenv("FASTSAM_DISABLE_TRITON", raising=False)
    torch.manual_seed(0)
    norm, qkv = nn.LayerNorm(k).cuda(), nn.Linear(k, 3 * k).cuda()
    x = torch.randn(2, 64, 64, k, device="cuda")
    exact = qkv(window_partition(norm(x), window)[0] if window else norm(x))
    norm16 = DeferredLayerNorm(copy.deepcopy(norm).bfloat16())
    int8 = Int8Linear(copy.deepcopy(qkv).bfloat16())
    x16 = x.bfloat16()
    for path in ("separate", "fused"):
        y = int8(norm16(x16).laid_out(path, window))
        assert sqnr_db(exact, y) > tol.INT8_LINEAR_MIN_SQNR_DB, path
    tuner = Tuner("int8_norm_linear_cuda_test")
    layer_norm_linear_path(x16, 3 * k, window,
                           lambda p: int8(norm16(x16).laid_out(p, window)), tuner)
    assert set(tuner.last_measurements) == {"fused", "separate"}


def test_2_4_leaves_linears_of_a_width_not_divisible_by_4_dense():
    """2:4 prunes groups of four input features: a linear of 6 inputs stays an nn.Linear
    (pruning it raised), one of 8 inputs and 6 outputs is pruned; the swap is made in
    copies of the block and its MLP, the block the encoder had keeps its float linears."""
    from fastsam_core.models.quant import quantize_linears

    block = nn.Module()
    block.mlp = MLPBlock(6, 8)  # lin1 6 -> 8 stays dense, lin2 8 -> 6 is pruned
    block.attn = nn.Module()
    block.attn.qkv, block.attn.proj = nn.Linear(6, 18), nn.Linear(6, 6)
    encoder = nn.Module()
    encoder.blocks = nn.ModuleList([block])
    report = quantize_linears(encoder, "2:4", "all")
    quantized = encoder.blocks[0]
    assert type(quantized.mlp.lin1) is nn.Linear and type(quantized.attn.qkv) is nn.Linear
    assert type(quantized.attn.proj) is nn.Linear
    assert isinstance(quantized.mlp.lin2, Sparse24Linear)
    assert torch.equal(quantized.mlp.lin2.weight, prune_2_4(block.mlp.lin2.weight))
    assert report.detail.startswith("1 layers (all)")
    assert type(block.mlp.lin2) is nn.Linear


def test_only_exact_gelu_two_layer_mlps_within_the_row_kernels_reach_fuse():
    """`fusable_mlp`: the fused path is fc1, the exact GELU, fc2 over int8 linears, through
    row kernels of up to MAX_ROW features (the input and the hidden width): an MLP with a
    tanh GELU, a ReLU, a sigmoid output, three layers or a wider row keeps its modules.
    Meta tensors stand in for the widest layers."""
    from sam2.modeling.sam2_utils import MLP

    from fastsam_core.kernels.quantize_rows import MAX_ROW

    def int8(mlp):
        if isinstance(mlp, MLPBlock):
            mlp.lin1, mlp.lin2 = Int8Linear(mlp.lin1), Int8Linear(mlp.lin2)
        else:
            mlp.layers = nn.ModuleList(Int8Linear(layer) for layer in mlp.layers)
        return mlp

    tanh = functools.partial(nn.GELU, approximate="tanh")
    assert fusable_mlp(int8(MLPBlock(16, 32)))
    assert fusable_mlp(int8(MLP(16, 32, 16, 2, nn.GELU)))
    assert not fusable_mlp(int8(MLPBlock(16, 32, tanh)))
    assert not fusable_mlp(int8(MLPBlock(16, 32, nn.ReLU)))
    assert not fusable_mlp(int8(MLP(16, 32, 16, 2, tanh)))
    assert not fusable_mlp(int8(MLP(16, 32, 16, 2, nn.GELU, sigmoid_output=True)))
    assert not fusable_mlp(int8(MLP(16, 32, 16, 3, nn.GELU)))
    with torch.device("meta"):
        assert fusable_mlp(int8(MLPBlock(16, MAX_ROW)))
        assert fusable_mlp(int8(MLPBlock(MAX_ROW, 16)))
        assert not fusable_mlp(int8(MLPBlock(16, MAX_ROW + 1)))
        assert not fusable_mlp(int8(MLPBlock(MAX_ROW + 1, 16)))


def test_norms_are_deferred_only_where_their_int8_layers_take_them():
    """int8 MLPs only: qkv stays a float linear, so norm1 stays an nn.LayerNorm (and the
    report claims no norm1 fused), norm2 is deferred to the MLP. norm1 is deferred before an
    int8 qkv of up to MAX_ROW input features, and only an affine LayerNorm (weight and bias:
    the fused kernel applies both) is deferred. Meta tensors stand in for the widest layers."""
    from fastsam_core.kernels.quantize_rows import MAX_ROW
    from fastsam_core.models.quant import defers_norm1, defers_norm2

    sam = small_sam()
    fastsam_core.optimize(sam, FastConfig(quantize="int8", quantize_layers="mlp"))
    blocks = sam.image_encoder.blocks
    assert all(type(b.norm1) is nn.LayerNorm and type(b.norm2) is DeferredLayerNorm
               for b in blocks)
    assert "norm1 LayerNorms" not in str(fastsam_core.report(sam))
    block = blocks[0]
    with torch.device("meta"):
        for width, deferred in ((MAX_ROW, True), (MAX_ROW + 1, False)):
            block.attn.qkv = Int8Linear(nn.Linear(width, 8))
            block.norm1 = nn.LayerNorm(width)
            assert defers_norm1(block) is deferred, width
        block.norm1 = nn.LayerNorm(MAX_ROW, bias=False)
        assert not defers_norm1(block)
        block.norm2 = nn.LayerNorm(block.norm2.normalized_shape)
        assert defers_norm2(block)
        block.norm2 = nn.LayerNorm(block.norm2.normalized_shape, bias=False)
        assert not defers_norm2(block)
        block.norm2 = nn.LayerNorm(block.norm2.normalized_shape, elementwise_affine=False)
        assert not defers_norm2(block)


@torch.inference_mode()
def test_a_deferred_layer_norm_keeps_its_eps():
    """The LayerNorm's own eps (0.5 here, where it moves every output) on both paths:
    `value()` is the LayerNorm's output, and the fused codes fed to an int8 linear give what
    it gives on that output but for rounding-tie flips."""
    norm = nn.LayerNorm(32, eps=0.5)
    x = torch.randn(2, 3, 4, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    pending = DeferredLayerNorm(norm)(x)
    assert torch.equal(pending.value(), norm(x))
    qkv = Int8Linear(nn.Linear(32, 48))
    assert sqnr_db(qkv(norm(x)), qkv(pending.laid_out("fused", 0))) \
        >= tol.INT8_TIE_FLIP_MIN_SQNR_DB


@torch.inference_mode()
def test_int8_layers_return_their_inputs_dtype_on_every_path():
    """fp16 in, fp16 out: an Int8Linear fed codes (`Int8Tokens`) gives the dtype they were
    taken from, as on the activations themselves, and an Int8MLP its input's dtype on both
    paths, from a tensor or a deferred LayerNorm."""
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)).half()
    linear = Int8Linear(nn.Linear(32, 16).half())
    codes, scales = quantize_per_row(x)
    y = linear(Int8Tokens(codes, scales, x.dtype))
    assert y.dtype == torch.float16 and torch.equal(y, linear(x))
    mlp = int8_mlp().half()
    norm = DeferredLayerNorm(nn.LayerNorm(32).half())
    for path in ("separate", "fused"):
        for h in (x, norm(x)):
            out = mlp.run(path, h)
            assert out.dtype == torch.float16 and out.shape == (6, 32), path


def test_2_4_semi_structured_weight_built_again_when_the_weight_changes(monkeypatch):
    """The semi-structured weight (CUDA; stood in for by the pruned weight doubled, every
    call "sparse") is built again after an in-place edit of the weight, and after a
    load_state_dict also for an inference tensor (it has no version to see the write by)."""
    import fastsam_core.models.quant as quant

    monkeypatch.setattr(Sparse24Linear, "runs_sparse", lambda self, x: True)
    monkeypatch.setattr(quant, "semi_structured", lambda w: w * 2)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))

    def expected(layer):
        return nn.functional.linear(x, layer.weight * 2, layer.bias)

    layer = Sparse24Linear(nn.Linear(16, 8))
    with torch.no_grad():
        assert torch.equal(layer(x), expected(layer))
        layer.weight.mul_(3)
        assert torch.equal(layer(x), expected(layer))
    with torch.inference_mode():
        layer = Sparse24Linear(nn.Linear(16, 8))
        assert layer.weight.is_inference()
        assert torch.equal(layer(x), expected(layer))
        layer.load_state_dict(nn.Linear(16, 8).state_dict())
        assert torch.equal(layer(x), expected(layer))
