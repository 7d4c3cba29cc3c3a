"""FP8 (e4m3) and INT8 KV cache: per-tensor scales as Model Optimizer exports them.

``k_scale`` / ``v_scale`` are amax / 448 (fp8; Model Optimizer raises them to at least 1.0 by default)
or amax / 127 (int8). Stored value = quantize(x / scale); read back as stored * scale.
"""

from __future__ import annotations

import torch

from exaone.core.errors import ExaoneError

KV_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def _kv_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in KV_DTYPES:
            raise ExaoneError(
                f"--kv_cache_dtype {dtype!r}: a quantized KV cache is one of {', '.join(KV_DTYPES)}"
            )
        return KV_DTYPES[dtype]
    if dtype not in KV_DTYPES.values():
        raise ExaoneError(f"KV cache dtype {dtype}: expected torch.float8_e4m3fn or torch.int8")
    return dtype


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | float, dtype: str | torch.dtype) -> torch.Tensor:
    """Keys or values -> fp8 e4m3 or int8, saturating at the format's range."""
    dtype = _kv_dtype(dtype)
    # a tensor divisor: CUDA divides by a Python number through its reciprocal (see backend.exact_div)
    y = x.float() / torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if dtype == torch.int8:
        return y.round().clamp(-128, 127).to(torch.int8)
    return y.clamp(-448.0, 448.0).to(dtype)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """Stored fp8/int8 KV -> ``dtype`` (the attention's compute dtype)."""
    return (q.float() * torch.as_tensor(scale, dtype=torch.float32, device=q.device)).to(dtype)
