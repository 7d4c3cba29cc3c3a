"""What a quantization format is: one record per format, read by every part that handles one.

A record says how Model Optimizer makes the format (algorithm name in `hf_quant_config.json`, the
`mtq` config), which tensors one linear of [out, in] holds in the export, how a checkpoint's linear
is recognised as this format, the reference math (dequantized weight, activation quantization, from
exaone/core/qmath.py), and the kernel: how `exaone build` packs the tensors once and which function
the engine calls at every step (exaone/core/kernels). `exaone quantize`, the loader, `exaone convert`,
`exaone build` and `exaone inspect` all read these records; adding a format is adding one here
(plus its kernel). docs/ARCHITECTURE.md shows how.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from exaone.core import kernels as K
from exaone.core import qmath
from exaone.core.errors import OptionError

F32, E4M3 = torch.float32, torch.float8_e4m3fn
Tensors = dict[str, torch.Tensor]
Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class Format:
    name: str
    summary: str
    # Model Optimizer: quant_algo in hf_quant_config.json, and the mtq config that makes it (None:
    # a format exaone reads but does not make, e.g. AutoAWQ's GEMM layout).
    modelopt_algo: str | None
    modelopt_config: str | None
    tensors: Callable[[int, int, int], Specs]  # (out, in, group) -> suffix -> (shape, dtype)
    matches: Callable[[torch.Tensor, Callable[[str], bool], int, int], bool] | None  # (weight, has, out, in)
    dequantize: Callable[[Tensors], torch.Tensor]  # float32 [out, in]: y = act(x * pqs) @ W.T
    activations: Callable[[torch.Tensor, Tensors], torch.Tensor] | None = None  # activation fake quant
    group: Callable[[Tensors, int], int] = lambda t, inn: 128  # group size from the tensors
    block: str | None = None  # which block size applies: "awq" (--awq_block_size) or "nvfp4" (16)
    pack: Callable[[Tensors, torch.dtype], Tensors] | None = None  # build time: export -> kernel layout
    linear: Callable[..., torch.Tensor] | None = None  # run time: linear(x, **packed tensors)
    # packed linears sharing an input (q, k, v; gate, up) -> one with their outputs side by side
    # (None when their tensors cannot serve one input, e.g. different activation scales)
    concat: Callable[[list[Tensors]], Tensors | None] | None = None
    fp8_hardware: bool = False  # calibration needs FP8 math on a GPU (sm_89+)
    trtllm: bool = False  # `exaone convert` maps it onto TensorRT-LLM tensors


def _only(t: Tensors, *names: str) -> Tensors:
    return {n: t[n] for n in names if n in t}


def _int4_group(t: Tensors, inn: int) -> int:
    return inn // t["weight_scale"].shape[-1]


def _fp8_tensors(out, inn, group) -> Specs:
    return {"weight": ((out, inn), E4M3), "weight_scale": ((), F32), "input_scale": ((), F32)}


def _int8_tensors(activations: bool):
    def specs(out, inn, group) -> Specs:
        s = {"weight": ((out, inn), torch.int8), "weight_scale": ((out,), F32)}
        return {**s, "input_scale": ((), F32)} if activations else s

    return specs


def _int4_tensors(w4a8: bool):
    def specs(out, inn, group) -> Specs:
        s = {"weight": ((out // 2, inn), torch.uint8), "weight_scale": ((out, inn // group), F32)}
        return {**s, "weight_scale_2": ((), F32), "input_scale": ((), F32)} if w4a8 else s

    return specs


def _nvfp4_tensors(out, inn, group) -> Specs:
    b = qmath.NVFP4_BLOCK
    return {"weight": ((out, inn // 2), torch.uint8), "weight_scale": ((out, inn // b), E4M3),
            "weight_scale_2": ((), F32), "input_scale": ((), F32)}  # fmt: skip


def _awq_gemm_tensors(out, inn, group) -> Specs:
    return {"qweight": ((inn, out // 8), torch.int32), "qzeros": ((inn // group, out // 8), torch.int32),
            "scales": ((inn // group, out), F32)}  # fmt: skip


def _int4_packed(weight: torch.Tensor, out: int, inn: int) -> bool:
    return weight.dtype == torch.uint8 and tuple(weight.shape) == (out // 2, inn)


def _pack_w4a8(t: Tensors, dtype: torch.dtype) -> Tensors:
    return K.pack_w4a8(**_only(t, "weight", "weight_scale", "weight_scale_2", "input_scale",
                               "pre_quant_scale"), dtype=dtype)  # fmt: skip


RECORDS = [
    Format(
        "fp8", "FP8 e4m3 weights and activations, per-tensor scales", "FP8", "FP8_DEFAULT_CFG",
        tensors=_fp8_tensors,
        matches=lambda w, has, out, inn: w.dtype == E4M3,
        dequantize=lambda t: qmath.dequantize_fp8(t["weight"], t["weight_scale"]),
        activations=lambda x, t: qmath.fake_quant_fp8(x, t["input_scale"]),
        pack=lambda t, dtype: K.pack_fp8(**_only(t, "weight", "weight_scale", "input_scale")),
        linear=K.fp8_linear, concat=K.concat_fp8, fp8_hardware=True, trtllm=True,
    ),
    Format(
        "int8_sq", "INT8 SmoothQuant: int8 weights per channel, int8 activations per tensor",
        "W8A8_SQ_PER_CHANNEL", "INT8_SMOOTHQUANT_CFG",
        tensors=_int8_tensors(activations=True),
        matches=lambda w, has, out, inn: w.dtype == torch.int8 and has("input_scale"),
        dequantize=lambda t: qmath.dequantize_int8(t["weight"], t["weight_scale"]),
        activations=lambda x, t: qmath.fake_quant_int8(x, t["input_scale"]),
        pack=lambda t, dtype: K.pack_int8_sq(
            **_only(t, "weight", "weight_scale", "input_scale", "pre_quant_scale")
        ),
        linear=K.int8_sq_linear, concat=K.concat_int8_sq, trtllm=True,
    ),
    Format(
        "int4_awq", "INT4 AWQ: 4-bit weights in groups, 16-bit activations", "W4A16_AWQ", "INT4_AWQ_CFG",
        tensors=_int4_tensors(w4a8=False),
        matches=lambda w, has, out, inn: _int4_packed(w, out, inn) and not has("weight_scale_2"),
        dequantize=lambda t: qmath.dequantize_int4(t["weight"], t["weight_scale"]),
        group=_int4_group, block="awq",
        pack=lambda t, dtype: K.pack_int4(**_only(t, "weight", "weight_scale", "pre_quant_scale")),
        linear=K.w4a16_linear, concat=K.concat_int4, trtllm=True,
    ),
    Format(
        "w4a8_awq", "W4A8 AWQ: 4-bit weights in groups, FP8 activations", "W4A8_AWQ", "W4A8_AWQ_BETA_CFG",
        tensors=_int4_tensors(w4a8=True),
        matches=lambda w, has, out, inn: _int4_packed(w, out, inn) and has("weight_scale_2"),
        dequantize=lambda t: qmath.dequantize_w4a8(t["weight"], t["weight_scale"], t["weight_scale_2"]),
        activations=lambda x, t: qmath.fake_quant_fp8(x, t["input_scale"]),
        group=_int4_group, block="awq", pack=_pack_w4a8, linear=K.w4a8_linear, concat=K.concat_fp8,
        fp8_hardware=True, trtllm=True,
    ),
    Format(
        "nvfp4", "NVFP4: e2m1 weights and activations, e4m3 scale per 16, global scale", "NVFP4",
        "NVFP4_DEFAULT_CFG",
        tensors=_nvfp4_tensors,
        matches=lambda w, has, out, inn: w.dtype == torch.uint8 and tuple(w.shape) == (out, inn // 2),
        dequantize=lambda t: qmath.dequantize_nvfp4(t["weight"], t["weight_scale"], t["weight_scale_2"]),
        activations=lambda x, t: qmath.fake_quant_nvfp4(x, t["input_scale"]),
        block="nvfp4",
        pack=lambda t, dtype: K.pack_nvfp4(
            **_only(t, "weight", "weight_scale", "weight_scale_2", "input_scale")
        ),
        linear=K.nvfp4_linear, fp8_hardware=True,
    ),
    Format(
        "int8_wo", "INT8 weight-only: int8 weights per channel, 16-bit activations", "W8A16",
        "INT8_WEIGHT_ONLY_CFG",
        tensors=_int8_tensors(activations=False),
        matches=lambda w, has, out, inn: w.dtype == torch.int8 and not has("input_scale"),
        dequantize=lambda t: qmath.dequantize_int8(t["weight"], t["weight_scale"]),
        pack=lambda t, dtype: K.pack_int8_wo(**_only(t, "weight", "weight_scale")),
        linear=K.w8a16_linear, concat=K.concat_int8_wo, trtllm=True,
    ),
    Format(
        # Model Optimizer exports it as W4A16_AWQ without pre_quant_scale: a checkpoint reads back as
        # int4_awq (the same tensors and math), so this record is never matched.
        "int4_wo", "INT4 weight-only: 4-bit weights in groups (no AWQ search), 16-bit activations",
        "W4A16_AWQ", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
        tensors=_int4_tensors(w4a8=False), matches=None,
        dequantize=lambda t: qmath.dequantize_int4(t["weight"], t["weight_scale"]),
        group=_int4_group, block="awq",
        pack=lambda t, dtype: K.pack_int4(**_only(t, "weight", "weight_scale", "pre_quant_scale")),
        linear=K.w4a16_linear, concat=K.concat_int4, trtllm=True,
    ),
    Format(
        "awq_gemm", "AutoAWQ GEMM layout (LG's -AWQ releases), read only", None, None,
        tensors=_awq_gemm_tensors,
        matches=lambda w, has, out, inn: has("qweight"),
        dequantize=lambda t: qmath.dequantize_awq_gemm(t["qweight"], t["qzeros"], t["scales"]),
        group=lambda t, inn: inn // t["scales"].shape[0],
    ),
]  # fmt: skip
FORMATS: dict[str, Format] = {f.name: f for f in RECORDS}
# What `exaone quantize --qformat` makes, in the order help lists them.
QUANTIZE_FORMATS = tuple(f.name for f in RECORDS if f.modelopt_config is not None)
# Tensors kept in float32 whatever the compute dtype (scales lose too much in bf16): every float32
# tensor of every format, plus the KV-cache scales riding on k_proj / v_proj.
FP32_TENSORS = sorted(
    {s for f in RECORDS for s, (_, dt) in f.tensors(256, 256, 128).items() if dt == F32}
    | {"pre_quant_scale", "k_scale", "v_scale"}
)
FP32_PATTERNS = [rf"\.({'|'.join(FP32_TENSORS)})$"]
# A linear is quantized when it holds one of these.
MARKERS = ("weight_scale", "qweight")


def get(name: str) -> Format:
    if name not in FORMATS:
        raise OptionError("qformat", name, f"unknown (expected one of {', '.join(QUANTIZE_FORMATS)})")
    return FORMATS[name]


def by_algo(algo: str) -> Format | None:
    """The record Model Optimizer's quant_algo names (the first: int4_wo exports as int4_awq's)."""
    return next((f for f in RECORDS if f.modelopt_algo == algo), None)


def trtllm_algos() -> dict[str, str]:
    """Model Optimizer quant_algo -> our format, for the formats `exaone convert` writes."""
    return {f.modelopt_algo: f.name for f in RECORDS if f.trtllm and by_algo(f.modelopt_algo) is f}


def detect(weight: torch.Tensor | None, has: Callable[[str], bool], out: int, inn: int) -> Format | None:
    """The format of one linear from its weight's dtype and shape and which other tensors it has."""
    if has("qweight"):
        return FORMATS["awq_gemm"]
    if weight is None:
        return None
    return next((f for f in RECORDS if f.matches is not None and f.matches(weight, has, out, inn)), None)
