"""Root conftest: runs before anything imports triton.

On machines without a CUDA device, Triton kernels run in its interpreter (numpy on the CPU).
The variable is read when a kernel is decorated, so it must be set before the first import of
triton; on a GPU machine it stays unset so the compiled kernels are tested.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
