"""fastsam_core.ops.attention against segment_anything's attention math."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos, get_rel_pos

from fastsam_core.ops.attention import choose_backend, rel_pos_attention, rel_pos_index
from tests import tolerances as tol
from tests.parity import assert_close_fp32, assert_lowp_parity

GRIDS = [(4, 4), (6, 5), (7, 7), (14, 14)]


def inputs(batch, heads, grid, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen) for _ in range(3))
    table_h = torch.randn(2 * grid[0] - 1, dim, generator=gen) * 0.5
    table_w = torch.randn(2 * grid[1] - 1, dim, generator=gen) * 0.5
    return q, k, v, table_h, table_w


def reference(q, k, v, table_h, table_w, grid, scale):
    """segment_anything's Attention.forward core, in the dtype of its inputs."""
    b, heads, n, d = q.shape
    q, k, v = (t.reshape(b * heads, n, d) for t in (q, k, v))
    attn = (q * scale) @ k.transpose(-2, -1)
    if table_h is not None:
        attn = add_decomposed_rel_pos(attn, q, table_h, table_w, grid, grid)
    return (attn.softmax(dim=-1) @ v).view(b, heads, n, d)


def fast(q, k, v, table_h, table_w, grid, scale, backend):
    pos_h = table_h[rel_pos_index(grid[0])]
    pos_w = table_w[rel_pos_index(grid[1])]
    return rel_pos_attention(q, k, v, pos_h, pos_w, grid, scale, backend)


@pytest.mark.parametrize("size", [1, 4, 7, 14, 64])
def test_rel_pos_index_gathers_what_get_rel_pos_returns(size):
    table = torch.randn(2 * size - 1, 8)
    assert torch.equal(table[rel_pos_index(size)], get_rel_pos(size, size, table))


@pytest.mark.parametrize("backend", ["triton", "sdpa", "math"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("batch, heads, dim", [(1, 2, 16), (3, 3, 32), (2, 1, 80)])
def test_fp32(backend, grid, batch, heads, dim, kernel_launches):
    q, k, v, th, tw = inputs(batch, heads, grid, dim)
    scale = dim**-0.5
    out = fast(q, k, v, th, tw, grid, scale, backend)
    assert_close_fp32(out, reference(q, k, v, th, tw, grid, scale), tol.FP32_OP_REL_L2)
    assert kernel_launches == ([tuple(q.shape)] if backend == "triton" else [])


@pytest.mark.parametrize("backend", ["triton", "sdpa", "math"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", [(6, 5), (14, 14)])
def test_low_precision(backend, dtype, grid, kernel_launches):
    q, k, v, th, tw = inputs(2, 2, grid, 32)
    scale = 32**-0.5
    low = [t.to(dtype) for t in (q, k, v, th, tw)]
    out = fast(*low, grid, scale, backend)
    assert out.dtype == dtype
    assert kernel_launches == ([tuple(q.shape)] if backend == "triton" else [])
    naive = reference(*low, grid, scale)
    exact = reference(*(t.double() for t in (q, k, v, th, tw)), grid, scale)
    assert_lowp_parity(out, naive, exact)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "math"])
def test_without_bias(backend):
    q, k, v, _, _ = inputs(2, 2, (5, 5), 16)
    out = rel_pos_attention(q, k, v, None, None, (5, 5), 0.25, backend)
    assert_close_fp32(out, reference(q, k, v, None, None, (5, 5), 0.25), tol.FP32_OP_REL_L2)


def test_bias_changes_the_result():
    q, k, v, th, tw = inputs(1, 2, (6, 5), 16)
    with_bias = fast(q, k, v, th, tw, (6, 5), 0.25, "sdpa")
    without = rel_pos_attention(q, k, v, None, None, (6, 5), 0.25, "sdpa")
    assert (with_bias - without).norm() / without.norm() > 0.1


def test_unknown_backend_raises():
    q, k, v, th, tw = inputs(1, 1, (4, 4), 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        fast(q, k, v, th, tw, (4, 4), 0.25, "flash")
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="attention must be"):
        choose_backend("flash", cpu)
    assert choose_backend("auto", cpu)[0] == "sdpa" and choose_backend("math", cpu)[0] == "math"
    assert choose_backend("auto", torch.device("cuda"))[0] == "auto"
