"""W8A16: int8 weight-only (Model Optimizer ``W8A16``): ``weight`` int8 [N, K], ``weight_scale`` [N]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exaone.core.kernels.backend import check_weight, choose, flatten


def pack_int8_wo(weight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Transposed to [K, N] so the kernel's weight tiles are read along contiguous output columns."""
    check_weight("weight", weight, torch.int8, 2)
    return {"qweight": weight.t().contiguous(), "scales": weight_scale.float().reshape(1, -1).contiguous()}


def concat_int8_wo(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Side-by-side outputs: [K, N] weights and [1, N] scales concatenate along N, exactly."""
    return {"qweight": torch.cat([p["qweight"] for p in parts], 1).contiguous(),
            "scales": torch.cat([p["scales"] for p in parts], 1).contiguous()}  # fmt: skip


def w8a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    config: dict | None = None,
) -> torch.Tensor:
    """y = x @ (int8 * weight_scale).T + bias, in x's dtype."""
    path = choose(x, backend)
    k = qweight.shape[0]
    block_k = 128 if k % 128 == 0 else 64
    if path == "reference" or k % block_k:  # odd widths: dequantize + cuBLAS, still correct
        w = (qweight.t().float() * scales.reshape(-1, 1)).to(x.dtype)
        return F.linear(x, w, bias)
    from exaone.core.kernels.dequant_gemm import INT8, dequant_gemm

    x2, lead = flatten(x)
    y = dequant_gemm(x2, qweight, scales, INT8, k, bias=bias, config=config, block_k=block_k)
    return y.reshape(*lead, -1)
