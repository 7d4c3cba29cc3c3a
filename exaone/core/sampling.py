"""Choosing the next token on the device: greedy, temperature, top-k, top-p, a seed per request.

Every operation is a tensor operation of fixed shape (no host synchronisation, no torch.Generator),
so the engine's decode step, sampling included, can be captured in a CUDA graph, and rows with
different parameters share one call. Randomness is counter-based: the uniform number of vocabulary
entry v at generation step t of a request seeded s is a hash of (s, t, v), turned into Gumbel noise;
the argmax of filtered logits plus that noise is an exact draw from their softmax (the Gumbel-max
trick). So a request's draws depend only on its own seed and step, never on its batch, and the
in-memory reference path (exaone/core/generate.py) draws the same tokens from the same logits.
"""

from __future__ import annotations

import torch

from exaone.core.kernels.ops import argmax

_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding 32-bit values (products wrap; the low 32
    bits are exact on every device)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 [R, vocab] in (0, 1): one independent draw per (row seed, row step, entry)."""
    v = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    s = seed.to(torch.int64)
    key = _mix((s & _M32) ^ _mix((s >> 32) & _M32)) ^ _mix(step.to(torch.int64) & _M32)
    h = _mix(_mix(key[:, None] ^ v[None, :]) ^ 0x9E3779B9)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """Next token ids [R] from logits [R, V]; per row: temperature (0: greedy), top_k (0: all; 1:
    greedy), top_p (0 or 1: off; else the smallest set whose mass reaches top_p), seed, step."""
    x = logits.float()
    vocab = x.shape[-1]
    greedy = (temperature <= 0) | (top_k == 1)
    x = x / torch.where(greedy, 1.0, temperature.float())[:, None]
    ordered, order = x.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).to(torch.int64)
    kth = ordered.gather(1, (k - 1)[:, None])
    in_k = ordered >= kth  # ties with the k-th value stay, as masking `logits < kth` keeps them
    masked = ordered.masked_fill(~in_k, float("-inf"))
    probs = masked.softmax(-1)
    use_p = ((top_p > 0) & (top_p < 1))[:, None]
    drop = ((probs.cumsum(-1) - probs) >= top_p.float()[:, None]) & use_p
    keep = torch.zeros_like(in_k).scatter(1, order, in_k & ~drop)
    noise = -torch.log(-torch.log(uniform(seed, step, vocab)))
    drawn = (x.masked_fill(~keep, float("-inf")) + noise).argmax(-1)
    return torch.where(greedy, argmax(logits), drawn)
