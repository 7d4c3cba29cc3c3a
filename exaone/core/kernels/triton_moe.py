"""Fused MoE in Triton: every routed expert's gate/up GEMM (+ silu * up) in one launch, every down GEMM
(+ the routing weight) in another, with no host synchronisation, so a MoE step can be captured in a
CUDA graph.

The token-expert pairs ("slots", T x top_k of them) are sorted by expert on the device and each
expert's run padded to a multiple of BLOCK_M; a tile of BLOCK_M slots belongs to one expert. The
number of tiles is bounded without looking at the routing (T x top_k / BLOCK_M + experts), so the
grid is static; tiles past the real ones exit at once. Each slot's down-projected row is written to
its own place and the top_k rows of a token are summed afterwards (no atomics: the same sum each run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from exaone.core.kernels.backend import triton_interpreting
from exaone.core.kernels.dequant_gemm import _cast


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED:  # the CPU interpreter gets 16-bit tl.dot wrong: dot in float32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _gate_up(x_ptr, w_ptr, slot_ptr, tile_expert_ptr, act_ptr, H, INTER, TOP_K: tl.constexpr, E,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):  # fmt: skip
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e >= E:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(slot_ptr + rows)
    ok = slot >= 0
    token = tl.where(ok, slot // TOP_K, 0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < INTER
    dtype = x_ptr.dtype.element_ty
    w_e = w_ptr + e.to(tl.int64) * (2 * INTER) * H
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < H
        x = tl.load(x_ptr + token[:, None] * H + k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = n_ok[None, :] & k_ok[:, None]
        wg = tl.load(w_e + n[None, :].to(tl.int64) * H + k[:, None], mask=w_mask, other=0.0)
        wu = tl.load(w_e + (INTER + n[None, :]).to(tl.int64) * H + k[:, None], mask=w_mask, other=0.0)
        acc_g = _dot(x, wg, acc_g, PRECISION, INTERPRETED)
        acc_u = _dot(x, wu, acc_u, PRECISION, INTERPRETED)
    g = _cast(acc_g, dtype, INTERPRETED).to(tl.float32)
    u = _cast(acc_u, dtype, INTERPRETED).to(tl.float32)
    a = _cast(g / (1.0 + tl.exp(-g)), dtype, INTERPRETED).to(tl.float32)  # silu, rounded as torch holds it
    out = act_ptr + tl.where(ok, slot, 0).to(tl.int64)[:, None] * INTER + n[None, :]
    tl.store(out, _cast(a * u, dtype, INTERPRETED), mask=ok[:, None] & n_ok[None, :])


@triton.jit
def _down(act_ptr, w_ptr, slot_ptr, tile_expert_ptr, weight_ptr, y_ptr, H, INTER, E,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):  # fmt: skip
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e >= E:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(slot_ptr + rows)
    ok = slot >= 0
    s = tl.where(ok, slot, 0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    dtype = act_ptr.dtype.element_ty
    w_e = w_ptr + e.to(tl.int64) * H * INTER
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < INTER
        a = tl.load(act_ptr + s[:, None] * INTER + k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = n_ok[None, :] & k_ok[:, None]
        w = tl.load(w_e + n[None, :].to(tl.int64) * INTER + k[:, None], mask=w_mask, other=0.0)
        acc = _dot(a, w, acc, PRECISION, INTERPRETED)
    y = _cast(acc, dtype, INTERPRETED).to(tl.float32) * tl.load(weight_ptr + s, mask=ok, other=0.0)[:, None]
    tl.store(y_ptr + s[:, None] * H + n[None, :], y, mask=ok[:, None] & n_ok[None, :])


def route_tiles(experts: torch.Tensor, num_experts: int, block_m: int):
    """Slots sorted by expert, padded per expert to block_m: (slot of each padded row or -1, expert of
    each tile or num_experts for an empty one), all of static size."""
    ids = experts.reshape(-1)
    slots = ids.numel()
    dev = ids.device
    max_tiles = -(-slots // block_m) + num_experts
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, ids, torch.ones_like(ids))
    padded = (counts + block_m - 1) // block_m * block_m
    end = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts
    sorted_ids = ids[order]
    rank = torch.arange(slots, device=dev) - start[sorted_ids]
    row = end[sorted_ids] - padded[sorted_ids] + rank
    slot_of_row = torch.full((max_tiles * block_m,), -1, dtype=torch.long, device=dev)
    slot_of_row[row] = order
    tiles = torch.arange(max_tiles, device=dev) * block_m
    tile_expert = torch.searchsorted(end, tiles, right=True)  # num_experts: past the last real tile
    return slot_of_row, tile_expert, max_tiles


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, experts: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; experts / weights [T, k]
    (the router's choice and float32 weights) -> sum over k of weight * expert(x), [T, H] in x's dtype."""
    t, h = x.shape
    e, i2, _ = w13.shape
    i, k = i2 // 2, experts.shape[1]
    block_m, block_n, block_k = 16, 64, 64
    slot_of_row, tile_expert, max_tiles = route_tiles(experts, e, block_m)
    act = torch.empty((t * k, i), dtype=x.dtype, device=x.device)
    y = torch.empty((t * k, h), dtype=torch.float32, device=x.device)
    interp = triton_interpreting()
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    if t:
        _gate_up[(max_tiles, triton.cdiv(i, block_n))](
            x.contiguous(), w13, slot_of_row, tile_expert, act, h, i, TOP_K=k, E=e,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=prec, INTERPRETED=interp,
        )  # fmt: skip
        _down[(max_tiles, triton.cdiv(h, block_n))](
            act, w2, slot_of_row, tile_expert, weights.reshape(-1).float().contiguous(), y, h, i, E=e,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=prec, INTERPRETED=interp,
        )  # fmt: skip
    return y.view(t, k, h).sum(1).to(x.dtype)
