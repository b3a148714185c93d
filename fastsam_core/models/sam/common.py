"""Helpers shared by the fast SAM modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_utils import LayerNorm2d as Sam2LayerNorm2d
from segment_anything.modeling.common import LayerNorm2d

LAYER_NORMS_2D = (LayerNorm2d, Sam2LayerNorm2d)  # the same channel LayerNorm in both packages


def layer_norm_2d(x: torch.Tensor, norm: LayerNorm2d) -> torch.Tensor:
    """The reference `LayerNorm2d` as `F.layer_norm` over channels (fp32 statistics for
    low-precision inputs): B x C x H x W -> B x C x H x W."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), norm.weight.shape, norm.weight, norm.bias, norm.eps)
    return y.permute(0, 3, 1, 2)
