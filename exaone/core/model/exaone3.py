"""EXAONE-3.0 / 3.5 / Deep (`model_type: exaone`): the Llama-3 computation under EXAONE's own names."""

from __future__ import annotations

import re

from exaone.core.config import ModelConfig
from exaone.core.model.layers import Attention, CausalLM, GatedMLP, PreNormBlock, RMSNorm

# Checkpoint name prefix <-> module name prefix (= transformers' LlamaForCausalLM names); {} is the layer.
_PREFIXES = [
    ("transformer.wte.", "model.embed_tokens."),
    ("transformer.ln_f.", "model.norm."),
    ("transformer.h.{}.ln_1.", "model.layers.{}.input_layernorm."),
    ("transformer.h.{}.ln_2.", "model.layers.{}.post_attention_layernorm."),
    ("transformer.h.{}.attn.attention.out_proj.", "model.layers.{}.self_attn.o_proj."),
    ("transformer.h.{}.attn.attention.q_proj.", "model.layers.{}.self_attn.q_proj."),
    ("transformer.h.{}.attn.attention.k_proj.", "model.layers.{}.self_attn.k_proj."),
    ("transformer.h.{}.attn.attention.v_proj.", "model.layers.{}.self_attn.v_proj."),
    ("transformer.h.{}.mlp.c_fc_0.", "model.layers.{}.mlp.gate_proj."),
    ("transformer.h.{}.mlp.c_fc_1.", "model.layers.{}.mlp.up_proj."),
    ("transformer.h.{}.mlp.c_proj.", "model.layers.{}.mlp.down_proj."),
]


def _regexes(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [("^" + re.escape(src).replace(r"\{\}", r"(\d+)"), dst.replace("{}", r"\1")) for src, dst in pairs]


RENAME = _regexes(_PREFIXES)  # checkpoint name -> module name (regex, replacement)
RENAME_BACK = _regexes([(mod, ckpt) for ckpt, mod in _PREFIXES])  # module name -> checkpoint name


class Block(PreNormBlock):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)


class Exaone3ForCausalLM(CausalLM):
    block_class = Block


Model = Exaone3ForCausalLM
