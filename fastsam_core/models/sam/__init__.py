"""Fast modules for segment_anything's SAM."""

from fastsam_core.models.sam.image_encoder import FastImageEncoderViT

__all__ = ["FastImageEncoderViT"]
