"""`QuantLinear`: an nn.Linear stand-in holding a quantized checkpoint's tensors as they were exported.

Its forward pass is the reference path: pre_quant_scale applied to the input, the activation
round-tripped through the format's activation type where the format quantizes activations (FP8,
INT8 SmoothQuant, W4A8, NVFP4), the weight dequantized with `exaone.quant.formats`, then one matmul.
That is the computation the quantized model stands for, on any device; fast kernels replace it
elsewhere and are tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exaone.quant import formats

# format -> (tensor suffix -> (shape given out/in/group, dtype)); None dims are resolved per format.
ACTIVATION_QUANT = {"fp8": "fp8", "w4a8_awq": "fp8", "int8_sq": "int8", "nvfp4": "nvfp4"}


def tensor_specs(fmt: str, out: int, inn: int, group: int, pre_quant_scale: bool) -> dict[str, tuple]:
    """The tensors (suffix -> (shape, dtype)) a linear of [out, in] holds in a format."""
    f32 = torch.float32
    if fmt == "fp8":
        specs = {
            "weight": ((out, inn), torch.float8_e4m3fn),
            "weight_scale": ((), f32),
            "input_scale": ((), f32),
        }
    elif fmt in ("int8_sq", "int8_wo"):
        specs = {"weight": ((out, inn), torch.int8), "weight_scale": ((out,), f32)}
        if fmt == "int8_sq":
            specs["input_scale"] = ((), f32)
    elif fmt in ("int4_awq", "int4_wo", "w4a8_awq"):
        specs = {"weight": ((out // 2, inn), torch.uint8), "weight_scale": ((out, inn // group), f32)}
        if fmt == "w4a8_awq":
            specs.update(weight_scale_2=((), f32), input_scale=((), f32))
    elif fmt == "nvfp4":
        block = formats.NVFP4_BLOCK
        specs = {
            "weight": ((out, inn // 2), torch.uint8),
            "weight_scale": ((out, inn // block), torch.float8_e4m3fn),
            "weight_scale_2": ((), f32),
            "input_scale": ((), f32),
        }
    elif fmt == "awq_gemm":
        specs = {
            "qweight": ((inn, out // 8), torch.int32),
            "qzeros": ((inn // group, out // 8), torch.int32),
            "scales": ((inn // group, out), f32),
        }
    else:
        raise ValueError(f"unknown quantized format {fmt!r}")
    if pre_quant_scale:
        specs["pre_quant_scale"] = ((inn,), f32)
    return specs


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
        self.in_features, self.out_features, self.fmt, self.group_size = (
            in_features,
            out_features,
            fmt,
            group_size,
        )
        for name, (shape, dtype) in tensor_specs(
            fmt, out_features, in_features, group_size, pre_quant_scale
        ).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype))
        # KV-cache scales (k_proj.k_scale, v_proj.v_scale) ride on the projection that makes K or V;
        # the runtime's quantized cache reads them, the reference path leaves the cache unquantized.
        for name in kv_scales:
            self.register_buffer(name, torch.empty((), dtype=torch.float32))
        self._dense: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}"

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 [out, in] weight this layer multiplies by (after pre_quant_scale)."""
        f = self.fmt
        if f == "fp8":
            return formats.dequantize_fp8(self.weight, self.weight_scale)
        if f in ("int8_sq", "int8_wo"):
            return formats.dequantize_int8(self.weight, self.weight_scale)
        if f in ("int4_awq", "int4_wo"):
            return formats.dequantize_int4(self.weight, self.weight_scale)
        if f == "w4a8_awq":
            return formats.dequantize_w4a8(self.weight, self.weight_scale, self.weight_scale_2)
        if f == "nvfp4":
            return formats.dequantize_nvfp4(self.weight, self.weight_scale, self.weight_scale_2)
        return formats.dequantize_awq_gemm(self.qweight, self.qzeros, self.scales)

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
        act = ACTIVATION_QUANT.get(self.fmt)
        if act == "fp8":
            x = formats.fake_quant_fp8(x, self.input_scale)
        elif act == "int8":
            x = formats.fake_quant_int8(x, self.input_scale)
        elif act == "nvfp4":
            x = formats.fake_quant_nvfp4(x, self.input_scale)
        return F.linear(x, self._weight(x.dtype))
