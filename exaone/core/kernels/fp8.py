"""FP8 W8A8 (Model Optimizer ``FP8``): e4m3 weights and activations on cuBLASLt via ``torch._scaled_mm``.

Exported per linear: ``weight`` e4m3 [N, K], ``weight_scale`` (scalar; [N] for per-channel),
``input_scale`` (scalar, static). Activations are quantized as Model Optimizer does:
e4m3(clamp(x / input_scale, +-448)); with no input_scale, per token (amax / 448).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exaone.core import qmath
from exaone.core.errors import ExaoneError
from exaone.core.kernels.backend import check_weight, choose, flatten

FP8 = torch.float8_e4m3fn


def quantize_activations(x: torch.Tensor, scale: torch.Tensor | None = None):
    """x [M, K] -> (e4m3 [M, K], float32 scale: the given per-tensor one, or per token [M, 1])."""
    scale = qmath.token_scale(x, qmath.E4M3_MAX) if scale is None else scale.float()
    return qmath.quantize_fp8(x, scale), scale


def pack_fp8(
    weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Row-major [N, K] e4m3: its transpose is the column-major operand ``_scaled_mm`` needs."""
    check_weight("weight", weight, FP8, 2)
    n = weight.shape[0]
    if weight_scale.numel() not in (1, n):
        raise ExaoneError(f"weight_scale: expected a scalar or [{n}], got shape {tuple(weight_scale.shape)}")
    out = {"weight": weight.contiguous(), "weight_scale": weight_scale.float().reshape(-1).contiguous()}
    if input_scale is not None:
        out["input_scale"] = input_scale.float().reshape(()).contiguous()
    return out


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def scaled_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """e4m3 [M, K] x e4m3 [N, K]^T on cuBLASLt -> [M, N], per-tensor or per-row/per-channel scales."""
    m, n = xq.shape[0], weight.shape[0]
    xq_p = _pad_rows(xq, 16)
    if x_scale.numel() == 1 and w_scale.numel() == 1:
        y = torch._scaled_mm(
            xq_p, weight.t(), scale_a=x_scale.reshape(()), scale_b=w_scale.reshape(()), out_dtype=out_dtype
        )
    else:  # rowwise: [M, 1] x [1, N] float32 scales, bf16 output only
        sa = _pad_rows(x_scale.reshape(-1, 1).expand(m, 1).contiguous(), 16)
        sb = w_scale.reshape(1, -1).expand(1, n).contiguous()
        y = torch._scaled_mm(xq_p, weight.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16).to(out_dtype)
    return y[:m]


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y = dq(q(x)) @ dq(W).T + bias, in x's dtype."""
    x2, lead = flatten(x)
    xq, x_scale = quantize_activations(x2, input_scale)
    n, k = weight.shape
    if (
        choose(x, backend, cpu_ok=True) == "reference" or k % 16 or n % 16
    ):  # cuBLASLt fp8 needs multiples of 16
        w = weight.float() * weight_scale.float().reshape(-1, 1)
        y = ((xq.float() * x_scale) @ w.t()).to(x.dtype)
    else:
        y = scaled_mm(xq, x_scale, weight, weight_scale.float(), x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, n)
