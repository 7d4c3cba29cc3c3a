"""NVFP4 (Model Optimizer ``NVFP4``) on Hopper, which has no FP4 tensor cores.

Exported per linear: ``weight`` uint8 [N, K/2] (e2m1 codes, input column 2i in the low nibble, 2i+1 in
the high one), ``weight_scale`` e4m3 [N, K/16] (one per block of 16 inputs), ``weight_scale_2`` (per
tensor) and ``input_scale`` (= activation amax / (6 * 448)). Weight = e2m1 * weight_scale * weight_scale_2.

Activations are fake-quantized to NVFP4 exactly as Model Optimizer's Hopper kernel does during
calibration (``fp4_fake_quant_block``): per block of 16, scale = e4m3(min(amax / (6 * input_scale), 448))
* input_scale (blocks whose scale falls under 1e-5 use 1.0), values rounded to the nearest e2m1
magnitude, ties to even. The GEMM then dequantizes the 4-bit weights in registers (dequant_gemm.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exaone.core import qmath
from exaone.core.errors import ExaoneError
from exaone.core.kernels.backend import check_weight, choose, flatten
from exaone.core.kernels.int4 import pack_nibbles, unpack_nibbles

BLOCK = qmath.NVFP4_BLOCK


def pack_nvfp4(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    input_scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Model Optimizer's NVFP4 tensors -> what ``nvfp4_linear`` reads (4-bit codes in the int4 layout)."""
    check_weight("weight", weight, torch.uint8, 2)
    check_weight("weight_scale", weight_scale, torch.float8_e4m3fn, 2)
    n, k = weight.shape[0], weight.shape[1] * 2
    if tuple(weight_scale.shape) != (n, k // BLOCK):
        raise ExaoneError(
            f"weight_scale: expected shape ({n}, {k // BLOCK}), got {tuple(weight_scale.shape)}"
        )
    codes = torch.stack([weight & 0xF, weight >> 4], dim=-1).reshape(n, k)
    out = {
        "qweight": pack_nibbles(codes),
        "scales": weight_scale.t().contiguous(),
        "weight_scale_2": weight_scale_2.float().reshape(()),
    }
    if input_scale is not None:
        out["input_scale"] = input_scale.float().reshape(())
    return out


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, weight_scale_2: torch.Tensor, dtype
) -> torch.Tensor:
    """Kernel layout -> dense [N, K] weight in ``dtype``."""
    codes = unpack_nibbles(qweight).long()
    vals = qmath.E2M1_VALUES.to(qweight.device)[codes]
    block_scale = scales.t().float().repeat_interleave(BLOCK, dim=1)
    return (vals * block_scale * weight_scale_2.float()).to(dtype)


def nvfp4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    weight_scale_2: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    config: dict | None = None,
) -> torch.Tensor:
    """y = fq(x) @ dequant(W).T + bias (fq: NVFP4 fake quant, skipped with no input_scale: W4A16)."""
    if choose(x, backend) == "reference":
        xq = qmath.fake_quant_nvfp4(x, input_scale) if input_scale is not None else x
        return F.linear(xq, dequantize(qweight, scales, weight_scale_2, x.dtype), bias)
    from exaone.core.kernels.dequant_gemm import NVFP4, dequant_gemm
    from exaone.core.kernels.nvfp4_act import fake_quant_nvfp4_triton

    x2, lead = flatten(x)
    if input_scale is not None:
        if x2.shape[1] % BLOCK:
            raise ExaoneError(f"nvfp4 activations: in_features {x2.shape[1]} is not a multiple of {BLOCK}")
        x2 = fake_quant_nvfp4_triton(x2, input_scale)
    y = dequant_gemm(
        x2,
        qweight,
        scales.view(torch.uint8),
        NVFP4,
        BLOCK,
        weight_scale_2.float().reshape(1),
        bias=bias,
        config=config,
    )
    return y.reshape(*lead, -1)
