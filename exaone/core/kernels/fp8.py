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
from exaone.core.kernels.backend import HAS_TRITON, check_weight, choose, flatten, same

FP8 = torch.float8_e4m3fn


def quantize_activations(x: torch.Tensor, scale: torch.Tensor | None = None, pre_quant_scale=None):
    """x [M, K] (times pre_quant_scale) -> (e4m3 [M, K], float32 scale: the given per-tensor one, or
    per token [M, 1]); a static scale on a GPU is one fused kernel."""
    if scale is not None and x.is_cuda and HAS_TRITON:
        from exaone.core.kernels import triton_ops

        return triton_ops.quantize_static(x, scale.float().reshape(1), pre_quant_scale), scale.float()
    if pre_quant_scale is not None:
        x = x * pre_quant_scale.to(x.dtype)
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


def concat_fp8(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """Packed linears reading one input (q, k, v; gate, up) -> one whose output is theirs side by side,
    exactly: each keeps its weight scale as per-row scales (the rowwise GEMM). None when their
    activation scales (or smoothing factors) differ: one quantized input cannot serve them all."""
    if not same(parts, "input_scale") or not same(parts, "pre_quant_scale"):
        return None
    out = {k: v for k, v in parts[0].items() if k not in ("weight", "weight_scale")}
    out["weight"] = torch.cat([p["weight"] for p in parts])
    out["weight_scale"] = torch.cat([p["weight_scale"].float().reshape(-1).expand(p["weight"].shape[0])
                                     for p in parts]).contiguous()  # fmt: skip
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
    pre_quant_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = dq(q(x * pre_quant_scale)) @ dq(W).T + bias, in x's dtype."""
    x2, lead = flatten(x)
    xq, x_scale = quantize_activations(x2, input_scale, pre_quant_scale)
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
