"""Layers shared by every EXAONE family: RMSNorm, RoPE, attention, gated MLP, the causal LM.

Module names follow the transformers Llama/EXAONE-4 layout (`self_attn.q_proj`, `mlp.gate_proj`,
...); each family maps its checkpoint names onto them with a table (see `RENAME` in the family
modules). The math follows transformers closely (RMSNorm in fp32, RoPE cos/sin in fp32 then cast)
so that logits match the reference within float rounding; the small operations are
exaone/core/kernels/ops.py's, which run fused Triton kernels on a GPU.

Blocks pass the residual stream beside the hidden state (as vLLM does), so a norm can fuse the
residual add before it (`RMSNorm.add`, pre-norm) or after it (`RMSNorm.add_after`, post-norm).

Where keys and values go is the context's business: `Attention` projects q, k, v and hands them,
with itself, to `ctx.attention(...)`. `Context` (no cache: attend within the tokens given) and
`KVCache` (kv_cache.py) do it with the reference math in `Attention.reference_qk` and
`ops.masked_attention`; the engine's step context (exaone/core/engine) with its fused kernels over
the paged cache. Shapes are [B, T, ...] for the reference contexts, [T, ...] (tokens of many
sequences packed) for the engine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from exaone.core.config import ModelConfig
from exaone.core.kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the pre-norm residual add fused with the norm."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)

    def add_after(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + norm(x): the post-norm (EXAONE-4) residual add fused with the norm."""
        return ops.rms_norm_add(x, residual, self.weight, self.eps)


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


class Context:
    """Attention without a cache: the tokens given attend to each other ([B, T, ...] shapes)."""

    def rope(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        cos, sin = ops.rope_cos_sin(positions, inv_freq, dtype)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads

    def attention(self, attn: Attention, q, k, v, positions, rope) -> torch.Tensor:
        q, k = attn.reference_qk(q, k, rope)
        out = ops.masked_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), positions, positions, attn.window,
            attn.scale,
        )  # fmt: skip
        return out.transpose(1, 2)

    def advance(self, t: int):
        pass


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

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    def project_qkv(self, x):
        """q, k, v projections [..., *]; the engine's runtime layout overrides this with one fused GEMM."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def reference_qk(self, q, k, rope):
        """q/k RMSNorm (EXAONE-4, K-EXAONE) then RoPE (not on NoPE layers), q [..., H, D]."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = ops.apply_rope(q, *rope), ops.apply_rope(k, *rope)
        return q, k

    def forward(self, x, positions, rope, ctx: Context):
        lead = x.shape[:-1]
        q, k, v = self.project_qkv(x)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        out = ctx.attention(self, q, k, v, positions, rope)
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PreNormBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)) (EXAONE-3, K-EXAONE); families build the modules."""

    def forward(self, x, residual, positions, rope, ctx):
        if residual is None:  # the first layer: the residual stream starts as the embedding
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add(x, residual)
        h = self.self_attn(h, positions, rope, ctx)
        h, residual = self.post_attention_layernorm.add(h, residual)
        return self.mlp(h), residual


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
        cache: Context | None = None,
        last_only: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for input_ids [B, T] at positions [B, T]: [B, T, V], or [B, 1, V] with last_only.
        The engine passes packed tokens [T] and `rows`, the token rows whose logits it needs ([R, V])."""
        ctx = cache if cache is not None else Context()
        if positions is None:
            start = getattr(cache, "length", 0)
            positions = torch.arange(start, start + input_ids.shape[-1], device=input_ids.device)
            positions = positions.expand(input_ids.shape)
        h = self.model.embed_tokens(input_ids)
        rope = ctx.rope(positions, self.inv_freq, h.dtype)
        residual = None
        for block in self.model.layers:
            h, residual = block(h, residual, positions, rope, ctx)
        ctx.advance(input_ids.shape[-1])
        if last_only:
            h, residual = h[:, -1:], residual[:, -1:] if residual is not None else None
        if rows is not None:
            h, residual = h[rows], residual[rows] if residual is not None else None
        h = self.model.norm(h) if residual is None else self.model.norm.add(h, residual)[0]
        return self.lm_head(h)
