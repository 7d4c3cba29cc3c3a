"""Quantized linears packed once, at `exaone build`, into the layout their kernel reads.

Each QuantLinear (a checkpoint's tensors as exported) becomes a PackedLinear through its format
record's `pack` (exaone/core/formats/registry.py); the engine then calls the record's kernel at every
step (its CPU reference path where there is no GPU).
"""

from __future__ import annotations

import torch
from torch import nn

from exaone.core.errors import ExaoneError
from exaone.core.formats.linear import PackedLinear, QuantLinear


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
    return {n: m.fmt for n, m in quantized.items()}
