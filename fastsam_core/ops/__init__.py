"""Functional ops with a backend choice (sdpa / math, and Triton kernels as they land)."""

from fastsam_core.ops.attention import rel_pos_attention

__all__ = ["rel_pos_attention"]
