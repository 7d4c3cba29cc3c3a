"""One TensorRT-LLM linear from one or more source linears, in any weight format, and back.

A source linear is a dict of its tensors by suffix: `weight` alone (float), or Model Optimizer's
Hugging Face export (`weight`, `weight_scale`, `weight_scale_2`, `input_scale`, `pre_quant_scale`;
exaone/quant/formats.py). The TensorRT-LLM names are those Model Optimizer's TensorRT-LLM exporter
writes (modelopt/torch/export/model_config.py, `LinearConfig` fields, and model_config_utils.py):
`weights_scaling_factor`, `weights_scaling_factor_2`, `activation_scaling_factor`,
`prequant_scaling_factor`; the packed int4 weight is viewed as int8 (`pack_linear_weights`).

Each tensor has a role that decides how it is split and fused:
- `w`, the weight [out / rows_per_byte, in / cols_per_byte]: rows split for a column-parallel
  linear, columns for a row-parallel one, rows concatenated to fuse;
- `row`, a scale per output row ([out] or per block [out, in / G]): follows the weight's rows, and
  its columns when it has blocks;
- `scalar`: replicated; fused linears take the maximum (`QKVConfig.activation_scaling_factor` /
  `weights_scaling_factor`); an FP8 weight is re-quantized to the fused scale, as the exporter
  quantizes the concatenated weight with that maximum;
- `in`, the per-input AWQ / SmoothQuant scale: split with the input, identical across a fused group.
"""

from __future__ import annotations

import torch

from exaone.core.errors import ExaoneError, OptionError
from exaone.core.trtllm import names as tn

TRT_SUFFIX = {
    "weight": "weight",
    "weight_scale": "weights_scaling_factor",
    "weight_scale_2": "weights_scaling_factor_2",
    "input_scale": "activation_scaling_factor",
    "pre_quant_scale": "prequant_scaling_factor",
}
HF_SUFFIX = {v: k for k, v in TRT_SUFFIX.items()}
E4M3_MAX = 448.0


def role(suffix: str, t: torch.Tensor) -> str:
    if suffix == "weight":
        return "w"
    if suffix == "pre_quant_scale":
        return "in"
    return "scalar" if t.numel() == 1 else "row"


def _dup(t: torch.Tensor, kv_heads: int, tp: int) -> torch.Tensor:
    return tn.dup_kv(t[:, None], kv_heads, tp)[:, 0] if t.dim() == 1 else tn.dup_kv(t, kv_heads, tp)


def build(
    parts: list[dict],
    column: bool,
    tp: int,
    rank: int,
    kv: tuple[int, ...] = (),
    kv_heads: int = 0,
    name: str = "linear",
):
    """Source linears (fused in order) -> one rank's tensors under the HF suffixes.

    column: split by output rows (else by input columns); kv: indices of parts whose heads are
    duplicated when tp_size exceeds kv_heads; name: for error messages."""
    suffixes = set(parts[0])
    if any(set(p) != suffixes for p in parts):
        raise ExaoneError(f"fused linears hold different tensors: {[sorted(p) for p in parts]}")
    if len(parts) > 1 and "weight_scale" in suffixes and parts[0]["weight_scale"].numel() == 1:
        parts = _requantize_fp8(parts)
    out = {}
    for suffix in sorted(suffixes):
        tensors = []
        for i, p in enumerate(parts):
            t, r = p[suffix], role(suffix, p[suffix])
            if column and r in ("w", "row") and i in kv and kv_heads < tp:
                t = _dup(t, kv_heads, tp)
            dim = None
            if column and r in ("w", "row"):
                dim = 0
            elif not column and (r == "w" or (r == "row" and t.dim() == 2)):
                dim = 1
            elif not column and r == "in":
                dim = 0
            if dim is not None:
                if t.shape[dim] % tp:
                    raise OptionError(
                        "tp_size",
                        tp,
                        "for int4 blocks: in_features / tp_size must be a multiple of the group size",
                        f"{name}.{suffix}: dimension {dim} of {list(t.shape)} is not divisible by "
                        "{option} {value} ({problem})",
                    )
                t = tn.chunk(t, tp, rank, dim)
            tensors.append(t)
        r = role(suffix, parts[0][suffix])
        if r in ("w", "row"):
            out[suffix] = torch.cat(tensors, dim=0)
        elif r == "scalar":
            out[suffix] = torch.stack([t.reshape(()) for t in tensors]).amax()
        else:
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise ExaoneError(
                    "fused linears (q/k/v or gate/up) have different pre_quant_scale; cannot fuse"
                )
            out[suffix] = tensors[0]
    return out


def _requantize_fp8(parts: list[dict]) -> list[dict]:
    scale = torch.stack([p["weight_scale"].float().reshape(()) for p in parts]).amax()
    new = []
    for p in parts:
        w = p["weight"]
        if w.dtype != torch.float8_e4m3fn:
            raise ExaoneError(
                f"a per-tensor weight_scale with a {w.dtype} weight is no format exaone converts"
            )
        if not torch.equal(p["weight_scale"].float().reshape(()), scale):
            w = (
                (w.float() * p["weight_scale"].float() / scale)
                .clamp(-E4M3_MAX, E4M3_MAX)
                .to(torch.float8_e4m3fn)
            )
        new.append({**p, "weight": w, "weight_scale": scale.reshape(p["weight_scale"].shape)})
    return new


def split_fused(
    tensors: list[dict], rows: list[int], column: bool, kv: tuple[int, ...] = (), kv_heads: int = 0
) -> list[dict]:
    """Per-rank tensors of one fused linear (HF suffixes) -> full source linears.

    rows: the logical output rows of each part on one rank (after kv duplication); kv: the parts
    whose heads were duplicated, of which one rank per head is kept."""
    tp, total = len(tensors), sum(rows)
    out = [dict() for _ in rows]
    for suffix in tensors[0]:
        r = role(suffix, tensors[0][suffix])
        for i in range(len(rows)):
            if (
                r == "scalar"
                or (r == "in" and column)
                or (not column and r == "row" and tensors[0][suffix].dim() == 1)
            ):
                out[i][suffix] = tensors[0][suffix]
            elif r == "in":
                out[i][suffix] = torch.cat([t[suffix] for t in tensors])
            elif not column:
                out[i][suffix] = torch.cat([t[suffix] for t in tensors], dim=1)
            else:
                pieces = []
                for t in tensors:
                    per_row = t[suffix].shape[0] / total  # 1, or 1/2 for int4 rows packed in pairs
                    pieces.append(t[suffix].split([int(n * per_row) for n in rows], dim=0)[i])
                if i in kv and kv_heads < tp:  # rank r held kv head r * kv_heads // tp: keep one per head
                    pieces = pieces[:: tp // kv_heads]
                out[i][suffix] = torch.cat(pieces)
    return out


def to_trt(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for suffix, t in tensors.items():
        if suffix == "weight" and t.dtype == torch.uint8:
            t = t.view(torch.int8)  # the exporter's int4 packing, viewed as int8 for TensorRT-LLM
        elif role(suffix, t) == "scalar":
            t = t.reshape(1)
        out[TRT_SUFFIX[suffix]] = t.contiguous()
    return out


def from_trt(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TensorRT-LLM names -> Model Optimizer suffixes; an int8 weight with block scales is packed int4."""
    out = {HF_SUFFIX[name]: t for name, t in tensors.items()}
    scale = out.get("weight_scale")
    if out["weight"].dtype == torch.int8 and scale is not None and scale.dim() == 2:
        out["weight"] = out["weight"].view(torch.uint8)
    for suffix, t in out.items():
        if suffix != "weight" and role(suffix, t) == "scalar":
            out[suffix] = t.reshape(())
    return out
