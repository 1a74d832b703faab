#!/usr/bin/env bash
# check.sh - the one command for the GPU machine (run from the repo root, .gpu-cuda/ carried there; see
# scripts/gpu/bundle.sh): every CUDA parity test, then the engine benchmark against HF transformers.
# Logs go to $OUT (the device tool's output folder; ./gpu-out when unset):
#   gpu.txt      card, driver, clocks at start and end
#   parity.log   test_cuda_ops + test_cuda_model
#   hf.log/json  scripts/bench/hf_engine.py
#   bench.log/json  kvmesh bench engine --synthetic llama-3.1-8b (with the HF numbers beside ours)
# Usage: scripts/gpu/check.sh [all|parity|bench]
set -uo pipefail
what=${1:-all}
B=$PWD/.gpu-cuda
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$B/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export KVM_SHARED_DIR=$B/shared KVM_SOURCE_DIR=$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
clocks() { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv,noheader; }
{ echo "start: $(date -u)"; clocks; nvidia-smi -L; nvcc --version 2>/dev/null | tail -1; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
rc=0
if [ "$what" = all ] || [ "$what" = parity ]; then
  { echo "== test_cuda_ops ($(date -u))"; timeout 120 "$B/test_cuda_ops"; echo "rc=$?";
    echo "== test_cuda_model ($(date -u))"; timeout 180 "$B/test_cuda_model"; echo "rc=$?"; } > "$OUT/parity.log" 2>&1
  if [ -n "${SANITIZE:-}" ]; then   # SANITIZE=1: the op tests once more under compute-sanitizer memcheck
    { echo "== compute-sanitizer test_cuda_ops ($(date -u))"; timeout 240 compute-sanitizer --tool memcheck --leak-check no \
        "$B/test_cuda_ops" 2>&1 | grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" | head -20; } >> "$OUT/parity.log" 2>&1
  fi
  grep -E "rel err|identical|DIFFER|max\|diff|PASSED|FAILED|SKIPPED|rc=|GPU:|ERROR SUMMARY|Invalid" "$OUT/parity.log" | cut -c1-150 | head -120
  grep -q "FAILED" "$OUT/parity.log" && rc=1
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  if [ -z "${SKIP_HF:-}" ]; then   # SKIP_HF=1: our engine only (development runs)
    timeout 200 python3 scripts/bench/hf_engine.py --model llama-3.1-8b --json "$OUT/hf.json" > "$OUT/hf.log" 2>&1
    echo "hf rc=$?"; tail -5 "$OUT/hf.log"
  fi
  timeout 150 "$B/kvmesh" bench engine --synthetic llama-3.1-8b --hf-json "$OUT/hf.json" --json "$OUT/bench.json" ${BENCH_ARGS:---profile} \
    > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -B2 -A40 "^kvmesh bench engine" "$OUT/bench.log" | head -45; grep -A14 "^profile" "$OUT/bench.log" | cut -c1-90
  # ALT_ENVS="A=1 B=2;C=3": the same benchmark once more per ';'-separated group of settings (bench_alt.log)
  IFS=';' read -ra alts <<< "${ALT_ENVS:-}"
  for alt in "${alts[@]}"; do
    echo "== alternative: $alt" >> "$OUT/bench_alt.log"
    env $alt timeout 90 "$B/kvmesh" bench engine --synthetic llama-3.1-8b --no-eager --reps 10 >> "$OUT/bench_alt.log" 2>&1
    echo "alt ($alt) rc=$?"; tac "$OUT/bench_alt.log" | grep -m3 -E "^\| (TTFT prefill  |decode b=1 \(|decode b=16 step \()" | tac
  done
fi
{ echo "end: $(date -u)"; clocks; } >> "$OUT/gpu.txt" 2>&1
exit $rc
