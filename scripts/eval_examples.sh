#!/usr/bin/env bash
# eval_examples.sh [KVMESH] [N] - accuracy of every bundled-model example with dense and kvcomm on N
# seeded inputs (default 100), plus the reuse rate; one JSON line per (example, kv).
# Runs go in waves of 4 (--concurrency 4): KVCOMM anchors created by a run are committed when it ends,
# so later waves can reuse them (the paper runs requests one by one).
set -euo pipefail
kvmesh=${1:-build/kvmesh}; n=${2:-100}
for ex in team pipeline revise; do
  for kv in dense kvcomm; do
    "$kvmesh" run "examples/$ex.lua" --n "$n" --seed 1 --kv "$kv" --concurrency 4 --json -q --no-trace |
      python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'example':'$ex','kv':'$kv','runs':d['runs'],'failed':d['failed'],'accuracy':round(100*d['accuracy'],1),'reuse_rate':round(100*d['reuse_rate'],1),'mean_batch':round(d['mean_batch_seqs'],2)}))" || true
  done
done
