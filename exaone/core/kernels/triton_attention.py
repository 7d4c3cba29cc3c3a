"""Paged attention in Triton: queries of a step attend to keys and values read straight from the
paged KV cache (no gathered copies), for decode (one query per sequence) and prefill chunks alike.

Work is cut into tiles: a tile is up to BLOCK_Q consecutive query tokens of one sequence, times the
G query heads that share one KV head (GQA), stacked into the BLOCK_M rows of one `tl.dot`. A program
takes one (tile, KV head, split) and runs an online softmax over its share of the sequence's keys:
keys are fetched by position through the block table (any tokens_per_block), dequantized when the
cache is fp8/int8 (one float32 scale per stored vector), masked causally by position and by the
layer's sliding window, so a window layer reads only its window. With several splits (split-KV,
flash-decoding, for long contexts at small batch) each writes a partial result and `_reduce`
combines them. Everything data-dependent is read from tensors, so a decode step with a fixed grid
can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from exaone.core.kernels.backend import tile_rows, triton_interpreting


@triton.jit
def _attention(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, seqlen_ptr, qstart_ptr, tiles_ptr, out_ptr,
    part_ptr, lse_ptr, sm_scale, window, num_splits,
    sq_t, sq_h, so_t, so_h, bt_stride, split_stride,
    G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BS: tl.constexpr, QUANT: tl.constexpr, FP8: tl.constexpr,
    SPLIT: tl.constexpr, DECODE: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:  # one query per sequence: tile i is sequence i
        seq = tile
        q0 = tile
        qn = 1
    else:
        seq = tl.load(tiles_ptr + tile * 3)
        q0 = tl.load(tiles_ptr + tile * 3 + 1)
        qn = tl.load(tiles_ptr + tile * 3 + 2)
    seq_len = tl.load(seqlen_ptr + seq)
    q_begin = tl.load(qstart_ptr + seq)
    q_total = tl.load(qstart_ptr + seq + 1) - q_begin
    rows = tl.arange(0, BLOCK_M)
    tok = rows // G
    head = kvh * G + rows % G
    row_ok = (tok < qn) & (rows < (BLOCK_M // G) * G)
    q_tok = q0 + tok
    q_pos = seq_len - q_total + (q_tok - q_begin)  # the chunk's queries are the sequence's last tokens
    d = tl.arange(0, BD)
    d_ok = d < D
    q = tl.load(q_ptr + q_tok[:, None].to(tl.int64) * sq_t + head[:, None] * sq_h + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    pos_hi = tl.max(tl.where(row_ok, q_pos, 0), axis=0) + 1
    pos_lo = 0
    if window > 0:
        pos_lo = tl.maximum(tl.min(tl.where(row_ok, q_pos, 2147483647), axis=0) - window + 1, 0)
    span = tl.maximum(pos_hi - pos_lo, 0)
    active = _active_splits(span, num_splits)
    if split >= active:  # a short sequence needs fewer splits; _reduce reads only the active ones
        return
    per_split = tl.cdiv(tl.cdiv(span, active), BLOCK_N) * BLOCK_N
    lo = pos_lo + split * per_split
    hi = tl.minimum(lo + per_split, pos_hi)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BD), tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + n
        k_ok = k_pos < hi
        block = tl.load(bt_ptr + seq.to(tl.int64) * bt_stride + k_pos // BS, mask=k_ok, other=0)
        slot = block.to(tl.int64) * BS + k_pos % BS
        at = (slot[:, None] * HKV + kvh) * D + d[None, :]
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + at, mask=kv_mask, other=0)
        v = tl.load(vc_ptr + at, mask=kv_mask, other=0)
        if QUANT:
            if FP8:
                k = k.to(tl.float8e4nv, bitcast=True)
                v = v.to(tl.float8e4nv, bitcast=True)
            k_s = tl.load(ks_ptr + slot * HKV + kvh, mask=k_ok, other=0.0)
            v_s = tl.load(vs_ptr + slot * HKV + kvh, mask=k_ok, other=0.0)
            k = (k.to(tl.float32) * k_s[:, None]).to(q.dtype)
            v = (v.to(tl.float32) * v_s[:, None]).to(q.dtype)
        if INTERPRETED:  # the CPU interpreter gets 16-bit tl.dot wrong: dot in float32
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)
        visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if window > 0:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if INTERPRETED:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    t_abs = q_tok.to(tl.int64)
    out_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:  # a partial result and its log-sum-exp (base 2), combined by _reduce
        at = split.to(tl.int64) * split_stride + (t_abs[:, None] * (G * HKV) + head[:, None]) * D + d[None, :]
        tl.store(part_ptr + at, out, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        lse_at = split.to(tl.int64) * (split_stride // D) + t_abs * (G * HKV) + head
        tl.store(lse_ptr + lse_at, lse, mask=row_ok)
    else:
        tl.store(out_ptr + t_abs[:, None] * so_t + head[:, None] * so_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)  # fmt: skip


@triton.jit
def _active_splits(span, num_splits):
    """Splits worth running for `span` keys: at least 256 keys each (each split's partial result costs
    the reduction a pass); the rest of the grid returns at once."""
    return tl.minimum(num_splits, tl.maximum(tl.cdiv(span, 256), 1))


@triton.jit
def _reduce(part_ptr, lse_ptr, out_ptr, seqlen_ptr, split_stride, so_t, so_h, num_splits, window,
            H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """out[t, h] = sum_s exp2(lse_s - lse_max) * part_s / sum_s exp2(lse_s - lse_max), over the
    splits the decode query of sequence t used."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BD)
    d_ok = d < D
    seq_len = tl.load(seqlen_ptr + t)
    span = seq_len
    if window > 0:
        span = tl.minimum(seq_len, window)
    num_splits = _active_splits(span, num_splits)
    m = float("-inf")
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(lse_ptr + s * (split_stride // D) + t * H + h))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros((BD,), tl.float32)
    total = 0.0
    for s in range(0, num_splits):
        w = tl.exp2(tl.load(lse_ptr + s * (split_stride // D) + t * H + h) - m_safe)
        acc += w * tl.load(part_ptr + s * split_stride + (t * H + h) * D + d, mask=d_ok, other=0.0)
        total += w
    total = tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + t * so_t + h * so_h + d, (acc / total).to(out_ptr.dtype.element_ty), mask=d_ok)


def paged_attention(
    q, k_pool, v_pool, k_scale, v_scale, block_table, seq_lens, query_start, block_size, window, scale,
    tiles=None, num_splits=1, out=None, workspace=None,
) -> torch.Tensor:
    """q [T, H, D] -> out [T, H, D]. tiles None: decode, one query per sequence (T = sequences);
    else an int32 [N, 3] tensor of (sequence, first query token, query tokens) per tile."""
    t, h, d = q.shape
    hkv = k_pool.shape[1]
    g = h // hkv
    decode = tiles is None
    bm = tile_rows(g, decode)
    num_tiles = t if decode else tiles.shape[0]
    out = torch.empty_like(q) if out is None else out
    quant = k_pool.dtype in (torch.int8, torch.float8_e4m3fn)
    fp8 = k_pool.dtype == torch.float8_e4m3fn
    kc, vc = (k_pool.view(torch.uint8), v_pool.view(torch.uint8)) if fp8 else (k_pool, v_pool)
    split = num_splits > 1
    if split:
        part, lse = workspace if workspace is not None else _workspace(num_splits, t, h, d, q.device)
    else:
        part, lse = out, out
    if num_tiles:
        _attention[(num_tiles, hkv, num_splits)](
            q, kc, vc, k_scale if quant else q, v_scale if quant else q, block_table, seq_lens,
            query_start, tiles if tiles is not None else seq_lens, out, part, lse, scale,
            window or 0, num_splits, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            block_table.stride(0), t * h * d,
            G=g, HKV=hkv, D=d, BD=triton.next_power_of_2(d), BLOCK_M=bm, BLOCK_N=64,
            BS=block_size, QUANT=quant, FP8=fp8, SPLIT=split, DECODE=decode,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRETED=triton_interpreting(),
            num_warps=4,
        )  # fmt: skip
        if split:
            _reduce[(t, h)](part, lse, out, seq_lens, t * h * d, out.stride(0), out.stride(1), num_splits,
                            window or 0, H=h, D=d, BD=triton.next_power_of_2(d))  # fmt: skip
    return out


def _workspace(num_splits: int, t: int, h: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((num_splits, t, h, d), dtype=torch.float32, device=device),
            torch.empty((num_splits, t, h), dtype=torch.float32, device=device))  # fmt: skip
