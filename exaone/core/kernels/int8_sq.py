"""INT8 SmoothQuant (Model Optimizer ``W8A8_SQ_PER_CHANNEL``) on cuBLAS ``torch._int_mm``.

Exported per linear: ``weight`` int8 [N, K], ``weight_scale`` float32 [N] (per output channel),
``input_scale`` scalar (static, per tensor) and ``pre_quant_scale`` [K] (the smoothing factors, applied
to the activations). Activations: int8(clamp(round(x * pre_quant_scale / input_scale), -128, 127)),
as Model Optimizer's fake quantizer does; with no input_scale, per token (amax / 127).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exaone.core import qmath
from exaone.core.errors import ExaoneError
from exaone.core.kernels.backend import HAS_TRITON, check_weight, choose, flatten, same


def quantize_activations(x: torch.Tensor, scale: torch.Tensor | None = None, pre_quant_scale=None):
    """x [M, K] (times pre_quant_scale) -> (int8 [M, K], float32 scale: the given per-tensor one, or
    per token [M, 1]); a static scale on a GPU is one fused kernel."""
    if scale is not None and x.is_cuda and HAS_TRITON:
        from exaone.core.kernels import triton_ops

        xq = triton_ops.quantize_static(x, scale.float().reshape(1), pre_quant_scale, int8=True)
        return xq, scale.float()
    if pre_quant_scale is not None:
        x = x * pre_quant_scale.to(x.dtype)
    scale = qmath.token_scale(x, qmath.INT8_MAX) if scale is None else scale.float()
    return qmath.quantize_int8(x, scale), scale


def pack_int8_sq(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    pre_quant_scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Row-major [N, K] int8: its transpose is the column-major operand cuBLAS int8 GEMM wants."""
    check_weight("weight", weight, torch.int8, 2)
    n = weight.shape[0]
    if weight_scale.numel() not in (1, n):
        raise ExaoneError(f"weight_scale: expected a scalar or [{n}], got shape {tuple(weight_scale.shape)}")
    out = {
        "weight": weight.contiguous(),
        "weight_scale": weight_scale.float().reshape(-1).expand(n).contiguous(),
    }
    if input_scale is not None:
        out["input_scale"] = input_scale.float().reshape(()).contiguous()
    if pre_quant_scale is not None:
        out["pre_quant_scale"] = pre_quant_scale.contiguous()
    return out


def concat_int8_sq(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """Side-by-side outputs (per-row scales concatenate exactly); None when activation scales or
    smoothing factors differ."""
    if not same(parts, "input_scale") or not same(parts, "pre_quant_scale"):
        return None
    out = dict(parts[0])
    out["weight"] = torch.cat([p["weight"] for p in parts])
    out["weight_scale"] = torch.cat([p["weight_scale"] for p in parts])
    return out


def int_mm(xq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> int32 [M, N] on cuBLAS; rows padded to _int_mm's M > 16, M % 8."""
    m = xq.shape[0]
    rows = max(32, -(-m // 8) * 8)
    xq_p = F.pad(xq, (0, 0, 0, rows - m)) if rows != m else xq
    return torch._int_mm(xq_p, weight.t())[:m]


def int8_sq_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    pre_quant_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y = (q(x * s) @ Wq.T) * input_scale * weight_scale + bias, in x's dtype."""
    x2, lead = flatten(x)
    xq, x_scale = quantize_activations(x2, input_scale, pre_quant_scale)
    n, k = weight.shape
    if choose(x, backend, cpu_ok=True) == "reference" or k % 8 or n % 8:  # _int_mm needs K, N multiples of 8
        acc = (xq.double() @ weight.double().t()).float()  # exact: int8 products summed in float64
    else:
        acc = int_mm(xq, weight).float()
    y = (acc * (x_scale * weight_scale.float().reshape(1, -1))).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, n)
