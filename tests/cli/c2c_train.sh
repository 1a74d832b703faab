#!/usr/bin/env bash
# c2c_train.sh KVMESH SHARED - the C2C training scripts of the bundled pair (docs/c2c.md, "Training the bundled
# fuser"): scripts/gpu/c2c_train.sh refuses bad calls (exit 2, usage); with a Python that has torch,
# scripts/train/c2c_models.py's forward matches the committed logits fixtures of both bundled models (its own check,
# rel. error <= 1e-4, also through the cache in two chunks), and c2c_train.py refuses a malformed `kvmesh c2c docs`
# line naming the file and line. Exits 77 (skipped) without torch. The GPU run itself and its CPU smoke
# (SMOKE=1 scripts/gpu/c2c_train.sh run OUT, ~2 minutes) are not run here.
set -euo pipefail
kvmesh=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
R=models/minillama-2m; S=models/miniqwen3-6m
[ -f $R/config.json ] && [ -f $S/config.json ] || { echo "SKIPPED: the bundled models are absent"; exit 77; }

# --- the shell entry: usage errors ---------------------------------------------------------------------------
usage() { # usage WANT ARGS...: exit status 2 and WANT in the output
  local want=$1; shift
  set +e; bash scripts/gpu/c2c_train.sh "$@" > "$tmp/out" 2>&1; local rc=$?; set -e
  [ $rc -eq 2 ] || { echo "c2c_train.sh $*: exit status $rc"; cat "$tmp/out"; exit 1; }
  grep -q -- "$want" "$tmp/out" || { echo "c2c_train.sh $*: output lacks '$want'"; cat "$tmp/out"; exit 1; }
}
usage "usage:"
usage "usage:" frobnicate
usage "usage:" run
usage "OUT of a finished run" install "$tmp/nothing-here"

# --- the Python side, where torch is importable ------------------------------------------------------------------
py=""
for c in python3 /usr/bin/python3; do
  if command -v "$c" > /dev/null && "$c" -c "import torch" > /dev/null 2>&1; then py=$c; break; fi
done
[ -n "$py" ] || { echo "SKIPPED: no Python with torch (the usage checks passed)"; exit 77; }
"$py" scripts/train/c2c_models.py > "$tmp/models" 2>&1 || { cat "$tmp/models"; exit 1; }
cat "$tmp/models"
[ "$(grep -c "argmax of every row equal: True" "$tmp/models")" -eq 2 ] || { echo "c2c_models.py: argmax rows differ"; exit 1; }

"$kvmesh" c2c docs --model $R --n 6 --seed 1 --facts 2-3 -o "$tmp/docs.jsonl"
[ "$(wc -l < "$tmp/docs.jsonl")" -eq 6 ]
# the 4th line loses an answer digit: refused, naming file:line
sed '4s/"answer":\[\([0-9]*\),/"answer":[/' "$tmp/docs.jsonl" > "$tmp/bad.jsonl"
! cmp -s "$tmp/docs.jsonl" "$tmp/bad.jsonl" || { echo "the edit did not change line 4"; exit 1; }
set +e
"$py" scripts/train/c2c_train.py --train-docs "$tmp/bad.jsonl" --eval-docs "$tmp/docs.jsonl" --out "$tmp/o" \
  --device cpu --steps 1 > "$tmp/out" 2>&1
rc=$?
set -e
[ $rc -ne 0 ] || { echo "a malformed document was accepted"; cat "$tmp/out"; exit 1; }
grep -q "bad.jsonl:4: bad document" "$tmp/out" || { echo "the error does not name bad.jsonl:4"; cat "$tmp/out"; exit 1; }
[ ! -e "$tmp/o/results.json" ] || { echo "results written for a malformed input"; exit 1; }
echo "c2c_train: ok"
