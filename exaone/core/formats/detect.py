"""Quantized checkpoints: which method made them, and which format each linear is in.

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

from exaone.core.errors import ExaoneError
from exaone.core.formats.linear import QuantLinear
from exaone.core.formats.registry import FP32_PATTERNS, MARKERS, detect

HF_QUANT_CONFIG = "hf_quant_config.json"


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


def swap_quantized_linears(
    model: nn.Module, tensors: dict[str, torch.Tensor], method: str | None, where: str = "checkpoint"
) -> list[str]:
    """Replace every nn.Linear of `model` that the checkpoint quantizes by a QuantLinear of the right
    format (tensors: module-named, meta or real); return the regexes of tensors to keep in float32."""
    if method is None:
        return []
    prefixes = sorted({n.rsplit(".", 1)[0] for n in tensors if n.rsplit(".", 1)[-1] in MARKERS})
    modules = dict(model.named_modules())
    for prefix in prefixes:
        linear = modules.get(prefix)
        if not isinstance(linear, nn.Linear):
            raise ExaoneError(f"{where}: quantized tensors for {prefix}, which is not a linear layer here")
        out, inn = linear.out_features, linear.in_features
        weight = tensors.get(f"{prefix}.weight")
        own = {n.removeprefix(prefix + "."): t for n, t in tensors.items() if n.startswith(prefix + ".")}
        record = detect(weight, own.__contains__, out, inn)
        if record is None:
            dtype = "" if weight is None else str(weight.dtype).removeprefix("torch.")
            what = "none" if weight is None else f"{dtype}{list(weight.shape)}"
            raise ExaoneError(
                f"{where}: tensor {prefix}.weight ({what}) is no quantized format exaone reads"
            )
        kv = tuple(s for s in ("k_scale", "v_scale") if s in own)
        with linear.weight.device:  # meta while the loader builds the skeleton: nothing allocated
            q = QuantLinear(inn, out, record.name, record.group(own, inn), "pre_quant_scale" in own, kv)
            if record.name == "fp8":  # per-channel FP8 exports (weight_scale [out] or [out, 1]) load too
                q.register_buffer("weight_scale", torch.empty(own["weight_scale"].shape, dtype=torch.float32))
        parent, _, child = prefix.rpartition(".")
        setattr(modules[parent] if parent else model, child, q)
    return FP32_PATTERNS
