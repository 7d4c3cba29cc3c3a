"""Kernels against references no one here wrote: Model Optimizer's own quantizers and exporter, and the
format math of exaone/quant/formats.py.

The Triton kernels run under TRITON_INTERPRET=1 in one child process (the interpreter must be chosen
before triton compiles anything, and must not leak into a GPU run of the suite): `_INTERP_CHECKS`
below are executed there and each one is reported here as its own test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import interpreted_checks, interpreted_test

from exaone.core import kernels as K
from exaone.core import qmath as formats
from exaone.core.errors import ExaoneError

BF, FP16 = torch.bfloat16, torch.float16
REPO = Path(__file__).resolve().parents[1]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _activations(m: int, k: int, dtype=BF, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    channel = torch.logspace(-1, 0.5, k)  # uneven channels, as real activations (and AWQ) have
    return (torch.randn(m, k, generator=g) * channel).to(dtype)


def exported(fmt: str, n: int = 64, k: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """One linear's tensors in Model Optimizer's exported layout, made with formats.py's quantizers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = _activations(32, k)
    pqs = (torch.rand(k, generator=g) + 0.5).to(BF)
    if fmt == "fp8":
        s = w.abs().max() / 448
        return {
            "weight": formats.quantize_fp8(w, s),
            "weight_scale": s,
            "input_scale": x.float().abs().max() / 448,
        }
    if fmt in ("int8_sq", "int8_wo"):
        s = w.abs().amax(1) / 127
        t = {"weight": formats.quantize_int8(w, s), "weight_scale": s}
        if fmt == "int8_sq":
            t |= {"input_scale": (x * pqs).float().abs().max() / 127, "pre_quant_scale": pqs}
        return t
    if fmt in ("int4_awq", "int4_wo", "w4a8_awq"):
        s = formats.int4_block_scale(w, 128)
        t = {"weight": formats.quantize_int4(w, s, 128), "weight_scale": s}
        if fmt != "int4_wo":
            t["pre_quant_scale"] = pqs
        if fmt == "w4a8_awq":
            t["weight_scale_2"] = formats.dequantize_int4(t["weight"], s).abs().max() / 448
            t["input_scale"] = (x * pqs).float().abs().max() / 448
        return t
    if fmt == "nvfp4":
        s2 = formats.nvfp4_scale_2(w.abs().max())
        s = formats.nvfp4_block_scale(w, s2)
        return {
            "weight": formats.quantize_nvfp4(w, s, s2),
            "weight_scale": s,
            "weight_scale_2": s2,
            "input_scale": formats.nvfp4_scale_2(x.float().abs().max()),
        }
    raise ValueError(fmt)


def packed_linear(fmt: str, t: dict[str, torch.Tensor], dtype=BF):
    """(pack(t), the kernel function) for a format."""
    if fmt == "fp8":
        return K.pack_fp8(t["weight"], t["weight_scale"], t["input_scale"]), K.fp8_linear
    if fmt == "int8_sq":
        p = K.pack_int8_sq(t["weight"], t["weight_scale"], t["input_scale"], t["pre_quant_scale"])
        return p, K.int8_sq_linear
    if fmt == "int8_wo":
        return K.pack_int8_wo(t["weight"], t["weight_scale"]), K.w8a16_linear
    if fmt in ("int4_awq", "int4_wo"):
        return K.pack_int4(t["weight"], t["weight_scale"], t.get("pre_quant_scale")), K.w4a16_linear
    if fmt == "w4a8_awq":
        args = (t["weight"], t["weight_scale"], t["weight_scale_2"], t["input_scale"], t["pre_quant_scale"])
        return K.pack_w4a8(*args, dtype=dtype), K.w4a8_linear
    if fmt == "nvfp4":
        args = (t["weight"], t["weight_scale"], t["weight_scale_2"], t["input_scale"])
        return K.pack_nvfp4(*args), K.nvfp4_linear
    raise ValueError(fmt)


def formats_reference(fmt: str, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """y from formats.py alone: activations through the format's quantizer, weights dequantized."""
    if "pre_quant_scale" in t:
        x = x * t["pre_quant_scale"].to(x.dtype)
    w = {
        "fp8": lambda: formats.dequantize_fp8(t["weight"], t["weight_scale"]),
        "int8_sq": lambda: formats.dequantize_int8(t["weight"], t["weight_scale"]),
        "int8_wo": lambda: formats.dequantize_int8(t["weight"], t["weight_scale"]),
        "int4_awq": lambda: formats.dequantize_int4(t["weight"], t["weight_scale"]),
        "int4_wo": lambda: formats.dequantize_int4(t["weight"], t["weight_scale"]),
        # modelopt's int4 step yields the model dtype before its fp8 step (test_matches_modelopt checks
        # this against its fake quantizer), so the int4 weight is rounded to bf16 first.
        "w4a8_awq": lambda: formats.fake_quant_fp8(
            formats.dequantize_int4(t["weight"], t["weight_scale"]).to(BF), t["weight_scale_2"]
        ),
        "nvfp4": lambda: formats.dequantize_nvfp4(t["weight"], t["weight_scale"], t["weight_scale_2"]),
    }[fmt]()
    if fmt in ("fp8", "w4a8_awq"):
        x = formats.fake_quant_fp8(x, t["input_scale"])
    elif fmt == "int8_sq":
        x = formats.fake_quant_int8(x, t["input_scale"])
    elif fmt == "nvfp4":
        x = formats.fake_quant_nvfp4(x, t["input_scale"])
    return F.linear(x, w.to(x.dtype))


FORMATS = ("fp8", "int8_sq", "int8_wo", "int4_awq", "int4_wo", "w4a8_awq", "nvfp4")


def test_dense_linear():
    x, w, b = torch.randn(3, 7, 32), torch.randn(48, 32), torch.randn(48)
    torch.testing.assert_close(K.dense_linear(x, w, b), x @ w.t() + b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_path_matches_formats(fmt):
    t = exported(fmt)
    p, linear = packed_linear(fmt, t)
    x = _activations(2 * 5, 256).reshape(2, 5, 256)
    y = linear(x, **p, backend="reference")
    assert y.shape == (2, 5, 64) and y.dtype == BF
    assert rel_err(y, formats_reference(fmt, t, x)) < 1.5e-2


@pytest.mark.parametrize("fmt", ["fp8", "int8_sq", "w4a8_awq"])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_library_path_matches_reference(fmt, m):
    """The _scaled_mm / _int_mm code (row padding, scales) run on the CPU, where torch has both too."""
    t = exported(fmt)
    p, linear = packed_linear(fmt, t)
    x = _activations(m, 256)
    bias = torch.randn(64).to(BF)
    y, ref = linear(x, **p, bias=bias, backend="cuda"), linear(x, **p, bias=bias, backend="reference")
    assert y.shape == (m, 64)
    assert rel_err(y, ref) < 1e-2


def test_fp8_rowwise_and_dynamic_scales():
    """Per-channel weight scales (rowwise _scaled_mm) with per-token activation scales (no input_scale)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=g) * torch.logspace(-2, 0, 48)[:, None]
    s = w.abs().amax(1) / 448
    p = K.pack_fp8(formats.quantize_fp8(w, s[:, None]), s)
    x = _activations(7, 64)
    xq = torch.stack([formats.fake_quant_fp8(r, r.float().abs().max() / 448) for r in x])
    ref = F.linear(xq, formats.dequantize_fp8(p["weight"], s).to(BF))
    for backend in ("reference", "cuda"):
        assert rel_err(K.fp8_linear(x, **p, backend=backend), ref) < 1e-2


def test_int8_dynamic_per_token():
    t = exported("int8_sq")
    p = K.pack_int8_sq(t["weight"], t["weight_scale"], None, t["pre_quant_scale"])
    x = _activations(20, 256)
    xs = x * t["pre_quant_scale"]
    xq = torch.stack([formats.fake_quant_int8(r, r.float().abs().max() / 127) for r in xs])
    ref = F.linear(xq, formats.dequantize_int8(t["weight"], t["weight_scale"]).to(BF))
    for backend in ("reference", "cuda"):
        assert rel_err(K.int8_sq_linear(x, **p, backend=backend), ref) < 1e-2


def test_int4_layouts_round_trip():
    q = torch.randint(-8, 8, (64, 256), dtype=torch.int8)
    packed = formats.pack_int4_rows(q)
    assert torch.equal(formats.unpack_int4_rows(packed), q)
    p = K.pack_int4(packed, torch.ones(64, 2))
    assert p["qweight"].shape == (128, 64) and p["qweight"].dtype == torch.uint8
    from exaone.core.kernels.int4 import dequantize

    assert torch.equal(dequantize(p["qweight"], p["scales"], torch.float32), q.float())


def test_nvfp4_matches_modelopt_quantizer():
    """Weights: modelopt's NVFP4QTensor packs them; our packing + dequantization reads them back.
    Activations: our fake quant equals modelopt's quantize -> dequantize with the same global scale."""
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from exaone.core.kernels.nvfp4 import dequantize

    g = torch.Generator().manual_seed(4)
    w = (torch.randn(64, 256, generator=g) * torch.logspace(-3, 0, 256)).to(BF)
    qt, ws, ws2 = NVFP4QTensor.quantize(w, 16)
    theirs = qt.dequantize(dtype=torch.float32, scale=ws, double_scale=ws2, block_sizes={-1: 16})
    p = K.pack_nvfp4(qt._quantized_data, ws, ws2)
    ours = dequantize(p["qweight"], p["scales"], p["weight_scale_2"], torch.float32)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert torch.equal(formats.fake_quant_nvfp4(w.float(), ws2), theirs)


# Model Optimizer quantizes one linear (its calibration, AWQ search, smoothing) and exports it with
# the exporter's own per-module function; the kernel must reproduce modelopt's fake-quant forward.
MODELOPT_CFG = {
    "fp8": "FP8_DEFAULT_CFG",
    "int8_sq": "INT8_SMOOTHQUANT_CFG",
    "int8_wo": "INT8_WEIGHT_ONLY_CFG",
    "int4_awq": "INT4_AWQ_CFG",
    "int4_wo": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
    "w4a8_awq": "W4A8_AWQ_BETA_CFG",
}


@pytest.fixture(scope="module")
def modelopt_linears():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export.unified_export_hf import _export_quantized_weight

    out = {}
    for fmt, cfg in MODELOPT_CFG.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 64, bias=False)).to(BF)
        calib = [_activations(8, 256, seed=s) for s in range(2)]
        mtq.quantize(model, getattr(mtq, cfg), forward_loop=lambda m, calib=calib: [m(c) for c in calib])
        lin = model[0]
        x = _activations(5, 256, seed=9)
        with torch.no_grad():
            y = model(x)
            w_fq = lin.weight_quantizer(lin.weight)
            pqs = getattr(lin.input_quantizer, "_pre_quant_scale", None)
            _export_quantized_weight(lin, BF)
        t = {
            n: v.detach() for n, v in [*lin.named_parameters(), *lin.named_buffers()] if "quantizer" not in n
        }
        if pqs is not None:
            t["pre_quant_scale"] = pqs.detach().squeeze().to(BF)
        out[fmt] = (x, y, w_fq, t)
    return out


@pytest.mark.parametrize("fmt", list(MODELOPT_CFG))
def test_matches_modelopt(modelopt_linears, fmt):
    x, y, w_fq, t = modelopt_linears[fmt]
    p, linear = packed_linear(fmt, t)
    # modelopt's fake quantizer and its exporter round a handful of weights differently (one step);
    # everything else (layouts, scales, activation quantization) must agree.
    assert rel_err(linear(x, **p, backend="reference"), y) < 2e-2
    if fmt == "w4a8_awq":  # the fp8 weights packed at build time are modelopt's fake-quant weights
        w = p["weight"].float() * p["weight_scale"]
        assert ((w.to(BF) != w_fq).float().mean() < 2e-3).item()


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_kv_cache_quantization(kv):
    x = torch.randn(2, 4, 16, 64).to(BF) * 3
    scale = torch.tensor(x.float().abs().max().item() / (448 if kv == "fp8" else 127))
    q = formats.quantize_kv(x, scale, kv)
    assert q.dtype == {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[kv]
    back = formats.dequantize_kv(q, scale, BF)
    expect = formats.fake_quant_fp8(x, scale) if kv == "fp8" else formats.fake_quant_int8(x, scale)
    assert torch.equal(back, expect)
    # saturation instead of inf/NaN for values beyond the calibrated range
    big = formats.quantize_kv(x * 10, scale, kv)
    assert torch.isfinite(formats.dequantize_kv(big, scale, torch.float32)).all()


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ExaoneError, match="multiple of 128"):
        K.pack_int4(torch.zeros(8, 96, dtype=torch.uint8), torch.ones(16, 1))
    with pytest.raises(ExaoneError, match="weight_scale"):
        K.pack_fp8(torch.zeros(16, 16).to(torch.float8_e4m3fn), torch.ones(3))
    with pytest.raises(ExaoneError, match="kv_cache_dtype"):
        formats.quantize_kv(torch.zeros(4), 1.0, "int4")
    with pytest.raises(ExaoneError, match="backend"):
        K.w8a16_linear(
            torch.zeros(2, 64), torch.zeros(64, 16, dtype=torch.int8), torch.ones(1, 16), backend="x"
        )


# --- Triton kernels, interpreted on the CPU in a child process --------------------------------------


def _interp_case(fmt: str, m: int, dtype, n: int = 64, k: int = 256, bias: bool = False, config=None):
    t = exported(fmt, n=n, k=k)
    p, linear = packed_linear(fmt, t)
    x = _activations(m, k, dtype)
    b = torch.randn(n).to(dtype) if bias else None
    ref = linear(x, **p, bias=b, backend="reference")
    y = linear(x, **p, bias=b, backend="triton", config=config)
    err = rel_err(y, ref)
    assert err < (5e-3 if dtype == BF else 2e-3), f"relative error {err:.2e}"


def _int4_per_channel():
    """Group size = in_features (int4 weight-only per channel), fp16."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 256, generator=g)
    s = w.abs().amax(1, keepdim=True) / 7
    p = K.pack_int4(formats.quantize_int4(w, s, 256), s)
    x = _activations(3, 256, FP16)
    ref = K.w4a16_linear(x, **p, backend="reference")
    assert rel_err(K.w4a16_linear(x, **p, backend="triton"), ref) < 2e-3


def _int4_group(group: int, k: int = 256):
    """Group sizes around the 64-row half tile: 64 (one scale row per half), 32 (two whole groups per
    half, broadcast), 48 (groups straddle halves: one scale load per row)."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(32, k, generator=g)
    s = formats.int4_block_scale(w, group)
    p = K.pack_int4(formats.quantize_int4(w, s, group), s)
    x = _activations(4, k)
    ref = K.w4a16_linear(x, **p, backend="reference")
    assert rel_err(K.w4a16_linear(x, **p, backend="triton", config=_SMALL_TILE), ref) < 5e-3


def _nvfp4_weight_only():
    t = exported("nvfp4")
    p = K.pack_nvfp4(t["weight"], t["weight_scale"], t["weight_scale_2"])  # no input_scale: W4A16
    x = _activations(2, 256, FP16)
    ref = F.linear(x, formats.dequantize_nvfp4(t["weight"], t["weight_scale"], t["weight_scale_2"]).to(FP16))
    assert rel_err(K.nvfp4_linear(x, **p, backend="triton"), ref) < 2e-3


def _nvfp4_activation_kernel():
    """The Triton activation quantizer gives exactly the torch one's values: scales deep in e4m3's
    subnormal range, blocks under the 1e-5 cut, saturation at 448, ragged K (6 blocks of 16)."""
    from exaone.core.kernels.nvfp4_act import fake_quant_nvfp4_triton

    g = torch.Generator().manual_seed(7)
    for dtype in (BF, FP16):
        x = (torch.randn(21, 96, generator=g) * torch.logspace(-7, 1, 96)).to(dtype)
        x[3] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 12)  # e2m1 ties at scale 1
        for input_scale in (
            torch.tensor(1 / 448 / 6 * 6.0),
            x.float().abs().max() / 2688,
            torch.tensor(1e-6),
        ):
            ours = fake_quant_nvfp4_triton(x, input_scale)
            assert torch.equal(ours, formats.fake_quant_nvfp4(x, input_scale)), (dtype, input_scale)


_SMALL_TILE = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
_SPLIT2 = {**_SMALL_TILE, "SPLIT_K": 2}
_INTERP_CHECKS = {
    "int4_awq_bf16_bias": lambda: _interp_case("int4_awq", 5, BF, bias=True),
    "int4_wo_fp16_m20": lambda: _interp_case("int4_wo", 20, FP16),
    "int4_awq_split_k": lambda: _interp_case("int4_awq", 3, BF, config=_SPLIT2),
    "int4_awq_ragged_n": lambda: _interp_case(
        "int4_awq", 2, FP16, n=48, config=_SMALL_TILE | {"BLOCK_N": 64}
    ),
    "int4_per_channel": _int4_per_channel,
    "int4_group64": lambda: _int4_group(64),
    "int4_group32": lambda: _int4_group(32),
    "int4_group48": lambda: _int4_group(48, k=768),
    "nvfp4_bf16": lambda: _interp_case("nvfp4", 3, BF, bias=True),
    "nvfp4_split_k": lambda: _interp_case("nvfp4", 1, FP16, config=_SPLIT2),
    "nvfp4_weight_only": _nvfp4_weight_only,
    "nvfp4_activation_kernel": _nvfp4_activation_kernel,
    "int8_wo_bf16_bias": lambda: _interp_case("int8_wo", 5, BF, bias=True),
    "int8_wo_k192": lambda: _interp_case("int8_wo", 2, FP16, k=192),
    "int8_wo_split_k": lambda: _interp_case("int8_wo", 1, BF, config=_SPLIT2),
    # from DEQUANT_MM_MIN_M rows: the dequantize kernel, then one matmul
    "int4_awq_large_m": lambda: _interp_case("int4_awq", 260, BF, bias=True),
    "nvfp4_large_m": lambda: _interp_case("nvfp4", 256, FP16),
    "int8_wo_large_m_k192": lambda: _interp_case("int8_wo", 300, BF, k=192, bias=True),
}


test_triton_kernel_interpreted = interpreted_test(_INTERP_CHECKS, __file__)


if __name__ == "__main__":  # the child: TRITON_INTERPRET=1 is set before triton is imported
    interpreted_checks(_INTERP_CHECKS)
