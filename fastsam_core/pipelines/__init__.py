"""Batched, sync-free pipelines that keep the reference input and output formats."""

from fastsam_core.pipelines.predict import predict_batch

__all__ = ["predict_batch"]
