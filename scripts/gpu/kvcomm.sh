#!/usr/bin/env bash
# kvcomm.sh - the one command for the GPU machine for KVCOMM on the device (run from the repo root with
# .gpu-kvcomm/ carried there, and optionally .gpu-old/ with the binaries of an older commit for the same-run
# baseline; make them with scripts/gpu/bundle_kvcomm.sh). Logs in $OUT (./gpu-out if unset), few files
# (the device tool returns at most 8):
#   gpu.txt            card, driver, clocks at start and end; the bundles' VERSION
#   parity.log         compute-sanitizer memcheck of test_kvcomm_ops (CUDA ops vs CPU, small shapes, under
#                      the sanitizer), then test_kvcomm_ops and test_kvcomm_device_path plainly
#   opsbench.log       the ops alone at Llama-3.1-8B shapes (T=1024, S=512, bf16) for N in $OPS_NS (default
#                      "2 20") anchors; with OPS_V1=1 also the first distance kernel (KVM_KVCOMM_DIST=v1):
#                      median ms, bandwidth floor, ratio (lines "KVCOMM_OPS_JSON {...}")
#   old.log            (.gpu-old present) the old bundle's ops bench at N=20 with CUDA_LAUNCH_BLOCKING=1 (which
#                      op fails), and with OLD_BENCH=1 its kvmesh bench kvcomm (the same-run baseline)
#   bench.log, bench_ttft.json   kvmesh bench kvcomm --synthetic llama-3.1-8b (TTFT workload); BENCH_V1=1 runs it
#                      again with the v1 distance kernel (bench_v1.log)
# OPS_VARIANTS / PARITY_VARIANTS: KVM_KVCOMM_DIST values for the ops bench (default "v2", plus v1 with OPS_V1=1)
# and for extra runs of test_kvcomm_ops (v1, v2u4: the kernels selectable at run time).
#   bench_timing.log   (step "timing", not in "all") the same bench with KVM_KVCOMM_DEV_TIMING=1: one line per
#                      device reuse call and prediction (where the alignment time goes)
#   bench_blend.log, bench_spans.log   (step "blend") the bench with kvcomm.preset=blend (BLEND_ARGS adds options),
#                      and with only the blend's span recompute
#   cuda.log           (step "cuda") test_cuda_ops and test_cuda_model: the engine's kernels and models vs the CPU
#   examples.log       (step "examples") scripts/eval_examples.sh with dense, kvcomm and kvcomm preset=blend on the GPU
#   hf.log, hf_ttft.json   (step "hf") HF transformers' TTFT at the agents' prompt lengths, same card
#   nsys.txt           (step "nsys", if nsys is there) kernel/API/memcpy summaries and the last 400 GPU ops of the bench
# SKIP_MEMCHECK=1 leaves out the compute-sanitizer run of the parity step.
# Usage: scripts/gpu/kvcomm.sh [all|parity|ops|old|bench|timing|blend|cuda|examples|hf|nsys]... BENCH_ARGS adds options to kvmesh bench kvcomm.
set -uo pipefail
steps=${*:-all}
B=$PWD/.gpu-kvcomm
OLD=$PWD/.gpu-old
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export KVM_SOURCE_DIR=$PWD
clocks() { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv,noheader; }
{ echo "start: $(date -u)"; echo "bundle: $(cat "$B/VERSION" 2>/dev/null)"; [ -d "$OLD" ] && echo "old bundle: $(cat "$OLD/VERSION")"
  clocks; nvidia-smi -L; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
rc=0
want() { [[ ( " $steps " == *" all "* && $1 != timing && $1 != blend && $1 != hf && $1 != nsys && $1 != cuda && $1 != examples ) || " $steps " == *" $1 "* ]]; }
step() { echo; echo "==== $1 ($(date -u +%T))"; }
new() { LD_LIBRARY_PATH=$B/lib "$@"; }
if [ -f "$OLD/old.tar.xz" ] && [ ! -x "$OLD/test_kvcomm_ops" ]; then tar xJf "$OLD/old.tar.xz" -C "$OLD"; fi
if [ -f "$B/bins.tar.xz" ] && [ ! -x "$B/kvmesh" ]; then tar xJf "$B/bins.tar.xz" -C "$B"; fi
if want old && [ -d "$OLD" ]; then
  step "old bundle: ops bench N=20 with CUDA_LAUNCH_BLOCKING=1 (which op fails)"
  { echo "== old ops bench N=20, CUDA_LAUNCH_BLOCKING=1"
    CUDA_LAUNCH_BLOCKING=1 KVM_KVCOMM_OPS_BENCH=1 KVM_KVCOMM_OPS_BENCH_N=20 LD_LIBRARY_PATH=$B/lib timeout 90 "$OLD/test_kvcomm_ops"
    echo "rc=$?"; } > "$OUT/old.log" 2>&1
  grep -E "rc=|LINE|ERROR|kvcomm_ops bench|floor|FAILED" "$OUT/old.log" | head -12
  if [ -n "${OLD_BENCH:-}" ]; then
    step "old bundle: kvmesh bench kvcomm (baseline, same card)"
    { echo "== old kvmesh bench kvcomm"; LD_LIBRARY_PATH=$B/lib timeout 170 "$OLD/kvmesh" bench kvcomm --synthetic llama-3.1-8b \
        --out /tmp/old_bench ${BENCH_ARGS:-}; echo "rc=$?"; } >> "$OUT/old.log" 2>&1
    grep -E "^agent|^a[0-9] |^reuse rate|^alignment|rc=" "$OUT/old.log" | tail -9
    cp /tmp/old_bench/*.json "$OUT/old_bench_ttft.json" 2>/dev/null
  fi
fi
if want parity; then
  step "memcheck + parity"
  : > "$OUT/parity.log"
  if [ -n "${SKIP_MEMCHECK:-}" ]; then
    echo "memcheck skipped (SKIP_MEMCHECK)" | tee -a "$OUT/parity.log"
  elif command -v compute-sanitizer >/dev/null; then
    { echo "== compute-sanitizer --tool memcheck test_kvcomm_ops"
      LD_LIBRARY_PATH=$B/lib timeout 200 compute-sanitizer --tool memcheck --leak-check no "$B/test_kvcomm_ops"; echo "rc=$?"; } >> "$OUT/parity.log" 2>&1
    grep -E "ERROR SUMMARY|rc=" "$OUT/parity.log" | tail -2
    grep -qE "ERROR SUMMARY: [1-9]" "$OUT/parity.log" && rc=1
  else
    echo "compute-sanitizer not found: memcheck skipped" | tee -a "$OUT/parity.log"
  fi
  { echo "== test_kvcomm_ops"; new timeout 120 "$B/test_kvcomm_ops"; echo "rc=$?"; } >> "$OUT/parity.log" 2>&1
  for v in ${PARITY_VARIANTS:-}; do
    { echo "== test_kvcomm_ops KVM_KVCOMM_DIST=$v"; KVM_KVCOMM_DIST=$v new timeout 120 "$B/test_kvcomm_ops"; echo "rc=$?"; } >> "$OUT/parity.log" 2>&1
  done
  { echo "== test_kvcomm_device_path"; new timeout 180 "$B/test_kvcomm_device_path"; echo "rc=$?"; } >> "$OUT/parity.log" 2>&1
  sed -n '/^== test_kvcomm_ops/,$p' "$OUT/parity.log" | grep -E "^==|rel err|SKIPPED|PASSED|FAILED|ERROR|rc=" | cut -c1-150 | head -60
  sed -n '/^== test_kvcomm_ops/,$p' "$OUT/parity.log" | grep -qE "FAILED|rc=[1-9]" && rc=1
fi
if want ops; then
  step "ops bench at Llama-3.1-8B shapes"
  : > "$OUT/opsbench.log"
  for n in ${OPS_NS:-2 20}; do
    for v in ${OPS_VARIANTS:-v2 ${OPS_V1:+v1}}; do
      { echo "== N=$n dist=$v"; KVM_KVCOMM_DIST=$v KVM_KVCOMM_OPS_BENCH=1 KVM_KVCOMM_OPS_BENCH_N=$n new timeout 100 "$B/test_kvcomm_ops"
        echo "rc=$?"; } >> "$OUT/opsbench.log" 2>&1
    done
  done
  grep -E "^== N|^kvcomm_ops bench|^  (device|dist|weights|apply|total|per)|rc=[1-9]|LINE|ERROR|iteration" "$OUT/opsbench.log" | cut -c1-170
fi
if want bench; then
  step "kvmesh bench kvcomm --synthetic llama-3.1-8b (device path)"
  new timeout 170 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b --out /tmp/new_bench ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  brc=$?
  echo "bench rc=$brc"; grep -E "^agent|^a[0-9] |^reuse rate|^alignment|^anchors|rror" "$OUT/bench.log" | head -12
  cp /tmp/new_bench/*.json "$OUT/bench_ttft.json" 2>/dev/null
  [ $brc -ne 0 ] && rc=1
  if [ -n "${BENCH_V1:-}" ]; then
    step "kvmesh bench kvcomm with the v1 distance kernel (KVM_KVCOMM_DIST=v1)"
    KVM_KVCOMM_DIST=v1 new timeout 150 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b --out /tmp/v1_bench ${BENCH_ARGS:-} \
      > "$OUT/bench_v1.log" 2>&1
    echo "v1 bench rc=$?"; grep -E "^a[0-9] |^alignment" "$OUT/bench_v1.log"
  fi
fi
if want timing; then
  step "kvmesh bench kvcomm with KVM_KVCOMM_DEV_TIMING=1 (where the alignment time goes; not the reported figure)"
  KVM_KVCOMM_DEV_TIMING=1 new timeout 150 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b --out /tmp/timing_bench ${BENCH_ARGS:-} \
    > "$OUT/bench_timing.log" 2>&1
  echo "timing bench rc=$?"; grep -E "^alignment" "$OUT/bench_timing.log"
fi
if want blend; then
  step "kvmesh bench kvcomm with kvcomm.preset=blend"
  new timeout 240 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b --set kvcomm.preset=blend ${BLEND_ARGS:-} \
    --out /tmp/blend_bench ${BENCH_ARGS:-} > "$OUT/bench_blend.log" 2>&1
  echo "blend bench rc=$?"; grep -E "^agent|^a[0-9] |^alignment|rror" "$OUT/bench_blend.log" | head -8
  step "kvmesh bench kvcomm with recompute_below=8 recompute_text=64 (the blend's span part, device path)"
  new timeout 150 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b --set kvcomm.recompute_below=8 \
    --set kvcomm.recompute_text=64 --out /tmp/spans_bench ${BENCH_ARGS:-} > "$OUT/bench_spans.log" 2>&1
  echo "spans bench rc=$?"; grep -E "^a[0-9] |^alignment|rror" "$OUT/bench_spans.log" | head -8
fi
if want cuda; then
  step "test_cuda_ops and test_cuda_model (the engine's CUDA kernels and whole models against the CPU)"
  { echo "== test_cuda_ops"; new timeout 200 "$B/test_cuda_ops"; echo "rc=$?"
    echo "== test_cuda_model"; new timeout 300 "$B/test_cuda_model"; echo "rc=$?"; } > "$OUT/cuda.log" 2>&1
  grep -E "^==|positioned|PASSED|FAILED|rc=|DIFFER" "$OUT/cuda.log" | head -30
  grep -qE "FAILED|rc=[1-9]" "$OUT/cuda.log" && rc=1
fi
if want examples; then
  step "the bundled-model examples on the GPU: dense, spec KVCOMM and preset=blend (scripts/eval_examples.sh, 100 inputs)"
  { KV_MODES="dense kvcomm" LD_LIBRARY_PATH=$B/lib timeout 240 bash scripts/eval_examples.sh "$B/kvmesh" ${EX_N:-100}
    KV_MODES=kvcomm KVCOMM_SET=preset=blend LD_LIBRARY_PATH=$B/lib timeout 120 bash scripts/eval_examples.sh "$B/kvmesh" ${EX_N:-100}
  } > "$OUT/examples.log" 2>&1
  cat "$OUT/examples.log" | grep '^{' 
fi
if want hf; then
  step "HF transformers TTFT at the agents' prompt lengths (same card, synthetic bf16 weights)"
  timeout 300 python3 scripts/bench/hf_engine.py --ttft-prompts ${HF_PROMPTS:-1520,2040,2560,3080,3600} --reps 10 \
    --json "$OUT/hf_ttft.json" > "$OUT/hf.log" 2>&1
  echo "hf rc=$?"; grep -E "^HF|Error" "$OUT/hf.log"
fi
if want nsys; then
  step "nsys: kernels of the bench (1 measured request)"
  if command -v nsys >/dev/null; then
    new timeout 200 nsys profile -q -t cuda -o /tmp/kvb --force-overwrite true "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b \
      --requests 1 --out /tmp/nsys_bench > /tmp/nsys_run.log 2>&1
    echo "nsys rc=$?"
    { nsys stats -q -r cuda_gpu_kern_sum,cuda_api_sum,cuda_gpu_mem_time_sum -f csv /tmp/kvb.nsys-rep
      echo "==== trace"; nsys stats -q -r cuda_gpu_trace -f csv /tmp/kvb.nsys-rep | tail -400; } > "$OUT/nsys.txt" 2>&1
    head -40 "$OUT/nsys.txt" | cut -c1-200
  else
    echo "nsys not found"
  fi
fi
{ echo "end: $(date -u)"; clocks; } >> "$OUT/gpu.txt" 2>&1
echo; echo "end: $(date -u)  rc=$rc"
exit $rc
