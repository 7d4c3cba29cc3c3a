"""The quantization math of every format exaone reads, and of the KV cache: pure torch, any device.

The one place rounding, clamping, packing and scales are computed; the kernels' reference paths,
the reference `QuantLinear`, `exaone convert` and the engine's KV cache all call it.

The layouts are NVIDIA Model Optimizer's Hugging Face export (checked against modelopt 0.47's
`export_hf_checkpoint` output and its `quant_utils.to_quantized_weight` / `NVFP4QTensor`), plus
AutoAWQ's GEMM layout (`qweight`/`qzeros`/`scales`) for pre-quantized AWQ checkpoints.
Per linear of shape [out, in] (tensor names are suffixes of the linear's name):

- fp8 (FP8): weight float8_e4m3fn [out, in], weight_scale f32 scalar, input_scale f32 scalar.
- int8_sq (W8A8_SQ_PER_CHANNEL): weight int8 [out, in], weight_scale f32 [out], input_scale scalar,
  pre_quant_scale f32 [in].
- int8_wo (W8A16): weight int8 [out, in], weight_scale f32 [out].
- int4_awq (W4A16_AWQ): weight uint8 [out/2, in] (two output rows per byte), weight_scale f32
  [out, in/G], pre_quant_scale [in] unless the exporter folded it into the preceding norm.
- int4_wo: int4_awq without pre_quant_scale (exported as W4A16_AWQ too).
- w4a8_awq (W4A8_AWQ): int4_awq's tensors plus weight_scale_2 and input_scale (f32 scalars).
- nvfp4 (NVFP4): weight uint8 [out, in/2] (two input columns per byte), weight_scale float8_e4m3fn
  [out, in/16], weight_scale_2 and input_scale f32 scalars.

Every `dequantize_*` returns float32 [out, in] such that y = x @ W.T (after x is multiplied by
pre_quant_scale, when there is one). Every `quantize_*` is the inverse, written to produce the same
bytes modelopt's exporter writes for the same scales; tests check that against modelopt itself.
"""

from __future__ import annotations

import torch

from exaone.core.errors import ExaoneError, OptionError

E4M3_MAX = 448.0
E2M1_MAX = 6.0
INT8_MAX = 127.0
INT4_MAX = 7.0
NVFP4_BLOCK = 16
# FP4 e2m1 code -> value; bit 3 is the sign (code 8 is -0).
E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
# Midpoints between neighbouring e2m1 magnitudes; a tie rounds to the even code (0.25->0, 0.75->1).
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
# AutoAWQ packs 8 columns per int32, nibble i (bits 4i..4i+3) holding column AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def exact_div(t: torch.Tensor, c: float) -> torch.Tensor:
    """t / c rounded as IEEE division on every device.

    CUDA torch divides by a Python number as a multiplication by its reciprocal, one ulp off at times;
    with per-token fp8 scales that flipped roundings and moved outputs by ~1% of their maximum on an
    H100 (docs/kernels.md). A 0-d tensor on t's device takes the true division."""
    return t / torch.tensor(c, dtype=t.dtype, device=t.device)


def token_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """Dynamic per-row (per-token) absmax scale [M, 1] for activations x [M, K]."""
    return exact_div(x.float().abs().amax(dim=-1, keepdim=True), qmax).clamp(min=1e-12)


def _per_row(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scale that broadcasts against x: a 1-D [rows] scale of a 2-D x applies per row."""
    scale = scale.float()
    if scale.dim() == 1 and x.dim() == 2 and scale.numel() == x.shape[0] and scale.numel() > 1:
        return scale[:, None]
    return scale


# --- FP8 (e4m3; per-tensor, per-channel or per-token scales) -----------------------------------


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale cast to float8_e4m3fn, saturating at +-448 (as modelopt's amax makes it); a 1-D
    scale of a 2-D x is per row."""
    return (x.float() / _per_row(scale, x)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [..., in] times a scalar (or per-row [out]) scale -> float32."""
    return weight.float() * _per_row(scale, weight)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round-trip activations through e4m3 with a static per-tensor scale (FP8 / W4A8 / KV cache)."""
    s = scale.float()
    return (quantize_fp8(x, s).float() * s).to(x.dtype)


# --- INT8 (symmetric; per-output-channel weights, per-tensor or per-token activations) ----------


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x / scale) clamped to [-128, 127] -> int8 (modelopt's INT8 SQ / W8A16); a 1-D scale of
    a 2-D x is per row (the weight's [out] channels)."""
    return (x.float() / _per_row(scale, x)).round().clamp(-128, 127).to(torch.int8)


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return weight.float() * _per_row(scale, weight)


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round-trip activations through int8 with a static per-tensor scale (amax / 127)."""
    s = scale.float()
    return (quantize_int8(x, s).float() * s).to(x.dtype)


# --- INT4 blockwise (modelopt AWQ / W4A8 / INT4 weight-only) -------------------------------------


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values [out, in] (int8 in [-8, 7]) -> uint8 [out/2, in].

    Two consecutive output rows share a byte: row 2i in the low nibble, row 2i+1 in the high one,
    each as a two's-complement nibble (modelopt's `pack_int4_in_uint8`)."""
    if q.shape[-2] % 2:
        raise ExaoneError(f"int4 packing needs an even number of output rows, got {q.shape[-2]}")
    q = q.to(torch.int8)
    lo, hi = q[..., 0::2, :] & 0x0F, q[..., 1::2, :] & 0x0F
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/2, in] -> int8 [out, in] in [-8, 7] (inverse of pack_int4_rows)."""
    p = packed.to(torch.int16)  # uint8 has no arithmetic shift; widen first
    lo, hi = p & 0x0F, (p >> 4) & 0x0F
    both = torch.stack((lo, hi), dim=-2)  # [..., out/2, 2, in]
    both = torch.where(both >= 8, both - 16, both)
    return both.reshape(*packed.shape[:-2], packed.shape[-2] * 2, packed.shape[-1]).to(torch.int8)


def int4_block_scale(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per-block scale amax / 7 [out, in/block] (modelopt's static block max calibration)."""
    out, inn = weight.shape
    return weight.float().abs().view(out, inn // block_size, block_size).amax(-1) / INT4_MAX


def quantize_int4(weight: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """float [out, in] and scale [out, in/block] -> packed uint8 [out/2, in]."""
    check_block(weight.shape[-1], block_size)
    s = scale.float().repeat_interleave(block_size, dim=-1)
    return pack_int4_rows((weight.float() / s).round().clamp(-8, 7).to(torch.int8))


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """uint8 [out/2, in] and scale [out, in/block] -> float32 [out, in]; block inferred when None."""
    q = unpack_int4_rows(packed)
    block = block_size or q.shape[-1] // scale.shape[-1]
    return q.float() * scale.float().repeat_interleave(block, dim=-1)


def dequantize_w4a8(
    packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor, block_size: int | None = None
) -> torch.Tensor:
    """W4A8 AWQ weight: int4 blocks times `weight_scale`, then the e4m3 round-trip with `weight_scale_2`
    (modelopt's weight quantizer is int4-then-fp8 in sequence; the fp8 step is what the kernel sees)."""
    return fake_quant_fp8(dequantize_int4(packed, scale, block_size), scale_2)


def check_block(in_features: int, block_size: int):
    if block_size <= 0 or in_features % block_size:
        raise ExaoneError(f"in_features {in_features} is not divisible by the block size {block_size}")


# --- NVFP4 (e2m1 values, e4m3 scale per 16, f32 global scale) ------------------------------------


def e2m1_code(x: torch.Tensor) -> torch.Tensor:
    """Float values already divided by their scales -> 4-bit e2m1 codes (uint8), round half to even,
    saturating at 6; negative values (even those rounding to 0) keep the sign bit, as modelopt does."""
    sign = (x < 0).to(torch.uint8)
    mag = x.abs().float()
    bounds = _E2M1_BOUNDS.to(mag.device)
    code = torch.searchsorted(bounds, mag.contiguous(), out_int32=True).to(torch.uint8)
    code += (mag[..., None] == bounds[[1, 3, 5]]).any(-1).to(torch.uint8)  # ties at odd bounds go up
    return (sign << 3) + code


def pack_fp4_cols(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes [..., in] -> uint8 [..., in/2]: column 2j in the low nibble, 2j+1 in the high one."""
    return ((codes[..., 1::2] << 4) | codes[..., 0::2]).to(torch.uint8)


def unpack_fp4_cols(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., in/2] -> e2m1 codes [..., in] (inverse of pack_fp4_cols)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def nvfp4_scale_2(amax: torch.Tensor) -> torch.Tensor:
    """Global (per-tensor) scale: amax / (6 * 448)."""
    return amax.float() / (E2M1_MAX * E4M3_MAX)


def nvfp4_block_scale(weight: torch.Tensor, scale_2: torch.Tensor, block: int = NVFP4_BLOCK) -> torch.Tensor:
    """Per-16 block scale in e4m3: block amax / (6 * scale_2), zeros as 1, clamped to [2^-9, 448]."""
    w = weight.float()
    amax = w.abs().view(*w.shape[:-1], w.shape[-1] // block, block).amax(-1)
    s = amax / (E2M1_MAX * scale_2.float())
    s[s == 0] = 1.0
    return s.clamp(min=2**-9, max=E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_nvfp4(
    weight: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor, block: int = NVFP4_BLOCK
) -> torch.Tensor:
    """float [out, in] -> packed uint8 [out, in/2] given e4m3 block scales and the global scale."""
    check_block(weight.shape[-1], block)
    w = weight.view(*weight.shape[:-1], -1, block)
    scaled = w / (scale.float() * scale_2.float())[..., None]
    return pack_fp4_cols(e2m1_code(scaled.reshape(weight.shape)))


def dequantize_nvfp4(
    packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor, block: int = NVFP4_BLOCK
) -> torch.Tensor:
    """uint8 [out, in/2], e4m3 [out, in/16], scalar f32 -> float32 [out, in]."""
    values = E2M1_VALUES.to(packed.device)[unpack_fp4_cols(packed).long()]
    s = scale.float().repeat_interleave(block, dim=-1) * scale_2.float()
    return values * s


def _round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """|x| / scale -> nearest e2m1 magnitude, ties to even (Model Optimizer's decision boundaries)."""
    out = torch.full_like(a, E2M1_MAX)
    for bound, value, inclusive in reversed(
        [(0.25, 0.0, True), (0.75, 0.5, False), (1.25, 1.0, True), (1.75, 1.5, False),
         (2.5, 2.0, True), (3.5, 3.0, False), (5.0, 4.0, True)]
    ):  # fmt: skip
        out = torch.where(a <= bound if inclusive else a < bound, value, out)
    return out


def fake_quant_nvfp4(x: torch.Tensor, input_scale: torch.Tensor, block: int = NVFP4_BLOCK) -> torch.Tensor:
    """Activations [..., K] -> the NVFP4 values they quantize to, in x's dtype, exactly as Model
    Optimizer's Hopper calibration kernel (`fp4_fake_quant_block`) computes them: per block of 16,
    scale = e4m3(min(amax / (6 * input_scale), 448)) * input_scale (blocks whose scale falls under 1e-5
    use 1.0), values rounded to the nearest e2m1 magnitude, ties to even."""
    k = x.shape[-1]
    if k % block:
        raise ExaoneError(f"nvfp4 activations: in_features {k} is not a multiple of {block}")
    xf = x.float().reshape(*x.shape[:-1], k // block, block)
    gs = input_scale.float().to(x.device)
    gs = torch.where(gs > 0, gs, torch.full_like(gs, 1e-12))
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (amax / (E2M1_MAX * gs)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float() * gs
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    q = _round_e2m1(xf.abs() / scale) * scale
    return torch.where(xf >= 0, q, -q).reshape(x.shape).to(x.dtype)


# --- AutoAWQ GEMM layout (LG's pre-quantized AWQ checkpoints) ------------------------------------


def pack_awq_int32(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [rows, cols] -> int32 [rows, cols/8] in AutoAWQ's interleaved order."""
    v = values.to(torch.int32).view(values.shape[0], -1, 8)
    out = torch.zeros(v.shape[:2], dtype=torch.int32, device=values.device)
    for slot, col in enumerate(AWQ_ORDER):
        out |= (v[..., col] & 0xF) << (4 * slot)
    return out


def unpack_awq_int32(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols/8] -> unsigned 4-bit values [rows, cols] as int16 (inverse of pack_awq_int32)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed[..., None] >> shifts) & 0xF  # nibble slot order
    natural = torch.empty_like(nibbles)
    natural[..., list(AWQ_ORDER)] = nibbles
    return natural.reshape(packed.shape[0], -1).to(torch.int16)


def dequantize_awq_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM: qweight int32 [in, out/8], qzeros int32 [in/G, out/8], scales [in/G, out]
    -> float32 [out, in] with W[o, i] = (q[i, o] - z[i/G, o]) * s[i/G, o]."""
    q = unpack_awq_int32(qweight).float()
    z = unpack_awq_int32(qzeros).float()
    group = q.shape[0] // scales.shape[0]
    w = (q - z.repeat_interleave(group, 0)) * scales.float().repeat_interleave(group, 0)
    return w.t().contiguous()


# --- KV cache (fp8 e4m3 / int8) ------------------------------------------------------------------

# The one list of KV-cache dtypes: --kv_cache_dtype value -> storage dtype.
KV_CACHE_DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp8": torch.float8_e4m3fn,
    "int8": torch.int8,
}
KV_QMAX = {torch.float8_e4m3fn: E4M3_MAX, torch.int8: INT8_MAX}


def kv_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in KV_CACHE_DTYPES:
            raise OptionError("kv_cache_dtype", dtype, f"expected one of {', '.join(KV_CACHE_DTYPES)}")
        return KV_CACHE_DTYPES[dtype]
    return dtype


def is_quantized_kv(dtype: torch.dtype) -> bool:
    return dtype in KV_QMAX


def kv_token_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One absmax scale per stored vector: x [..., D] -> float32 [...] (no calibration needed)."""
    return x.float().abs().amax(-1).clamp(min=1e-8) / KV_QMAX[dtype]


def kv_scale_from_amax(amax: torch.Tensor, dtype: str | torch.dtype) -> torch.Tensor:
    """A static per-tensor scale for a calibrated amax (TensorRT-LLM's int8 kv_cache_scaling_factor)."""
    return amax.float() / KV_QMAX[kv_dtype(dtype)]


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | float, dtype: str | torch.dtype) -> torch.Tensor:
    """Keys or values -> fp8 e4m3 or int8, saturating at the format's range. `scale` is per tensor
    (a checkpoint's k_scale / v_scale) or per vector (kv_token_scale, broadcast over the last dim)."""
    dtype = kv_dtype(dtype)
    if dtype not in KV_QMAX:
        raise OptionError("kv_cache_dtype", str(dtype), "a quantized KV cache is fp8 or int8")
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)  # a tensor divisor (see exact_div)
    if s.dim() and s.dim() == x.dim() - 1:
        s = s[..., None]
    y = (x.float() / s).clamp(-KV_QMAX[dtype], KV_QMAX[dtype])
    return y.round().to(dtype) if dtype == torch.int8 else y.to(dtype)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """Stored fp8/int8 KV -> `dtype` (the attention's compute dtype)."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
    if s.dim() and s.dim() == q.dim() - 1:
        s = s[..., None]
    return (q.float() * s).to(dtype)
