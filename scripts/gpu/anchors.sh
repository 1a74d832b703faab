#!/usr/bin/env bash
# anchors.sh - one GPU call for issue 17's anchor memory (q8 deltas, bases shared with the store): run from the repo
# root on the GPU machine with .gpu-i17/ (this commit: `scripts/gpu/issue17.sh bundle` here) and OLD=DIR (an older
# bundle, the same-call baseline of the TTFT figures) carried. Logs in $OUT:
#   gpu.txt, parity.log   issue17.sh's parity step (test_kvcomm_ops compares the q8 ops with the CPU's, byte for
#                         byte for kvcomm_diff), then compute-sanitizer memcheck of test_cuda_ops
#   kvcomm.log            kvmesh bench kvcomm --synthetic llama-3.1-8b, spec then blend (bytes per anchor, TTFT)
#   old/kvcomm.log        the same with the OLD bundle, spec only
#   team.log              the team workload on minillama-2m on the GPU (dense, spec, default)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
export OUT
s=scripts/gpu/issue17.sh
bash $s parity
B=$PWD/.gpu-i17
cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
{ echo "== memcheck test_cuda_ops ($(date -u +%T))"
  [ -n "$cs" ] && LD_LIBRARY_PATH=$B/lib timeout 200 "$cs" --tool memcheck --leak-check no "$B/test_cuda_ops" 2>&1 |
    grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" | head -8; } >> "$OUT/parity.log" 2>&1
tail -3 "$OUT/parity.log"
bash $s kvcomm
if [ -n "${OLD:-}" ]; then
  mkdir -p "$OUT/old"
  OUT=$OUT/old BUNDLE=$OLD POLICIES=${OLD_POLICIES:-spec} bash $s kvcomm
fi
TEAM_MODES=${TEAM_MODES:-dense,spec,default} bash $s team
