"""Shared fixtures: small random-weight SAM models (../shared/design.md, section 4)."""

from __future__ import annotations

import pytest
import torch

from fastsam_core.models.sam.reference import build_sam

if torch.cuda.is_available():
    # fp32 means fp32 in the parity tests: cuDNN's convolutions default to TF32 (matmuls
    # do not), rounding their inputs to 10 mantissa bits: 2^-11 relative each, coarser
    # than the fp32 stage tolerance of 1e-4 (tests/tolerances.py). Not for bench/: the
    # benchmarks time what users run, with torch's defaults.
    torch.backends.cudnn.allow_tf32 = False

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
# a test parametrized over these also runs on the lent GPU's device (CUDA-marked there)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def small_sam(name: str = "win4", seed: int = 0) -> torch.nn.Module:
    """A random-weight reference Sam with the small encoder `name` (tables filled)."""
    return build_sam("vit_b", IMAGE_SIZE, seed, **SMALL_CONFIGS[name])


def image_batch(batch: int = 2, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    """Normalized-image-like input, B x 3 x size x size."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def sam() -> torch.nn.Module:
    return small_sam()


@pytest.fixture(autouse=True, scope="session")
def own_tuning_cache(tmp_path_factory):
    """Kernel choices measured by the tests go to a cache of their own, not the user's (nor,
    on the GPU runner, the one bench/run_gpu.sh ships as tuned tables and whose benchmarks
    measure a cold start). Tests that need an empty cache still set their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTSAM_CACHE_DIR", str(tmp_path_factory.mktemp("tuning-cache")))
        yield


@pytest.fixture
def kernel_launches(monkeypatch) -> list[tuple[int, ...]]:
    """The q shapes of the rel-pos attention kernel's launches during the test, less those
    that measure launch configurations on a GPU: the "triton" backend falls back to SDPA with
    a warning only, so a test of the kernel checks it ran."""
    from fastsam_core.kernels import rel_pos_attention as kernel
    from fastsam_core.kernels import tuning

    launches, launch = [], kernel.rel_pos_attention_launch

    def counted(q, *args, **kwargs):
        if not tuning._nesting[0]:
            launches.append(tuple(q.shape))
        return launch(q, *args, **kwargs)

    monkeypatch.setattr(kernel, "rel_pos_attention_launch", counted)
    return launches
