"""Batched, sync-free pipelines that keep the reference input and output formats."""
