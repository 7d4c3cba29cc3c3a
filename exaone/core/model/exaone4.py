"""EXAONE-4.0 (`model_type: exaone4`): post-norm blocks, per-head q/k RMSNorm, hybrid sliding/full
attention where full layers take no RoPE when a window is set (see ModelConfig.uses_rope)."""

from __future__ import annotations

from torch import nn

from exaone.core.config import ModelConfig
from exaone.core.model.layers import Attention, CausalLM, GatedMLP, RMSNorm

RENAME: list[tuple[str, str]] = []  # checkpoint names are already the module names
RENAME_BACK: list[tuple[str, str]] = []


class Block(nn.Module):
    """Post-norm: x + norm(attn(x)), then x + norm(mlp(x)); there is no input norm."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer, qk_norm=True)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, rope, ctx):
        x = self.post_attention_layernorm.add_after(self.self_attn(x, positions, rope, ctx), x)
        return self.post_feedforward_layernorm.add_after(self.mlp(x), x), None  # x is the residual stream


class Exaone4ForCausalLM(CausalLM):
    block_class = Block


Model = Exaone4ForCausalLM
