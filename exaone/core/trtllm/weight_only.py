"""TensorRT-LLM weight-only quantization (W8A16 / W4A16) in pure torch, byte for byte.

TensorRT-LLM's converter calls `torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix`
on the transposed weight [in, out] (cpp/tensorrt_llm/thop/weightOnlyQuantOp.cpp). That op
(cpp/tensorrt_llm/kernels/cutlass_kernels/cutlass_preprocessors.cpp, `symmetric_quantize`):
- per output column: scale = max|w| / 128 (int8) or / 8 (int4), kept in float for the rounding and
  stored in the weight's dtype; q = clip(round(w / scale)) with C `round` (half away from zero);
- then `preprocess_weights_for_mixed_gemm` re-lays the int8 / packed-int4 matrix for the CUTLASS
  mixed-input GEMM of the GPU it runs on (`getSMVersion()`):
  * SM75-SM89 (B layout `ColumnMajorTileInterleave<64, 128*8/bits/64>` with the
    `OpMultiplyAddDequantizeInterleavedBToA` operator, cutlass_extensions/.../mixed_gemm_B_layout.h):
    LDSM row permutation, sub-byte transpose, column interleave, +128 / +8 bias with register
    interleave;
  * SM90 (B layout plain `ColumnMajor`): the transpose only, values stay signed.
The result keeps the shape of the unprocessed tensor: int8 [in, out * bits / 8].

Every step is a permutation of elements (plus the bias), so it is written here as index arithmetic
on whole tensors, and inverted exactly for reading a checkpoint back.
"""

from __future__ import annotations

import torch

from exaone.core.errors import ExaoneError, OptionError

LAYOUTS = ("sm80", "sm90")  # sm80 stands for every SM75..SM89 GPU: they share one layout
# Rows of B permuted together for LDSM, per bit width (cutlass_preprocessors.cpp, get_permutation_map).
_LDSM_PERM = {
    8: [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15],
    4: [0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27,
        4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15, 22, 23, 30, 31],
}  # fmt: skip
# Element order inside one 32-bit register after add_bias_and_interleave_*.
_REGISTER_ORDER = {8: [0, 2, 1, 3], 4: [0, 2, 4, 6, 1, 3, 5, 7]}
_TILE_K = 64  # ThreadblockK for 16-bit activations: 128 * 8 / 16


def layout_for_sm(sm: int) -> str:
    if 75 <= sm < 90:
        return "sm80"
    if sm == 90:
        return "sm90"
    raise OptionError("target_sm", sm, "TensorRT-LLM's weight-only layout is defined for SM75-SM90")


def symmetric_quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] in the checkpoint dtype -> (q int8 [out, in] in [-2^(b-1), 2^(b-1)-1], scale [out])."""
    wf = w.float()
    col_max = wf.abs().amax(dim=1) * (1.0 / (1 << (bits - 1)))  # float32, as the C++ keeps it
    x = (wf / torch.where(col_max == 0, 1.0, col_max)[:, None]).double()
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # C round(): half away from zero
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.where(col_max[:, None] == 0, 0.0, q).clamp(lo, hi).to(torch.int8)
    return q, col_max.to(w.dtype)


def check_shape(out_features: int, in_features: int, bits: int, layout: str, name: str):
    """The shape constraints TensorRT-LLM's preprocessor asserts, as one-line errors."""
    mult_in = 64 if (bits == 4 or layout == "sm80") else 32
    mult_out = 64 if bits == 4 else 32
    if in_features % mult_in or out_features % mult_out:
        raise ExaoneError(
            f"{name}: weight-only int{bits} needs in_features % {mult_in} == 0 and out_features % "
            f"{mult_out} == 0 per rank (TensorRT-LLM's CUTLASS preprocessor); got [out {out_features}, "
            f"in {in_features}]"
        )


def _permutation(rows: int, cols: int, bits: int, layout: str) -> torch.Tensor:
    """perm such that processed_elements.flatten() == logical[rows=in, cols=out].flatten()[perm]."""
    idx = torch.arange(rows * cols, dtype=torch.int64).view(rows, cols)
    if layout == "sm80":
        block = 16 if bits == 8 else 32
        perm = torch.tensor(_LDSM_PERM[bits])
        idx = idx.view(rows // block, block, cols)[:, perm].reshape(rows, cols)
    idx = idx.t().contiguous()  # sub-byte transpose: column-major [out, in]
    if layout == "sm80":
        per_word = 32 // bits
        interleave = 128 * 8 // bits // _TILE_K  # ColumnsInterleaved: 2 for int8, 4 for int4
        vec_per_tile = _TILE_K // per_word
        idx = idx.view(cols // interleave, interleave, rows // _TILE_K, vec_per_tile, per_word)
        idx = idx.permute(0, 2, 1, 3, 4).reshape(-1, per_word)
        idx = idx[:, torch.tensor(_REGISTER_ORDER[bits])]
    return idx.reshape(-1)


def preprocess(q: torch.Tensor, bits: int, layout: str) -> torch.Tensor:
    """q int8 [out, in] (logical) -> TensorRT-LLM's processed int8 tensor [in, out * bits / 8]."""
    out_f, in_f = q.shape
    flat = q.t().reshape(-1)[_permutation(in_f, out_f, bits, layout)].to(torch.int16)
    if layout == "sm80":
        flat = flat + (1 << (bits - 1))  # unsigned with bias 128 / 8
    if bits == 8:
        packed = (flat & 0xFF).to(torch.uint8)
    else:
        nib = (flat & 0xF).view(-1, 2)
        packed = (nib[:, 0] | (nib[:, 1] << 4)).to(torch.uint8)
    return packed.view(torch.int8).view(in_f, out_f * bits // 8)


def unpreprocess(processed: torch.Tensor, bits: int, layout: str) -> torch.Tensor:
    """The exact inverse of preprocess: int8 [in, out * bits / 8] -> q int8 [out, in]."""
    in_f = processed.shape[0]
    out_f = processed.shape[1] * 8 // bits
    raw = processed.reshape(-1).view(torch.uint8).to(torch.int16)
    if bits == 8:
        flat = raw
    else:
        flat = torch.stack((raw & 0xF, raw >> 4), dim=1).reshape(-1)
    if layout == "sm80":
        flat = flat - (1 << (bits - 1))
    else:  # signed two's complement in 8 or 4 bits
        flat = torch.where(flat >= (1 << (bits - 1)), flat - (1 << bits), flat)
    logical = torch.empty_like(flat)
    logical[_permutation(in_f, out_f, bits, layout)] = flat
    return logical.view(in_f, out_f).t().contiguous().to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [out, in] * per-row scale [out], computed in float32 and rounded once to dtype."""
    return (q.float() * scale.float()[:, None]).to(dtype)
