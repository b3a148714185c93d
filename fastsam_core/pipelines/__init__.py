"""Batched, sync-free pipelines that keep the reference input and output formats."""

from fastsam_core.pipelines.amg import FastAutomaticMaskGenerator, FastSam2AutomaticMaskGenerator
from fastsam_core.pipelines.predict import predict_batch

__all__ = ["FastAutomaticMaskGenerator", "FastSam2AutomaticMaskGenerator", "predict_batch"]
