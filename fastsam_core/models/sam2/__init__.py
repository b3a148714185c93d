"""Fast modules for sam2's SAM 2 / 2.1 models."""

from fastsam_core.models.sam2.image_encoder import FastSam2ImageEncoder
from fastsam_core.models.sam2.mask_decoder import FastSam2MaskDecoder

__all__ = ["FastSam2ImageEncoder", "FastSam2MaskDecoder"]
