"""How an EXAONE model's tensors are named, split and fused in a TensorRT-LLM checkpoint.

Source names are our module names (exaone/core/layers.py, after each family's RENAME), i.e. the
transformers Llama / Exaone4 / ExaoneMoe names. Targets follow TensorRT-LLM
(tensorrt_llm/models/llama/convert.py, `load_weights_from_hf_model` and
`get_prefix_and_param_name_map`):
- `self_attn.{q,k,v}_proj` -> `attention.qkv`: each of q, k, v split by rows per rank, then
  concatenated (kv heads duplicated first when tp_size > kv heads, `dup_kv_weight`);
- `self_attn.o_proj` -> `attention.dense` (split by columns);
- `mlp.gate_proj` (the activated one) -> `mlp.fc`, `mlp.up_proj` -> `mlp.gate`, both split by rows;
  `mlp.down_proj` -> `mlp.proj` (split by columns). EXAONE-3's `c_fc_0` is the gate, `c_fc_1` the
  up projection, exactly as TensorRT-LLM's EXAONE name map says;
- `input_layernorm`, `post_attention_layernorm` -> `input_layernorm`, `post_layernorm` (whole);
- `model.embed_tokens` -> `transformer.vocab_embedding` (whole, first pipeline rank),
  `model.norm` -> `transformer.ln_f`, `lm_head` (rows split, vocab padded to a multiple of tp;
  last pipeline rank; from the embedding when tied);
- layers are numbered locally per pipeline rank (`transformer.layers.{l - first_layer}`).
Extensions for the families TensorRT-LLM only runs in its PyTorch flow (docs/convert.md):
- q/k RMSNorm -> `attention.q_layernorm` / `attention.k_layernorm` (as TensorRT-LLM's Attention
  names them with `qk_layernorm`), whole;
- EXAONE-4 post-norms -> `post_layernorm` (on the attention output) and
  `post_feedforward_layernorm` (the names of TensorRT-LLM's Gemma-2 decoder layer);
- K-EXAONE MoE, as TensorRT-LLM's MoE models (llama/Mixtral, deepseek_v1/v2, qwen) write it:
  `mlp.router.weight` and `mlp.router.e_score_correction_bias` (fp32, whole);
  experts stacked: `mlp.fc.weight` [E, 2*I/tp, H] = cat(up, gate) along rows (Mixtral's
  `cat([w3, w1])`), `mlp.proj.weight` [E, H, I/tp]; shared expert `mlp.shared_expert.fc`
  (= cat(up, gate), each split) and `mlp.shared_expert.proj`;
  the MTP module is kept whole under its own names (`mtp.*`) on the last pipeline rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

NORMS = {  # module name suffix -> TensorRT-LLM name suffix (never split)
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_layernorm.weight",
    "post_feedforward_layernorm.weight": "post_feedforward_layernorm.weight",
    "self_attn.q_norm.weight": "attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "attention.k_layernorm.weight",
}
# TensorRT-LLM linear <- (our source linears, fused in this order; column-parallel; kv-duplicated parts)
ATTENTION = [
    ("attention.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), True, (1, 2)),
    ("attention.dense", ("self_attn.o_proj",), False, ()),
]
DENSE_MLP = [
    ("mlp.fc", ("mlp.gate_proj",), True, ()),
    ("mlp.gate", ("mlp.up_proj",), True, ()),
    ("mlp.proj", ("mlp.down_proj",), False, ()),
]
SHARED_EXPERT = [  # deepseek_v2/convert.py: fc = cat(up, gate), each split first
    ("mlp.shared_expert.fc", ("mlp.shared_experts.up_proj", "mlp.shared_experts.gate_proj"), True, ()),
    ("mlp.shared_expert.proj", ("mlp.shared_experts.down_proj",), False, ()),
]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_ONLY_ALGO = {"int8": "W8A16", "int4": "W4A16"}  # --weight_only_precision -> quant_algo
ALGO_BITS = {"W8A16": 8, "W4A16": 4}
ARCHITECTURES = {  # family -> TensorRT-LLM architecture written to config.json
    # architectures[0] of the HF config, which TensorRT-LLM's MODEL_MAP sends to LLaMAForCausalLM
    # (tensorrt_llm/models/__init__.py; llama/config.py from_hugging_face).
    "exaone3": "ExaoneForCausalLM",
    "exaone4": "Exaone4ForCausalLM",
    "exaone_moe": "ExaoneMoeForCausalLM",
}


def chunk(t: torch.Tensor, parts: int, rank: int, dim: int = 0) -> torch.Tensor:
    """convert_utils.split: torch.chunk along dim, one part."""
    return t if parts == 1 else torch.chunk(t, parts, dim=dim)[rank].contiguous()


def dup_kv(w: torch.Tensor, kv_heads: int, tp: int) -> torch.Tensor:
    """convert_utils.dup_kv_weight: repeat each kv head tp // kv_heads times (rows)."""
    reps = tp // kv_heads
    head = w.shape[0] // kv_heads
    return w.reshape(kv_heads, 1, head, -1).expand(kv_heads, reps, head, w.shape[-1]).reshape(-1, w.shape[-1])


def fuse_qkv(q, k, v, kv_heads: int, tp: int, rank: int) -> torch.Tensor:
    if kv_heads < tp:
        k, v = dup_kv(k, kv_heads, tp), dup_kv(v, kv_heads, tp)
    return torch.cat([chunk(q, tp, rank), chunk(k, tp, rank), chunk(v, tp, rank)], dim=0)


def unfuse_qkv(parts: list[torch.Tensor], q_rows: int, kv_rows: int, kv_heads: int, tp: int):
    """Per-rank fused qkv [q/tp + 2 kv', in] -> full q, k, v (dropping duplicated kv heads)."""
    qs, ks, vs = [], [], []
    kv_local = parts[0].shape[0] - q_rows // tp
    for p in parts:
        q, k, v = p.split([q_rows // tp, kv_local // 2, kv_local // 2], dim=0)
        qs.append(q), ks.append(k), vs.append(v)
    if kv_heads < tp:  # rank r holds kv head r * kv_heads // tp: keep one rank per head
        step = tp // kv_heads
        ks, vs = ks[::step], vs[::step]
    return torch.cat(qs), torch.cat(ks), torch.cat(vs)


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """convert.py pads lm_head to pad_vocab_size(vocab, tp) rows with zeros."""
    extra = -t.shape[0] % multiple
    return torch.nn.functional.pad(t, (0, 0, 0, extra)) if extra else t


def is_trtllm_checkpoint(directory: str | Path) -> bool:
    """A directory whose config.json is a TensorRT-LLM PretrainedConfig (not a Hugging Face config)."""
    d = Path(directory)
    try:
        raw = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and "architecture" in raw and "mapping" in raw and "model_type" not in raw


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (a tied lm_head, one scale read back into q, k and
    v): copy every tensor whose bytes overlap an earlier one's."""
    out = {name: t.contiguous() for name, t in tensors.items()}
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), n) for n, t in out.items())
    reach = -1
    for begin, end, name in spans:
        if begin < reach and end > begin:
            out[name] = out[name].clone()
        else:
            reach = max(reach, end)
    return out
