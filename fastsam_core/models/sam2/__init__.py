"""Fast modules for sam2's SAM 2 / 2.1 models."""

from fastsam_core.models.sam2.image_encoder import FastSam2ImageEncoder

__all__ = ["FastSam2ImageEncoder"]
