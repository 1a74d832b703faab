#!/usr/bin/env bash
# session_14.sh - one device call for issue 14 (C2C): the bundled pair's fuser trained, exported and evaluated
# (scripts/gpu/c2c_train.sh run, BUDGET_S), then the fusion cost against the text hand-off on the GPU (kvmesh bench
# c2c --timing: the bundled pair, and synthetic Qwen3-0.6B <- Qwen2.5-0.5B at real shapes) once the GPU is quiet.
# Carry .gpu-c2ctrain (scripts/gpu/c2c_train.sh bundle build: a kvmesh built with CUDA for sm_90).
# $OUT: c2c/ (c2c_train.sh's five files), timing.log, timing-bundled.json, timing-synthetic.json (8 at most come back).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
W=${WORK:-/tmp/session-14}
mkdir -p "$OUT/c2c" "$W"
echo "session_14 start $(date -u +%T)"
BUDGET_S=${BUDGET_S:-330} bash scripts/gpu/c2c_train.sh run "$OUT/c2c" > "$W/c2c-stdout.log" 2>&1
echo "c2c_train.sh exit status $? at $(date -u +%T)"
tail -n 50 "$W/c2c-stdout.log"
B=$PWD/.gpu-c2ctrain
export LD_LIBRARY_PATH=$B/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
[ -x "$B/kvmesh" ] || tar xJf "$B/bins.tar.xz" -C "$B"
{ echo "== timing, bundled pair (context 512) $(date -u +%T)"; nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
  timeout "${T_BUNDLED:-90}" "$B/kvmesh" bench c2c --timing --pair bundled --hidden 128 --backend cuda --prompt 128,256,448 --reps 5 \
    --json "$OUT/timing-bundled.json"; echo "exit status $?"
  echo "== timing, synthetic Qwen3-0.6B <- Qwen2.5-0.5B $(date -u +%T)"
  timeout "${T_SYNTH:-150}" "$B/kvmesh" bench c2c --timing --pair synthetic --backend cuda --prompt 128,512,1024 --reps 5 \
    --json "$OUT/timing-synthetic.json"; echo "exit status $?"; echo "end $(date -u +%T)"; } > "$OUT/timing.log" 2>&1
cat "$OUT/timing.log"
