"""Triton NVFP4 activation fake quantization (one launch instead of a chain of torch ops).

Same math as ``nvfp4.fake_quant_nvfp4`` (Model Optimizer's Hopper calibration kernel): per block of
16 along the last dimension, scale = e4m3(min(amax / (6 * s), 448)) * s with s = input_scale, blocks
whose scale falls under 1e-5 use 1.0, values rounded to the nearest e2m1 magnitude, ties to even.
The e4m3 rounding is done on the float32 bits so the CPU interpreter computes it the same way, and
divisions are IEEE-rounded (``div_rn``; Triton's plain ``/`` is approximate on the GPU), as torch's are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from exaone.core.kernels.backend import triton_interpreting
from exaone.core.kernels.dequant_gemm import _cast

BLOCK = 16


@triton.jit
def _round_e4m3(v):
    """Non-negative float32 (<= 448) -> the nearest e4m3 value, ties to even, as float32."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    subnormal = (v + 16384.0) - 16384.0  # float32 ulp at 2^14 is 2^-9, e4m3's subnormal step
    return tl.where(v < 0.015625, subnormal, normal)


@triton.jit
def _round_e2m1(a):
    return tl.where(
        a <= 0.25, 0.0,
        tl.where(a < 0.75, 0.5,
        tl.where(a <= 1.25, 1.0,
        tl.where(a < 1.75, 1.5,
        tl.where(a <= 2.5, 2.0,
        tl.where(a < 3.5, 3.0,
        tl.where(a <= 5.0, 4.0, 6.0)))))))  # fmt: skip


@triton.jit
def _fake_quant_kernel(x_ptr, y_ptr, s_ptr, M, K, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCKS: tl.constexpr):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCKS * 16 + tl.arange(0, BLOCKS * 16)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    ptrs = offs_m[:, None] * K + offs_k[None, :]
    x = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    gs = tl.load(s_ptr).to(tl.float32)
    gs = tl.where(gs > 0.0, gs, 1e-12)
    xb = tl.reshape(x, (BLOCK_M, BLOCKS, 16))
    amax = tl.max(tl.abs(xb), axis=2, keep_dims=True)
    scale = _round_e4m3(tl.minimum(tl.div_rn(amax, 6.0 * gs), 448.0)) * gs
    scale = tl.where(scale >= 1e-5, scale, 1.0)
    q = _round_e2m1(tl.div_rn(tl.abs(xb), scale)) * scale
    q = tl.where(xb >= 0, q, -q)
    tl.store(
        y_ptr + ptrs,
        _cast(tl.reshape(q, (BLOCK_M, BLOCKS * 16)), y_ptr.dtype.element_ty, INTERPRETED),
        mask=mask,
    )


def fake_quant_nvfp4_triton(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] contiguous (K a multiple of 16) -> its NVFP4 values in x's dtype."""
    m, k = x.shape
    y = torch.empty_like(x)
    block_m, blocks = 16, 8
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, blocks * BLOCK))
    _fake_quant_kernel[grid](
        x, y, input_scale.float().reshape(1), m, k,
        INTERPRETED=triton_interpreting(), BLOCK_M=block_m, BLOCKS=blocks,
    )  # fmt: skip
    return y
