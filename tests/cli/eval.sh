#!/usr/bin/env bash
# eval.sh - `kvmesh minitasks` and `kvmesh eval minitasks` end to end: deterministic JSONL, role
# variants, options and errors; a 10-content eval of each bundled model (models/) that must complete and
# reach the model's accuracy floor. Args: kvmesh binary, shared data dir (unused). Exits 77 only when
# no bundled model is present (the generator checks still run first).
set -u
bin="$1"
here="$(cd "$(dirname "$0")/../.." && pwd)"
fails=0
check() { # name expected actual
  if [ "$2" == "$3" ]; then echo "ok   $1"; else echo "FAIL $1: expected '$2' got '$3'"; fails=$((fails + 1)); fi
}

# ---- generator -------------------------------------------------------------------------------------
a="$("$bin" minitasks gen --seed 5 --n 50)"
b="$("$bin" minitasks gen --seed 5 --n 50)"
check "same seed, same bytes" "$(printf '%s' "$a" | sha256sum)" "$(printf '%s' "$b" | sha256sum)"
c="$("$bin" minitasks gen --seed 6 --n 50)"
[ "$a" != "$c" ] && echo "ok   other seed, other items" || { echo "FAIL other seed gives the same items"; fails=$((fails + 1)); }
check "50 lines" "50" "$(printf '%s\n' "$a" | wc -l | tr -d ' ')"
check "--start continues the stream" "$(printf '%s\n' "$a" | sed -n 21p)" "$("$bin" minitasks gen --seed 5 --n 1 --start 20)"
check "item fields" '{"task":"transform","role":"count","system":"Count the items.","user":"List: 2 0 3 7 3 5","answer":"6","id":"transform/train/1/1/count"}' \
  "$("$bin" minitasks gen --seed 1 --n 1 --start 1)"
roles="$("$bin" minitasks gen --split eval --task team --n 1 --role all | sed 's/.*"role":"\([a-z]*\)".*"answer":"\([^"]*\)".*/\1=\2/' | tr '\n' ' ')"
check "team roles of one content" "finder=9755 checker=no reverser=4761 neighbour=Carl " "$roles"
check "roles table" "12" "$("$bin" minitasks roles | wc -l | tr -d ' ')"
"$bin" minitasks gen --task nope >/dev/null 2>&1; check "unknown task -> 2" "2" "$?"
"$bin" minitasks gen --task recall --role sort >/dev/null 2>&1; check "role of another task -> 2" "2" "$?"
"$bin" minitasks gen --n -3 >/dev/null 2>&1; check "negative --n -> 2" "2" "$?"

# ---- eval ------------------------------------------------------------------------------------------
"$bin" eval minitasks >/dev/null 2>&1; check "eval without --model -> 2" "2" "$?"
"$bin" eval minitasks --model "$here/no/such/model" >/dev/null 2>err.$$; rc=$?
check "eval of a missing model -> 1" "1" "$rc"
grep -q "no/such/model" err.$$ && echo "ok   the error names the path" || { echo "FAIL error: $(cat err.$$)"; fails=$((fails + 1)); }
rm -f err.$$

# Accuracy floors on 10 contents per task (role = content % roles), per model and task, a margin below
# what the committed v2 models score on these 10 contents (docs/models.md): llama recall 1.0 / arithmetic
# 1.0 / transform 1.0 / team 0.6, qwen3 1.0 / 0.9 / 1.0 / 0.8 (team's checker and neighbour roles are
# only partly learned).
declare -A floor=(
  [minillama-2m:recall]=0.9 [minillama-2m:arithmetic]=0.8 [minillama-2m:transform]=0.9 [minillama-2m:team]=0.5
  [miniqwen3-6m:recall]=0.9 [miniqwen3-6m:arithmetic]=0.7 [miniqwen3-6m:transform]=0.9 [miniqwen3-6m:team]=0.6
)
ran=0
for m in minillama-2m miniqwen3-6m; do
  dir="$here/models/$m"
  if [ ! -f "$dir/config.json" ]; then echo "SKIP $m: $dir absent"; continue; fi
  ran=1
  out="$(KVM_THREADS=${KVM_THREADS:-2} "$bin" eval minitasks --model "$dir" --n 10 --json 2>/dev/null)"; rc=$?
  check "$m eval exits 0" "0" "$rc"
  for t in recall arithmetic transform team; do
    acc="$(printf '%s' "$out" | sed -n "s/.*\"$t\":{\"acc\":\([0-9.]*\),\"items\":10.*/\1/p")"
    if [ -z "$acc" ]; then echo "FAIL $m $t: no accuracy for 10 items in: $out"; fails=$((fails + 1)); continue; fi
    f="${floor[$m:$t]}"
    if awk -v a="$acc" -v f="$f" 'BEGIN { exit !(a >= f) }'; then echo "ok   $m $t accuracy $acc >= $f"
    else echo "FAIL $m $t accuracy $acc < floor $f"; fails=$((fails + 1)); fi
  done
done

[ "$fails" -eq 0 ] || { echo "$fails failure(s)"; exit 1; }
[ "$ran" -eq 1 ] || exit 77
echo "all ok"
