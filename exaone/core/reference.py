"""The transformers copy of an EXAONE checkpoint: transformers' own classes holding its weights.

It is the reference no one here wrote (`summarize --test_hf` compares against it) and the module tree
Model Optimizer calibrates and exports (`exaone quantize`: its HF exporter needs a transformers model
and `config.architectures`). EXAONE-3 has no transformers class (its own needs remote code, which we
never run), so it becomes `LlamaForCausalLM`, the same computation under other names; EXAONE-4.0 and
K-EXAONE use transformers' `Exaone4ForCausalLM` / `ExaoneMoeForCausalLM`. `name_back` maps exported
tensor names back to the checkpoint's own, so a quantized directory keeps the EXAONE layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from exaone.core.config import ModelConfig, load_config
from exaone.core.errors import ExaoneError
from exaone.core.loader import open_checkpoint, read_state
from exaone.core.trtllm.names import is_trtllm_checkpoint

# Checkpoint tensors transformers' classes do not hold; they are written back untouched.
PASSTHROUGH = re.compile(r"^mtp\.")


@dataclass
class HFModel:
    model: nn.Module
    # transformers tensor-name prefix -> checkpoint prefix (from every source tensor's name)
    prefix_back: dict[str, str]
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)

    def name_back(self, name: str) -> str:
        """Exported (transformers) tensor name -> the checkpoint's naming."""
        if name in self.prefix_back:
            return self.prefix_back[name]
        prefix, _, leaf = name.rpartition(".")
        if prefix in self.prefix_back:
            return f"{self.prefix_back[prefix]}.{leaf}"
        return name


def _transformers_config(cfg: ModelConfig, dtype: torch.dtype, use_cache: bool):
    common = cfg.transformers_kwargs()
    if cfg.family == "exaone3":
        from transformers import LlamaConfig, LlamaForCausalLM

        tcfg, cls = LlamaConfig(**common), LlamaForCausalLM
    elif cfg.family == "exaone4":
        from transformers import Exaone4Config, Exaone4ForCausalLM

        tcfg = Exaone4Config(
            **common,
            sliding_window=cfg.sliding_window,
            layer_types=list(cfg.layer_types),  # derived by us: transformers breaks when it is missing
        )
        cls = Exaone4ForCausalLM
    else:
        from transformers import ExaoneMoeConfig, ExaoneMoeForCausalLM

        tcfg = ExaoneMoeConfig(
            **common,
            sliding_window=cfg.sliding_window,
            layer_types=list(cfg.layer_types),
            mlp_layer_types=list(cfg.mlp_layer_types),
            moe_intermediate_size=cfg.moe_intermediate_size,
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            num_shared_experts=cfg.num_shared_experts,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        cls = ExaoneMoeForCausalLM
    tcfg.architectures = [cls.__name__]
    tcfg.use_cache = use_cache  # calibration needs no cache (and EXAONE-4's cache setup is what broke it)
    tcfg.dtype = dtype
    return tcfg, cls


def build(
    model_dir, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, use_cache: bool = False
) -> HFModel:
    """The transformers model of cfg's family with the checkpoint's weights, in eval mode on device."""
    tcfg, cls = _transformers_config(cfg, dtype, use_cache)
    with torch.device("meta"):
        model = cls(tcfg)
    ck = open_checkpoint(model_dir)
    # Module names are transformers' names; fused experts stay fused (transformers stores them so).
    named = read_state(ck, dtype, fp32=[r"e_score_correction_bias$"], prepare=False)
    back = {target: where.split(":", 1)[1] for target, where in ck.origin.items()}
    state, prefix_back, passthrough = {}, {}, {}
    for target, tensor in named.items():
        name = back.get(target, target)
        if PASSTHROUGH.search(name):
            passthrough[name] = tensor
            continue
        state[target] = tensor
        if target != name:
            prefix_back[target] = name
            if name.endswith(".weight") and target.endswith(".weight"):  # a module renamed as a whole
                prefix_back[target.removesuffix(".weight")] = name.removesuffix(".weight")
    if cfg.family == "exaone_moe":
        _fuse_experts(state, cfg)
    expected = set(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        what = f"lacks {sorted(missing)[0]}" if missing else f"has unexpected {sorted(unexpected)[0]}"
        raise ExaoneError(f"{model_dir}: checkpoint {what} for {cls.__name__} (does config.json match?)")
    model.load_state_dict(state, strict=False, assign=True)
    _rebuild_buffers(model, tcfg)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return HFModel(model.to(device).eval(), prefix_back, passthrough)


def check_plain_checkpoint(model_dir: Path):
    """The reference reads unquantized HF checkpoints only (what summarize.py's --hf_model_dir is)."""
    config = model_dir / "config.json"
    raw = json.loads(config.read_text()) if config.is_file() else {}
    if (model_dir / "hf_quant_config.json").is_file() or raw.get("quantization_config"):
        raise ExaoneError(
            f"--test_hf: {model_dir} is a quantized checkpoint; the Hugging Face reference needs the "
            "original one: pass --hf_model_dir"
        )
    if (model_dir / "rank0.safetensors").is_file() or is_trtllm_checkpoint(model_dir):
        raise ExaoneError(
            f"--test_hf: {model_dir} is a TensorRT-LLM checkpoint; "
            "pass the Hugging Face one with --hf_model_dir"
        )


def load_reference(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """transformers' causal LM (eval mode, with its KV cache) computing what our model for model_dir does."""
    model_dir = Path(model_dir)
    check_plain_checkpoint(model_dir)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # "Loading weights" bars are noise beside our own progress
    return build(model_dir, load_config(model_dir), dtype, device, use_cache=True).model


def _fuse_experts(state: dict[str, torch.Tensor], cfg: ModelConfig):
    """Per-expert linears (original K-EXAONE files) -> transformers' fused 3-D expert tensors."""
    for i, kind in enumerate(cfg.mlp_layer_types):
        prefix = f"model.layers.{i}.mlp.experts."
        if kind != "sparse" or f"{prefix}gate_up_proj" in state:
            continue
        gate_up, down = [], []
        for e in range(cfg.num_experts):
            p = f"{prefix}{e}."
            gate_up.append(torch.cat([state.pop(p + "gate_proj.weight"), state.pop(p + "up_proj.weight")]))
            down.append(state.pop(p + "down_proj.weight"))
        state[f"{prefix}gate_up_proj"] = torch.stack(gate_up)
        state[f"{prefix}down_proj"] = torch.stack(down)


def _rebuild_buffers(model: nn.Module, tcfg):
    """Non-persistent buffers (RoPE frequencies) are still on meta: rebuild their modules."""
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, type(module)(config=tcfg))
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ExaoneError(
            f"internal: buffer {left[0]} was not initialized when building the calibration model"
        )
