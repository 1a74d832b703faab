#!/usr/bin/env bash
# run_examples.sh KVMESH SHARED - `kvmesh run` on every example with the mock engine (no model needed),
# single runs and small seeded batches; traces written and readable by `kvmesh trace`.
set -euo pipefail
kvmesh=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# outputs go to a file before grep: `cmd | grep -q` under pipefail fails at random when grep exits first (SIGPIPE)
"$kvmesh" run --help > "$tmp/help"; grep -q -- "--kv" "$tmp/help" || { echo "run --help lacks --kv"; exit 1; }
for ex in team pipeline revise; do
  "$kvmesh" run "examples/$ex.lua" --mock --n 3 --seed 1 --trace "$tmp/t" -q > "$tmp/out" 2>&1 || {
    # the dataset needs the minitasks generator; without it the example must say so clearly
    grep -q "minitasks" "$tmp/out" && { echo "SKIP $ex: no minitasks generator in this build"; continue; }
    cat "$tmp/out"; exit 1; }
  grep -q "runs: 3 (0 failed)" "$tmp/out" || { cat "$tmp/out"; exit 1; }
done
"$kvmesh" run examples/review_8b.lua --mock --input input="Write is_prime(n)" --trace "$tmp/t" > "$tmp/out" 2>&1 || { cat "$tmp/out"; exit 1; }
grep -q "verdict" "$tmp/out" || { cat "$tmp/out"; exit 1; }
"$kvmesh" trace ls "$tmp/t" > "$tmp/ls"; grep -q " ok " "$tmp/ls" || { echo "trace ls shows no ok run"; exit 1; }
# a trace root given where a run is expected is named as such, with the command that lists its runs (issue 18)
"$kvmesh" trace show "$tmp/t" > "$tmp/root" 2>&1 && { echo "trace show of a trace root succeeded"; exit 1; }
grep -q "is a folder of .* runs, not a run: .kvmesh trace ls" "$tmp/root" || { echo "trace show of a root:"; cat "$tmp/root"; exit 1; }
run=$(ls -d "$tmp"/t/*/ | head -1)
"$kvmesh" trace show "$run" > "$tmp/show"; grep -q "result: ok" "$tmp/show" || { echo "trace show lacks 'result: ok'"; cat "$tmp/show"; exit 1; }
"$kvmesh" trace steps "$run" > "$tmp/steps"; grep -q "saw:" "$tmp/steps" || { echo "trace steps lacks 'saw:'"; head -20 "$tmp/steps"; exit 1; }
# replay every traced run from its trace alone: the same outputs
for r in "$tmp"/t/*/; do
  "$kvmesh" trace replay "$r" > "$tmp/replay" 2>&1 || { cat "$tmp/replay"; exit 1; }
  grep -q " 0 different" "$tmp/replay" || { cat "$tmp/replay"; exit 1; }
done
# timeout + retry on the bundled model: three attempts time out, the on_error edge runs the fallback (issue 18)
"$kvmesh" run examples/deadline.lua --input input="a cat" --no-trace > "$tmp/out" 2>&1 || { cat "$tmp/out"; exit 1; }
grep -q "note: .*timed out: its timeout_ms of 30 ms passed after .* output tokens (attempt 3 of 3)" "$tmp/out" &&
  grep -q "\[step 3\] fallback" "$tmp/out" || { echo "deadline.lua:"; cat "$tmp/out"; exit 1; }
# a subgraph on the bundled model: its state mapped in and out through the parent's reducers, its steps nested in the
# trace under its node (issue 18)
"$kvmesh" run examples/subgraph.lua --input input="a cat who learns to fly" --trace "$tmp/sg" > "$tmp/out" 2>&1 || { cat "$tmp/out"; exit 1; }
grep -q "^  notes: 2$" "$tmp/out" && grep -q "\[step 1\] research/plot " "$tmp/out" && grep -q "\[step 2\] research  *(subgraph) ok" "$tmp/out" ||
  { echo "subgraph.lua:"; cat "$tmp/out"; exit 1; }
sg=$(ls -d "$tmp"/sg/*/ | head -1)
"$kvmesh" trace show "$sg" > "$tmp/show" || { cat "$tmp/show"; exit 1; }
grep -q "research/pick  *func  ok" "$tmp/show" && grep -q "research  *subgraph ok" "$tmp/show" || { echo "trace show of subgraph.lua:"; cat "$tmp/show"; exit 1; }
grep -q '"graph":"research","depth":1,"parent":1' "$sg/events.jsonl" || { echo "no nested step records"; grep '"step"' "$sg/events.jsonl" | cut -c1-300; exit 1; }
"$kvmesh" trace replay "$sg" > "$tmp/replay" 2>&1 && grep -q " 0 different" "$tmp/replay" || { cat "$tmp/replay"; exit 1; }
"$kvmesh" run examples/subgraph.lua --mock --input input="a cat" --no-trace > "$tmp/out" 2>&1 && grep -q "^  notes: 2$" "$tmp/out" ||
  { echo "subgraph.lua --mock:"; cat "$tmp/out"; exit 1; }
# --stream: each agent's tokens on stdout as they come, behind its name; one run only (issue 18)
"$kvmesh" run examples/pipeline.lua --stream --no-trace --input name=Mark --input corpus="Mark: 9442" > "$tmp/so" 2> "$tmp/se" ||
  { cat "$tmp/so" "$tmp/se"; exit 1; }
grep -q "^extractor> 9442$" "$tmp/so" && grep -q "^answerer> " "$tmp/so" && grep -q "\[extractor: .* tok in" "$tmp/se" ||
  { echo "--stream output:"; cat "$tmp/so" "$tmp/se"; exit 1; }
"$kvmesh" run examples/debate.lua --mock --stream --no-trace --input input="Cats make better pets." > "$tmp/so" 2> "$tmp/se" ||
  { cat "$tmp/so" "$tmp/se"; exit 1; }
[ "$(grep -c "^pro> " "$tmp/so")" = 2 ] && [ "$(grep -c "^con> " "$tmp/so")" = 2 ] && grep -q "^judge> " "$tmp/so" &&
  grep -q "rounds: 2" "$tmp/so" || { echo "debate.lua --stream:"; cat "$tmp/so"; exit 1; }
"$kvmesh" run examples/team.lua --mock --stream --n 2 > "$tmp/out" 2>&1 && { echo "--stream --n accepted"; exit 1; }
grep -q "stream shows one run" "$tmp/out" || { cat "$tmp/out"; exit 1; }
echo "examples ok"
