"""Quantization through NVIDIA Model Optimizer (see issue 4)."""
