#!/usr/bin/env bash
# kvcomm.sh - the one command for the GPU machine for KVCOMM on the device (run from the repo root with
# .gpu-kvcomm/ carried there; make it with scripts/gpu/bundle_kvcomm.sh). Steps, logs in $OUT (./gpu-out if unset):
#   gpu.txt            card, driver, clocks at start and end; the bundle's VERSION
#   memcheck.log       compute-sanitizer memcheck of test_kvcomm_ops (CUDA kvcomm ops vs CPU, small shapes)
#   parity_ops.log     test_kvcomm_ops: CPU ops vs the formulas; CUDA ops vs CPU ops (rel err per output)
#   parity_path.log    test_kvcomm_device_path: device path vs host path REUSE cache (CPU forced; CUDA fp32/bf16 KV)
#   opsbench.log       the ops alone at Llama-3.1-8B shapes (T=1024, S=512, bf16) for N = 20 and 5 anchors:
#                      median ms, bandwidth floor, ratio (lines "KVCOMM_OPS_JSON {...}")
#   bench.log, bench/  kvmesh bench kvcomm --synthetic llama-3.1-8b (TTFT workload; JSON in $OUT/bench/)
# Usage: scripts/gpu/kvcomm.sh [all|parity|ops|bench]. BENCH_ARGS adds options to kvmesh bench kvcomm;
# HOST_BASELINE=1 also runs the bench once on the host path (KVM_KVCOMM_DEVICE=0, bench_host.log) for comparison.
set -uo pipefail
what=${1:-all}
B=$PWD/.gpu-kvcomm
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$B/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export KVM_SOURCE_DIR=$PWD
clocks() { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv,noheader; }
{ echo "start: $(date -u)"; echo "bundle: $(cat "$B/VERSION" 2>/dev/null)"; clocks; nvidia-smi -L; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
rc=0
step() { echo; echo "==== $1 ($(date -u +%T))"; }
if [ "$what" = all ] || [ "$what" = parity ]; then
  step "memcheck: compute-sanitizer test_kvcomm_ops"
  if command -v compute-sanitizer >/dev/null; then
    timeout 240 compute-sanitizer --tool memcheck --leak-check no "$B/test_kvcomm_ops" > "$OUT/memcheck.log" 2>&1
    echo "memcheck rc=$?"
    grep -E "ERROR SUMMARY|Invalid|out of bounds|Address|at 0x|by thread|PASSED|FAILED|SKIPPED" "$OUT/memcheck.log" | head -30
    grep -qE "ERROR SUMMARY: [1-9]" "$OUT/memcheck.log" && rc=1
  else
    echo "compute-sanitizer not found: memcheck skipped"
  fi
  step "parity: test_kvcomm_ops"
  timeout 120 "$B/test_kvcomm_ops" > "$OUT/parity_ops.log" 2>&1; prc=$?
  echo "test_kvcomm_ops rc=$prc"
  grep -E "rel err|kvcomm_(dist|apply)\(|SKIPPED|PASSED|FAILED|Error|error" "$OUT/parity_ops.log" | cut -c1-160 | head -40
  [ $prc -ne 0 ] && rc=1
  step "parity: test_kvcomm_device_path"
  timeout 180 "$B/test_kvcomm_device_path" > "$OUT/parity_path.log" 2>&1; prc=$?
  echo "test_kvcomm_device_path rc=$prc"
  grep -E "rel err|prepare|SKIPPED|PASSED|FAILED|Error|error|kvcomm" "$OUT/parity_path.log" | cut -c1-160 | head -30
  [ $prc -ne 0 ] && rc=1
fi
if [ "$what" = all ] || [ "$what" = ops ]; then
  step "ops bench at Llama-3.1-8B shapes"
  : > "$OUT/opsbench.log"
  for n in 20 5; do
    KVM_KVCOMM_OPS_BENCH=1 KVM_KVCOMM_OPS_BENCH_N=$n timeout 120 "$B/test_kvcomm_ops" >> "$OUT/opsbench.log" 2>&1
    echo "ops bench N=$n rc=$?"
  done
  grep -E "^kvcomm_ops bench|^  |KVCOMM_OPS_JSON|FAILED|rror" "$OUT/opsbench.log" | grep -v "rel err" | cut -c1-200
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  step "kvmesh bench kvcomm --synthetic llama-3.1-8b (device path)"
  timeout 300 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b --out "$OUT/bench" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  brc=$?
  echo "bench rc=$brc"; tail -45 "$OUT/bench.log"
  [ $brc -ne 0 ] && rc=1
  if [ -n "${HOST_BASELINE:-}" ]; then
    step "kvmesh bench kvcomm, host path (KVM_KVCOMM_DEVICE=0)"
    KVM_KVCOMM_DEVICE=0 timeout 240 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b --out "$OUT/bench_host" ${BENCH_ARGS:-} \
      > "$OUT/bench_host.log" 2>&1
    echo "host bench rc=$?"; tail -25 "$OUT/bench_host.log"
  fi
fi
{ echo "end: $(date -u)"; clocks; } >> "$OUT/gpu.txt" 2>&1
echo; echo "end: $(date -u)  rc=$rc"
exit $rc
