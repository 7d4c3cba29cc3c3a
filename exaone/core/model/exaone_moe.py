"""K-EXAONE (`model_type: exaone_moe`): pre-norm blocks with per-head q/k RMSNorm, hybrid
sliding/full attention (NoPE on full layers, see ModelConfig.uses_rope), and sigmoid-routed MoE
MLPs with shared experts; layers listed "dense" in `mlp_layer_types` keep a plain gated MLP.

Routed experts are kept as one nn.Linear triple each (`mlp.experts.{e}.gate_proj` ...) so that
Model Optimizer sees ordinary linears; fused 3-D checkpoints are split on load. The router is not
an nn.Linear on purpose: it stays unquantized. The multi-token-prediction layer (`mtp.*`) is
loaded and kept, but the forward pass does not use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exaone.core.config import ModelConfig
from exaone.core.errors import ExaoneError
from exaone.core.model.layers import Attention, CausalLM, GatedMLP, PreNormBlock, RMSNorm

# Checkpoints keep the router bias beside the router (`mlp.e_score_correction_bias`).
RENAME = [(r"\.mlp\.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias")]
RENAME_BACK = [(r"\.mlp\.gate\.e_score_correction_bias$", ".mlp.e_score_correction_bias")]
FP32_PARAMS = [r"\.e_score_correction_bias$"]


class Router(nn.Module):
    """Sigmoid scores in fp32; the bias only picks experts (within the best groups), never weighs them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids [N, top_k] and their fp32 weights [N, top_k] for tokens x [N, H]."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        n, num_experts = choice.shape
        group_scores = choice.view(n, self.n_group, -1).topk(2, dim=-1)[0].sum(-1)
        groups = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
        keep = keep.repeat_interleave(num_experts // self.n_group, dim=1)
        experts = choice.masked_fill(~keep, float("-inf")).topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return experts, weights * self.scale


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(
            GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)
        )
        self.shared_experts = GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        experts, weights = self.gate(flat)
        out = torch.zeros_like(flat)
        # Reference path: one pass per expert that received tokens.
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            y = self.experts[e](flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(x.shape) + self.shared_experts(x)


class Block(PreNormBlock):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)), the MLP dense or sparse per layer."""

    def __init__(self, cfg: ModelConfig, layer: int, sparse: bool | None = None):
        super().__init__()
        if sparse is None:
            sparse = cfg.mlp_layer_types[layer] == "sparse"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, qk_norm=True)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg) if sparse else GatedMLP(cfg.hidden_size, cfg.intermediate_size)


class MTP(nn.Module):
    """Multi-token prediction: fc(cat(pre_fc_norm_embedding(embed(x[t+1])), pre_fc_norm_hidden(h[t])))
    -> layers -> norm -> the shared lm_head. Names as vLLM and TensorRT-LLM read them (`mtp.*`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(h, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(h, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(self._layer(cfg, i) for i in range(cfg.num_mtp_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)

    @staticmethod
    def _layer(cfg: ModelConfig, index: int) -> Block:
        # Dense MLP and global NoPE attention, as TensorRT-LLM runs it; its cache slot follows the
        # main layers (TensorRT-LLM numbers it model.layers.{num_layers + index}).
        block = Block(cfg, 0, sparse=False)
        attn = block.self_attn
        attn.layer, attn.window, attn.rope = cfg.num_layers + index, None, False
        return block


class ExaoneMoeForCausalLM(CausalLM):
    block_class = Block

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if cfg.num_mtp_layers:
            self.mtp = MTP(cfg)


Model = ExaoneMoeForCausalLM


def prepare_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Split fused 3-D experts (gate_up_proj [E, 2I, H], gate first; down_proj [E, H, I]) per expert."""
    for name in [n for n in state if n.endswith(".mlp.experts.gate_up_proj")]:
        prefix = name.removesuffix("gate_up_proj")
        gate, up = state.pop(name).chunk(2, dim=1)
        for e in range(gate.shape[0]):
            state[f"{prefix}{e}.gate_proj.weight"] = gate[e]
            state[f"{prefix}{e}.up_proj.weight"] = up[e]
    for name in [n for n in state if n.endswith(".mlp.experts.down_proj")]:
        prefix = name.removesuffix("down_proj")
        for e, w in enumerate(state.pop(name)):
            state[f"{prefix}{e}.down_proj.weight"] = w
    has_mtp = any(n.startswith("mtp.") for n in state)
    if has_mtp and not cfg.num_mtp_layers:
        raise ExaoneError(
            "checkpoint holds MTP tensors (mtp.*) but config.json sets no num_nextn_predict_layers "
            "(older K-EXAONE configs omit it): set it to the number of mtp.layers"
        )
    if cfg.num_mtp_layers and not has_mtp:
        raise ExaoneError(
            f"config.json sets num_nextn_predict_layers={cfg.num_mtp_layers} but the checkpoint holds "
            "no mtp.* tensors (transformers drops them on re-save): set it to 0"
        )
    return state
