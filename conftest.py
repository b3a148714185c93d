"""Root conftest: runs before anything imports triton.

On machines without a CUDA device, Triton kernels run in its interpreter (numpy on the CPU).
The variable is read when a kernel is decorated, so it must be set before the first import of
triton; on a GPU machine it stays unset so the compiled kernels are tested.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where a CUDA device is present (the lent GPU)."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
