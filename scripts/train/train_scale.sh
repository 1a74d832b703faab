#!/usr/bin/env bash
# train_scale.sh - the third, larger member of the bundled family for issue 15's scale trend: a Llama of ~22M
# parameters (hidden 384, FFN 1536, 10 layers, 6 heads / 2 KV heads x 64) with the receiver's tokenizer, trained
# from scratch on the minitasks suite by scripts/train/train.py with the receiver's stage-1 recipe, within one
# 10-minute GPU call. It is not bundled (about 44 MB in bf16); its model card says how to get it.
#
#   scripts/train/train_scale.sh bundle            here: builds the static minitasks generator into .gpu-scale/
#                                                  (git-excluded; name .gpu-scale in the device run's `carry`)
#   scripts/train/train_scale.sh run OUT           on the GPU machine, from the repository root
#   scripts/train/train_scale.sh install OUT DIR   here: unpacks OUT/minillama-22m.tgz into DIR (default
#                                                  models-extra/; git-ignored) and copies its log beside it
# Knobs (environment): BUDGET_S (500: wall clock of prep + training; export and the final eval need ~40 s more),
# STEPS (12000, the cosine schedule's length; the budget usually stops it first), LR (1e-3), SHAPE, NAME.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cmd=${1:-}
NAME=${NAME:-minillama-22m}
SHAPE=${SHAPE:-hidden=384,ffn=1536,layers=10,heads=6,kv_heads=2,head_dim=64}
case "$cmd" in
  bundle)
    grep -qx "/.gpu-scale/" "$root/.git/info/exclude" 2> /dev/null || echo "/.gpu-scale/" >> "$root/.git/info/exclude"
    bash "$root/scripts/train/build_minigen.sh" "$root/.gpu-scale/minigen" ;;
  run)
    [ -n "${2:-}" ] || { echo "usage: $0 run OUT"; exit 2; }
    out=$(mkdir -p "$2" && cd "$2" && pwd)
    cd "$root" || exit 1
    [ -x .gpu-scale/minigen ] || { echo "no .gpu-scale/minigen: run '$0 bundle' here and carry .gpu-scale"; exit 2; }
    export PYTHONUNBUFFERED=1
    python3 scripts/train/train.py --minigen .gpu-scale/minigen --work /tmp/kvtrain-scale --out "$out" --n-eval 100 \
      --only receiver --name "$NAME" --tokenizer-dir models/minillama-2m --shape "$SHAPE" \
      --receiver-steps "${STEPS:-12000}" --receiver-lr "${LR:-1e-3}" \
      --easy-spec recall:2-4:2,recall:2-8:2,team:2-8:1,arithmetic::1 --easy-start 0.8 --easy-end 0.3 \
      --aux-frac 0.5 --aux-kinds bind --aux-facts 2-8 --budget-s "${BUDGET_S:-500}" 2>&1 | tee "$out/train-$NAME.log"
    exit "${PIPESTATUS[0]}" ;;
  install)
    [ -f "${2:-}/$NAME.tgz" ] || { echo "usage: $0 install OUT [DIR] (OUT holds $NAME.tgz)"; exit 2; }
    dir=${3:-$root/models-extra}
    mkdir -p "$dir" && tar xzf "$2/$NAME.tgz" -C "$dir" --strip-components=1 "models/$NAME" &&
      tar xzf "$2/$NAME.tgz" -C "$dir/$NAME" "train-$NAME.json" "fixtures/$NAME.json" &&
      { [ ! -f "$2/train-$NAME.log" ] || cp "$2/train-$NAME.log" "$dir/$NAME/"; } &&
      echo "installed $dir/$NAME" ;;
  *) echo "usage: $0 bundle | run OUT | install OUT [DIR]"; exit 2 ;;
esac
