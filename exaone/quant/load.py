"""Loading quantized checkpoints: detect the format and swap nn.Linear modules for QuantLinear.

Two checkpoint kinds are read: Model Optimizer's HF export (`quant_method: modelopt`, what
`exaone quantize` writes and what NVIDIA/LG publish as FP8 or NVFP4 checkpoints) and AutoAWQ's GEMM
layout (`quant_method: awq`, LG's `-AWQ` releases). The format of each linear is read from the tensors
it has, so Model Optimizer's mixed-precision exports load too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from exaone.core.checkpoint import TensorInfo
from exaone.core.errors import ExaoneError
from exaone.quant.linear import QuantLinear

HF_QUANT_CONFIG = "hf_quant_config.json"
# Tensors kept in float32 whatever the compute dtype: scales lose too much in bf16.
FP32_PATTERNS = [r"\.(weight_scale|weight_scale_2|input_scale|pre_quant_scale|k_scale|v_scale|scales)$"]
MARKERS = ("weight_scale", "qweight")


def quantization_method(model_dir: str | Path) -> str | None:
    """'modelopt', 'awq' or None (unquantized); other methods are refused with a one-line error."""
    model_dir = Path(model_dir)
    if (model_dir / HF_QUANT_CONFIG).is_file():
        return "modelopt"
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "modelopt":
        return method
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if qc.get("bits", 4) != 4 or version != "gemm" or not qc.get("zero_point", True):
            raise ExaoneError(
                f"{model_dir / 'config.json'}: AWQ with bits={qc.get('bits')}, version={version!r}, "
                f"zero_point={qc.get('zero_point')}: only 4-bit GEMM with zero points is supported"
            )
        return method
    raise ExaoneError(
        f"{model_dir / 'config.json'}: quantization_config.quant_method {method!r} is not supported "
        "(supported: modelopt, awq)"
    )


def linear_format(prefix: str, tensors: dict[str, TensorInfo], out: int, inn: int) -> str:
    """The format of one linear from the dtypes and shapes of its tensors."""
    if f"{prefix}.qweight" in tensors:
        return "awq_gemm"
    w = tensors.get(f"{prefix}.weight")
    if w is None:
        raise ExaoneError(f"quantized linear {prefix} has a weight_scale but no weight")
    if w.dtype == "F8_E4M3":
        return "fp8"
    if w.dtype == "I8":
        return "int8_sq" if f"{prefix}.input_scale" in tensors else "int8_wo"
    if w.dtype == "U8" and w.shape == (out // 2, inn):
        return "w4a8_awq" if f"{prefix}.weight_scale_2" in tensors else "int4_awq"
    if w.dtype == "U8" and w.shape == (out, inn // 2):
        return "nvfp4"
    raise ExaoneError(
        f"{w.file}: tensor {prefix}.weight ({w.dtype}{list(w.shape)}) is no quantized format exaone reads"
    )


def swap_quantized_linears(model: nn.Module, tensors: dict[str, TensorInfo], model_dir: Path) -> list[str]:
    """Replace every nn.Linear of `model` that the checkpoint quantizes (tensors: module-named) by a
    QuantLinear of the right format; return the regexes of tensors to keep in float32."""
    if quantization_method(model_dir) is None:
        return []
    prefixes = sorted({n.rsplit(".", 1)[0] for n in tensors if n.rsplit(".", 1)[-1] in MARKERS})
    modules = dict(model.named_modules())
    for prefix in prefixes:
        linear = modules.get(prefix)
        if not isinstance(linear, nn.Linear):
            raise ExaoneError(
                f"{model_dir}: quantized tensors for {prefix}, which is not a linear layer here"
            )
        out, inn = linear.out_features, linear.in_features
        fmt = linear_format(prefix, tensors, out, inn)
        scale = tensors[f"{prefix}.{'scales' if fmt == 'awq_gemm' else 'weight_scale'}"]
        group = 128
        if fmt in ("int4_awq", "w4a8_awq"):
            group = inn // scale.shape[-1]
        elif fmt == "awq_gemm":
            group = inn // scale.shape[0]
        kv = tuple(s for s in ("k_scale", "v_scale") if f"{prefix}.{s}" in tensors)
        pqs = f"{prefix}.pre_quant_scale" in tensors
        with linear.weight.device:  # meta while load_model builds the skeleton: nothing allocated
            q = QuantLinear(inn, out, fmt, group, pqs, kv)
            if fmt == "fp8":  # per-channel FP8 exports (weight_scale [out] or [out, 1]) load too
                info = tensors[f"{prefix}.weight_scale"]
                q.register_buffer("weight_scale", torch.empty(info.shape, dtype=torch.float32))
        parent, _, child = prefix.rpartition(".")
        setattr(modules[parent] if parent else model, child, q)
    return FP32_PATTERNS
