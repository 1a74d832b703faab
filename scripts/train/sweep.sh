#!/usr/bin/env bash
# sweep.sh OUT BUDGET_S 'TAG|MODEL|FLAGS' ... - trains several variants side by side on one GPU (the GPU
# machine; see docs/models.md). Each variant is one `train.py --only MODEL` run with its own work folder,
# its log in OUT/TAG.log and its result in OUT/<model>TAG.tgz. BUDGET_S is each run's wall-clock budget
# (data preparation included; the final eval and export take ~1 min more).
set -u
out=$1; budget=$2; shift 2
cd "$(dirname "$0")/../.."
mkdir -p "$out"
minigen=${MINIGEN:-.gpu-train/minigen}
pids=()
for v in "$@"; do
  IFS='|' read -r tag model flags <<<"$v"
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 python3 scripts/train/train.py --minigen "$minigen" --work "/tmp/kvtrain-$tag" \
      --out "$out" --tag="-$tag" --only "$model" --budget-s "$budget" $flags >"$out/$tag.log" 2>&1 &
  pids+=($!)
  echo "started $tag ($model): $flags"
done
(sleep 240; nvidia-smi >"$out/nvidia-smi.txt" 2>&1) &
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for v in "$@"; do
  tag=${v%%|*}
  echo "== $tag"; grep -E "QUICK EVAL|packing check|eval (recall|arithmetic|transform|team)|Error|error" "$out/$tag.log" | tail -n 30
done
exit $rc
