#!/usr/bin/env bash
# onepath.sh - the H100 run of issue 11 (one KVCOMM path, settings as parameters, one decode loop): run from the
# repo root on the GPU machine with .gpu-kvcomm/ (scripts/gpu/bundle_kvcomm.sh: this commit) and .gpu-old/
# (bundle_kvcomm.sh --old df22b09: the previous paths, for the same-run baseline) carried. Logs in $OUT:
#   gpu.txt      card, driver, clocks at start and end; the bundles' VERSION
#   parity.log   (step parity) test_kvcomm_ops, test_kvcomm_device_path, test_kvcomm_core, test_settings, and
#                test_hf_parity with KVM_PARITY_BACKEND=cuda: the CUDA backend against the CPU reference
#   cuda.log     (step cuda) test_cuda_ops and test_cuda_model
#   team.log, team.json   (step team) kvmesh bench kvcomm --workload team on models/minillama-2m, 300 requests,
#                dense / spec KVCOMM / blend on the one path (the CPU figures: 72.3 / 41.2 / 71.8)
#   ttft.log     (step ttft) kvmesh bench kvcomm --synthetic llama-3.1-8b (the paper's 5-agent TTFT setting),
#                the old bundle then the new one, ROUNDS times (default 2), same card
#   engine.log   (step engine) kvmesh bench engine --synthetic llama-3.1-8b (docs/perf/engine.md's table)
# Usage: scripts/gpu/onepath.sh [parity|cuda|team|ttft|engine]...   (default: all)
set -uo pipefail
steps=${*:-parity cuda team ttft engine}
B=$PWD/.gpu-kvcomm
OLD=$PWD/.gpu-old
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export KVM_SOURCE_DIR=$PWD
clocks() { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv,noheader; }
if [ -f "$B/bins.tar.xz" ] && [ ! -x "$B/kvmesh" ]; then tar xJf "$B/bins.tar.xz" -C "$B"; fi
if [ -f "$OLD/old.tar.xz" ] && [ ! -x "$OLD/kvmesh" ]; then tar xJf "$OLD/old.tar.xz" -C "$OLD"; fi
{ echo "start: $(date -u)"; echo "bundle: $(cat "$B/VERSION" 2>/dev/null)"; echo "old bundle: $(cat "$OLD/VERSION" 2>/dev/null)"
  clocks; nvidia-smi -L; } >> "$OUT/gpu.txt" 2>&1
rc=0
want() { [[ " $steps " == *" $1 "* ]]; }
step() { echo; echo "==== $1 ($(date -u +%T))"; }
new() { LD_LIBRARY_PATH=$B/lib "$@"; }
old() { LD_LIBRARY_PATH=$B/lib "$@"; }
run_test() { # log name timeout binary...
  local log=$1 name=$2 t=$3; shift 3
  { echo "== $name"; new timeout "$t" "$@"; echo "rc=$?"; } >> "$log" 2>&1
}
if want parity; then
  step "parity: KVCOMM ops, the one path, core, settings, HF fixtures on the GPU"
  run_test "$OUT/parity.log" test_kvcomm_ops 150 "$B/test_kvcomm_ops"
  run_test "$OUT/parity.log" test_kvcomm_device_path 200 "$B/test_kvcomm_device_path"
  run_test "$OUT/parity.log" test_kvcomm_core 200 "$B/test_kvcomm_core"
  run_test "$OUT/parity.log" test_settings 60 "$B/test_settings"
  { echo "== test_hf_parity (KVM_PARITY_BACKEND=cuda)"; KVM_PARITY_BACKEND=cuda new timeout 120 "$B/test_hf_parity"; echo "rc=$?"; } \
    >> "$OUT/parity.log" 2>&1
  grep -E "^==|SKIPPED|PASSED|FAILED|rc=" "$OUT/parity.log" | cut -c1-160
  grep -qE "FAILED|rc=[1-9]" "$OUT/parity.log" && rc=1
fi
if want cuda; then
  step "test_cuda_ops and test_cuda_model"
  run_test "$OUT/cuda.log" test_cuda_ops 200 "$B/test_cuda_ops"
  run_test "$OUT/cuda.log" test_cuda_model 300 "$B/test_cuda_model"
  grep -E "^==|PASSED|FAILED|rc=" "$OUT/cuda.log"
  grep -qE "FAILED|rc=[1-9]" "$OUT/cuda.log" && rc=1
fi
if want team; then
  step "team workload, 300 requests, on the GPU (one path)"
  new timeout 420 "$B/kvmesh" bench kvcomm --model models/minillama-2m --backend cuda --workload team --requests 300 \
    --modes dense,full,full+blend --out /tmp/team > "$OUT/team.log" 2>&1
  echo "team rc=$?"; grep -A4 '^mode' "$OUT/team.log"
  cp /tmp/team/*.json "$OUT/team.json" 2>/dev/null
fi
if want ttft; then
  step "TTFT bench (synthetic Llama-3.1-8B, 5 agents): old bundle, then new, ${ROUNDS:-2} rounds"
  for r in $(seq "${ROUNDS:-2}"); do
    { echo "== round $r old ($(cat "$OLD/VERSION"))"; old timeout 170 "$OLD/kvmesh" bench kvcomm --synthetic llama-3.1-8b; echo "rc=$?"
      echo "== round $r new ($(cat "$B/VERSION"))"; new timeout 170 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b; echo "rc=$?"
    } >> "$OUT/ttft.log" 2>&1
  done
  grep -E "^== round|^agent|^a[0-9] |^reuse rate|^alignment|rc=" "$OUT/ttft.log" | cut -c1-170
fi
if want engine; then
  step "bench engine (synthetic Llama-3.1-8B)"
  new timeout 200 "$B/kvmesh" bench engine --synthetic llama-3.1-8b > "$OUT/engine.log" 2>&1
  echo "engine rc=$?"; grep -E "^\| (TTFT|decode)" "$OUT/engine.log" | head -12
fi
{ echo "end: $(date -u)"; clocks; } >> "$OUT/gpu.txt" 2>&1
echo; echo "end: $(date -u)  rc=$rc"
exit $rc
