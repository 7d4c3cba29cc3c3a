"""TensorRT-LLM checkpoint format: `config.json` + one `rank{N}.safetensors` per rank.

`convert` writes it from a Hugging Face EXAONE directory, unquantized or a Model Optimizer export
from `exaone quantize` (names, splits and packing: trtllm_names.py, trtllm_linear.py,
trtllm_wo.py); `read_as_hf` merges the ranks back into one state dict under the family's Hugging
Face (and Model Optimizer) names, so `load_model` (and through it `run`) can load a converted
directory. Decisions and the EXAONE-4 / K-EXAONE extensions: docs/convert.md.
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exaone import __version__
from exaone.core import checkpoint
from exaone.core import manifest as mf
from exaone.core import trtllm_linear as tl
from exaone.core import trtllm_names as tn
from exaone.core import trtllm_wo as wo
from exaone.core.config import FULL, ModelConfig, load_config, parse_config
from exaone.core.errors import ExaoneError
from exaone.core.model import IGNORED, family_module, rename

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_ONLY_ALGO = {"int8": "W8A16", "int4": "W4A16"}
ALGO_BITS = {"W8A16": 8, "W4A16": 4}
# Model Optimizer quant_algo values whose export maps onto TensorRT-LLM tensors here.
MODELOPT_ALGOS = {"FP8": "fp8", "W8A8_SQ_PER_CHANNEL": "int8_sq", "W4A16_AWQ": "int4_awq",
                  "W4A8_AWQ": "w4a8_awq", "W8A16": "int8_wo"}  # fmt: skip
# Files a user needs beside the weights to run the converted model (trtllm-build ignores them).
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "generation_config.json", "chat_template.jinja", "added_tokens.json",
)  # fmt: skip
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


# --- detection and validation ----------------------------------------------------------------


def is_trtllm_checkpoint(directory: str | Path) -> bool:
    """A directory whose config.json is a TensorRT-LLM PretrainedConfig (not a Hugging Face config)."""
    d = Path(directory)
    try:
        raw = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and "architecture" in raw and "mapping" in raw and "model_type" not in raw


def resolve_dtype(opts: ConvertOptions, cfg: ModelConfig) -> str:
    """convert_utils.infer_dtype: 'auto' takes the checkpoint's dtype, float32 becomes float16."""
    if opts.dtype == "auto":
        found = cfg.torch_dtype if cfg.torch_dtype in DTYPES else "float16"
        return "float16" if found == "float32" else found
    if opts.dtype not in DTYPES:
        raise ExaoneError(f"--dtype {opts.dtype!r}: expected auto, {', '.join(DTYPES)}")
    return opts.dtype


def validate(cfg: ModelConfig, opts: ConvertOptions, quant: dict | None):
    tp, pp = opts.tp_size, opts.pp_size
    if tp < 1 or pp < 1:
        raise ExaoneError(f"--tp_size {tp} / --pp_size {pp}: both must be at least 1")
    if cfg.num_heads % tp:
        raise ExaoneError(f"--tp_size {tp} does not divide num_attention_heads {cfg.num_heads}")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ExaoneError(
            f"--tp_size {tp} does not divide num_key_value_heads {cfg.num_kv_heads} "
            "(nor is it a multiple of it, which would duplicate kv heads as TensorRT-LLM does)"
        )
    if cfg.num_layers % pp:
        raise ExaoneError(f"--pp_size {pp} does not divide the {cfg.num_layers} layers")
    if cfg.intermediate_size % tp:
        raise ExaoneError(f"--tp_size {tp} does not divide intermediate_size {cfg.intermediate_size}")
    if cfg.family == "exaone_moe" and cfg.moe_intermediate_size % tp:
        raise ExaoneError(f"--tp_size {tp} does not divide moe_intermediate_size {cfg.moe_intermediate_size}")
    if opts.workers < 1:
        raise ExaoneError(f"--workers {opts.workers}: must be at least 1")
    if opts.use_weight_only:
        if quant is not None:
            raise ExaoneError("--use_weight_only: the input is already quantized (hf_quant_config.json)")
        if opts.weight_only_precision not in WEIGHT_ONLY_ALGO:
            raise ExaoneError(
                f"--weight_only_precision {opts.weight_only_precision!r}: expected int8 or int4"
            )
        if cfg.family == "exaone_moe":
            raise ExaoneError(
                "not supported: weight-only quantization of K-EXAONE experts (TensorRT-LLM preprocesses "
                "MoE weights with another interleave); quantize with `exaone quantize` instead"
            )
        if opts.per_group and opts.weight_only_precision != "int4":
            raise ExaoneError("--per_group: only int4 has a group-wise format (W4A16_AWQ) in TensorRT-LLM")
        if opts.per_group:
            _check_groups(cfg, opts)
        else:
            wo.layout_for_sm(opts.target_sm)
    elif opts.per_group:
        raise ExaoneError("--per_group needs --use_weight_only --weight_only_precision int4")
    if opts.int8_kv_cache:
        if quant is not None and quant.get("kv_cache_quant_algo"):
            raise ExaoneError(
                "--int8_kv_cache: the input already has a quantized KV cache (hf_quant_config.json)"
            )
        if opts.calib_size < 1 or opts.calib_max_seq_length < 1:
            raise ExaoneError("--calib_size and --calib_max_seq_length must be at least 1")


def _check_groups(cfg: ModelConfig, opts: ConvertOptions):
    g, tp = opts.group_size, opts.tp_size
    ins = {
        "hidden_size": cfg.hidden_size,
        "num_attention_heads * head_dim / tp_size": cfg.num_heads * cfg.head_dim // tp,
        "intermediate_size / tp_size": cfg.intermediate_size // tp,
    }
    for what, n in ins.items():
        if n % g:
            raise ExaoneError(
                f"--group_size {g} does not divide {what} ({n}): int4 groups cannot straddle it"
            )


def _source_quantization(src: Path, raw: dict) -> dict | None:
    path = src / "hf_quant_config.json"
    if not path.is_file():
        method = (raw.get("quantization_config") or {}).get("quant_method")
        if method:
            raise ExaoneError(
                f"{src}: not supported yet: converting a {method!r}-quantized checkpoint to the TensorRT-LLM "
                "format (Model Optimizer exports from `exaone quantize` are)"
            )
        return None
    try:
        quant = json.loads(path.read_text())["quantization"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ExaoneError(f"{path}: expected a JSON object with a 'quantization' block") from None
    algo = quant.get("quant_algo")
    if algo not in MODELOPT_ALGOS and algo is not None:
        raise ExaoneError(
            f"{path}: not supported yet: converting quant_algo {algo!r} "
            f"(supported: {', '.join(MODELOPT_ALGOS)})"
        )
    if quant.get("kv_cache_quant_algo") not in (None, "FP8", "INT8"):
        raise ExaoneError(
            f"{path}: kv_cache_quant_algo {quant.get('kv_cache_quant_algo')!r} is not supported"
        )
    return quant


# --- reading the source ----------------------------------------------------------------------


def load_source(src: str | Path) -> Source:
    """Config and every tensor under our module names (memory-mapped, not cast)."""
    src = Path(src)
    if is_trtllm_checkpoint(src):
        raise ExaoneError(
            f"{src}: already a TensorRT-LLM checkpoint (config.json has 'architecture' and 'mapping')"
        )
    cfg = load_config(src)
    quant = _source_quantization(src, cfg.raw)
    fam = family_module(cfg)
    state = {}
    for name, t in checkpoint.iter_tensors(checkpoint.scan(src)):
        if not IGNORED.search(name):
            state[rename(name, fam.RENAME)] = t
    if hasattr(fam, "prepare_state_dict"):
        state = fam.prepare_state_dict(state, cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if quant is not None:
        quantized = {n.rsplit(".", 1)[0] for n in state if n.endswith(".weight_scale")}
        bad = sorted(n for n in quantized if ".experts." in n or n.startswith(("lm_head", "mtp.")))
        if bad:
            raise ExaoneError(
                f"{src}: not supported yet: converting quantized {bad[0]} (experts, lm_head, MTP)"
            )
    return Source(cfg, state, quant)


# --- writing one rank ------------------------------------------------------------------------


def rank_weights(source: Source, opts: ConvertOptions, dtype: str, rank: int) -> dict[str, torch.Tensor]:
    cfg, state = source.cfg, source.state
    tp, pp = opts.tp_size, opts.pp_size
    tp_rank, pp_rank = rank % tp, rank // tp
    dt = DTYPES[dtype]
    per_stage = cfg.num_layers // pp
    out: dict[str, torch.Tensor] = {}

    def get(name, to=dt):
        if name not in state:
            raise ExaoneError(f"source checkpoint lacks tensor {name}")
        return state[name].to(to)

    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = get("model.embed_tokens.weight")
    if pp_rank == pp - 1:
        head = get("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
        out["lm_head.weight"] = tn.chunk(tn.pad_rows(head, tp), tp, tp_rank)
        out["transformer.ln_f.weight"] = get("model.norm.weight")
        for name in sorted(n for n in state if n.startswith("mtp.")):
            out[name] = get(name, torch.float32 if name.endswith("e_score_correction_bias") else dt)
    for layer in range(pp_rank * per_stage, (pp_rank + 1) * per_stage):
        src, dst = f"model.layers.{layer}.", f"transformer.layers.{layer - pp_rank * per_stage}."
        linears = ATTENTION + (DENSE_MLP if src + "mlp.gate_proj.weight" in state else SHARED_EXPERT)
        for target, parts, column, kv in linears:
            srcs = [_source_linear(state, src + p, dt, opts) for p in parts]
            tensors = tl.build(srcs, column, tp, tp_rank, kv, cfg.num_kv_heads, name=src + parts[0])
            out.update({f"{dst}{target}.{k}": v for k, v in _to_trt(tensors, dt, opts, dst + target).items()})
        if source.kv_scales is not None:  # --int8_kv_cache
            out[dst + "attention.kv_cache_scaling_factor"] = source.kv_scales[layer]
        k_scale, v_scale = (
            state.get(src + "self_attn.k_proj.k_scale"),
            state.get(src + "self_attn.v_proj.v_scale"),
        )
        if k_scale is not None and v_scale is not None:  # modelopt: kv_cache_scaling_factor = max(k, v)
            out[dst + "attention.kv_cache_scaling_factor"] = torch.maximum(
                k_scale.float(), v_scale.float()
            ).reshape(1)
        for suffix, target in tn.NORMS.items():
            if src + suffix in state:
                out[dst + target] = get(src + suffix)
        if src + "mlp.gate.weight" in state:
            out.update(_moe_weights(cfg, get, src, dst, tp, tp_rank))
    return out


def _source_linear(
    state: dict, prefix: str, dt: torch.dtype, opts: ConvertOptions
) -> dict[str, torch.Tensor]:
    found = {s: state[f"{prefix}.{s}"] for s in tl.TRT_SUFFIX if f"{prefix}.{s}" in state}
    if "weight" not in found:
        raise ExaoneError(f"source checkpoint lacks tensor {prefix}.weight")
    if "weight_scale" not in found:  # unquantized: cast, and group-quantize for --per_group
        w = found["weight"].to(dt)
        if opts.use_weight_only and opts.per_group:
            from exaone.quant import formats

            scale = formats.int4_block_scale(w, opts.group_size)
            return {"weight": formats.quantize_int4(w, scale, opts.group_size), "weight_scale": scale.to(dt)}
        return {"weight": w}
    if "pre_quant_scale" in found:
        found["pre_quant_scale"] = found["pre_quant_scale"].to(dt)  # Int8SmoothQuantLinear / AWQ: model dtype
    return found


def _to_trt(tensors: dict[str, torch.Tensor], dt, opts: ConvertOptions, name: str) -> dict[str, torch.Tensor]:
    w = tensors["weight"]
    if "weight_scale" not in tensors and opts.use_weight_only or w.dtype == torch.int8:
        layout = wo.layout_for_sm(opts.target_sm)
    if "weight_scale" not in tensors and opts.use_weight_only:  # TensorRT-LLM's own W8A16 / W4A16
        bits = ALGO_BITS[WEIGHT_ONLY_ALGO[opts.weight_only_precision]]
        wo.check_shape(w.shape[0], w.shape[1], bits, layout, name)
        q, scale = wo.symmetric_quantize(w, bits)
        return {"weight": wo.preprocess(q, bits, layout), "per_channel_scale": scale}
    if w.dtype == torch.int8 and "input_scale" not in tensors:  # modelopt int8_wo -> TensorRT-LLM W8A16
        wo.check_shape(w.shape[0], w.shape[1], 8, layout, name)
        return {"weight": wo.preprocess(w, 8, layout), "per_channel_scale": tensors["weight_scale"].to(dt)}
    return tl.to_trt(tensors)


def _moe_weights(cfg: ModelConfig, get, src: str, dst: str, tp: int, tp_rank: int) -> dict:
    out = {
        dst + "mlp.router.weight": get(src + "mlp.gate.weight", torch.float32),
        dst + "mlp.router.e_score_correction_bias": get(
            src + "mlp.gate.e_score_correction_bias", torch.float32
        ),
    }
    fc, proj = [], []
    for e in range(cfg.num_experts):
        p = f"{src}mlp.experts.{e}."
        up = tn.chunk(get(p + "up_proj.weight"), tp, tp_rank)
        gate = tn.chunk(get(p + "gate_proj.weight"), tp, tp_rank)
        fc.append(torch.cat([up, gate]))  # Mixtral's cat([w3, w1]): up first
        proj.append(tn.chunk(get(p + "down_proj.weight"), tp, tp_rank, 1))
    out[dst + "mlp.fc.weight"] = torch.stack(fc)
    out[dst + "mlp.proj.weight"] = torch.stack(proj)
    return out


# --- config.json -----------------------------------------------------------------------------


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
        q.update(quant_algo=WEIGHT_ONLY_ALGO[opts.weight_only_precision])
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
    fam = family_module(cfg)
    table = [(r"^model\.embed_tokens", "transformer.vocab_embedding"), (r"^model\.norm", "transformer.ln_f"),
             (r"model\.layers\.", "transformer.layers."), (r"mlp\.gate$", "mlp.router"),
             (r"self_attn\.[qkv]_proj$", "attention.qkv"), (r"self_attn\.o_proj$", "attention.dense"),
             (r"mlp\.gate_proj$", "mlp.fc"), (r"mlp\.up_proj$", "mlp.gate"),
             (r"mlp\.down_proj$", "mlp.proj")]  # fmt: skip
    out = []
    for p in patterns:
        name = rename(p, fam.RENAME)
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


# --- convert ---------------------------------------------------------------------------------


def convert(src: str | Path, out: str | Path, opts: ConvertOptions, force: bool = False, say=None) -> Path:
    """Write a TensorRT-LLM checkpoint for src into out; a no-op when out already records the same job."""
    src, out = Path(src), Path(out)
    say = say or (lambda msg: print(msg, file=sys.stderr))
    started = mf.now()
    if is_trtllm_checkpoint(src):
        raise ExaoneError(f"{src}: already a TensorRT-LLM checkpoint; give the Hugging Face directory")
    parent_manifest = mf.load_or_derive(src)
    if parent_manifest.kind == "trtllm-checkpoint":
        raise ExaoneError(f"{src}: already a TensorRT-LLM checkpoint; give the Hugging Face directory")
    cfg = load_config(src)
    validate(cfg, opts, _source_quantization(src, cfg.raw))
    dtype = resolve_dtype(opts, cfg)
    parent = mf.manifest_hash(parent_manifest)
    arguments = {"source": str(src.resolve()), **asdict(opts), "dtype": dtype}
    if not opts.int8_kv_cache:
        for key in ("calib_dataset", "calib_size", "calib_max_seq_length"):
            arguments.pop(key)
    if not force and mf.is_up_to_date(out, parent, arguments):
        say(f"{out}: already converted from {src} with the same options; nothing to do (--force redoes)")
        return out
    source = load_source(src)
    if opts.int8_kv_cache:
        from exaone.core import trtllm_kv

        source.kv_scales, source.calib_tokens = trtllm_kv.calibrate(
            src, opts.calib_dataset, opts.calib_size, opts.calib_max_seq_length, 0, say
        )
    world = opts.tp_size * opts.pp_size
    with mf.atomic_output_dir(out, force=force) as tmp:
        config = trtllm_config(source, opts, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")

        def write(rank: int):
            t0 = time.monotonic()
            weights = rank_weights(source, opts, dtype, rank)
            save_file(_unshared(weights), str(tmp / f"rank{rank}.safetensors"), metadata={"format": "pt"})
            size = sum(t.numel() * t.element_size() for t in weights.values()) / 2**20
            say(
                f"rank {rank + 1}/{world}: {len(weights)} tensors, {size:.1f} MiB "
                f"({time.monotonic() - t0:.1f} s)"
            )

        with ThreadPoolExecutor(max_workers=min(opts.workers, world)) as pool:
            list(pool.map(write, range(world)))
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, tmp / name)
        _write_manifest(tmp, source, parent_manifest, parent, dtype, opts, config, arguments, started)
    return out


def _calibration(source: Source, opts: ConvertOptions, parent_manifest):
    if opts.int8_kv_cache:
        return mf.Calibration(
            dataset=opts.calib_dataset, size=opts.calib_size, seq=opts.calib_max_seq_length, seed=0,
            tokens=source.calib_tokens,
        )  # fmt: skip
    return parent_manifest.quantization.calibration if parent_manifest.quantization else None


def _write_manifest(tmp, source, parent_manifest, parent, dtype, opts, config, arguments, started):
    q = config["quantization"]
    quant = None
    if q["quant_algo"] or q["kv_cache_quant_algo"]:
        if opts.use_weight_only:
            algorithm = f"{opts.weight_only_precision}_wo"
        else:
            algorithm = parent_manifest.quantization.algorithm if parent_manifest.quantization else None
            algorithm = algorithm or MODELOPT_ALGOS.get(q["quant_algo"], "none")  # none: only the KV cache
        extra = {"trtllm_quant_algo": q["quant_algo"], "trtllm_kv_cache_quant_algo": q["kv_cache_quant_algo"]}
        if q["quant_algo"] in ("W8A16", "W4A16"):
            extra["weight_layout"] = wo.layout_for_sm(opts.target_sm)
        quant = mf.Quantization(
            algorithm=algorithm,
            kv_cache_dtype=(q["kv_cache_quant_algo"] or "").lower() or None,
            group_size=q["group_size"] if q["quant_algo"] in ("W4A16_AWQ", "W4A8_AWQ") else None,
            calibration=_calibration(source, opts, parent_manifest),
            extra=extra,
        )
    model = parent_manifest.model.model_copy(update={"architecture": tn.ARCHITECTURES[source.cfg.family]})
    m = mf.Manifest(
        kind="trtllm-checkpoint",
        model=model,
        dtype=dtype,
        quantization=quant,
        mapping=mf.ParallelMapping(
            world_size=opts.tp_size * opts.pp_size, tp_size=opts.tp_size, pp_size=opts.pp_size
        ),
        files=mf.list_files(tmp),
        parent=parent,
        producer=mf.make_producer(arguments, started),
    )
    mf.write_manifest(tmp, m)


# --- reading back ----------------------------------------------------------------------------


def read_as_hf(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, state dict under the family's checkpoint names), every rank merged.

    TensorRT-LLM's own weight-only tensors (W8A16 / W4A16 with per_channel_scale) are dequantized
    with its math (float32); Model Optimizer formats come back in Model Optimizer's export layout, with the
    HF config's `quantization_config` and the `hf_quant_config` block (returned under the
    config's "hf_quant_config" key) for the quantized loader."""
    d = Path(directory)
    if not is_trtllm_checkpoint(d):
        raise ExaoneError(f"{d}: not a TensorRT-LLM checkpoint (config.json lacks 'architecture'/'mapping')")
    tc = json.loads((d / "config.json").read_text())
    hf = hf_config(tc, str(d / "config.json"))
    cfg = parse_config(hf, source=str(d / "config.json"))
    mapping = tc["mapping"]
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    q = tc.get("quantization") or {}
    algo = q.get("quant_algo")
    if algo not in (None, *ALGO_BITS, *MODELOPT_ALGOS):
        raise ExaoneError(f"{d / 'config.json'}: quant_algo {algo!r} is not supported by this reader")
    layout = _weight_layout(d)
    ranks = [_read_rank(d / f"rank{r}.safetensors") for r in range(tp * pp)]
    for weights in ranks:
        _dequantize_weight_only(weights, algo, layout)
    state = _merge(cfg, ranks, tp, pp)
    if any(n.endswith(".weight_scale") for n in state):
        quant = tc.get("source_quantization") or {
            k: q.get(k) for k in ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules")
        }
        hf["quantization_config"] = {"quant_method": "modelopt", **quant}
        hf["hf_quant_config"] = {
            "producer": {"name": "exaone", "version": __version__},
            "quantization": quant,
        }
    return hf, to_checkpoint_names(state, family_module(cfg))


def _weight_layout(d: Path) -> str:
    m = mf.read_manifest(d)
    if m is not None and m.quantization is not None:
        return m.quantization.extra.get("weight_layout", "sm90")
    return "sm90"  # without our manifest, assume the SM90 (Hopper) layout; docs/convert.md


def _read_rank(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ExaoneError(f"{path}: missing (config.json's mapping names this rank)")
    checkpoint.read_header(path)
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _dequantize_weight_only(weights: dict[str, torch.Tensor], algo, layout: str):
    """TensorRT-LLM's W8A16 / W4A16 (processed weight + per_channel_scale) -> float32 q * scale.

    Not back to an int8 format: each tensor-parallel rank of a row-parallel linear has its own
    per-channel scales, which no single-scale format can hold."""
    for scale_name in [n for n in weights if n.endswith(".per_channel_scale")]:
        module = scale_name.removesuffix(".per_channel_scale")
        bits = ALGO_BITS.get(algo, 8)
        q = wo.unpreprocess(weights[module + ".weight"], bits, layout)
        weights[module + ".weight"] = wo.dequantize(q, weights.pop(scale_name), torch.float32)


def _merge(cfg: ModelConfig, ranks: list[dict], tp: int, pp: int) -> dict[str, torch.Tensor]:
    """Per-rank TensorRT-LLM tensors -> full tensors under our module names."""
    per_stage = cfg.num_layers // pp
    first, last = ranks[:tp], ranks[(pp - 1) * tp :]
    state = {"model.embed_tokens.weight": first[0]["transformer.vocab_embedding.weight"]}
    state["model.norm.weight"] = last[0]["transformer.ln_f.weight"]
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = torch.cat([r["lm_head.weight"] for r in last])[: cfg.vocab_size]
    state.update({n: t for n, t in last[0].items() if n.startswith("mtp.")})
    q_rows, kv_rows = (
        cfg.num_heads * cfg.head_dim // tp,
        cfg.num_kv_heads * cfg.head_dim // min(tp, cfg.num_kv_heads),
    )
    for layer in range(cfg.num_layers):
        stage = ranks[(layer // per_stage) * tp : (layer // per_stage + 1) * tp]
        src, dst = f"transformer.layers.{layer % per_stage}.", f"model.layers.{layer}."
        moe = src + "mlp.router.weight" in stage[0]
        inter = (cfg.moe_intermediate_size * cfg.num_shared_experts if moe else cfg.intermediate_size) // tp
        rows = {"attention.qkv": [q_rows, kv_rows, kv_rows], "mlp.shared_expert.fc": [inter, inter]}
        for target, parts, column, kv in ATTENTION + (SHARED_EXPERT if moe else DENSE_MLP):
            prefix = f"{src}{target}."
            per_rank = [tl.from_trt({n.removeprefix(prefix): t for n, t in r.items() if n.startswith(prefix)})
                        for r in stage]  # fmt: skip
            pieces = tl.split_fused(per_rank, rows.get(target, [1]), column, kv, cfg.num_kv_heads)
            for p, tensors in zip(parts, pieces, strict=True):
                state.update({f"{dst}{p}.{s}": t for s, t in tensors.items()})
        kv_scale = stage[0].get(src + "attention.kv_cache_scaling_factor")
        if kv_scale is not None and dst + "self_attn.k_proj.weight_scale" in state:
            # only a quantized projection carries the KV scales in Model Optimizer's format
            state[dst + "self_attn.k_proj.k_scale"] = state[dst + "self_attn.v_proj.v_scale"] = (
                kv_scale.reshape(())
            )
        for suffix, target in tn.NORMS.items():
            if src + target in stage[0]:
                state[dst + suffix] = stage[0][src + target]
        if moe:
            state.update(_merge_moe(cfg, stage, src, dst))
    return state


def _merge_moe(cfg: ModelConfig, stage: list[dict], src: str, dst: str) -> dict:
    out = {
        dst + "mlp.gate.weight": stage[0][src + "mlp.router.weight"],
        dst + "mlp.gate.e_score_correction_bias": stage[0][src + "mlp.router.e_score_correction_bias"],
    }
    fc = [r[src + "mlp.fc.weight"] for r in stage]  # [E, 2 I/tp, H]: up then gate
    ups = torch.cat([f.chunk(2, dim=1)[0] for f in fc], dim=1)
    gates = torch.cat([f.chunk(2, dim=1)[1] for f in fc], dim=1)
    downs = torch.cat([r[src + "mlp.proj.weight"] for r in stage], dim=2)
    for e in range(cfg.num_experts):
        p = f"{dst}mlp.experts.{e}."
        out.update(
            {p + "up_proj.weight": ups[e], p + "gate_proj.weight": gates[e], p + "down_proj.weight": downs[e]}
        )
    return out


def to_checkpoint_names(state: dict[str, torch.Tensor], fam) -> dict[str, torch.Tensor]:
    return {rename(n, fam.RENAME_BACK): t for n, t in state.items()}


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


# --- load_model hook -------------------------------------------------------------------------


def as_hf_dir(directory: str | Path) -> Path:
    """Read a TensorRT-LLM checkpoint back into a temporary Hugging Face directory (removed at exit)."""
    d = Path(directory)
    hf, state = read_as_hf(d)
    tmp = Path(tempfile.mkdtemp(prefix="exaone-trtllm-"))
    atexit.register(shutil.rmtree, tmp, True)
    hf_quant = hf.pop("hf_quant_config", None)
    if hf_quant is not None:
        (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4))
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    save_file(_unshared(state), str(tmp / "model.safetensors"))
    for name in SIDE_FILES:
        if (d / name).is_file():
            shutil.copy(d / name, tmp / name)
    return tmp


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
