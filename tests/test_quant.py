"""int8 and 2:4 linears: the ops, the modules, and their use through FastConfig.quantize."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastsam_core
from fastsam_core import FastConfig
from fastsam_core.models.quant import Int8Linear, Sparse24Linear
from fastsam_core.ops.quant import (
    int8_linear,
    is_2_4_sparse,
    prune_2_4,
    quantize_per_row,
    sqnr_db,
)
from tests import tolerances as tol
from tests.conftest import image_batch, small_sam


def test_quantize_per_row_round_trip():
    x = torch.randn(32, 64) * torch.logspace(-2, 2, 32)[:, None]  # rows of very different range
    x_q, scale = quantize_per_row(x)
    assert x_q.dtype == torch.int8 and x_q.abs().max() <= 127
    err = (x_q.float() * scale - x).abs()
    assert (err <= scale / 2 + 1e-6 * x.abs()).all()  # half a step of each row's own scale
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
    assert torch.allclose(out.double(), exact, rtol=1e-6, atol=1e-5)
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


@torch.inference_mode()
def test_modules_match_the_linear_they_replace():
    linear = nn.Linear(64, 96)
    x = torch.randn(5, 7, 64)
    assert sqnr_db(linear(x), Int8Linear(linear)(x)) > tol.INT8_LINEAR_MIN_SQNR_DB
    sparse = Sparse24Linear(linear)
    assert is_2_4_sparse(sparse.weight)
    assert torch.allclose(sparse(x), x @ sparse.weight.t() + linear.bias)
    assert set(Int8Linear(linear).state_dict()) == {"weight_int8", "weight_scale", "bias"}
    assert set(sparse.state_dict()) == {"weight", "bias"}


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
    assert any(isinstance(m, Int8Linear) for m in model.image_encoder.modules())
    out = model.image_encoder(x)["vision_features"]
    assert sqnr_db(before, out) > tol.INT8_ENCODER_MIN_SQNR_DB
    fastsam_core.restore(model)
    assert torch.equal(model.image_encoder(x)["vision_features"], before)


def test_quantize_config_validation():
    with pytest.raises(ValueError, match="FastConfig.quantize"):
        FastConfig(quantize="int4")
    with pytest.raises(ValueError, match="FastConfig.quantize_layers"):
        FastConfig(quantize="int8", quantize_layers="attn")
    with pytest.raises(ValueError, match="cannot be combined"):
        FastConfig(quantize="int8", originals="drop")


@pytest.mark.cuda
@torch.inference_mode()
def test_int_mm_and_semi_structured_on_cuda():
    linear = nn.Linear(256, 512).cuda().half()
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    assert sqnr_db(linear(x), Int8Linear(linear)(x)) > tol.INT8_LINEAR_MIN_SQNR_DB
    sparse = Sparse24Linear(linear)
    dense = x @ sparse.weight.t() + linear.bias
    assert sqnr_db(dense, sparse(x)) > 40  # same pruned weight, sparse tensor cores
