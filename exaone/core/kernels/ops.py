"""The model's small operations, each with its torch reference (the math, on any device) and its fused
Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1): RMSNorm with the residual
add fused before or after it, silu(gate) * up, RoPE, the q/k norm + RoPE + KV-cache store of an
attention layer, and attention itself (over contiguous keys, or over the paged KV cache).

The model code (exaone/core/model/layers.py) calls these; `backend` picks "reference" or "triton"
("auto": triton for CUDA tensors when Triton is installed; EXAONE_KERNELS=triton forces the Triton
kernels everywhere, which with TRITON_INTERPRET=1 runs them on the CPU, as the tests do).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from exaone.core import qmath
from exaone.core.kernels.backend import choose

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _path(x: torch.Tensor, backend: str) -> str:
    if backend == "auto":
        forced = os.environ.get("EXAONE_KERNELS") == "triton"
        return "triton" if HAS_TRITON and (x.is_cuda or forced) else "reference"
    return "reference" if choose(x, backend) == "reference" else "triton"


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [R, V] -> the first index of each row's maximum, as torch.argmax. A long row reduced in
    one pass runs on one multiprocessor (tens of microseconds for 102,400 entries); cut into 256
    chunks it spreads over the GPU."""
    r, v = logits.shape
    if not logits.is_cuda or v % 256:
        return logits.argmax(-1)
    best, at = logits.view(r, 256, v // 256).max(-1)
    chunk = best.argmax(-1)  # the first chunk holding the maximum; within it, its first index
    return chunk * (v // 256) + at.gather(1, chunk[:, None])[:, 0]


# --- RMSNorm ---------------------------------------------------------------------------------------


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: float32 statistics, the normalized value rounded to x's dtype, times weight."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    if _path(x, backend) == "reference" or x.dim() != 2:
        return _norm(x, weight, eps)
    from exaone.core.kernels import triton_ops

    return triton_ops.rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps: float, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm blocks: (norm(x + residual), x + residual)."""
    if _path(x, backend) == "reference" or x.dim() != 2:
        s = x + residual
        return _norm(s, weight, eps), s
    from exaone.core.kernels import triton_ops

    return triton_ops.rms_norm(x, weight, eps, residual, triton_ops.ADD_NORM)


def rms_norm_add(x, residual, weight, eps: float, backend: str = "auto") -> torch.Tensor:
    """Post-norm blocks (EXAONE-4): residual + norm(x)."""
    if _path(x, backend) == "reference" or x.dim() != 2:
        return residual + _norm(x, weight, eps)
    from exaone.core.kernels import triton_ops

    return triton_ops.rms_norm(x, weight, eps, residual, triton_ops.NORM_ADD)


# --- MLP activation ------------------------------------------------------------------------------


def silu_mul(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """[..., 2N] = [gate | up] -> silu(gate) * up."""
    if _path(gate_up, backend) == "reference" or gate_up.dim() != 2:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    from exaone.core.kernels import triton_ops

    return triton_ops.silu_mul(gate_up)


# --- RoPE ----------------------------------------------------------------------------------------


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin [..., head_dim] for positions [...] (padding, -1, gets position 0), as transformers."""
    freqs = positions.clamp(min=0).float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def cos_sin_table(inv_freq: torch.Tensor, positions: int) -> torch.Tensor:
    """float32 [positions, head_dim]: cos of each position's frequencies, then their sin (the fused
    kernel's table)."""
    freqs = torch.arange(positions, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq.float()
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# --- attention -----------------------------------------------------------------------------------


def masked_attention(q, k, v, q_pos, k_pos, window: int | None, scale: float) -> torch.Tensor:
    """Causal (optionally sliding-window) attention decided by positions, not by slots.

    q [B, H, T, D]; k, v [B, Hkv, S, D]; q_pos [B, T], k_pos [B, S]; position -1 marks padding
    or an empty cache slot. A key is visible when 0 <= k_pos <= q_pos and q_pos - k_pos < window.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= (qp - kp) < window
    mask |= ~mask.any(-1, keepdim=True)  # padding queries see something, avoiding NaN; ignored later
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


def qk_rope_store(
    q, k, v, positions, cos_sin, q_norm, k_norm, eps, rope: bool, k_pool, v_pool, k_scale, v_scale, slots,
    backend: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """One attention layer's q/k RMSNorm (weights q_norm/k_norm, or None), RoPE (when `rope`), and
    the store of k and v at `slots` of the paged pools [slots, Hkv, D] (-1: not stored), quantized
    to fp8/int8 with one scale per vector when the pools are. q [T, H, D], k, v [T, Hkv, D]; returns
    q ready for attention [T, H, D]."""
    if _path(q, backend) != "reference":
        from exaone.core.kernels import triton_ops

        return triton_ops.qk_rope_store(
            q, k, v, positions, cos_sin, q_norm, k_norm, eps, rope, k_pool, v_pool, k_scale, v_scale, slots
        )
    if q_norm is not None:
        q, k = _norm(q, q_norm, eps), _norm(k, k_norm, eps)
    if rope:
        half = q.shape[-1] // 2
        table = cos_sin[positions.clamp(min=0)]
        cos, sin = table[:, None, :half].repeat(1, 1, 2), table[:, None, half:].repeat(1, 1, 2)
        q = apply_rope(q.float(), cos, sin).to(q.dtype)
        k = apply_rope(k.float(), cos, sin).to(k.dtype)
    keep = slots >= 0
    idx = slots[keep]
    store_kv(k_pool, k_scale, idx, k[keep])
    store_kv(v_pool, v_scale, idx, v[keep])
    return q.contiguous()


def store_kv(pool: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, x: torch.Tensor):
    """x [N, Hkv, D] into pool [slots, Hkv, D] (quantized with a scale per vector when the pool is)."""
    if qmath.is_quantized_kv(pool.dtype):
        s = qmath.kv_token_scale(x, pool.dtype)
        scales.index_copy_(0, slots, s)
        x = qmath.quantize_kv(x, s, pool.dtype)
    raw = pool.view(torch.uint8) if pool.dtype == torch.float8_e4m3fn else pool
    raw.index_copy_(0, slots, x.view(torch.uint8) if pool.dtype == torch.float8_e4m3fn else x.to(pool.dtype))


def read_kv(pool: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, dtype) -> torch.Tensor:
    raw = pool.view(torch.uint8) if pool.dtype == torch.float8_e4m3fn else pool
    x = raw[slots]
    if pool.dtype == torch.float8_e4m3fn:
        x = x.view(pool.dtype)
    if qmath.is_quantized_kv(pool.dtype):
        return qmath.dequantize_kv(x, scales[slots], dtype)
    return x.to(dtype)


def attention_workspace(num_splits: int, t: int, h: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV partial outputs [splits, T, H, D] and their log-sum-exps [splits, T, H] (float32)."""
    return (torch.empty((num_splits, t, h, d), dtype=torch.float32, device=device),
            torch.empty((num_splits, t, h), dtype=torch.float32, device=device))  # fmt: skip


def paged_attention(
    q, k_pool, v_pool, k_scale, v_scale, block_table, seq_lens, query_start, block_size: int,
    window: int | None, scale: float, tiles=None, num_splits: int = 1, out=None, workspace=None,
    backend: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """Attention of the step's queries q [T, H, D] over the paged cache (which already holds the
    step's own keys and values). Sequence s owns queries query_start[s]..query_start[s+1] (its last
    tokens) and has seq_lens[s] tokens cached; block_table [S, W] maps its logical blocks to the
    pools' physical ones. `tiles` / `num_splits` / `workspace` only shape the Triton launch."""
    if _path(q, backend) != "reference":
        from exaone.core.kernels import triton_attention

        return triton_attention.paged_attention(
            q, k_pool, v_pool, k_scale, v_scale, block_table, seq_lens, query_start, block_size, window,
            scale, tiles, num_splits, out, workspace,
        )  # fmt: skip
    out = torch.empty_like(q) if out is None else out
    starts, lens = query_start.tolist(), seq_lens.tolist()
    for s in range(len(lens)):
        q0, q1, n = starts[s], starts[s + 1], lens[s]
        if q1 == q0:
            continue
        lo = 0 if window is None else max(0, n - (q1 - q0) - window + 1)
        k_pos = torch.arange(lo, n, device=q.device)
        slots = block_table[s, k_pos // block_size].long() * block_size + k_pos % block_size
        k = read_kv(k_pool, k_scale, slots, q.dtype).transpose(0, 1)[None]
        v = read_kv(v_pool, v_scale, slots, q.dtype).transpose(0, 1)[None]
        q_pos = torch.arange(n - (q1 - q0), n, device=q.device)
        o = masked_attention(q[q0:q1].transpose(0, 1)[None], k, v, q_pos[None], k_pos[None], window, scale)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


# --- MoE ---------------------------------------------------------------------------------------


def fused_moe(x, w13, w2, experts, weights, backend: str = "auto") -> torch.Tensor:
    """Routed experts of a MoE layer: x [T, H], w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I],
    the router's choice experts [T, k] and float32 weights [T, k] -> sum_k weight * expert(x) [T, H].
    The reference loops over the chosen experts (it reads the choice on the host); the Triton kernels
    (kernels/triton_moe.py) do not, so a MoE step fits a CUDA graph."""
    if _path(x, backend) != "reference":
        from exaone.core.kernels import triton_moe

        return triton_moe.fused_moe(x, w13, w2, experts, weights)
    out = torch.zeros_like(x)
    for e in experts.unique().tolist():
        token, slot = torch.where(experts == e)
        gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e]) * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out
