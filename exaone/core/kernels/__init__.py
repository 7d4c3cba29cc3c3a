"""GEMM kernels for every quantized format, on raw tensors (their math: exaone/core/qmath.py).

Each linear function takes the activations ``x`` ``[..., K]`` and the weight tensors in the layout its
``pack_*`` function produces from NVIDIA Model Optimizer's exported checkpoint (``exaone build`` calls the
packers once; the runtime calls the linears). ``backend="auto"`` runs the CUDA path when ``x`` is on a
GPU and the CPU reference path otherwise; ``"reference"`` and ``"triton"`` force one (the Triton kernels
run on CPU tensors under ``TRITON_INTERPRET=1``, which is how the CPU tests check them).

| format   | module     | CUDA kernel                                          | quantized           |
|----------|------------|------------------------------------------------------|---------------------|
| bf16/fp16| dense      | cuBLAS (F.linear)                                    | nothing             |
| fp8      | fp8        | torch._scaled_mm (per-tensor or rowwise scales)      | weights+activations |
| int8_sq  | int8_sq    | torch._int_mm + fp32 rescale                         | weights+activations |
| int4_awq | int4       | Triton dequant GEMM (4-bit in registers)*            | weights             |
| w4a8_awq | w4a8       | fp8 weights packed at build + torch._scaled_mm       | weights+activations |
| nvfp4    | nvfp4      | Triton activation fake-quant + dequant GEMM*         | weights+activations |
| int8_wo  | int8_wo    | Triton dequant GEMM (8-bit in registers)*            | weights             |

(*) from dequant_gemm.DEQUANT_MM_MIN_M rows on: the weight is dequantized once, then one cuBLAS GEMM.
docs/kernels.md has the layouts, the reasons and H100 timings.
"""

from exaone.core.kernels.dense import dense_linear
from exaone.core.kernels.fp8 import concat_fp8, fp8_linear, pack_fp8
from exaone.core.kernels.int4 import concat_int4, pack_int4, w4a16_linear
from exaone.core.kernels.int8_sq import concat_int8_sq, int8_sq_linear, pack_int8_sq
from exaone.core.kernels.int8_wo import concat_int8_wo, pack_int8_wo, w8a16_linear
from exaone.core.kernels.nvfp4 import nvfp4_linear, pack_nvfp4
from exaone.core.kernels.w4a8 import pack_w4a8, w4a8_linear

__all__ = [
    "concat_fp8",
    "concat_int4",
    "concat_int8_sq",
    "concat_int8_wo",
    "dense_linear",
    "fp8_linear",
    "int8_sq_linear",
    "nvfp4_linear",
    "pack_fp8",
    "pack_int4",
    "pack_int8_sq",
    "pack_int8_wo",
    "pack_nvfp4",
    "pack_w4a8",
    "w4a16_linear",
    "w4a8_linear",
    "w8a16_linear",
]
