"""Quantized linears packed once, at `exaone build`, into the layout their kernel reads.

Each QuantLinear (a checkpoint's tensors as exported) becomes a PackedLinear through its format
record's `pack` (exaone/core/formats/registry.py); q/k/v and gate/up then become one PackedLinear
each where the record's `concat` can join them exactly. The engine calls the record's kernel at every
step (its CPU reference path where there is no GPU).
"""

from __future__ import annotations

import torch
from torch import nn

from exaone.core.engine.layout import FusedGatedMLP, fuse_attention
from exaone.core.errors import ExaoneError
from exaone.core.formats.linear import PackedLinear, QuantLinear
from exaone.core.formats.registry import FORMATS
from exaone.core.model.layers import Attention, GatedMLP


def _swap(model: nn.Module, prefix: str, module: nn.Module):
    parent, _, child = prefix.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def pack_model(model: nn.Module, dtype: torch.dtype) -> dict[str, str] | None:
    """Replace every QuantLinear by a PackedLinear (in place); {module name: format}, or None (model
    untouched) when some format has no packed kernel."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if any(m.record.pack is None for m in quantized.values()):
        return None
    packed = {}
    for name, m in quantized.items():
        try:
            packed[name] = PackedLinear(m.fmt, m.record.pack(m.tensors(), dtype))
        except ExaoneError:  # a shape the kernel does not take (e.g. in_features not a multiple of 64)
            return None
    for name, module in packed.items():
        _swap(model, name, module)
    _fuse_packed(model)
    return {n: m.fmt for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def _concat(parts: list[nn.Module]) -> PackedLinear | None:
    """One PackedLinear with the outputs of `parts` side by side, when their format can (registry
    `concat`: the scales stay exact) and they read one input the same way."""
    if not all(isinstance(p, PackedLinear) for p in parts) or len({p.fmt for p in parts}) != 1:
        return None
    record = FORMATS[parts[0].fmt]
    if record.concat is None:
        return None
    tensors = record.concat([{n: getattr(p, n) for n in p.names} for p in parts])
    return PackedLinear(parts[0].fmt, tensors) if tensors is not None else None


def _fuse_packed(model: nn.Module):
    """Quantized q/k/v and gate/up become one GEMM each, as the unquantized ones do (layout.fuse)."""
    for module in list(model.modules()):
        if isinstance(module, Attention) and hasattr(module, "q_proj"):
            parts = [module.q_proj, module.k_proj, module.v_proj]
            fused = _concat(parts)
            if fused is not None:
                sizes = [module.num_heads * module.head_dim] + [module.num_kv_heads * module.head_dim] * 2
                fuse_attention(module, fused, sizes)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GatedMLP):
                fused = _concat([child.gate_proj, child.up_proj])
                if fused is not None:
                    setattr(parent, name, FusedGatedMLP(fused, child.down_proj))
