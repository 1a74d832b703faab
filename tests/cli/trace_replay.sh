#!/usr/bin/env bash
# trace_replay.sh - `kvmesh trace replay RUN --from-step N [--kv P] [--edit-output FILE]` and `kvmesh trace blame
# --verify` (docs/correct.md, "Replay" and "Verify by replay"), on examples/pipeline.lua and the bundled model: an
# error injected by a replay (the extractor's output replaced) makes the run fail, blame --verify confirms the
# extractor's step by replaying it and puts the failure into the cache; a step generated again reproduces the run;
# bad input (a step out of range, a missing file, a func step edited, a torn or garbled trace, bad options) is a
# clear error with a non-zero exit status, never a crash; runs with subgraphs: a replay from each step reproduces the
# run, an edited nested step reaches the parent, blame --verify confirms a nested step; `kvmesh bench blame --verify`
# on two runs. Args: kvmesh binary.
set -u
bin="$1"
. "$(dirname "$0")/../support/checks.sh"
# exit statuses above 2 (a crash is 128+) fail the check
sane() { [ "$1" -eq 1 ] || [ "$1" -eq 2 ]; }

"$bin" trace --help | grep -q "trace replay RUN_DIR --from-step N" && ok "trace --help names replay --from-step" || bad "trace --help"
"$bin" trace replay --from-step 0 --help | grep -q "edit-output FILE" && ok "trace replay --help" || bad "trace replay --help"

"$bin" run examples/pipeline.lua --n 1 --seed 3 --trace "$work/r" -q > /dev/null 2>&1
base="$(ls -d "$work"/r/*/ | head -1)"; base="${base%/}"
[ -f "$base/events.jsonl" ] && ok "a traced pipeline run" || { bad "no base run"; echo "$fails failed"; exit 1; }
said="$("$bin" trace steps "$base" --step 1 | grep 'said')"

# the extractor's output (trace step 1) replaced: the answerer reads it, the run fails
printf '99999\n' > "$work/edit.txt"
out="$("$bin" trace replay "$base" --from-step 1 --edit-output "$work/edit.txt" 2>&1)"; rc=$?
inj="$(sed -n 's/^trace: //p' <<< "$out")"
[ $rc -eq 1 ] && grep -q "score 0.000 -> failed" <<< "$out" && [ -f "$inj/events.jsonl" ] \
  && ok "--edit-output: the replay fails (exit 1) and has a trace" || bad "edit: rc $rc: $out"
"$bin" trace steps "$inj" --step 1 | grep -q "said (0 tokens, stop none): 99999$" && ok "the edited step says the file's text" \
  || bad "edited step: $("$bin" trace steps "$inj" --step 1)"
"$bin" trace steps "$inj" --step 1 | grep -q "KV given" && ok "the edited step is marked given" || bad "not marked given"
"$bin" trace show "$inj" | grep -q "^replay of run $(basename "$base") from step 1 (output), 1 edited output$" \
  && ok "trace show names the replay's origin" || bad "origin: $("$bin" trace show "$inj" | head -3)"

out="$("$bin" trace replay "$inj" 2>&1)"; rc=$?
[ $rc -eq 0 ] && ok "trace replay of a replay (no --from-step) reproduces it, edit included" || bad "compare replay: rc $rc: $out"

# a step generated again (greedy: the same output): the run passes again, under --kv dense too
out="$("$bin" trace replay "$inj" --from-step 1 2>&1)"; rc=$?
[ $rc -eq 0 ] && grep -q -- "-> passed" <<< "$out" && ok "regenerating the edited step makes the run pass (exit 0)" || bad "regen: rc $rc: $out"
regen="$(sed -n 's/^trace: //p' <<< "$out")"
[ "$("$bin" trace steps "$regen" --step 1 | grep 'said')" = "$said" ] && ok "the regenerated step says what the original run said" \
  || bad "regenerated: $("$bin" trace steps "$regen" --step 1 | grep said) vs $said"
out="$("$bin" trace replay "$inj" --from-step 1 --kv dense 2>&1)"; rc=$?
[ $rc -eq 0 ] && grep -q "step 1 under kv dense" <<< "$out" && ok "--kv dense" || bad "--kv dense: rc $rc: $out"
out="$("$bin" trace replay "$inj" --from-step 2 2>&1)"; rc=$?
[ $rc -eq 1 ] && grep -q -- "-> failed" <<< "$out" && ok "regenerating a later step keeps the edit: still fails" || bad "later: rc $rc: $out"

# blame --verify confirms the extractor (blame's step 2 = trace step 1) and feeds the cache
out="$("$bin" trace blame "$inj" --verify --state "$work/st" 2>&1)"; rc=$?
[ $rc -eq 0 ] && grep -q "^confirmed: agent extractor, step 2$" <<< "$out" && ok "blame --verify confirms the injected step" \
  || bad "verify: rc $rc: $out"
grep -q "^verify: [1-3] replays\? (budget 3)" <<< "$out" && ok "within the default budget of 3" || bad "budget: $out"
again="$(grep -o 'kvmesh trace replay [^;]*' <<< "$out" | head -1 | sed 's/^kvmesh //')"
out2="$("$bin" $again 2>&1)"; rc=$?
[ $rc -eq 0 ] && grep -q "with sampling seed" <<< "$out2" && ok "the command verify names repeats its replay: $again" || bad "repeat '$again': rc $rc: $out2"
grep -q "cache: the confirmed failure is in schema #0" <<< "$out" && "$bin" trace cache stats --state "$work/st" | grep -q "^entries 1," \
  && ok "the confirmed failure is in the cache" || bad "cache: $out"
# --judge: the bundled model writes the confirmed failure's schema text (poor text from a 2M-parameter model: the
# mechanics are what is checked), kept in the snapshot and shown by cache show
out="$("$bin" trace blame "$inj" --verify --state "$work/stj" --judge models/minillama-2m --judge-tokens 48 2>&1)"; rc=$?
[ $rc -eq 0 ] && grep -q "^judge: models/minillama-2m wrote the text of schema #0" <<< "$out" \
  && "$bin" trace cache show 0 --state "$work/stj" | grep -q '"model":.*"minillama-2m"' \
  && grep -q '"version":2' "$work/stj/schemas.snap" && ok "blame --verify --judge: the schema's text is written and kept" \
  || bad "judge: rc $rc: $out"
out="$("$bin" trace blame "$inj" --judge models/minillama-2m 2>&1)"; rc=$?
[ $rc -eq 2 ] && grep -q "give --verify too" <<< "$out" && ok "--judge without --verify: exit 2" || bad "judge alone: rc $rc: $out"
out="$("$bin" trace blame "$inj" --verify --judge "$work/no-model" 2>&1)"; rc=$?
[ $rc -eq 1 ] && grep -q "no-model" <<< "$out" && ok "a judge that cannot be loaded is named (exit 1)" || bad "bad judge: rc $rc: $out"
out="$("$bin" trace blame "$base" --verify 2>&1)"; rc=$?
[ $rc -eq 0 ] && grep -q "it did not fail, nothing to verify" <<< "$out" && ok "a run that passed: nothing to verify" || bad "passed run: rc $rc: $out"
out="$("$bin" trace blame "$inj" --verify --budget 0 2>&1)"; rc=$?
[ $rc -eq 0 ] && grep -q "^not confirmed" <<< "$out" && ok "--budget 0: no replay, not confirmed" || bad "budget 0: rc $rc: $out"

# bad input: clear errors, non-zero exit statuses, no crash
out="$("$bin" trace replay "$base" --from-step 7 2>&1)"; rc=$?
[ $rc -eq 1 ] && grep -q "step 7 is out of range: the run has 3 steps (0..2" <<< "$out" && ok "a step out of range" || bad "range: rc $rc: $out"
out="$("$bin" trace replay "$base" --from-step 1 --edit-output "$work/missing.txt" 2>&1)"; rc=$?
[ $rc -eq 1 ] && grep -q "missing.txt: No such file" <<< "$out" && ok "a missing --edit-output file" || bad "missing: rc $rc: $out"
out="$("$bin" trace replay "$base" --from-step 0 --edit-output "$work/edit.txt" 2>&1)"; rc=$?
[ $rc -eq 1 ] && grep -q "step 0 is the tool node 'facts': only an agent's output can be replaced" <<< "$out" \
  && ok "a tool step cannot be edited" || bad "tool edit: rc $rc: $out"
for a in "--from-step -1" "--from-step x" "--from-step" "--kv bogus --from-step 1" "--from-step 1 --kv dense --edit-output $work/edit.txt" \
         "--from-step 1 --seed -3" "--from-step 1 --seed 9007199254740992" "--from-step 1 --seed 5 --edit-output $work/edit.txt" \
         "--from-step 1 --nope"; do
  out="$("$bin" trace replay "$base" $a 2>&1)"; rc=$?
  [ $rc -eq 2 ] && [ -n "$out" ] && ok "usage error: $a" || bad "usage '$a': rc $rc: $out"
done
out="$("$bin" trace replay --from-step 1 2>&1)"; rc=$?
[ $rc -eq 2 ] && ok "no run directory: usage" || bad "no dir: rc $rc"
out="$("$bin" trace replay "$work/nothing" --from-step 1 2>&1)"; rc=$?
sane $rc && [ -n "$out" ] && ok "a missing run directory: exit $rc, said" || bad "missing dir: rc $rc: $out"
out="$("$bin" trace blame "$inj" --verify --budget 99 2>&1)"; rc=$?
[ $rc -eq 2 ] && grep -q "budget takes 0..16" <<< "$out" && ok "--budget out of range" || bad "budget 99: rc $rc: $out"
# torn: the last line cut in half (the reader keeps what is whole); garbled: a line in the middle replaced
cp -r "$base" "$work/torn"
size=$(stat -c %s "$work/torn/events.jsonl"); head -c $((size - 40)) "$base/events.jsonl" > "$work/torn/events.jsonl"
out="$("$bin" trace replay "$work/torn" --from-step 1 --trace "$work/out" 2>&1)"; rc=$?
{ [ $rc -eq 0 ] || sane $rc; } && ok "a torn trace: exit $rc, no crash" || bad "torn: rc $rc: $out"
cp -r "$base" "$work/garbled"
awk 'NR == 3 { print "{\"t\": \"step\", garbage"; next } { print }' "$base/events.jsonl" > "$work/garbled/events.jsonl"
out="$("$bin" trace replay "$work/garbled" --from-step 1 --trace "$work/out" 2>&1)"; rc=$?
[ $rc -eq 1 ] && grep -q "events.jsonl:3" <<< "$out" && ok "a garbled trace: exit 1 naming the line" || bad "garbled: rc $rc: $out"
out="$("$bin" trace blame "$work/garbled" --verify 2>&1)"; rc=$?
sane $rc && grep -q "events.jsonl:3" <<< "$out" && ok "blame --verify on a garbled trace: exit $rc naming the line" || bad "garbled blame: rc $rc: $out"

# a run with subgraphs (examples/subgraph.lua, greedy, dense): a replay from each of its steps, nested ones included,
# reproduces every agent step (the nested steps before it are given their recorded outputs); a nested step edited says the
# edit and the subgraph maps it out
said() { "$bin" trace steps "$1" | sed -n 's/^  said ([^)]*): //p' | sort; } # agent steps (a table's key order varies)
"$bin" run examples/subgraph.lua --input input="a cat" --kv dense --trace "$work/sg" -q > /dev/null 2>&1
sg="$(ls -d "$work"/sg/*/ | head -1)"; sg="${sg%/}"
want="$(said "$sg")"
n=$(grep -c '"t":"step"' "$sg/events.jsonl"); differ=0
for ((k = 0; k < n; k++)); do
  out="$("$bin" trace replay "$sg" --from-step $k 2>&1)"; rc=$?
  rp="$(sed -n 's/^trace: //p' <<< "$out")"
  [ $rc -eq 0 ] && [ -n "$rp" ] && [ "$(said "$rp")" = "$want" ] || { differ=$((differ + 1)); echo "from step $k: rc $rc: $out"; }
done
[ "$n" -eq 6 ] && [ $differ -eq 0 ] && ok "replay from each of the 6 steps of a run with a subgraph reproduces it" \
  || bad "subgraph replay: $differ of $n steps differ"
given=$(grep -c '"mode":"given"' "$rp/events.jsonl")
[ "$given" -eq 2 ] && ok "replayed from its last step: the 2 nested agent steps before it were given" || bad "given: $given"
printf 'EDITED hero\n' > "$work/hero.txt"
out="$("$bin" trace replay "$sg" --from-step 1 --edit-output "$work/hero.txt" 2>&1)"; rc=$?
rp="$(sed -n 's/^trace: //p' <<< "$out")"
[ $rc -eq 0 ] && "$bin" trace show "$rp" | grep -q '"findings":\["EDITED hero"' && ok "--edit-output of a nested step reaches the parent" \
  || bad "nested edit: rc $rc: $out"

# blame --verify on a run with a subgraph (mock model): the nested extractor's output edited makes the run fail; the
# replay that generates that nested step again passes, so it is confirmed
cat > "$work/sgscore.lua" <<'LUA'
local kvm = kvmesh
local m = kvm.model("mock:echo")
local find = kvm.graph{ name = "find", state = { q = kvm.reduce.replace, fact = kvm.reduce.replace } }
find:agent("extractor", { model = m, template = "{state.q}", max_tokens = 8, writes = "fact" })
find:edge(kvm.START, "extractor")
local g = kvm.graph{ name = "main", state = { q = kvm.reduce.replace, fact = kvm.reduce.replace, answer = kvm.reduce.replace } }
g:func("ask", function(state, last, ctx) return { q = ctx.inputs.input } end)
g:subgraph("find", find, { input = { q = "q" }, output = { fact = "fact" } })
g:agent("answerer", { model = m, template = "{state.fact}", max_tokens = 8, writes = "answer" })
g:edge(kvm.START, "ask")
g:edge("ask", "find")
g:edge("find", "answerer")
g:output(function(state) return { answer = state.answer } end)
g:score(function(res) return res.outputs.answer and res.outputs.answer:find("9442") and 1 or 0 end)
return g
LUA
"$bin" run "$work/sgscore.lua" --input input="Mark 9442" --trace "$work/sgb" -q > /dev/null 2>&1
sgb="$(ls -d "$work"/sgb/*/ | head -1)"; sgb="${sgb%/}"
out="$("$bin" trace replay "$sgb" --from-step 1 --edit-output "$work/edit.txt" 2>&1)"; rc=$?
sginj="$(sed -n 's/^trace: //p' <<< "$out")"
[ $rc -eq 1 ] && grep -q "score 0.000 -> failed" <<< "$out" && ok "a nested step edited: the run with a subgraph fails" || bad "nested inj: rc $rc: $out"
out="$("$bin" trace blame "$sginj" --verify --state "$work/st2" 2>&1)"; rc=$?
[ $rc -eq 0 ] && grep -q "^confirmed: agent extractor, step 2$" <<< "$out" && ok "blame --verify confirms the nested step of a subgraph" \
  || bad "nested verify: rc $rc: $out"

# the benchmark of docs/correct.md, a few runs of one workflow (every pipeline run is scored 1 and an injected
# error fails it: two failures, both confirmed)
out="$("$bin" bench blame --verify --runs 2 --workflows examples/pipeline.lua --json "$work/v.json" 2>&1)"; rc=$?
[ $rc -eq 0 ] && grep -q "blame verified by replay: 2 failures" <<< "$out" && grep -q "confirmed by a replay: 2 of 2 (empty cache)" <<< "$out" \
  && grep -q '"replays_per_run"' "$work/v.json" && ok "bench blame --verify" || bad "bench: rc $rc: $out"
out="$("$bin" bench blame --verify --budget 17 2>&1)"; rc=$?
[ $rc -eq 2 ] && ok "bench blame --verify --budget out of range" || bad "bench budget: rc $rc: $out"

echo "trace_replay: $fails failed"
[ $fails -eq 0 ]
