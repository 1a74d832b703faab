#!/usr/bin/env bash
# fanout.sh KVMESH [MODEL] [REPS] - wall time of a fan-out of 4 agents (one batch per step) against the
# same 4 agents run one by one, with the same token work (fixed-length outputs). One JSON line per
# workflow: best wall ms of REPS runs (the model load is excluded: timed from the first step), forward
# passes and the mean batch size. MODEL defaults to stories260K (CPU); on the GPU machine use
# synthetic:llama-3.1-8b. Environment: KV_MB (KV budget per model, MiB), BACKEND (auto|cpu|cuda).
set -euo pipefail
kvmesh=${1:-build/kvmesh}; model=${2:-../shared/models/stories260K/stories260K.bin}; reps=${3:-3}
for wf in chain4 fanout4; do
  for r in $(seq "$reps"); do
    "$kvmesh" run "scripts/bench/$wf.lua" --model "$model" --input input="write a short story about a cat" \
      --no-trace -q --json ${KV_MB:+--kv-mb "$KV_MB"} ${BACKEND:+--backend "$BACKEND"} 2>/dev/null
  done | python3 -c "
import json, sys
txt = sys.stdin.read(); dec = json.JSONDecoder(); runs = []; i = 0
while i < len(txt):
    if txt[i].isspace(): i += 1; continue
    d, i = dec.raw_decode(txt, i); runs.append(d)
b = min(runs, key=lambda d: d['wall_ms'])
print(json.dumps({'workflow': '$wf', 'model': '$model', 'wall_ms_best': round(b['wall_ms'], 1),
                  'wall_ms_all': [round(d['wall_ms'], 1) for d in runs], 'forward_passes': b['forward_passes'],
                  'mean_batch_seqs': round(b['mean_batch_seqs'], 2), 'max_batch_seqs': b['max_batch_seqs']}))"
done
