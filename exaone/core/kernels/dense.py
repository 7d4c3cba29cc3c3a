"""bf16/fp16 linear: cuBLAS through F.linear on the GPU, the same call on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias, weight [N, K] in x's dtype."""
    return F.linear(x, weight, bias)
