"""Shared fixtures: small random-weight SAM models (../shared/design.md, section 4)."""

from __future__ import annotations

import pytest
import torch

from fastsam_core.models.sam.reference import build_sam

# Small encoders: 256 px -> 16 x 16 tokens. Windows 4 (no padding), 5 and 6 (padded to 20
# and 18), head dims 16 and 32, with and without relative / absolute positions.
SMALL = dict(depth=4, embed_dim=64, num_heads=4, global_attn_indexes=(1, 3), window_size=4)
SMALL_CONFIGS = {
    "win4": SMALL,
    "win5-padded": dict(SMALL, window_size=5),
    "win6-padded-d32": dict(SMALL, num_heads=2, window_size=6),
    "no-rel-pos": dict(SMALL, use_rel_pos=False),
    "no-abs-pos": dict(SMALL, use_abs_pos=False),
}
IMAGE_SIZE = 256


def small_sam(name: str = "win4", seed: int = 0) -> torch.nn.Module:
    """A random-weight reference Sam with the small encoder `name` (tables filled)."""
    return build_sam("vit_b", IMAGE_SIZE, seed, **SMALL_CONFIGS[name])


def image_batch(batch: int = 2, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    """Normalized-image-like input, B x 3 x size x size."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def sam() -> torch.nn.Module:
    return small_sam()
