"""The kernels on a CUDA GPU against the CPU reference path (tests/test_kernels.py ties that path to
Model Optimizer and formats.py), plus a small timing print."""

from __future__ import annotations

import pytest
import test_engine_kernels as tek
import torch
from test_kernels import BF, FORMATS, FP16, _activations, exported, packed_linear, rel_err

from exaone.core import kernels as K
from exaone.core import qmath as formats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda(p: dict) -> dict:
    return {name: t.cuda() for name, t in p.items()}


@pytest.mark.parametrize("dtype", [BF, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_matches_reference(fmt, m, dtype):
    n, k = 256, 512
    p, linear = packed_linear(fmt, exported(fmt, n=n, k=k), dtype=dtype)
    x = _activations(m, k, dtype)
    bias = torch.randn(n).to(dtype)
    ref = linear(x, **p, bias=bias, backend="reference")
    y = linear(x.cuda(), **_cuda(p), bias=bias.cuda(), backend="auto")
    assert y.is_cuda and y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y.cpu(), ref) < 1e-2


@pytest.mark.parametrize("m", [1, 33])
def test_fp8_rowwise_on_cuda(m):
    w = torch.randn(128, 256) * torch.logspace(-2, 0, 128)[:, None]
    s = w.abs().amax(1) / 448
    p = K.pack_fp8(formats.quantize_fp8(w, s[:, None]), s)
    x = _activations(m, 256)
    ref = K.fp8_linear(x, **p, backend="reference")
    for dtype in (BF, FP16):
        y = K.fp8_linear(x.to(dtype).cuda(), **_cuda(p))
        assert y.dtype == dtype and rel_err(y.cpu(), ref) < 1e-2


def test_int8_dynamic_on_cuda():
    t = exported("int8_sq", n=128, k=256)
    p = K.pack_int8_sq(t["weight"], t["weight_scale"], None, t["pre_quant_scale"])
    x = _activations(5, 256)
    ref = K.int8_sq_linear(x, **p, backend="reference")
    assert rel_err(K.int8_sq_linear(x.cuda(), **_cuda(p)).cpu(), ref) < 1e-2


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_kv_quant_on_cuda(kv):
    x = torch.randn(2, 8, 32, 128).to(BF)
    scale = torch.tensor(0.01)
    q = formats.quantize_kv(x.cuda(), scale.cuda(), kv)
    assert torch.equal(q.cpu().view(torch.uint8), formats.quantize_kv(x, scale, kv).view(torch.uint8))
    back = formats.dequantize_kv(q, scale.cuda(), BF).cpu()
    assert torch.equal(back, formats.dequantize_kv(q.cpu(), scale, BF))


def test_timing_print():
    """Not an assertion on speed: one line per format at an EXAONE-3.5-7.8B attention shape (see bench/)."""
    from triton.testing import do_bench

    n, k = 4096, 4096
    for fmt in ("bf16", *FORMATS):
        for m in (1, 128):
            x = _activations(m, k).cuda()
            if fmt == "bf16":
                w = torch.randn(n, k, device="cuda", dtype=BF) * 0.02
                ms = do_bench(lambda w=w, x=x: K.dense_linear(x, w))
            else:
                p, linear = packed_linear(fmt, exported(fmt, n=n, k=k))
                p = _cuda(p)
                ms = do_bench(lambda p=p, x=x, linear=linear: linear(x, **p))
            print(f"{fmt:9s} M={m:4d} {n}x{k}: {ms * 1e3:8.1f} us")


def test_nvfp4_activation_kernel_exact_on_cuda():
    """The Triton activation quantizer's e4m3/e2m1 rounding on the GPU equals the torch reference."""
    from exaone.core.kernels.nvfp4_act import fake_quant_nvfp4_triton

    g = torch.Generator().manual_seed(7)
    for dtype in (BF, FP16):
        x = (torch.randn(37, 4096, generator=g) * torch.logspace(-7, 1, 4096)).to(dtype)
        for input_scale in (torch.tensor(1 / 448), x.float().abs().max() / 2688, torch.tensor(1e-6)):
            ours = fake_quant_nvfp4_triton(x.cuda(), input_scale.cuda()).cpu()
            assert torch.equal(ours, formats.fake_quant_nvfp4(x, input_scale))


# --- the engine's fused kernels on the GPU: the checks tests/test_engine_kernels.py runs interpreted ----


@pytest.mark.parametrize("name", [n for n in tek._CHECKS if not n.startswith("engine")])
def test_fused_kernel_on_cuda(name):
    tek.DEV = "cuda"
    try:
        tek._CHECKS[name]()
    finally:
        tek.DEV = "cpu"
