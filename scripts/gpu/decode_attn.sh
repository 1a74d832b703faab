#!/usr/bin/env bash
# decode_attn.sh - one GPU call for the decode attention kernels (issue 17): parity of every attention kernel
# against the CPU reference, whole-model greedy tokens and the KVCOMM tests (their 1-row passes use the decode
# kernel), then the engine's decode (batch 1 and 16) with the tensor-core decode kernel (attn_dec_mma=1) and the
# generic split-K one (attn_dec_mma=0) alternated in the same call (OLD=DIR also runs the bundle DIR of an older
# commit, the previous path, in the same alternation), a per-op profile, the KVCOMM spec TTFT with each,
# compute-sanitizer memcheck. NCU=1 adds Nsight Compute on one batch-16 decode-attention launch and two
# skinny GEMMs; PROFILE=0, KVCOMM=0, MEMCHECK=0, PARITY_TESTS, MEMCHECK_TESTS and MODES trim the call. Run from
# the repo root on the GPU machine with .gpu-i17/ carried (made here by `scripts/gpu/issue17.sh bundle`). Logs in
# $OUT.
set -uo pipefail
B=$PWD/.gpu-i17
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$B/lib KVM_SOURCE_DIR=$PWD
if [ -f "$B/bins.tar.xz" ] && [ ! -x "$B/kvmesh" ]; then tar xJf "$B/bins.tar.xz" -C "$B"; fi
clocks() { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader; }
{ echo "start: $(date -u)"; echo "bundle: $(cat "$B/VERSION")"; clocks; } > "$OUT/gpu.txt" 2>&1
for t in test_cuda_ops test_cuda_model test_kvcomm_ops test_kvcomm_device_path test_kvcomm_core test_comm_state test_c2c; do
  echo "== $t ($(date -u +%T))"; timeout 200 "$B/$t" 2>&1 | grep -vE "^\[ +(RUN|OK) +\]" | tail -60; echo "rc=${PIPESTATUS[0]}"
done > "$OUT/parity.log" 2>&1
grep -E "^==|tensor cores|PASSED|FAILED|rc=" "$OUT/parity.log" | head -40
for a in ${MODES:-0 1 0 1}; do   # attn_dec_mma: 1 the tensor cores (default), 0 the generic split-K kernel
  echo "==== attn_dec_mma=$a ($(date -u +%T))"
  KVM_CUDA_ATTN_DEC_MMA=$a timeout 150 "$B/kvmesh" bench engine --synthetic llama-3.1-8b --no-eager ${ENGINE_ARGS:-} 2>&1 |
    grep -E "^\| (TTFT prefill  |decode b=1 \(graph|decode b=16 step \(graph)|^spread|rror"
  if [ -n "${OLD:-}" ]; then
    echo "==== the older bundle $OLD ($(cat "$OLD/VERSION"))"
    LD_LIBRARY_PATH=$OLD/lib timeout 150 "$OLD/kvmesh" bench engine --synthetic llama-3.1-8b --no-eager ${ENGINE_ARGS:-} 2>&1 |
      grep -E "^\| (TTFT prefill  |decode b=1 \(graph|decode b=16 step \(graph)|^spread|rror"
  fi
done > "$OUT/engine.log" 2>&1
cat "$OUT/engine.log"
if [ "${PROFILE:-1}" = 1 ]; then
  timeout 150 "$B/kvmesh" bench engine --synthetic llama-3.1-8b --profile > "$OUT/profile.log" 2>&1
  grep -E "^profile|attention|m=16 mma" "$OUT/profile.log"
fi
if [ "${KVCOMM:-1}" = 1 ]; then
  for mode in 1 0; do
    echo "==== attn_dec_mma=$mode bench kvcomm spec ($(date -u +%T))"
    KVM_CUDA_ATTN_DEC_MMA=$mode timeout 200 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b --set kvcomm.preset=spec \
      --set kvcomm.force_reuse=on --out /tmp/kvb 2>&1 | grep -E "^agent|^a[0-9] |^anchors|rror"
  done > "$OUT/kvcomm.log" 2>&1
  cat "$OUT/kvcomm.log"
fi
if [ "${NCU:-0}" = 1 ]; then   # Nsight Compute on a few decode-attention launches: batch 1 (skip 10), batch 16 (skip 170)
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  for skip in ${NCU_SKIPS:-170}; do
    echo "==== ncu k_attn_dec, launch-skip $skip ($(date -u +%T))"
    [ -n "$ncu" ] && timeout 200 "$ncu" --kernel-name regex:k_attn_dec --launch-skip $skip --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
      "$B/kvmesh" bench engine --synthetic llama-3.1-8b --reps 1 --warmup 0 --no-eager 2>&1 | grep -vE "^\| |^kvmesh|^card|^model|^workload" | tail -80
  done > "$OUT/ncu.log" 2>&1
  { echo "==== ncu k_skinny (batch 16: layer 0's gate+up and down), launch-skip 2 ($(date -u +%T))"
    [ -n "$ncu" ] && timeout 200 "$ncu" --kernel-name regex:k_skinny --launch-skip 2 --launch-count 2 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
      "$B/kvmesh" bench engine --synthetic llama-3.1-8b --reps 1 --warmup 0 --no-eager 2>&1 |
      grep -vE "^\| |^kvmesh|^card|^model|^workload" | tail -120; } >> "$OUT/ncu.log" 2>&1
  grep -E "====|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Block Limit|Grid Size|Stall" "$OUT/ncu.log" | head -60
fi
cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$cs" ] && [ "${MEMCHECK:-1}" = 1 ]; then
  echo "== memcheck test_cuda_ops ($(date -u +%T))" > "$OUT/memcheck.log"
  for t in test_cuda_ops test_kvcomm_device_path; do echo "== $t"; timeout 200 "$cs" --tool memcheck --leak-check no "$B/$t" 2>&1 | grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" | head -8; done >> "$OUT/memcheck.log"
  cat "$OUT/memcheck.log"
fi
{ echo "end: $(date -u)"; clocks; } >> "$OUT/gpu.txt" 2>&1
