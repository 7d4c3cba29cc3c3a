"""The two nn.Linear stand-ins that run a format record.

`QuantLinear` holds a quantized checkpoint's tensors as they were exported and runs the reference
path: pre_quant_scale applied to the input, the activation round-tripped through the format's
activation type where the format quantizes activations, the weight dequantized (exaone/core/qmath.py),
then one matmul. That is the computation the quantized model stands for, on any device.

`PackedLinear` holds the same tensors in its kernel's layout (packed once by `exaone build`) and calls
the format's kernel at every step; the kernels are tested against the reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exaone.core.formats.registry import FORMATS, Format


class QuantLinear(nn.Module):
    """y = act_quant(x * pre_quant_scale) @ dequantize(weight).T (no bias: EXAONE linears have none)."""

    # Keep the dequantized weight after the first call: the reference path is for correctness, and
    # dequantizing every step would make CPU generation needlessly slow. Set False to save memory.
    cache_dequantized = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str,
        group_size: int = 128,
        pre_quant_scale: bool = False,
        kv_scales: tuple[str, ...] = (),
    ):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.fmt = fmt
        specs = self.record.tensors(out_features, in_features, group_size)
        if pre_quant_scale:
            specs["pre_quant_scale"] = ((in_features,), torch.float32)
        for name, (shape, dtype) in specs.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype))
        # KV-cache scales (k_proj.k_scale, v_proj.v_scale) ride on the projection that makes K or V.
        # They are kept so a re-export or `exaone inspect` sees them; this path and the engine's
        # cache do not read them (the engine computes its own per-token scales).
        for name in kv_scales:
            self.register_buffer(name, torch.empty((), dtype=torch.float32))
        self._dense: torch.Tensor | None = None

    @property
    def record(self) -> Format:
        return FORMATS[self.fmt]

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}"

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 [out, in] weight this layer multiplies by (after pre_quant_scale)."""
        return self.record.dequantize(self.tensors())

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self._dense is not None and self._dense.dtype == dtype:
            return self._dense
        w = self.dequantized_weight().to(dtype)
        if self.cache_dequantized:
            self._dense = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pre_quant_scale"):
            x = x * self.pre_quant_scale.to(x.dtype)
        if self.record.activations is not None:
            x = self.record.activations(x, self.tensors())
        return F.linear(x, self._weight(x.dtype))


class PackedLinear(nn.Module):
    """A quantized linear in its kernel's layout; forward is the format's kernel."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.fmt = fmt
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.names = list(tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FORMATS[self.fmt].linear(x, **{n: getattr(self, n) for n in self.names})

    def extra_repr(self) -> str:
        return f"format={self.fmt}"


LINEAR_TYPES = (nn.Linear, QuantLinear, PackedLinear)


def linear_kinds(model: nn.Module) -> set[str]:
    """Names of the linear layer types in the model (nn.Linear or a quantized stand-in)."""
    return {type(m).__name__ for m in model.modules() if isinstance(m, LINEAR_TYPES)}
