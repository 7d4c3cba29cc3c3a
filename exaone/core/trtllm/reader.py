"""Reading a TensorRT-LLM checkpoint back: every rank merged into one state dict under our module
names, with the ModelConfig rebuilt from its config.json, for the one loader (exaone/core/loader.py).

TensorRT-LLM's own weight-only tensors (W8A16 / W4A16 with per_channel_scale) are dequantized with its
math (float32); Model Optimizer formats come back in Model Optimizer's export layout, so the quantized
linears load as they would from an `exaone quantize` directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from exaone.core.config import ModelConfig, parse_config
from exaone.core.errors import ExaoneError
from exaone.core.formats.registry import trtllm_algos
from exaone.core.io import checkpoint
from exaone.core.io import manifest as mf
from exaone.core.trtllm import linear as tl
from exaone.core.trtllm import names as tn
from exaone.core.trtllm import weight_only as wo
from exaone.core.trtllm.config import hf_config


@dataclass
class Read:
    hf_config: dict  # the family's Hugging Face config.json (quantization_config when quantized)
    cfg: ModelConfig
    state: dict[str, torch.Tensor]  # module names
    quantization: dict | None  # Model Optimizer's "quantization" block, when quantized linears remain


def read(directory: str | Path) -> Read:
    """Every rank of a TensorRT-LLM checkpoint merged, under our module names."""
    d = Path(directory)
    if not tn.is_trtllm_checkpoint(d):
        raise ExaoneError(f"{d}: not a TensorRT-LLM checkpoint (config.json lacks 'architecture'/'mapping')")
    tc = json.loads((d / "config.json").read_text())
    hf = hf_config(tc, str(d / "config.json"))
    cfg = parse_config(hf, source=str(d / "config.json"))
    mapping = tc["mapping"]
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    q = tc.get("quantization") or {}
    algo = q.get("quant_algo")
    if algo not in (None, *tn.ALGO_BITS, *trtllm_algos()):
        raise ExaoneError(f"{d / 'config.json'}: quant_algo {algo!r} is not supported by this reader")
    layout = _weight_layout(d)
    ranks = [_read_rank(d / f"rank{r}.safetensors") for r in range(tp * pp)]
    for weights in ranks:
        _dequantize_weight_only(weights, algo, layout)
    state = _merge(cfg, ranks, tp, pp)
    quant = None
    if any(n.endswith(".weight_scale") for n in state):
        quant = tc.get("source_quantization") or {
            k: q.get(k) for k in ("quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules")
        }
        hf["quantization_config"] = {"quant_method": "modelopt", **quant}
    return Read(hf, cfg, state, quant)


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
        bits = tn.ALGO_BITS.get(algo, 8)
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
        for target, parts, column, kv in tn.ATTENTION + (tn.SHARED_EXPERT if moe else tn.DENSE_MLP):
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



