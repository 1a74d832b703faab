#!/usr/bin/env bash
# eval_examples.sh [KVMESH] [N] - accuracy of every bundled-model example with dense and kvcomm on N
# seeded inputs (default 100), plus the reuse rate; one JSON line per (example, kv).
# KV_MODES (default "dense kvcomm") picks the modes; KVCOMM_SET="KEY=VALUE ..." passes KVCOMM switches
# to the kvcomm runs (e.g. KVCOMM_SET=recompute_below=8).
# Runs go in waves of 4 (--concurrency 4): KVCOMM anchors created by a run are committed when it ends,
# so later waves can reuse them (the paper runs requests one by one).
set -euo pipefail
kvmesh=${1:-build/kvmesh}; n=${2:-100}
for ex in team pipeline revise; do
  for kv in ${KV_MODES:-dense kvcomm}; do
    set_args=()
    if [ "$kv" = kvcomm ]; then for s in ${KVCOMM_SET:-}; do set_args+=(--kvcomm "$s"); done; fi
    "$kvmesh" run "examples/$ex.lua" --n "$n" --seed 1 --kv "$kv" --concurrency 4 --json -q --no-trace "${set_args[@]}" |
      python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'example':'$ex','kv':'$kv${KVCOMM_SET:+ $KVCOMM_SET}','runs':d['runs'],'failed':d['failed'],'accuracy':round(100*d['accuracy'],1),'reuse_rate':round(100*d['reuse_rate'],1),'mean_batch':round(d['mean_batch_seqs'],2)}))" || true
  done
done
