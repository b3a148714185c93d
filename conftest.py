"""Root conftest: runs before anything imports triton.

On machines without a CUDA device, Triton kernels run in its interpreter (numpy on the CPU).
The variable is read when a kernel is decorated, so it must be set before the first import of
triton; on a GPU machine it stays unset so the compiled kernels are tested.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # fp32 means fp32 in the parity tests: cuDNN's convolutions default to TF32 (matmuls
    # do not), rounding their inputs to 10 mantissa bits: 2^-11 relative each, coarser
    # than the fp32 stage tolerance of 1e-4 (tests/tolerances.py)
    torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where a CUDA device is present (the lent GPU)."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
