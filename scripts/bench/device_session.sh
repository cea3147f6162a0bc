#!/usr/bin/env bash
# One device call that every GPU session can afford: the GPU kernel checks (tests/test_kernels_gpu.py, on 8
# pytest workers sharing the GPU), then the decode benchmark at batch 1 and 4, dense and sparse, with a per-kernel
# trace. Logs and reports go under $OUT (the device tool's folder) or /tmp/device_session.
#   bash scripts/bench/device_session.sh [extra decode-benchmark flags]
set -o pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/device_session}; mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
start=$(date +%s)
# Each worker allocates as it goes instead of taking 75% of the GPU at start (8 of them share it).
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 python -m pytest tests/test_kernels_gpu.py -n 8 -q \
    -p no:cacheprovider --durations=8 2>&1 | grep -v -i warn | tee "$out/gpu_checks.log" | tail -25
echo "gpu checks: rc ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s wall"
timeout 400 python -m scripts.bench.decode --shape llama2-7b --batch 1 4 --sparse --gate-decay 0.5 --repeats 3 \
    --profile /tmp/decode_profile --json-out "$out/decode.json" "$@" 2>&1 | grep -v -i warn > "$out/decode.log"
echo "decode: rc ${PIPESTATUS[0]}"
tail -7 "$out/decode.log"
