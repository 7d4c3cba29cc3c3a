#!/usr/bin/env bash
# One device call: GPU tests, then `exaone bench` on the 7.8B shape against transformers, logs in $OUT.
#   bash bench/device_check.sh [tests|bench|all]
# The wheels of .whl/ (pydantic and what it needs) are installed into /tmp/site first.
set -u
what=${1:-all}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv | tee "$OUT/gpu.txt"
if [[ $what == tests || $what == all ]]; then
  timeout 300 python3 -m pytest -q tests/test_gpu_kernels.py -k fused tests/test_gpu_engine.py \
    -k "fused or not default_model" 2>&1 | tee "$OUT/tests.log" | tail -15
fi
if [[ $what == bench || $what == all ]]; then  # ours and transformers at batch 1 and 64, 128/128
  timeout 420 python3 -m exaone.cli.app bench throughput --shape exaone-3.5-7.8b --batch 1,64 \
    --lengths 128/128 --ttft_len 2048 --compare transformers --workdir /tmp/eb \
    --output "$OUT/compare.json" 2>&1 | tee "$OUT/compare.log" | tail -30
fi
if [[ $what == formats ]]; then  # every weight format side by side, 16 of the 32 layers (fits one call)
  timeout 170 python3 -m pytest -q tests/test_gpu_kernels.py tests/test_gpu_engine.py -k "not default_model" \
    2>&1 | tee "$OUT/tests.log" | tail -5
  timeout 390 python3 -m exaone.cli.app bench throughput --shape exaone-3.5-7.8b --layers 16 \
    --formats bf16,fp8,int4_awq,int8_wo,w4a8_awq --batch 1,64 --lengths 128/128 --workdir /tmp/eb \
    --output "$OUT/formats.json" 2>&1 | tee "$OUT/formats.log" | tail -25
fi
if [[ $what == large ]]; then  # ours at the large batches (transformers has no paged cache to fill)
  timeout 300 python3 -m exaone.cli.app bench throughput --shape exaone-3.5-7.8b --batch 1,8,64,256,max \
    --lengths 128/128,1024/256,2048/128 --workdir /tmp/eb --output "$OUT/throughput.json" \
    --plot "$OUT/throughput.png" 2>&1 | tee "$OUT/throughput.log" | tail -30
fi
