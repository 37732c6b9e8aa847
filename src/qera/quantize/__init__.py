"""Quantizing a model: the per-layer step, the one-shot and sequential drivers, the pipeline that picks one, placement, streaming and torchrun."""
