"""Triton GEMM that dequantizes 4- or 8-bit weights in registers: y = x @ dequant(W).T (+ bias).

Hopper has no tensor-core instruction for int4 or fp4 operands with 16-bit activations, so the
weights are unpacked to the activation dtype tile by tile and fed to a 16-bit MMA; only the
compressed bytes cross the memory bus, which is what matters for decode (memory bound).

Weight layouts (made by the ``pack_*`` functions of int4.py, nvfp4.py, int8_wo.py):
- 4-bit kinds: ``qweight`` uint8 [K/2, N]. Each chunk of 128 input rows k0..k0+127 is stored as 64
  byte rows; byte row j holds k0+j in its low nibble and k0+64+j in its high nibble, so a K tile
  splits into two half tiles with no interleaving, each one plain ``tl.dot``.
- int8: ``qweight`` int8 [K, N].
Scales are [K/G, N] (one row per group of G input rows); nvfp4 scales are the raw e4m3 bytes of the
[K/16, N] block scales, decoded in the kernel, times the per-tensor ``weight_scale_2``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from exaone.core.kernels.backend import triton_interpreting

INT4, NVFP4, INT8 = 0, 1, 2
PACK_K = 128  # input rows per packed 4-bit chunk (and the kernel's K tile)
DEQUANT_MM_MIN_M = 256  # rows from which dequantize + cuBLAS replaces the fused kernel (bench/kernels.py)


@triton.jit
def _cast(v, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 -> dtype, rounding to nearest even. The CPU interpreter truncates float32 -> bf16, so
    there the rounding is done on the bits first (the GPU's conversion already rounds to nearest)."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _dot(a, b, acc, INTERPRETED: tl.constexpr):
    if INTERPRETED:  # the CPU interpreter gets bf16 tl.dot wrong; the rounded operands go in as fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _e4m3_to_f32(b):
    """Raw e4m3 bytes (as int32, non-negative scales) -> float32, exactly."""
    e = (b >> 3) & 0xF
    m = b & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)


@triton.jit
def _e2m1_to_f32(n):
    """FP4 e2m1 nibbles (int32) -> float32: magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 and a sign bit."""
    e = (n >> 1) & 0x3
    m = n & 0x1
    normal = (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
    return tl.where((n & 0x8) != 0, -mag, mag)


@triton.jit
def _scales(
    s_ptr,
    row0,
    rows,
    offs_n,
    n_mask,
    N,
    G: tl.constexpr,
    ws2,
    KIND: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    H: tl.constexpr,
):
    """Float32 scales for a tile of H weight rows starting at row0 ([1, BN] or [H, BN])."""
    if SCALE_MODE == 0:  # ROW: the whole tile lies in one group
        s = tl.load(s_ptr + (row0 // G) * N + offs_n, mask=n_mask, other=0)[None, :]
    elif SCALE_MODE == 1:  # SUB: H // G whole groups; load one row each and repeat it G times
        sub = row0 // G + tl.arange(0, H // G)
        s = tl.load(s_ptr + sub[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    else:  # GATHER: any group size, one scale load per weight row
        s = tl.load(s_ptr + (rows // G)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    if KIND == 1:
        s = _e4m3_to_f32(s.to(tl.int32)) * ws2
    if SCALE_MODE == 1:
        s = tl.reshape(tl.broadcast_to(s[:, None, :], (H // G, G, s.shape[1])), (H, s.shape[1]))
    return s


@triton.jit
def _dequant_half(
    b,
    row0,
    rows,
    offs_n,
    n_mask,
    s_ptr,
    N,
    G: tl.constexpr,
    ws2,
    KIND: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    H: tl.constexpr,
    HIGH: tl.constexpr,
):
    """One half of a packed 4-bit tile [H, BN] (low or high nibbles) -> float32 weights."""
    if HIGH:
        nib = (b >> 4) & 0xF
    else:
        nib = b & 0xF
    if KIND == 0:
        val = ((nib ^ 8) - 8).to(tl.float32)
    else:
        val = _e2m1_to_f32(nib)
    return val * _scales(s_ptr, row0, rows, offs_n, n_mask, N, G, ws2, KIND, SCALE_MODE, H)


@triton.jit
def _dequant_gemm_kernel(
    x_ptr, w_ptr, s_ptr, pqs_ptr, bias_ptr, y_ptr,
    M, N, K, ws2_ptr, stride_xm, stride_ym,
    G: tl.constexpr, KIND: tl.constexpr, SCALE_MODE: tl.constexpr,
    HAS_PQS: tl.constexpr, HAS_BIAS: tl.constexpr,
    INTERPRETED: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Split-K (small M): program pid_k takes an equal share of the K chunks and adds into fp32 y.
    pid_k = tl.program_id(2)
    chunks = K // BLOCK_K
    per_split = tl.cdiv(chunks, SPLIT_K)
    k_begin = pid_k * per_split * BLOCK_K
    k_end = tl.minimum(k_begin + per_split * BLOCK_K, K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # nvfp4's per-tensor weight_scale_2 is read on the device (no host sync, CUDA-graph safe)
    if KIND == 1:
        ws2 = tl.load(ws2_ptr).to(tl.float32)
    else:
        ws2 = 1.0
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if KIND == 2:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None], other=0.0)
            if HAS_PQS:
                x = _cast(
                    x.to(tl.float32) * tl.load(pqs_ptr + ks).to(tl.float32)[None, :], dtype, INTERPRETED
                )
            q = tl.load(w_ptr + ks[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            s = _scales(s_ptr, k0, ks, offs_n, n_mask, N, G, ws2, KIND, SCALE_MODE, BLOCK_K)
            w = _cast(q.to(tl.float32) * s, dtype, INTERPRETED)
            acc = _dot(x, w, acc, INTERPRETED)
    else:
        offs_h = tl.arange(0, BLOCK_K // 2)
        for k0 in range(k_begin, k_end, BLOCK_K):
            lo_k = k0 + offs_h
            hi_k = lo_k + BLOCK_K // 2
            x_lo = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + lo_k[None, :], mask=m_mask[:, None], other=0.0
            )
            x_hi = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + hi_k[None, :], mask=m_mask[:, None], other=0.0
            )
            if HAS_PQS:
                x_lo = _cast(
                    x_lo.to(tl.float32) * tl.load(pqs_ptr + lo_k).to(tl.float32)[None, :], dtype, INTERPRETED
                )
                x_hi = _cast(
                    x_hi.to(tl.float32) * tl.load(pqs_ptr + hi_k).to(tl.float32)[None, :], dtype, INTERPRETED
                )
            b = tl.load(
                w_ptr + (k0 // 2 + offs_h)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0
            )
            b = b.to(tl.int32)
            w_lo = _dequant_half(
                b, k0, lo_k, offs_n, n_mask, s_ptr, N, G, ws2, KIND, SCALE_MODE, BLOCK_K // 2, False
            )
            w_hi = _dequant_half(
                b,
                k0 + BLOCK_K // 2,
                hi_k,
                offs_n,
                n_mask,
                s_ptr,
                N,
                G,
                ws2,
                KIND,
                SCALE_MODE,
                BLOCK_K // 2,
                True,
            )
            acc = _dot(x_lo, _cast(w_lo, dtype, INTERPRETED), acc, INTERPRETED)
            acc = _dot(x_hi, _cast(w_hi, dtype, INTERPRETED), acc, INTERPRETED)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, _cast(acc, dtype, INTERPRETED), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, out_ptr, N, ws2_ptr,
    G: tl.constexpr, KIND: tl.constexpr, SCALE_MODE: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Packed weight -> dense W^T [K, N] in out's dtype (the large-M path: then one cuBLAS GEMM)."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    dtype = out_ptr.dtype.element_ty
    # nvfp4's per-tensor weight_scale_2 is read on the device (no host sync, CUDA-graph safe)
    if KIND == 1:
        ws2 = tl.load(ws2_ptr).to(tl.float32)
    else:
        ws2 = 1.0
    if KIND == 2:
        ks = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(w_ptr + ks[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        s = _scales(s_ptr, k0, ks, offs_n, n_mask, N, G, ws2, KIND, SCALE_MODE, BLOCK_K)
        tl.store(
            out_ptr + ks[:, None] * N + offs_n[None, :],
            _cast(q.to(tl.float32) * s, dtype, INTERPRETED),
            mask=n_mask[None, :],
        )
    else:
        lo_k = k0 + tl.arange(0, BLOCK_K // 2)
        hi_k = lo_k + BLOCK_K // 2
        b = tl.load(
            w_ptr + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[:, None] * N + offs_n[None, :],
            mask=n_mask[None, :],
            other=0,
        ).to(tl.int32)
        w_lo = _dequant_half(
            b, k0, lo_k, offs_n, n_mask, s_ptr, N, G, ws2, KIND, SCALE_MODE, BLOCK_K // 2, False
        )
        w_hi = _dequant_half(
            b, k0 + BLOCK_K // 2, hi_k, offs_n, n_mask, s_ptr, N, G, ws2, KIND, SCALE_MODE, BLOCK_K // 2, True
        )
        tl.store(
            out_ptr + lo_k[:, None] * N + offs_n[None, :],
            _cast(w_lo, dtype, INTERPRETED),
            mask=n_mask[None, :],
        )
        tl.store(
            out_ptr + hi_k[:, None] * N + offs_n[None, :],
            _cast(w_hi, dtype, INTERPRETED),
            mask=n_mask[None, :],
        )


def default_config(M: int, N: int, K: int = 0) -> dict:
    """Tile shape and launch settings by batch size (measured choices are recorded in docs/kernels.md)."""
    if M <= 16:
        # Decode: too few output tiles to fill the GPU, so K is split as well (about 2 waves of CTAs).
        tiles = triton.cdiv(N, 64)
        split = max(1, min(8, 264 // max(tiles, 1), K // (4 * PACK_K)))
        return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4, "SPLIT_K": split}
    if M <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    # measured at M = 2048: 128x64 tiles, 4 warps beat 128x128 / 8 warps by ~23% (docs/kernels.md)
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def _scale_mode(group_size: int, step: int) -> int:
    """Scale loads per step: one row when a (half) tile lies in one group, one row per group when the
    tile holds whole groups (nvfp4's 16), else one per weight row."""
    if group_size % step == 0:
        return 0
    if step % group_size == 0 and (group_size & (group_size - 1)) == 0:
        return 1
    return 2


def dequantize_weight(
    qweight: torch.Tensor, scales: torch.Tensor, kind: int, group_size: int, dtype: torch.dtype,
    weight_scale_2: torch.Tensor | None = None, block_k: int = PACK_K,
) -> torch.Tensor:  # fmt: skip
    """Packed weight -> dense W^T [K, N] in ``dtype`` (written once per call, read by cuBLAS)."""
    n = qweight.shape[1]
    k = qweight.shape[0] * (2 if kind != INT8 else 1)
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    step = block_k if kind == INT8 else block_k // 2
    grid = (k // block_k, triton.cdiv(n, 64))
    _dequant_kernel[grid](
        qweight, scales, out, n, weight_scale_2 if weight_scale_2 is not None else scales,
        G=group_size, KIND=kind, SCALE_MODE=_scale_mode(group_size, step), INTERPRETED=triton_interpreting(),
        BLOCK_N=64, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def dequant_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    kind: int,
    group_size: int,
    weight_scale_2: torch.Tensor | None = None,
    pre_quant_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
    block_k: int = PACK_K,
) -> torch.Tensor:
    """x [M, K] (contiguous, fp16/bf16) -> y [M, N] in x's dtype; ``block_k`` (int8 only) the K tile.

    From DEQUANT_MM_MIN_M rows on (prefill), dequantizing the weight once and running cuBLAS beats
    dequantizing every tile in the fused kernel; a given ``config`` always takes the fused kernel."""
    M, K = x.shape
    N = qweight.shape[1]
    block_k = block_k if kind == INT8 else PACK_K
    step = block_k if kind == INT8 else block_k // 2
    if K % block_k:
        raise ValueError(f"in_features {K} is not a multiple of {block_k}")
    if config is None and M >= DEQUANT_MM_MIN_M:
        wt = dequantize_weight(qweight, scales, kind, group_size, x.dtype, weight_scale_2, block_k)
        xs = x * pre_quant_scale if pre_quant_scale is not None else x
        return torch.addmm(bias, xs, wt) if bias is not None else torch.mm(xs, wt)
    cfg = dict(config or default_config(M, N, K))
    split = cfg.pop("SPLIT_K", 1)
    if split > 1:
        y = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    else:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    dummy = scales
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split)
    _dequant_gemm_kernel[grid](
        x, qweight, scales,
        pre_quant_scale if pre_quant_scale is not None else dummy,
        bias if bias is not None else dummy,
        y, M, N, K, weight_scale_2 if weight_scale_2 is not None else scales, x.stride(0), y.stride(0),
        G=group_size, KIND=kind, SCALE_MODE=_scale_mode(group_size, step),
        HAS_PQS=pre_quant_scale is not None, HAS_BIAS=bias is not None,
        INTERPRETED=triton_interpreting(), SPLIT_K=split,
        BLOCK_K=block_k, **cfg,
    )  # fmt: skip
    return y.to(x.dtype) if split > 1 else y
