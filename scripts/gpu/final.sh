#!/usr/bin/env bash
# final.sh - the lead's end-of-session GPU check (run from the repo root on the GPU machine, .gpu-final/
# carried; make it here with `scripts/gpu/final.sh bundle`). Logs in $OUT:
#   cuda_model.log    test_cuda_model: stories260K, the bundled models (fp32 mode, 256 greedy tokens vs the
#                     CPU engine) and the HF fixtures (fp32 and bf16) on the GPU
#   kvcomm.log, kvcomm_ttft.json   kvmesh bench kvcomm --synthetic llama-3.1-8b (dense vs reused TTFT per agent)
#   kvcomm20.log      (FULL=1) the same with 20 warm-up requests (full anchor pools, as in kvcomm.md's 2 ms estimate)
#   opsbench.log      the KVCOMM ops alone at Llama shapes (N = 20 and 5 anchors; under compute-sanitizer with FULL=1)
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ "${1:-}" = bundle ]; then
  wt=/tmp/kvmesh-final-wt; head=$(git -C "$root" rev-parse HEAD)
  if [ -e "$wt/.git" ]; then git -C "$wt" checkout -q --detach "$head"; else git -C "$root" worktree add -q --detach "$wt" "$head"; fi
  cmake -S "$wt" -B "$wt/build" -DKVM_WERROR=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$wt/build" -j"$(nproc)" --target kvmesh_cli test_cuda_model test_kvcomm_ops >/dev/null || exit 1
  grep -qx '/.gpu-final/' "$root/.git/info/exclude" || echo '/.gpu-final/' >> "$root/.git/info/exclude"
  rm -rf "$root/.gpu-final"
  "$root/../shared/tools/gpu-bundle" "$root/.gpu-final" "$wt/build/kvmesh" "$wt/build/test_cuda_model" "$wt/build/test_kvcomm_ops"
  mkdir -p "$root/.gpu-final/shared/models" && cp -r "$root/../shared/models/stories260K" "$root/.gpu-final/shared/models/"
  echo "HEAD $head" > "$root/.gpu-final/VERSION"
  exit 0
fi
B=$PWD/.gpu-final; OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=$B/lib KVM_SOURCE_DIR=$PWD KVM_SHARED_DIR=$B/shared PYTHONUNBUFFERED=1
{ date -u; cat "$B/VERSION"; nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader; } | tee "$OUT/gpu.txt"
timeout 150 "$B/test_cuda_model" > "$OUT/cuda_model.log" 2>&1; echo "test_cuda_model rc=$?"
grep -E "identical|rel diff|DIFFER|PASSED|FAILED|SKIPPED" "$OUT/cuda_model.log" | head -30
timeout 150 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b --out "$OUT/k5" > "$OUT/kvcomm.log" 2>&1; echo "bench kvcomm rc=$?"
grep -A12 "^agent" "$OUT/kvcomm.log"; grep -E "^reuse rate|^alignment|^anchors" "$OUT/kvcomm.log"
if [ -n "${FULL:-}" ]; then
  timeout 200 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b --warmup 20 --requests 3 > "$OUT/kvcomm20.log" 2>&1; echo "bench kvcomm (20 warm-up) rc=$?"
  grep -A7 "^agent" "$OUT/kvcomm20.log"; grep -E "^reuse rate|^alignment|^anchors|error" "$OUT/kvcomm20.log"
fi
KVM_KVCOMM_OPS_BENCH=1 timeout 60 ${FULL:+compute-sanitizer --tool memcheck --leak-check no} "$B/test_kvcomm_ops" > "$OUT/opsbench.log" 2>&1
echo "ops bench rc=$?"; grep -E "ERROR SUMMARY|Invalid|at 0x|by thread|kvcomm_ops bench|floor|FAILED|ERROR" "$OUT/opsbench.log" | head -20
cp "$OUT/k5/"*.json "$OUT/kvcomm_ttft.json" 2>/dev/null; rm -rf "$OUT/k5"
