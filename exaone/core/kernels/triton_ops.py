"""Triton kernels for the decode step's small operations, each one launch instead of a chain of torch ops.

- `_rms_norm`: RMSNorm, optionally fused with the residual add before it (pre-norm blocks) or after
  it (post-norm blocks).
- `_silu_mul`: silu(gate) * up from the fused gate/up projection.
- `_qk_rope_store`: per-head q/k RMSNorm (EXAONE-4, K-EXAONE), RoPE (skipped on NoPE layers), and
  the store of k and v into the paged KV cache (quantized to fp8/int8 with one scale per vector).

Rounding follows the torch reference in ops.py step by step (values rounded to the activation dtype
wherever the reference holds them in it), so bf16 results agree to the last bit in most elements.
Under TRITON_INTERPRET=1 they run on CPU tensors (how the CPU tests check them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from exaone.core.kernels.backend import triton_interpreting
from exaone.core.kernels.dequant_gemm import _cast
from exaone.core.kernels.nvfp4_act import _round_e4m3

NORM, ADD_NORM, NORM_ADD = 0, 1, 2


@triton.jit
def _rms_norm(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, N, eps, sx, sr, sy, ss, MODE: tl.constexpr,
              BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dtype = y_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 1:  # s = x + residual (held in the activation dtype), y = norm(s)
        r = tl.load(r_ptr + row * sr + offs, mask=mask, other=0.0).to(tl.float32)
        s = _cast(x + r, dtype, INTERPRETED)
        tl.store(s_ptr + row * ss + offs, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _cast(x * rstd, dtype, INTERPRETED).to(tl.float32) * w
    if MODE == 2:  # y = residual + norm(x)
        r = tl.load(r_ptr + row * sr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _cast(y, dtype, INTERPRETED).to(tl.float32) + r
    tl.store(y_ptr + row * sy + offs, _cast(y, dtype, INTERPRETED), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual=None, mode: int = NORM):
    """x, residual [T, N] (rows may be strided); returns y, or (y, x + residual) with ADD_NORM."""
    t, n = x.shape
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if mode == ADD_NORM else y
    r = residual if residual is not None else x
    if t:
        _rms_norm[(t,)](
            x, r, weight, y, s, n, eps, x.stride(0), r.stride(0), y.stride(0), s.stride(0),
            MODE=mode, BLOCK=triton.next_power_of_2(n), INTERPRETED=triton_interpreting(),
            num_warps=4 if n <= 4096 else 8,
        )  # fmt: skip
    return (y, s) if mode == ADD_NORM else y


@triton.jit
def _silu_mul(x_ptr, y_ptr, N, sx, sy, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dtype = y_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * sx + N + offs, mask=mask, other=0.0).to(tl.float32)
    a = _cast(g / (1.0 + tl.exp(-g)), dtype, INTERPRETED).to(tl.float32)  # F.silu, rounded as torch holds it
    tl.store(y_ptr + row * sy + offs, _cast(a * u, dtype, INTERPRETED), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2N] = [gate | up] -> silu(gate) * up [T, N]."""
    t, n2 = x.shape
    n = n2 // 2
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    block = 1024
    if t:
        _silu_mul[(t, triton.cdiv(n, block))](
            x, y, n, x.stride(0), y.stride(0), BLOCK=block, INTERPRETED=triton_interpreting()
        )
    return y


@triton.jit
def _round_half_even(x):
    """torch.round: to the nearest integer, ties to even."""
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _store_kv(c_ptr, s_ptr, dst, scale_at, x, offs, mask, qmax, QUANT: tl.constexpr,
              INTERPRETED: tl.constexpr):  # fmt: skip
    """One vector (the rows of a head) into a cache pool, quantized with its own absmax scale."""
    if QUANT == 0:
        tl.store(c_ptr + dst + offs, _cast(x, c_ptr.dtype.element_ty, INTERPRETED), mask=mask)
    else:
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-8) / qmax
        tl.store(s_ptr + scale_at, scale)
        y = tl.clamp(tl.div_rn(x, scale), -qmax, qmax)
        if QUANT == 1:
            tl.store(c_ptr + dst + offs, _round_half_even(y).to(tl.int8), mask=mask)
        else:  # fp8 e4m3, stored as its bytes
            if INTERPRETED:  # the interpreter's float32 -> e4m3 conversion does not round to nearest
                r = _round_e4m3(tl.abs(y))
                y = tl.where(y < 0, -r, r)
            tl.store(c_ptr + dst + offs, y.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mask)


@triton.jit
def _qk_rope_store(
    q_ptr, k_ptr, v_ptr, qo_ptr, pos_ptr, cs_ptr, qw_ptr, kw_ptr, slot_ptr,
    kc_ptr, vc_ptr, ks_ptr, vs_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, eps, qmax,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    QK_NORM: tl.constexpr, ROPE: tl.constexpr, QUANT: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """One program per (token, head): heads 0..H-1 are q heads, H..H+HKV-1 the kv heads."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dtype = qo_ptr.dtype.element_ty
    half = D // 2
    j = tl.arange(0, BD)
    mj = j < D
    if h < H:
        base = q_ptr + t * sq_t + h * sq_h
        w_ptr = qw_ptr
    else:
        base = k_ptr + t * sk_t + (h - H) * sk_h
        w_ptr = kw_ptr
    x = tl.load(base + j, mask=mj, other=0.0).to(tl.float32)
    if QK_NORM:
        rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(w_ptr + j, mask=mj, other=0.0).to(tl.float32)
        x = _cast(_cast(x * rstd, dtype, INTERPRETED).to(tl.float32) * w, dtype, INTERPRETED).to(tl.float32)
    if ROPE:  # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
        p = tl.maximum(tl.load(pos_ptr + t), 0).to(tl.int64)
        f = tl.where(j < half, j, j - half)
        cos = tl.load(cs_ptr + p * D + f, mask=mj, other=0.0)
        sin = tl.load(cs_ptr + p * D + half + f, mask=mj, other=0.0)
        partner = tl.load(base + tl.where(j < half, j + half, j - half), mask=mj, other=0.0).to(tl.float32)
        if QK_NORM:  # the partner element through the same norm
            pw = tl.load(w_ptr + tl.where(j < half, j + half, j - half), mask=mj, other=0.0).to(tl.float32)
            partner = _cast(_cast(partner * rstd, dtype, INTERPRETED).to(tl.float32) * pw, dtype,
                            INTERPRETED).to(tl.float32)  # fmt: skip
        x = x * cos + tl.where(j < half, -partner, partner) * sin
    x = _cast(x, dtype, INTERPRETED).to(tl.float32)
    if h < H:
        tl.store(qo_ptr + (t * H + h) * D + j, x.to(dtype), mask=mj)
    else:
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            kv = h - H
            dst = (slot * HKV + kv) * D
            _store_kv(kc_ptr, ks_ptr, dst, slot * HKV + kv, x, j, mj, qmax, QUANT, INTERPRETED)
            v = tl.load(v_ptr + t * sv_t + kv * sv_h + j, mask=mj, other=0.0).to(tl.float32)
            _store_kv(vc_ptr, vs_ptr, dst, slot * HKV + kv, v, j, mj, qmax, QUANT, INTERPRETED)


def qk_rope_store(q, k, v, positions, cos_sin, q_weight, k_weight, eps, rope, k_pool, v_pool, k_scale,
                  v_scale, slots) -> torch.Tensor:  # fmt: skip
    """q [T, H, D], k, v [T, Hkv, D] (strided views of the qkv projection) -> q normed and rotated
    [T, H, D]; k (normed, rotated) and v stored at slots [T] of the pools (slot -1: not stored)."""
    t, h, d = q.shape
    hkv = k.shape[1]
    out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    quant = {torch.int8: 1, torch.float8_e4m3fn: 2}.get(k_pool.dtype, 0)
    kc, vc = (k_pool.view(torch.uint8), v_pool.view(torch.uint8)) if quant == 2 else (k_pool, v_pool)
    qk_norm = q_weight is not None
    if t:
        _qk_rope_store[(t, h + hkv)](
            q, k, v, out, positions, cos_sin if rope else q,
            q_weight if qk_norm else q, k_weight if qk_norm else q, slots, kc, vc,
            k_scale if quant else q, v_scale if quant else q,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), eps,
            448.0 if quant == 2 else 127.0,
            H=h, HKV=hkv, D=d, BD=triton.next_power_of_2(d), QK_NORM=qk_norm, ROPE=rope, QUANT=quant,
            INTERPRETED=triton_interpreting(),
        )  # fmt: skip
    return out


@triton.jit
def _quantize_static(x_ptr, pqs_ptr, s_ptr, y_ptr, N, sx, HAS_PQS: tl.constexpr, INT8: tl.constexpr,
                     BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PQS:  # the smoothing product, held in x's dtype as the reference holds it
        x = _cast(x * tl.load(pqs_ptr + offs, mask=mask, other=0.0).to(tl.float32), x_ptr.dtype.element_ty,
                  INTERPRETED).to(tl.float32)  # fmt: skip
    y = tl.div_rn(x, tl.load(s_ptr).to(tl.float32))
    if INT8:
        tl.store(y_ptr + row * N + offs, _round_half_even(tl.clamp(y, -128.0, 127.0)).to(tl.int8), mask=mask)
    else:
        y = tl.clamp(y, -448.0, 448.0)
        if INTERPRETED:  # the interpreter's float32 -> e4m3 conversion does not round to nearest
            r = _round_e4m3(tl.abs(y))
            y = tl.where(y < 0, -r, r)
        tl.store(y_ptr + row * N + offs, y.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mask)


def quantize_static(x: torch.Tensor, scale: torch.Tensor, pre_quant_scale=None, int8: bool = False):
    """x [M, K] (times pre_quant_scale) / scale -> int8 (rounded) or e4m3, saturating, in one launch."""
    m, k = x.shape
    y = torch.empty((m, k), dtype=torch.int8 if int8 else torch.uint8, device=x.device)
    block = 1024
    if m:
        _quantize_static[(m, triton.cdiv(k, block))](
            x, pre_quant_scale if pre_quant_scale is not None else x, scale, y, k, x.stride(0),
            HAS_PQS=pre_quant_scale is not None, INT8=int8, BLOCK=block, INTERPRETED=triton_interpreting(),
        )  # fmt: skip
    return y if int8 else y.view(torch.float8_e4m3fn)
