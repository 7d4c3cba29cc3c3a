"""Quantized linears in the kernels' packed layout (exaone/core/kernels): packed once by `exaone build`,
run by the kernel's linear function at every step (the CPU reference path where there is no GPU)."""

from __future__ import annotations

import torch
from torch import nn

from exaone.core import kernels as K
from exaone.core.errors import ExaoneError

# format -> (pack function, linear function, Model Optimizer tensors the pack function takes)
PACKERS = {
    "fp8": (K.pack_fp8, K.fp8_linear, ("weight", "weight_scale", "input_scale")),
    "int8_sq": (
        K.pack_int8_sq,
        K.int8_sq_linear,
        ("weight", "weight_scale", "input_scale", "pre_quant_scale"),
    ),
    "int8_wo": (K.pack_int8_wo, K.w8a16_linear, ("weight", "weight_scale")),
    "int4_awq": (K.pack_int4, K.w4a16_linear, ("weight", "weight_scale", "pre_quant_scale")),
    "int4_wo": (K.pack_int4, K.w4a16_linear, ("weight", "weight_scale", "pre_quant_scale")),
    "w4a8_awq": (
        K.pack_w4a8,
        K.w4a8_linear,
        ("weight", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale"),
    ),
    "nvfp4": (K.pack_nvfp4, K.nvfp4_linear, ("weight", "weight_scale", "weight_scale_2", "input_scale")),
}


class PackedLinear(nn.Module):
    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.fmt = fmt
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.names = list(tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PACKERS[self.fmt][1](x, **{n: getattr(self, n) for n in self.names})

    def extra_repr(self) -> str:
        return f"format={self.fmt}"


def _swap(model: nn.Module, prefix: str, module: nn.Module):
    parent, _, child = prefix.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def pack_model(model: nn.Module, dtype: torch.dtype) -> dict[str, str] | None:
    """Replace every QuantLinear by a PackedLinear (in place); {module name: format}, or None (model
    untouched) when some format has no packed kernel."""
    quantized = {n: m for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"}
    if any(m.fmt not in PACKERS for m in quantized.values()):
        return None
    packed = {}
    for name, m in quantized.items():
        pack, _, args = PACKERS[m.fmt]
        kwargs = {a: getattr(m, a) for a in args if hasattr(m, a)}
        if m.fmt == "w4a8_awq":
            kwargs["dtype"] = dtype
        try:
            packed[name] = PackedLinear(m.fmt, pack(**kwargs))
        except ExaoneError:  # a shape the kernel does not take (e.g. in_features not a multiple of 64)
            return None
    for name, module in packed.items():
        _swap(model, name, module)
    return {n: m.fmt for n, m in quantized.items()}


def place_packed(model: nn.Module, packed: dict[str, str], state: dict[str, torch.Tensor]):
    """Put PackedLinear modules holding the loaded tensors where the engine recorded them."""
    for name, fmt in packed.items():
        prefix = name + "."
        tensors = {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        _swap(model, name, PackedLinear(fmt, tensors))
