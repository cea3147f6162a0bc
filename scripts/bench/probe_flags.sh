#!/usr/bin/env bash
# Decode at batch 1 (and 4) under XLA flag settings, with a per-kernel trace of the default run: what the
# command buffers (CUDA graphs) and cuBLAS products change. Writes logs and reports under $OUT (device machine).
#   bash scripts/bench/probe_flags.sh
set -o pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/probe}; mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
run() {  # name, XLA_FLAGS, args...
  local name=$1 flags=$2; shift 2
  echo "=== $name: XLA_FLAGS='$flags' $*"
  XLA_FLAGS="$flags" timeout 400 python -m scripts.bench.decode --shape llama2-7b --repeats 3 "$@" \
    --json-out "$out/$name.json" 2>&1 | grep -v -i warn > "$out/$name.log"
  grep -E '^\s*[0-9.]+ +[0-9.]+ +[0-9.]+  all kernels|^shape|^llama' "$out/$name.log" | tail -12
  tail -8 "$out/$name.log"
}
run base "" --batch 1 4 --sparse --gate-decay 0.5 --profile /tmp/prof
run cmdbuf_while "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" --batch 1 --profile /tmp/prof2
run cmdbuf_off "--xla_gpu_enable_command_buffer=" --batch 1
run cublas "--xla_gpu_enable_triton_gemm=false" --batch 1 4 --projections xla table
