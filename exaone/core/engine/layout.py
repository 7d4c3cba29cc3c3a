"""The runtime weight layout: q/k/v fused into one projection, gate/up into one, per plain linear.

`fuse(model)` rewrites a loaded model in place (concatenating the weights) at build time; on a
meta-device model it only reshapes the module tree, so the engine loader can assign the stored
tensors under the same names without any re-layout. Quantized linears are left as they are: their
scales differ per projection, so they keep the Model Optimizer layout and the reference math.
"""

from __future__ import annotations

import torch
from torch import nn

from exaone.core.kernels import ops
from exaone.core.model.exaone_moe import SparseMoE
from exaone.core.model.layers import Attention, GatedMLP


class FusedQKVAttention(Attention):
    """The model's Attention (same forward, masking and RoPE rules) with one q/k/v GEMM."""

    def project_qkv(self, x):
        return self.qkv_proj(x).split(self.qkv_sizes, dim=-1)


class FusedGatedMLP(nn.Module):
    """The gated MLP with one gate/up GEMM and silu(gate) * up in one kernel."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj

    def forward(self, x):
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class FusedSparseMoE(nn.Module):
    """K-EXAONE's MoE layer with every routed expert's weights stacked ([E, 2I, H] gate/up rows,
    [E, H, I] down): the router (unchanged, float32) picks, the fused kernels compute, with no host
    synchronisation (ops.fused_moe); the shared expert is a fused gated MLP beside it."""

    def __init__(self, gate: nn.Module, experts_w13: torch.Tensor, experts_w2: torch.Tensor, shared):
        super().__init__()
        self.gate, self.shared_experts = gate, shared
        self.experts_w13 = nn.Parameter(experts_w13, requires_grad=False)
        self.experts_w2 = nn.Parameter(experts_w2, requires_grad=False)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        experts, weights = self.gate(flat)
        routed = ops.fused_moe(flat, self.experts_w13, self.experts_w2, experts, weights)
        return routed.view(x.shape) + self.shared_experts(x)


def _fuse_moe(moe: nn.Module) -> FusedSparseMoE | None:
    experts = list(moe.experts)
    if not all(_plain(m.gate_proj, m.up_proj, m.down_proj) for m in experts):
        return None  # quantized experts keep the per-expert path
    w13 = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in experts])
    w2 = torch.stack([m.down_proj.weight for m in experts])
    shared = moe.shared_experts
    if _plain(shared.gate_proj, shared.up_proj):
        shared = FusedGatedMLP(_concat([shared.gate_proj, shared.up_proj]), shared.down_proj)
    return FusedSparseMoE(moe.gate, w13, w2, shared)


def _plain(*modules) -> bool:
    return all(type(m) is nn.Linear and m.bias is None for m in modules)


def _concat(linears: list[nn.Linear]) -> nn.Linear:
    w = [m.weight for m in linears]
    out = sum(x.shape[0] for x in w)
    fused = nn.Linear(w[0].shape[1], out, bias=False, device=w[0].device, dtype=w[0].dtype)
    if w[0].device.type != "meta":
        with torch.no_grad():
            fused.weight = nn.Parameter(torch.cat(w, 0), requires_grad=False)
    return fused


def fuse_attention(module: Attention, qkv_proj: nn.Module, sizes: list[int]):
    """Turn an Attention into its fused form with one q/k/v projection (in place)."""
    module.qkv_proj, module.qkv_sizes = qkv_proj, sizes
    del module.q_proj, module.k_proj, module.v_proj
    module.__class__ = FusedQKVAttention


def fuse(model: nn.Module, keep: set[str] = frozenset()) -> nn.Module:
    """Fuse every plain (unquantized, bias-free) q/k/v triple and gate/up pair, except those with a
    projection named in `keep` (packed quantized projections that stay apart); return the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Attention) and not isinstance(module, FusedQKVAttention):
            q, k, v = module.q_proj, module.k_proj, module.v_proj
            if _plain(q, k, v) and not {f"{name}.{p}_proj" for p in "qkv"} & keep:
                fuse_attention(module, _concat([q, k, v]), [q.out_features, k.out_features, v.out_features])
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{parent_name}.{name}" if parent_name else name
            apart = {f"{path}.gate_proj", f"{path}.up_proj"} & keep
            if isinstance(child, GatedMLP) and _plain(child.gate_proj, child.up_proj) and not apart:
                gate_up = _concat([child.gate_proj, child.up_proj])
                setattr(parent, name, FusedGatedMLP(gate_up, child.down_proj))
            elif isinstance(child, SparseMoE) and not any(k.startswith(f"{path}.experts.") for k in keep):
                fused = _fuse_moe(child)
                if fused is not None:
                    setattr(parent, name, fused)
    return model
