"""`config.json` of a TensorRT-LLM checkpoint, both ways: the options of a conversion and the
PretrainedConfig they produce (tensorrt_llm/models/modeling_utils.py, llama/config.py), and the
Hugging Face config.json rebuilt from one when reading a checkpoint back."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from exaone import __version__
from exaone.core import model as models
from exaone.core.config import FULL, ModelConfig
from exaone.core.errors import ExaoneError
from exaone.core.trtllm import names as tn


@dataclass
class ConvertOptions:
    dtype: str = "auto"  # float16 | bfloat16 | float32 | auto (checkpoint's; float32 -> float16)
    tp_size: int = 1
    pp_size: int = 1
    use_weight_only: bool = False
    weight_only_precision: str = "int8"  # int8 | int4
    per_group: bool = False
    group_size: int = 128
    int8_kv_cache: bool = False
    workers: int = 1
    target_sm: int = 90  # GPU the weight-only layout is preprocessed for (TensorRT-LLM uses the local one)
    calib_dataset: str = "cnn_dailymail"  # --int8_kv_cache calibration (convert_checkpoint.py's flags)
    calib_size: int = 512
    calib_max_seq_length: int = 512


@dataclass
class Source:
    cfg: ModelConfig
    state: dict[str, torch.Tensor]  # our module names, memory-mapped, not cast
    quant: dict | None  # hf_quant_config.json's "quantization" block for a Model Optimizer export
    kv_scales: dict[int, torch.Tensor] | None = None  # --int8_kv_cache: layer -> scale [1]
    calib_tokens: int = 0


def quant_config(source: Source, opts: ConvertOptions) -> dict:
    """QuantConfig.to_dict() (tensorrt_llm/models/modeling_utils.py) for this conversion."""
    q = {"quant_algo": None, "kv_cache_quant_algo": None, "group_size": opts.group_size,
         "smoothquant_val": 0.5, "clamp_val": None, "use_meta_recipe": False, "has_zero_point": False,
         "pre_quant_scale": False, "exclude_modules": None}  # fmt: skip
    if opts.int8_kv_cache:
        q.update(kv_cache_quant_algo="INT8")
    if opts.use_weight_only and opts.per_group:
        q.update(quant_algo="W4A16_AWQ")  # group-wise int4 as Model Optimizer's int4_wo exports it
    elif opts.use_weight_only:
        q.update(quant_algo=tn.WEIGHT_ONLY_ALGO[opts.weight_only_precision])
    elif source.quant is not None:
        sq = source.quant
        has_pqs = any(n.endswith(".pre_quant_scale") for n in source.state)
        q.update(
            quant_algo=sq.get("quant_algo"), kv_cache_quant_algo=sq.get("kv_cache_quant_algo"),
            group_size=sq.get("group_size") or 128, pre_quant_scale=has_pqs,
            has_zero_point=bool(sq.get("has_zero_point", False)),
            exclude_modules=_exclude_modules(sq.get("exclude_modules"), source.cfg),
        )  # fmt: skip
    return q


def _exclude_modules(patterns, cfg: ModelConfig):
    """Model Optimizer's exclusions (checkpoint names) -> TensorRT-LLM module names where they map."""
    if not patterns:
        return patterns
    fam = models.family(cfg)
    table = [(r"^model\.embed_tokens", "transformer.vocab_embedding"), (r"^model\.norm", "transformer.ln_f"),
             (r"model\.layers\.", "transformer.layers."), (r"mlp\.gate$", "mlp.router"),
             (r"self_attn\.[qkv]_proj$", "attention.qkv"), (r"self_attn\.o_proj$", "attention.dense"),
             (r"mlp\.gate_proj$", "mlp.fc"), (r"mlp\.up_proj$", "mlp.gate"),
             (r"mlp\.down_proj$", "mlp.proj")]  # fmt: skip
    out = []
    for p in patterns:
        name = models.rename(p, fam.RENAME)
        for pattern, repl in table:
            name = re.sub(pattern, repl, name)
        if name not in out:
            out.append(name)
    return out


def trtllm_config(source: Source, opts: ConvertOptions, dtype: str) -> dict:
    """PretrainedConfig.to_dict() as LLaMAConfig writes it (tensorrt_llm/models/modeling_utils.py,
    llama/config.py), plus the fields the EXAONE-4 / K-EXAONE extension needs."""
    cfg = source.cfg
    tp, pp = opts.tp_size, opts.pp_size
    moe = {
        "num_experts": cfg.num_experts, "shared_expert_intermediate_size": 0,
        "top_k": cfg.num_experts_per_tok, "normalization_mode": None, "sparse_mixer_epsilon": 0.01,
        "tp_mode": 0, "device_limited_n_group": 0, "device_limited_topk_group": 0,
        "device_limited_routed_scaling_factor": 1.0,
    }  # fmt: skip
    out = {
        "producer": {"name": "exaone", "version": __version__},
        "architecture": tn.ARCHITECTURES[cfg.family],
        "dtype": dtype,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_act": "silu",
        "logits_dtype": "float32",
        "norm_epsilon": cfg.rms_norm_eps,
        "runtime_defaults": None,
        "position_embedding_type": "rope_gpt_neox",
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "mapping": {
            "world_size": tp * pp,
            "gpus_per_node": 8,
            "cp_size": 1,
            "tp_size": tp,
            "pp_size": pp,
            "moe_tp_size": tp,
            "moe_cluster_size": 1,
            "moe_ep_size": 1,
            "attn_tp_size": tp,
            "attn_cp_size": 1,
            "cp_config": {},
            "auto_parallel": False,
        },  # fmt: skip
        "quantization": quant_config(source, opts),
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "head_size": cfg.head_dim,
        "qk_layernorm": cfg.family != "exaone3",
        "rotary_embedding_dim": cfg.head_dim,
        "mlp_bias": False,
        "attn_bias": False,
        "rotary_base": cfg.rope_theta,
        "rotary_scaling": cfg.raw.get("rope_scaling") if cfg.family == "exaone3" else cfg.rope_scaling,
        "residual_mlp": False,
        "disable_weight_only_quant_plugin": False,
        "fc_after_embed": False,
        "use_input_layernorm_in_first_layer": True,
        "use_last_layernorm": True,
        "layer_idx_offset": 0,
        "moe": moe,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids)
        if len(cfg.eos_token_ids) > 1
        else next(iter(cfg.eos_token_ids), None),
        "pad_token_id": cfg.pad_token_id,
    }
    if source.quant is not None:
        out["source_quantization"] = source.quant  # hf_quant_config.json's block, to read back as it was
    if cfg.family != "exaone3":
        out["sliding_window"] = cfg.sliding_window
        out["layer_types"] = list(cfg.layer_types)
    if cfg.family == "exaone_moe":
        moe.update(
            shared_expert_intermediate_size=cfg.moe_intermediate_size * cfg.num_shared_experts,
            normalization_mode=1 if cfg.norm_topk_prob else 0,
            device_limited_n_group=cfg.n_group,
            device_limited_topk_group=cfg.topk_group,
            device_limited_routed_scaling_factor=cfg.routed_scaling_factor,
        )
        out.update(
            moe_intermediate_size=cfg.moe_intermediate_size,
            mlp_layer_types=list(cfg.mlp_layer_types),
            scoring_func="sigmoid",
            num_nextn_predict_layers=cfg.num_mtp_layers,
        )
    return out


def hf_config(tc: dict, source: str) -> dict:
    """The Hugging Face config.json of the family, rebuilt from a TensorRT-LLM config."""
    arch = tc.get("architecture")
    family = {v: k for k, v in tn.ARCHITECTURES.items()}.get(arch)
    if family is None and arch == "LlamaForCausalLM":
        family = "exaone3"  # a LLaMA-layout checkpoint reads back as the same computation
    if family is None:
        raise ExaoneError(f"{source}: architecture {arch!r} is not an EXAONE architecture")
    try:
        common = dict(
            vocab_size=tc["vocab_size"], hidden_size=tc["hidden_size"],
            intermediate_size=tc["intermediate_size"],
            num_attention_heads=tc["num_attention_heads"], num_key_value_heads=tc["num_key_value_heads"],
            max_position_embeddings=tc["max_position_embeddings"], rope_theta=tc.get("rotary_base", 10000.0),
            rope_scaling=tc.get("rotary_scaling"),
            tie_word_embeddings=bool(tc.get("tie_word_embeddings", False)),
            torch_dtype=tc["dtype"], bos_token_id=tc.get("bos_token_id"), eos_token_id=tc.get("eos_token_id"),
            pad_token_id=tc.get("pad_token_id"),
        )  # fmt: skip
        if family == "exaone3":
            return dict(
                model_type="exaone", architectures=["ExaoneForCausalLM"], num_layers=tc["num_hidden_layers"],
                layer_norm_epsilon=tc["norm_epsilon"], activation_function="silu",
                head_dim=tc.get("head_size"),
                **common,
            )  # fmt: skip
        out = dict(
            model_type=family, architectures=[arch], num_hidden_layers=tc["num_hidden_layers"],
            rms_norm_eps=tc["norm_epsilon"], hidden_act="silu", head_dim=tc["head_size"],
            sliding_window=tc.get("sliding_window"),
            layer_types=tc.get("layer_types") or [FULL] * tc["num_hidden_layers"],
            **common,
        )  # fmt: skip
        if family == "exaone_moe":
            moe = tc["moe"]
            out.update(
                num_experts=moe["num_experts"], num_experts_per_tok=moe["top_k"],
                moe_intermediate_size=tc["moe_intermediate_size"],
                num_shared_experts=moe["shared_expert_intermediate_size"] // tc["moe_intermediate_size"],
                n_group=moe["device_limited_n_group"], topk_group=moe["device_limited_topk_group"],
                routed_scaling_factor=moe["device_limited_routed_scaling_factor"],
                norm_topk_prob=bool(moe["normalization_mode"]), mlp_layer_types=tc["mlp_layer_types"],
                num_nextn_predict_layers=tc.get("num_nextn_predict_layers", 0),
            )  # fmt: skip
        return out
    except (KeyError, TypeError) as e:
        raise ExaoneError(f"{source}: TensorRT-LLM config lacks field {e}") from None
