#!/usr/bin/env bash
# anchors.sh - one GPU call for issue 17: the anchor memory (q8 deltas, bases shared with the store) and the skinny
# GEMM's rows per CTA (opts.skinny_rows). Run from the repo root on the GPU machine with .gpu-i17/ (this commit:
# `scripts/gpu/issue17.sh bundle` here) and OLD=DIR (an older bundle: the same-call baseline) carried. The steps run
# in order of need (parity, the anchor figures, the GEMM timings, accuracy, memcheck, then the baselines and
# profiles), so a call cut short keeps the first. Logs in $OUT:
#   gpu.txt, parity.log   issue17.sh's parity step (test_kvcomm_ops compares the q8 ops with the CPU's, byte for
#                         byte for kvcomm_diff; test_cuda_ops the skinny GEMM at 32 and 64 rows per CTA)
#   engine.log            kvmesh bench engine (graphs) with skinny_rows 16, 32, 64 alternated (SKINNY_MODES), and
#                         the OLD bundle once per round
#   profile.log           per-op profiles of batch-16 decode at each skinny_rows
#   kvcomm.log            kvmesh bench kvcomm --synthetic llama-3.1-8b, POLICIES (default spec: bytes per anchor, TTFT)
#   old/kvcomm.log        the same with the OLD bundle, spec only
#   team.log              the team workload on minillama-2m on the GPU (dense, spec, default)
#   memcheck.log          compute-sanitizer memcheck of test_cuda_ops and test_kvcomm_ops
#   hf.log, hf.json       HF transformers eager at the engine's shapes (HF=0 skips it)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
export OUT
mkdir -p "$OUT"
s=scripts/gpu/issue17.sh
bash $s parity
B=$PWD/.gpu-i17
if [ -n "${OLD:-}" ] && [ ! -x "$OLD/kvmesh" ]; then tar xJf "$OLD/bins.tar.xz" -C "$OLD"; fi
POLICIES=${POLICIES:-spec} bash $s kvcomm
run_engine() { timeout 120 "$1/kvmesh" bench engine --synthetic llama-3.1-8b --no-eager 2>&1 |
  grep -E "^\| (TTFT prefill  |decode b=1 \(graph|decode b=16 step \(graph)|^spread|rror"; }
{ for round in 1 2; do
    for r in ${SKINNY_MODES:-16 32 64}; do
      echo "==== skinny_rows=$r ($(date -u +%T))"; KVM_CUDA_SKINNY_ROWS=$r LD_LIBRARY_PATH=$B/lib run_engine "$B"
    done
    if [ -n "${OLD:-}" ]; then echo "==== the older bundle ($(cat "$OLD/VERSION"))"; LD_LIBRARY_PATH=$OLD/lib run_engine "$OLD"; fi
  done; } > "$OUT/engine.log" 2>&1
cat "$OUT/engine.log"
TEAM_MODES=${TEAM_MODES:-dense,spec,default} bash $s team
MEMCHECK_TESTS="test_cuda_ops test_kvcomm_ops" MEMCHECK_S=150 bash $s memcheck
if [ -n "${OLD:-}" ]; then
  mkdir -p "$OUT/old"
  OUT=$OUT/old BUNDLE=$OLD POLICIES=${OLD_POLICIES:-spec} bash $s kvcomm
fi
if [ "${PROFILE:-1}" = 1 ]; then
  { for r in ${SKINNY_MODES:-16 32 64}; do
      echo "==== skinny_rows=$r"
      KVM_CUDA_SKINNY_ROWS=$r LD_LIBRARY_PATH=$B/lib timeout 120 "$B/kvmesh" bench engine --synthetic llama-3.1-8b --profile 2>&1 |
        sed -n '/^profile: decode batch 16, skinny matmul default/,/^$/p'
    done; } > "$OUT/profile.log" 2>&1
  grep -E "====|m=16 mma" "$OUT/profile.log"
fi
[ "${HF:-1}" = 1 ] && HF_COMPILE=${HF_COMPILE:-0} bash $s hf   # HF transformers eager on the same card (compile: HF_COMPILE=1)
