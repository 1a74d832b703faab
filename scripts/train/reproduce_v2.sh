#!/usr/bin/env bash
# reproduce_v2.sh STAGE OUT - retrains the v2 bundled models from scratch on the GPU machine (one H100),
# with the committed script, seeds and step counts (docs/models.md, "Reproducing v2"). Each stage fits one
# 10-minute GPU call; build the generator here first: bash scripts/train/build_minigen.sh .gpu-train/minigen
#   STAGE sharer     miniqwen3-6m, 7,911 steps                       -> OUT/miniqwen3-6m.tgz
#   STAGE receiver1  minillama-2m stage 1, 7,646 steps (fresh)        -> OUT/minillama-2m.tgz
#   STAGE receiver2  minillama-2m stage 2, 12,284 steps continuing stage 1's export, which must be
#                    unpacked first: tar xzf OUT1/minillama-2m.tgz -C /tmp/s1 &&
#                    mkdir -p .gpu-train/init2 && cp -r /tmp/s1/models/minillama-2m .gpu-train/init2/
#   STAGE pair       sharer and receiver1 side by side on the one GPU (as the original runs shared it), in one
#                    call: OUT/sharer/ and OUT/receiver1/, with their logs
# EXTRA_ARGS (environment): more train.py flags (e.g. --smoke for a quick check of the script here).
# BUDGET_S (environment, default none): a safety net for the 10-minute call (train.py --budget-s, counted from
# the start including data preparation). The cosine schedule follows max(step, wall-clock) progress, so a budget
# that the fixed steps finish within leaves the schedule exactly as without it; the log says if it cut a run.
# The original runs were cut by a wall-clock budget (--budget-s) at these step counts, with other
# training processes sharing the GPU; here the step counts are fixed and the cosine schedule runs over
# the steps, which is the same schedule up to the jitter of the wall clock.
set -euo pipefail
stage=${1:-}; out=${2:-}
[ -n "$out" ] || { echo "usage: $0 sharer|receiver1|receiver2|pair OUT" >&2; exit 2; }
cd "$(dirname "$0")/../.."
[ -x .gpu-train/minigen ] || { echo "no .gpu-train/minigen: run scripts/train/build_minigen.sh here and carry .gpu-train" >&2; exit 2; }
budget=${BUDGET_S:+--budget-s $BUDGET_S}
t="python3 scripts/train/train.py --minigen .gpu-train/minigen --out $out --n-eval 250 $budget ${EXTRA_ARGS:-}"
export PYTHONUNBUFFERED=1
case "$stage" in
  sharer)
    $t --work /tmp/kvtrain-v2s --only sharer --sharer-steps 7911 --sharer-lr 1.5e-3 \
       --easy-spec recall:2-4:2,recall:2-8:2,team:2-8:2,arithmetic::2 --easy-start 0.8 --easy-end 0.3 \
       --aux-frac 0.5 --aux-kinds bind --aux-facts 2-8 ;;
  receiver1)
    $t --work /tmp/kvtrain-v2r1 --only receiver --receiver-steps 7646 --receiver-lr 1.5e-3 \
       --easy-spec recall:2-4:2,recall:2-8:2,team:2-8:1,arithmetic::1 --easy-start 0.8 --easy-end 0.3 \
       --aux-frac 0.5 --aux-kinds bind --aux-facts 2-8 ;;
  receiver2)
    $t --work /tmp/kvtrain-v2r2 --only receiver --init-dir .gpu-train/init2 --warmup 300 \
       --receiver-steps 12284 --receiver-lr 1e-3 \
       --easy-spec recall:2-4:1,recall:2-8:1,team:2-8:2,arithmetic::2 --easy-start 0.6 --easy-end 0.3 \
       --aux-frac 0.3 --aux-kinds bind --aux-facts 2-8 ;;
  pair)
    mkdir -p "$out/sharer" "$out/receiver1"
    bash "$0" sharer "$out/sharer" > "$out/sharer/sharer.log" 2>&1 & s_pid=$!
    r_rc=0; bash "$0" receiver1 "$out/receiver1" > "$out/receiver1/receiver1.log" 2>&1 || r_rc=$?
    s_rc=0; wait $s_pid || s_rc=$?
    echo "pair: sharer exit $s_rc, receiver1 exit $r_rc"
    [ $s_rc -eq 0 ] && [ $r_rc -eq 0 ] ;;
  *) echo "usage: $0 sharer|receiver1|receiver2|pair OUT" >&2; exit 2 ;;
esac
