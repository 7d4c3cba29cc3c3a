"""W4A8 AWQ (Model Optimizer ``W4A8_AWQ``): 4-bit weights, fp8 activations.

Exported per linear: the int4 AWQ tensors (``weight`` uint8 [N/2, K], ``weight_scale`` [N, K/128],
``pre_quant_scale``) plus ``weight_scale_2`` (per tensor, amax / 448) and ``input_scale`` (fp8, static).
Model Optimizer's weight quantizer is int4 per group followed by fp8 per tensor, so the weight it
computes with is e4m3(dtype(int4 * weight_scale) / weight_scale_2) * weight_scale_2 (checked against its
fake quantizer, see tests/test_kernels.py).

Kernel choice: ``pack_w4a8`` computes those e4m3 weights once at build time and the runtime is the
FP8 W8A8 path (cuBLASLt ``torch._scaled_mm``). That is exactly the checkpoint's math, uses the FP8
tensor cores at full rate, and needs no new kernel; the price is 8 bits per weight in GPU memory
instead of 4 (the checkpoint on disk stays 4-bit). A Triton kernel unpacking int4 to fp8 in registers
would halve decode-time weight traffic and is the next step if decode speed for this format matters.
"""

from __future__ import annotations

import torch

from exaone.core import qmath
from exaone.core.kernels.backend import check_weight
from exaone.core.kernels.fp8 import fp8_linear


def pack_w4a8(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    input_scale: torch.Tensor,
    pre_quant_scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """Model Optimizer's W4A8 tensors -> fp8 weights for ``w4a8_linear`` (``dtype``: the model's)."""
    check_weight("weight", weight, torch.uint8, 2)
    w = qmath.dequantize_int4(weight, weight_scale).to(dtype)  # modelopt's int4 step yields the model dtype
    s2 = weight_scale_2.float().reshape(())
    out = {
        "weight": qmath.quantize_fp8(w, s2).contiguous(),
        "weight_scale": s2.reshape(1),
        "input_scale": input_scale.float().reshape(()),
    }
    if pre_quant_scale is not None:
        out["pre_quant_scale"] = pre_quant_scale.contiguous()
    return out


def w4a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    pre_quant_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y = fp8(x * pre_quant_scale) @ W.T + bias with the packed fp8 weight, in x's dtype."""
    return fp8_linear(x, weight, weight_scale, input_scale, bias, backend, pre_quant_scale=pre_quant_scale)
