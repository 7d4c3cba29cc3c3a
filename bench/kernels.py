"""Per-format GEMM timing at EXAONE-3.5-7.8B linear shapes on a CUDA GPU; JSON out.

    python bench/kernels.py --out kernels.json [--sweep]

For each format, shape (in K -> out N) and batch M: ``op_us`` is the whole kernel function as the
runtime calls it (activation quantization included, no CUDA graph; for the Triton formats from
M = 256 on, dequantize + cuBLAS), ``core_us`` the GEMM launch alone (for the Triton formats the fused
dequant GEMM on ready activations at every M; for fp8/int8 the cuBLASLt call).
``--sweep`` also times a grid of Triton tile settings for the 4-bit kernel at decode batch sizes.
Medians from triton.testing.do_bench (L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from exaone.core import kernels as K
from exaone.core import qmath as formats
from exaone.core.kernels import dequant_gemm as dg
from exaone.core.kernels.fp8 import quantize_activations as quantize_fp8
from exaone.core.kernels.fp8 import scaled_mm
from exaone.core.kernels.int8_sq import int_mm
from exaone.core.kernels.int8_sq import quantize_activations as quantize_int8

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in_features K, out_features N)
BATCHES = [1, 16, 128, 2048]
FORMATS = ["bf16", "fp16", "fp8", "fp8_rowwise", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4", "int8_wo"]
# Bytes per weight element as the runtime stores it (scales included).
WEIGHT_BYTES = {
    "bf16": 2, "fp16": 2, "fp8": 1, "fp8_rowwise": 1, "int8_sq": 1, "int8_wo": 1,
    "int4_awq": 0.5 + 4 / 128, "w4a8_awq": 1, "nvfp4": 0.5 + 1 / 16,
}  # fmt: skip


def _us(fn) -> float:
    return do_bench(fn, return_mode="median") * 1e3


def make(fmt: str, n: int, k: int, x: torch.Tensor):
    """(op, core) closures for one format at one shape; weights quantized on the GPU by formats.py."""
    dev, dtype = x.device, x.dtype
    w = torch.randn(n, k, device=dev) * 0.02
    pqs = (torch.rand(k, device=dev) + 0.5).to(dtype)
    amax = x.float().abs().max()
    if fmt in ("bf16", "fp16"):
        wd = w.to(dtype)
        op = lambda: K.dense_linear(x, wd)  # noqa: E731
        return op, op
    if fmt in ("fp8", "fp8_rowwise"):
        s = w.abs().max() / 448 if fmt == "fp8" else w.abs().amax(1) / 448
        p = K.pack_fp8(formats.quantize_fp8(w, s if fmt == "fp8" else s[:, None]), s)
        if fmt == "fp8":
            p["input_scale"] = amax / 448
        xq, xs = quantize_fp8(x, p.get("input_scale"))
        return (lambda: K.fp8_linear(x, **p)), (
            lambda: scaled_mm(xq, xs, p["weight"], p["weight_scale"], dtype)
        )
    if fmt == "int8_sq":
        s = w.abs().amax(1) / 127
        p = K.pack_int8_sq(formats.quantize_int8(w, s), s, (x * pqs).float().abs().max() / 127, pqs)
        xq, _ = quantize_int8(x * pqs, p["input_scale"])
        return (lambda: K.int8_sq_linear(x, **p)), (lambda: int_mm(xq, p["weight"]))
    if fmt == "int8_wo":
        s = w.abs().amax(1) / 127
        p = K.pack_int8_wo(formats.quantize_int8(w, s), s)
        cfg = dg.default_config(x.shape[0], n, k)
        return (lambda: K.w8a16_linear(x, **p)), (lambda: K.w8a16_linear(x, **p, config=cfg))
    if fmt in ("int4_awq", "w4a8_awq"):
        s = formats.int4_block_scale(w, 128)
        packed = formats.quantize_int4(w, s, 128)
        if fmt == "int4_awq":
            p = K.pack_int4(packed, s, pqs)
            cfg = dg.default_config(x.shape[0], n, k)
            core = lambda: dg.dequant_gemm(x, p["qweight"], p["scales"], dg.INT4, 128, config=cfg)  # noqa: E731
            return (lambda: K.w4a16_linear(x, **p)), core
        s2 = formats.dequantize_int4(packed, s).abs().max() / 448
        p = K.pack_w4a8(packed, s, s2, (x * pqs).float().abs().max() / 448, pqs, dtype=dtype)
        xq, xs = quantize_fp8(x * pqs, p["input_scale"])
        return (lambda: K.w4a8_linear(x, **p)), (
            lambda: scaled_mm(xq, xs, p["weight"], p["weight_scale"], dtype)
        )
    if fmt == "nvfp4":
        s2 = formats.nvfp4_scale_2(w.abs().max())
        s = formats.nvfp4_block_scale(w, s2)
        p = K.pack_nvfp4(formats.quantize_nvfp4(w, s, s2), s, s2, formats.nvfp4_scale_2(amax))
        xq = K.fake_quant_nvfp4(x, p["input_scale"])
        sc = p["scales"].view(torch.uint8)
        cfg = dg.default_config(x.shape[0], n, k)
        core = lambda: dg.dequant_gemm(xq, p["qweight"], sc, dg.NVFP4, 16, s2.reshape(1), config=cfg)  # noqa: E731
        return (lambda: K.nvfp4_linear(x, **p)), core
    raise ValueError(fmt)


def _int4_case(k: int, n: int) -> dict[str, torch.Tensor]:
    w = torch.randn(n, k, device="cuda") * 0.02
    s = formats.int4_block_scale(w, 128)
    return K.pack_int4(formats.quantize_int4(w, s, 128), s)


def _time_int4(results: list, p: dict, x: torch.Tensor, cfg: dict) -> None:
    us = _us(lambda: dg.dequant_gemm(x, p["qweight"], p["scales"], dg.INT4, 128, config=cfg))
    k, n = p["qweight"].shape[0] * 2, p["qweight"].shape[1]
    results.append({"K": k, "N": n, "M": x.shape[0], **cfg, "us": round(us, 2)})
    print(f"sweep K={k} N={n} M={x.shape[0]} {cfg}: {us:.1f} us", flush=True)


def sweep(results: list, dtype: torch.dtype) -> None:
    """Tile settings for the 4-bit dequant GEMM at decode and prefill batch sizes."""
    for k, n in SHAPES[1:]:
        p = _int4_case(k, n)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            for bn, split, stages in itertools.product((32, 64, 128), (1, 2, 4, 8), (3, 5)):
                cfg = {"BLOCK_M": 16, "BLOCK_N": bn, "num_warps": 4, "num_stages": stages, "SPLIT_K": split}
                _time_int4(results, p, x, cfg)
        x = torch.randn(2048, k, device="cuda", dtype=dtype)
        for bm, bn, warps in ((128, 128, 8), (128, 128, 4), (64, 128, 4), (128, 64, 4)):
            _time_int4(results, p, x, {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": 3})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("kernels.json"))
    ap.add_argument("--formats", nargs="*", default=FORMATS)
    ap.add_argument("--batches", nargs="*", type=int, default=BATCHES)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    report = {
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "results": [],
        "sweep": [],
    }
    for k, n in SHAPES:
        for m in args.batches:
            for fmt in args.formats:
                dtype = torch.float16 if fmt == "fp16" else torch.bfloat16
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                try:
                    op, core = make(fmt, n, k, x)
                    op_us, core_us = _us(op), _us(core)
                except Exception as e:  # recorded, not hidden: one failing format does not stop the rest
                    report["results"].append({"format": fmt, "M": m, "K": k, "N": n, "error": repr(e)[:300]})
                    print(f"{fmt} M={m} K={k} N={n}: ERROR {e!r}"[:300], flush=True)
                    continue
                row = {"format": fmt, "M": m, "K": k, "N": n, "op_us": round(op_us, 2)}
                row["core_us"] = round(core_us, 2)
                row["core_tflops"] = round(2 * m * n * k / core_us / 1e6, 1)
                row["weight_gbps"] = round(WEIGHT_BYTES[fmt] * n * k / core_us / 1e3, 1)
                report["results"].append(row)
                print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(report, indent=1))
    if args.sweep:
        sweep(report["sweep"], torch.bfloat16)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
