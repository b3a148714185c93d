"""Batched pipelines that keep the reference input and output formats (predict_batch has no
host-device sync; the mask generators synchronize only in their filters)."""

from fastsam_core.pipelines.amg import FastAutomaticMaskGenerator, FastSam2AutomaticMaskGenerator
from fastsam_core.pipelines.predict import predict_batch
from fastsam_core.pipelines.video import FastSam2VideoPredictor

__all__ = ["FastAutomaticMaskGenerator", "FastSam2AutomaticMaskGenerator",
           "FastSam2VideoPredictor", "predict_batch"]
