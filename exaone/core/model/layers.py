"""Layers shared by every EXAONE family: RMSNorm, RoPE, attention over a KV cache, gated MLP.

Module names follow the transformers Llama/EXAONE-4 layout (`self_attn.q_proj`, `mlp.gate_proj`,
...); each family maps its checkpoint names onto them with a table (see `rename` in the family
modules). The math follows transformers closely (RMSNorm in fp32, RoPE cos/sin in fp32 then cast)
so that logits match the reference within float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from exaone.core.config import ModelConfig
from exaone.core.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with llama3 or linear scaling applied as transformers does."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape [B, 1, T, head_dim] for positions [B, T] (padding, -1, gets position 0)."""
    freqs = positions.clamp(min=0).float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attend(q, k, v, q_pos, k_pos, window: int | None, scale: float) -> torch.Tensor:
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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, qk_norm: bool = False):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.window(layer)
        self.rope = cfg.uses_rope(layer)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x):
        """q, k, v projections [B, T, *]; the engine's runtime layout overrides this with one fused GEMM."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, positions, rope_cs, cache: KVCache | None):
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, *rope_cs), apply_rope(k, *rope_cs)
        if cache is None:
            k_all, v_all, k_pos = k, v, positions
        else:
            k_all, v_all, k_pos = cache.update(self.layer, k, v, positions)
        out = attend(q, k_all, v_all, positions, k_pos, self.window, self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CausalLM(nn.Module):
    """Embedding -> decoder blocks -> final norm -> lm_head. Families supply the block class."""

    block_class: type[nn.Module]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(self.block_class(cfg, i) for i in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def tie_weights(self):
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only) for input_ids [B, T] at positions [B, T]."""
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            positions = positions.expand(input_ids.shape[0], -1)
        h = self.model.embed_tokens(input_ids)
        rope_cs = rope_cos_sin(positions, self.inv_freq, h.dtype)
        for block in self.model.layers:
            h = block(h, positions, rope_cs, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.model.norm(h))
