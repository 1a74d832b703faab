#!/usr/bin/env bash
# session_12_14.sh - one device call for issues 12 and 14 together, for when the session's device budget allows
# only one long call: the daemon's load test (scripts/gpu/serve_load_gpu.sh: 64 clients, synthetic Llama-3.1-8B,
# LOAD_SECONDS) in the background and the C2C fuser training of the bundled pair (scripts/gpu/c2c_train.sh run,
# BUDGET_S) in the foreground, on the same GPU. The load test's verdict (errors, RSS, the daemon's own time outside
# model compute) does not depend on the GPU being shared; the training's speed does (its steps are in train.log).
# CPU threads of the training side are capped so that the daemon's 16 cores are not taken from it.
# Carry .gpu-serve and .gpu-c2ctrain (scripts/gpu/bundle_tests.sh serve build kvmesh; c2c_train.sh bundle build).
# $OUT gets 7 files (the device tool brings back 8 at most): serve.tgz (the load test's logs) and serve-summary.txt;
# c2c/ with c2c_train.sh's five (train.log, results.json, h.json, bench.log, c2c_train_result.tgz).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
W=${WORK:-/tmp/session-12-14}
mkdir -p "$OUT/c2c" "$W/serve"
echo "session_12_14 start $(date -u +%T)"
( OUT=$W/serve LOAD_SECONDS=${LOAD_SECONDS:-545} bash scripts/gpu/serve_load_gpu.sh > "$W/serve/stdout.log" 2>&1
  echo "serve_load_gpu.sh exit status $?" >> "$W/serve/stdout.log" ) &
sp=$!
OMP_NUM_THREADS=4 KVM_THREADS=4 BUDGET_S=${BUDGET_S:-530} bash scripts/gpu/c2c_train.sh run "$OUT/c2c" > "$W/c2c-stdout.log" 2>&1
echo "c2c_train.sh exit status $? at $(date -u +%T)"
tail -n 45 "$W/c2c-stdout.log"
wait $sp
echo "== serve $(date -u +%T)"
cp "$W/serve/load-summary.txt" "$OUT/serve-summary.txt" 2> /dev/null
tar czf "$OUT/serve.tgz" -C "$W" serve
tail -n 25 "$W/serve/stdout.log"
