#!/usr/bin/env bash
# session_all.sh - one device call for three jobs at once, for a session whose device budget allows one long call
# (it replaces session_12_14.sh, which ran the first two):
#   1. issue 12: the daemon's load test (scripts/gpu/serve_load_gpu.sh: 64 clients, synthetic Llama-3.1-8B,
#      LOAD_SECONDS), in the background;
#   2. issue 14: the C2C fuser training of the bundled pair (scripts/gpu/c2c_train.sh run, C2C_BUDGET_S);
#   3. issue 15: the scale-trend model (scripts/train/train_scale.sh run, SCALE_BUDGET_S);
#   and on an H100 also the team cells of issue 15 on the GPU (scripts/gpu/issue17.sh team, after the rest).
# First, with the current build (.gpu-i17), the CUDA parity tests (issue17.sh parity: test_cublas_lazy, the ops, the
# models, KVCOMM, C2C; memcheck of three), in the background.
# All share the GPU: the load test's verdict (errors, RSS, the daemon's own time outside model compute) does not
# depend on it, the trainings' step counts do (their logs have them). test_c2c (the C2C ops, CUDA vs CPU) runs first.
# Carry .gpu-serve (bundle_tests.sh serve build kvmesh test_c2c), .gpu-c2ctrain (c2c_train.sh bundle build),
# .gpu-scale (train_scale.sh bundle) and, for the team cells, .gpu-i17 (issue17.sh bundle).
# $OUT (7 files, the device tool brings back 8): summary.txt, serve.tgz, c2c.tgz, logs.tgz (test_c2c, team, the
# scale training's log), scale.tgz.part-aa.. (the scale model's tgz cut in 15 MiB pieces: cat them back together).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
W=${WORK:-/tmp/session-all}
rm -rf "$W" && mkdir -p "$OUT" "$W/serve" "$W/c2c" "$W/scale" "$W/logs"
S=$OUT/summary.txt
t0=$(date +%s)
{ echo "session_all start $(date -u +%T)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } | tee "$S"
# the current build (.gpu-i17: cuBLAS loaded on first use, the guard's checks after the call): the CUDA parity tests
pp=
if [ -d .gpu-i17 ]; then # in the background, beside the rest
  ( OUT=$W/logs timeout 420 bash scripts/gpu/issue17.sh parity > "$W/logs/parity-stdout.log" 2>&1 ) &
  pp=$!
fi
(cd .gpu-serve && [ -x test_c2c ] || tar xJf bins.tar.xz)
LD_LIBRARY_PATH=$PWD/.gpu-serve/lib timeout 120 ./.gpu-serve/test_c2c > "$W/logs/test_c2c.log" 2>&1
echo "test_c2c rc=$? ($(grep -cE '^\[ +OK' "$W/logs/test_c2c.log") OK, $(grep -cE 'FAILED' "$W/logs/test_c2c.log") FAILED lines)" | tee -a "$S"
( OUT=$W/serve LOAD_SECONDS=${LOAD_SECONDS:-520} bash scripts/gpu/serve_load_gpu.sh > "$W/serve/stdout.log" 2>&1
  echo "serve_load_gpu.sh exit status $?" >> "$W/serve/stdout.log" ) &
sp=$!
( OMP_NUM_THREADS=4 KVM_THREADS=4 BUDGET_S=${C2C_BUDGET_S:-515} bash scripts/gpu/c2c_train.sh run "$W/c2c" > "$W/c2c/stdout.log" 2>&1
  echo "c2c_train.sh exit status $? at $(date -u +%T)" >> "$W/c2c/stdout.log" ) &
cp=$!
OMP_NUM_THREADS=4 BUDGET_S=${SCALE_BUDGET_S:-470} bash scripts/train/train_scale.sh run "$W/scale" > "$W/logs/scale-stdout.log" 2>&1
echo "train_scale.sh exit status $? at $(date -u +%T)" | tee -a "$S"
grep -E "params|QUICK EVAL|deadline|final|story|packed|Error|error" "$W/logs/scale-stdout.log" | tail -20 >> "$S"
wait $cp
echo "== c2c $(date -u +%T)" >> "$S"; tail -n 30 "$W/c2c/stdout.log" >> "$S"
if nvidia-smi -L | grep -q H100 && [ -d .gpu-i17 ] && [ $(( $(date +%s) - t0 )) -lt 450 ]; then
  OUT=$W/team TEAM_CELLS="minillama-2m:team miniqwen3-6m:team" TEAM_MODES=dense,spec,default \
    timeout $(( 560 - ($(date +%s) - t0) )) bash scripts/gpu/issue17.sh team > "$W/logs/team-stdout.log" 2>&1
  cp -r "$W/team" "$W/logs/" 2> /dev/null
fi
wait $sp
[ -n "$pp" ] && { wait $pp; echo "== parity (current build)" >> "$S"
  grep -E "^==|PASSED|FAILED|rc=|ERROR SUMMARY|byte-identical" "$W/logs/parity.log" | head -40 >> "$S"; }
echo "== serve $(date -u +%T)" >> "$S"; cat "$W/serve/load-summary.txt" >> "$S" 2> /dev/null; tail -n 5 "$W/serve/stdout.log" >> "$S"
tar czf "$OUT/serve.tgz" -C "$W" serve
tar czf "$OUT/c2c.tgz" -C "$W" c2c
cp "$W/scale/"*.log "$W/logs/" 2> /dev/null
tar czf "$OUT/logs.tgz" -C "$W" logs
for f in "$W/scale/"*.tgz; do [ -f "$f" ] && split -b 15M -d -a 1 "$f" "$OUT/scale.tgz.part-"; done
ls -la "$OUT" >> "$S"
echo "session_all end $(date -u +%T) ($(( $(date +%s) - t0 )) s)" | tee -a "$S"
cat "$S"
