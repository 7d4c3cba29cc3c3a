"""W4A16: int4 AWQ and int4 weight-only (Model Optimizer ``W4A16_AWQ``), 16-bit activations.

Model Optimizer exports ``weight`` uint8 [N/2, K] (byte [j, k] = row 2j in the low nibble, row 2j+1 in
the high nibble, two's-complement int4), ``weight_scale`` float32 [N, K/G] (amax/7 per group of G input
columns; G = K is per-channel) and, for AWQ, ``pre_quant_scale`` [K] that multiplies the activations.
Dequantized weight: int4 * weight_scale, in the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exaone.core import qmath
from exaone.core.errors import ExaoneError
from exaone.core.kernels.backend import check_weight, choose, flatten, same

PACK_K = 128


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (int, 0..15 or -8..7) -> the kernel layout uint8 [K/2, N] (see dequant_gemm)."""
    n, k = q.shape
    if k % PACK_K:
        raise ExaoneError(f"4-bit weight with in_features {k}: the kernel needs a multiple of {PACK_K}")
    codes = (q.to(torch.int16) & 0xF).to(torch.uint8).t().reshape(k // PACK_K, 2, PACK_K // 2, n)
    return (codes[:, 0] | (codes[:, 1] << 4)).reshape(k // 2, n).contiguous()


def unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """Kernel layout uint8 [K/2, N] -> 4-bit codes uint8 [N, K] (0..15)."""
    k2, n = qweight.shape
    chunks = qweight.reshape(k2 // (PACK_K // 2), 1, PACK_K // 2, n)
    codes = torch.cat([chunks & 0xF, chunks >> 4], dim=1)
    return codes.reshape(k2 * 2, n).t()


def pack_int4(
    weight: torch.Tensor, weight_scale: torch.Tensor, pre_quant_scale: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Model Optimizer's int4 tensors -> what ``w4a16_linear`` reads."""
    check_weight("weight", weight, torch.uint8, 2)
    n, k = weight.shape[0] * 2, weight.shape[1]
    if weight_scale.dim() == 1:
        weight_scale = weight_scale[:, None]
    if weight_scale.shape[0] != n or k % weight_scale.shape[1]:
        raise ExaoneError(f"weight_scale: shape {tuple(weight_scale.shape)} does not fit a [{n}, {k}] weight")
    out = {
        "qweight": pack_nibbles(qmath.unpack_int4_rows(weight)),
        "scales": weight_scale.float().t().contiguous(),
    }
    if pre_quant_scale is not None:
        out["pre_quant_scale"] = pre_quant_scale.contiguous()
    return out


def concat_int4(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """Side-by-side outputs: [K/2, N] nibbles and [K/G, N] scales concatenate along N, exactly; None
    when the AWQ smoothing factors differ (one scaled input cannot serve them all)."""
    if not same(parts, "pre_quant_scale") or len({p["scales"].shape[0] for p in parts}) != 1:
        return None
    out = {"qweight": torch.cat([p["qweight"] for p in parts], 1).contiguous(),
           "scales": torch.cat([p["scales"] for p in parts], 1).contiguous()}  # fmt: skip
    if "pre_quant_scale" in parts[0]:
        out["pre_quant_scale"] = parts[0]["pre_quant_scale"]
    return out


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Kernel layout -> dense [N, K] weight in ``dtype``."""
    codes = unpack_nibbles(qweight).to(torch.int8)
    q = torch.where(codes > 7, codes - 16, codes).float()
    group = q.shape[1] // scales.shape[0]
    return (q * scales.t().repeat_interleave(group, dim=1)).to(dtype)


# torch's tinygemm (aten._weight_int4pack_mm: bf16 activations, int4 weights, bf16 scales) streams the
# weights of a decode step near bandwidth where our Triton kernel does not (docs/kernels.md); it is
# poor at large M, so it takes only the small batches. Its tensors are made from ours on the first
# call and kept on the weight tensor (a copy of the int4 bytes; the Triton layout stays for larger
# batches), checked once against the reference, and used only if they agree.
TINYGEMM_MAX_M = 16
_TINY_STATE = {"ok": None}


def _tinygemm(qweight: torch.Tensor, scales: torch.Tensor, group: int):
    if getattr(qweight, "_tinygemm", None) is None:
        codes = unpack_nibbles(qweight).to(torch.int16)  # [N, K] two's-complement nibbles
        w_int = (torch.where(codes > 7, codes - 16, codes) + 8).to(torch.uint8)  # (q + 8) in 0..15
        packed = (w_int[:, ::2] << 4 | w_int[:, 1::2]).contiguous()
        w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        # dequantized as (w_int - 8) * scale + zero: zero 0 gives our symmetric q * scale
        sz = torch.stack((scales, torch.zeros_like(scales)), dim=-1).to(torch.bfloat16).contiguous()
        qweight._tinygemm = (w, sz, group)
    return qweight._tinygemm


def _tinygemm_usable(x2, qweight, scales, group) -> bool:
    if _TINY_STATE["ok"] is None:  # once: tinygemm against the reference on this GPU and torch
        try:
            w, sz, _ = _tinygemm(qweight, scales, group)
            probe = torch.randn(3, x2.shape[1], device=x2.device, dtype=torch.bfloat16)
            got = torch.ops.aten._weight_int4pack_mm(probe, w, group, sz).float()
            want = F.linear(probe, dequantize(qweight, scales, torch.bfloat16)).float()
            _TINY_STATE["ok"] = bool(((got - want).norm() / want.norm()) < 1e-2)
        except RuntimeError:
            _TINY_STATE["ok"] = False
    return _TINY_STATE["ok"]


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    pre_quant_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    config: dict | None = None,
) -> torch.Tensor:
    """y = (x * pre_quant_scale) @ dequant(W).T + bias, in x's dtype."""
    pqs = pre_quant_scale.to(x.dtype) if pre_quant_scale is not None else None
    if choose(x, backend) == "reference":
        xs = x * pqs if pqs is not None else x
        return F.linear(xs, dequantize(qweight, scales, x.dtype), bias)
    from exaone.core.kernels.dequant_gemm import INT4, dequant_gemm

    x2, lead = flatten(x)
    group = x2.shape[1] // scales.shape[0]
    tiny = (config is None and x2.is_cuda and x2.dtype == torch.bfloat16 and x2.shape[0] <= TINYGEMM_MAX_M
            and group in (32, 64, 128, 256) and _tinygemm_usable(x2, qweight, scales, group))  # fmt: skip
    if tiny:
        w, sz, g = _tinygemm(qweight, scales, group)
        y = torch.ops.aten._weight_int4pack_mm(x2 * pqs if pqs is not None else x2, w, g, sz)
        y = y + bias if bias is not None else y
    else:
        y = dequant_gemm(x2, qweight, scales, INT4, group, pre_quant_scale=pqs, bias=bias, config=config)
    return y.reshape(*lead, -1)
