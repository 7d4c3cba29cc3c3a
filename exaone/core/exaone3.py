"""EXAONE-3.0 / 3.5 / Deep (`model_type: exaone`): the Llama-3 computation under EXAONE's own names."""

from __future__ import annotations

from torch import nn

from exaone.core.config import ModelConfig
from exaone.core.layers import Attention, CausalLM, GatedMLP, RMSNorm

# Checkpoint name -> module name (regex, replacement), applied in order.
RENAME = [
    (r"^transformer\.wte\.", "model.embed_tokens."),
    (r"^transformer\.ln_f\.", "model.norm."),
    (r"^transformer\.h\.(\d+)\.ln_1\.", r"model.layers.\1.input_layernorm."),
    (r"^transformer\.h\.(\d+)\.ln_2\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^transformer\.h\.(\d+)\.attn\.attention\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^transformer\.h\.(\d+)\.attn\.attention\.([qkv])_proj\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_fc_0\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_fc_1\.", r"model.layers.\1.mlp.up_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.", r"model.layers.\1.mlp.down_proj."),
]


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, positions, rope_cs, cache):
        x = x + self.self_attn(self.input_layernorm(x), positions, rope_cs, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Exaone3ForCausalLM(CausalLM):
    block_class = Block


Model = Exaone3ForCausalLM
