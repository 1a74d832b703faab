#!/usr/bin/env bash
# decode_attn.sh - one GPU call for the decode attention kernels (issue 17): parity of every attention kernel
# against the CPU reference, whole-model greedy tokens, memcheck, then the engine's decode (batch 1 and 16) and
# the KVCOMM spec TTFT with the tensor-core decode kernel (attn_dec_mma=1, the default) and with the tiled
# CUDA-core kernel it replaces (attn_dec_mma=0), alternated in the same call. Run from the repo root on the GPU
# machine with .gpu-i17/ carried (made here by `scripts/gpu/issue17.sh bundle`). Logs in $OUT.
set -uo pipefail
B=$PWD/.gpu-i17
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$B/lib KVM_SOURCE_DIR=$PWD
if [ -f "$B/bins.tar.xz" ] && [ ! -x "$B/kvmesh" ]; then tar xJf "$B/bins.tar.xz" -C "$B"; fi
clocks() { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader; }
{ echo "start: $(date -u)"; echo "bundle: $(cat "$B/VERSION")"; clocks; } > "$OUT/gpu.txt" 2>&1
for t in test_cuda_ops test_cuda_model; do
  echo "== $t ($(date -u +%T))"; timeout 240 "$B/$t" 2>&1 | grep -vE "^\[ +(RUN|OK) +\]" | tail -60; echo "rc=${PIPESTATUS[0]}"
done > "$OUT/parity.log" 2>&1
grep -E "^==|attention|PASSED|FAILED|rc=" "$OUT/parity.log" | head -40
for mode in ${MODES:-1 0 1 0}; do
  echo "==== attn_dec_mma=$mode ($(date -u +%T))"
  KVM_CUDA_ATTN_DEC_MMA=$mode timeout 150 "$B/kvmesh" bench engine --synthetic llama-3.1-8b --no-eager ${ENGINE_ARGS:-} 2>&1 |
    grep -E "^\| (TTFT prefill|decode b=1 \(graph|decode b=16 step \(graph)|spread"
done > "$OUT/engine.log" 2>&1
cat "$OUT/engine.log"
if [ "${PROFILE:-1}" = 1 ]; then
  KVM_CUDA_ATTN_DEC_MMA=1 timeout 150 "$B/kvmesh" bench engine --synthetic llama-3.1-8b --profile > "$OUT/profile.log" 2>&1
  grep -E "attention" "$OUT/profile.log"
fi
if [ "${KVCOMM:-1}" = 1 ]; then
  for mode in 1 0; do
    echo "==== attn_dec_mma=$mode bench kvcomm spec ($(date -u +%T))"
    KVM_CUDA_ATTN_DEC_MMA=$mode timeout 200 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b --set kvcomm.preset=spec \
      --set kvcomm.force_reuse=on --out /tmp/kvb 2>&1 | grep -E "^agent|^a[0-9] |^anchors|rror"
  done > "$OUT/kvcomm.log" 2>&1
  cat "$OUT/kvcomm.log"
fi
cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$cs" ] && [ "${MEMCHECK:-1}" = 1 ]; then
  echo "== memcheck test_cuda_ops ($(date -u +%T))" > "$OUT/memcheck.log"
  timeout 300 "$cs" --tool memcheck --leak-check no "$B/test_cuda_ops" 2>&1 | grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" | head -8 >> "$OUT/memcheck.log"
  cat "$OUT/memcheck.log"
fi
{ echo "end: $(date -u)"; clocks; } >> "$OUT/gpu.txt" 2>&1
