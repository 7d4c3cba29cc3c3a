"""fp8 (e4m3) and int8 KV cache storage: one absmax scale per stored token and KV head.

A scale per (token, head) needs no calibration (an engine can be built from any checkpoint) and
costs 4 bytes per head_dim values. Keys and values of the chunk being computed are used at full
precision in that step; what is read back from the cache is dequantized to the compute dtype.
"""

from __future__ import annotations

import torch

KV_DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp8": torch.float8_e4m3fn,
    "int8": torch.int8,
}
QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QMAX


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (stored [..., D] in dtype, scale [...] float32) with x ~= stored * scale."""
    qmax = QMAX[dtype]
    xf = x.float()
    scale = xf.abs().amax(-1).clamp(min=1e-8) / qmax
    q = (xf / scale[..., None]).clamp(-qmax, qmax)
    if dtype == torch.int8:
        q = q.round()
    return q.to(dtype), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)
