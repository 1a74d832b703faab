#!/usr/bin/env bash
# session_12_14.sh - one device call for issues 12 and 14 together, for when the session's device budget allows
# only one long call: the daemon's load test (scripts/gpu/serve_load_gpu.sh: 64 clients, synthetic Llama-3.1-8B,
# LOAD_SECONDS) in the background and the C2C fuser training of the bundled pair (scripts/gpu/c2c_train.sh run,
# BUDGET_S) in the foreground, on the same GPU. The load test's verdict (errors, RSS, the daemon's own time outside
# model compute) does not depend on the GPU being shared; the training's speed does (its steps are in train.log).
# CPU threads of the training side are capped so that the daemon's 16 cores are not taken from it.
# Carry .gpu-serve and .gpu-c2ctrain (scripts/gpu/bundle_tests.sh serve build kvmesh; c2c_train.sh bundle build).
# Logs: $OUT/serve/ (load-summary.txt, load.jsonl, load-rss.log, load-daemon.log), $OUT/c2c/ (see c2c_train.sh).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT/serve" "$OUT/c2c"
echo "session_12_14 start $(date -u +%T)"
( OUT=$OUT/serve LOAD_SECONDS=${LOAD_SECONDS:-545} bash scripts/gpu/serve_load_gpu.sh > "$OUT/serve/stdout.log" 2>&1
  echo "serve_load_gpu.sh exit status $?" >> "$OUT/serve/stdout.log" ) &
sp=$!
OMP_NUM_THREADS=4 KVM_THREADS=4 BUDGET_S=${BUDGET_S:-530} bash scripts/gpu/c2c_train.sh run "$OUT/c2c" > "$OUT/c2c/stdout.log" 2>&1
echo "c2c_train.sh exit status $? at $(date -u +%T)"
rm -f "$OUT/c2c/train.jsonl"   # ~100 MB of documents: regenerated from the seed, not brought back
tail -n 40 "$OUT/c2c/stdout.log"
wait $sp
echo "== serve $(date -u +%T)"
tail -n 25 "$OUT/serve/stdout.log"
