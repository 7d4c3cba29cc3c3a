"""A transformers model holding an EXAONE checkpoint's weights, for Model Optimizer to calibrate and export.

Model Optimizer's HF exporter needs a transformers module tree and `config.architectures`. EXAONE-3
has no transformers class, so it becomes a `LlamaForCausalLM` (the same computation); EXAONE-4 and
K-EXAONE use transformers' own classes. `names_back` maps the exported tensor names back to the
checkpoint's own, so the quantized directory keeps the EXAONE layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from exaone.core import checkpoint
from exaone.core.config import ModelConfig
from exaone.core.errors import ExaoneError
from exaone.core.model import family_module, rename

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


def _transformers_config(cfg: ModelConfig, dtype: torch.dtype):
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
    tcfg.use_cache = False  # calibration needs no cache (and EXAONE-4's cache setup is what broke it)
    tcfg.dtype = dtype
    return tcfg, cls


def build(model_dir, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> HFModel:
    """The transformers model of cfg's family with the checkpoint's weights, in eval mode on device."""
    tcfg, cls = _transformers_config(cfg, dtype)
    fam = family_module(cfg)
    with torch.device("meta"):
        model = cls(tcfg)
    state: dict[str, torch.Tensor] = {}
    prefix_back: dict[str, str] = {}
    passthrough: dict[str, torch.Tensor] = {}
    infos = checkpoint.scan(model_dir)
    for name, tensor in checkpoint.iter_tensors(infos):
        if PASSTHROUGH.search(name):
            passthrough[name] = tensor
            continue
        target = rename(name, fam.RENAME)
        if name.endswith("e_score_correction_bias"):
            tensor = tensor.float()
        elif tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[target] = tensor
        if target != name:
            prefix_back[target] = name
            if name.endswith(".weight") and target.endswith(".weight"):  # a module renamed as a whole
                prefix_back[target.removesuffix(".weight")] = name.removesuffix(".weight")
    if cfg.family == "exaone_moe":
        _fuse_experts(state, cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
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
