#!/usr/bin/env bash
# trace_blame.sh - `kvmesh trace blame|label|cache` and `kvmesh bench blame` (docs/correct.md). A mock run whose
# finder output is corrupted into a fabricated answer is blamed on the finder; a label goes into the cache of
# --state DIR and a later run is shown that schema; the cache survives a torn snapshot; bad arguments are exit 2;
# the Who&When benchmark reproduces the deterministic rows of correct.md §9.3 (skipped loudly without the data).
# Args: kvmesh binary, shared dir.
set -u
bin="$1"
shared="${2:-../shared}"
. "$(dirname "$0")/../support/checks.sh"

"$bin" trace --help | grep -q "trace blame" && ok "trace --help names blame" || bad "trace --help names blame"
"$bin" trace blame --help | grep -q "trace label RUN_DIR --agent A --step N --state DIR" \
  && ok "trace blame --help shows label" || bad "trace blame --help"

for seed in 7 8; do
  "$bin" run examples/team.lua --mock --n 1 --seed $seed --trace "$work/r$seed" -q > /dev/null 2>&1
done
r7="$(ls -d "$work"/r7/*/)"; r8="$(ls -d "$work"/r8/*/)"
# corrupt the finder's output (step 1: step 0 is the task) with a made-up claim, as an injected error would
corrupt() {
/usr/bin/python3 - "$1/events.jsonl" <<'PY'
import json, sys
p = sys.argv[1]
lines = open(p).read().splitlines()
for i, l in enumerate(lines):
    d = json.loads(l)
    if d.get("t") == "step" and d.get("node") == "finder":
        d["output"]["text"] = "I could not open the file, so let us assume sample data: the answer is 123456789."
        lines[i] = json.dumps(d, separators=(",", ":"))
        break
open(p, "w").write("\n".join(lines) + "\n")
PY
}
corrupt "$r7"; corrupt "$r8"

out="$("$bin" trace blame "$r7")"; rc=$?
[ $rc -eq 0 ] && grep -q "^blame: agent finder, step 1$" <<< "$out" && grep -q "UNGROUNDED" <<< "$out" \
  && ok "the corrupted finder output is blamed (no cache)" || bad "blame: rc $rc: $out"
grep -q "schemata: 0 of 0 in the cache" <<< "$out" && ok "no --state: an empty cache" || bad "empty cache: $out"
out="$("$bin" trace blame "$r7" --method prior)"
grep -q "^blame: agent " <<< "$out" && ok "--method prior answers" || bad "prior: $out"

out="$("$bin" trace label "$r7" --agent finder --step 1 --state "$work/st")"; rc=$?
[ $rc -eq 0 ] && grep -q "schema #0" <<< "$out" && [ -s "$work/st/schemas.snap" ] \
  && ok "label: schema #0 saved in the state folder" || bad "label: rc $rc: $out"
out="$("$bin" trace blame "$r8" --state "$work/st")"; rc=$?
[ $rc -eq 0 ] && grep -q "schemata: 1 of 1 in the cache: #0" <<< "$out" && grep -q "^blame: agent finder, step 1$" <<< "$out" \
  && ok "a later failure is shown the labelled schema" || bad "warm blame: rc $rc: $out"
out="$("$bin" trace cache stats --state "$work/st")"
grep -q "^entries 1, groups 1, tombstones 0" <<< "$out" && grep -q "queries 1" <<< "$out" \
  && ok "cache stats counts the entry and the query" || bad "stats: $out"
"$bin" trace cache show 0 --state "$work/st" | grep -q '"HUMAN_LABEL"' && ok "cache show: a human label" || bad "cache show"
cp -r "$work/st" "$work/st2"
out="$("$bin" trace label "$r8" --agent finder --step 1 --state "$work/st2")"
grep -q "feedback: 1 of 1 schemata shown were helpful" <<< "$out" && "$bin" trace cache show 0 --state "$work/st2" | grep -q '"helpful":.1' \
  && ok "a label gives feedback to the schemata blame showed" || bad "feedback: $out"
"$bin" trace cache pin 0 --state "$work/st" && "$bin" trace cache show 0 --state "$work/st" | grep -q '"PINNED"' \
  && ok "cache pin persists" || bad "cache pin"

# --judge on label: the judge model writes the schema's text (mock:echo here; trace_replay.sh uses the bundled model)
cp -r "$work/st" "$work/stj"
out="$("$bin" trace label "$r8" --agent finder --step 1 --state "$work/stj" --judge mock:echo --judge-tokens 16)"; rc=$?
id="$(sed -n 's/.*-> schema #\([0-9]*\).*/\1/p' <<< "$out")"
[ $rc -eq 0 ] && grep -q "^judge: mock:echo wrote the text of schema #$id" <<< "$out" \
  && "$bin" trace cache show "$id" --state "$work/stj" | grep -q '"stub":.*false' \
  && ok "label --judge: the schema's text is written by the judge" || bad "label --judge: rc $rc: $out"
before="$(cat "$work/stj/schemas.snap")"
out="$("$bin" trace label "$r8" --agent finder --step 1 --state "$work/stj" --judge "$work/none" 2>&1)"; rc=$?
[ $rc -eq 1 ] && grep -q "none" <<< "$out" && [ "$before" = "$(cat "$work/stj/schemas.snap")" ] \
  && ok "label --judge with a missing model: exit 1, the cache unchanged" || bad "label bad judge: rc $rc: $out"
out="$("$bin" trace label "$r8" --agent finder --step 1 --state "$work/stj" --judge mock:echo --judge-tokens 0 2>&1)"; rc=$?
[ $rc -eq 2 ] && ok "--judge-tokens 0: exit 2" || bad "judge-tokens: rc $rc: $out"

# a torn snapshot: set aside, the cache starts empty, blame still answers
head -c 100 "$work/st/schemas.snap" > "$work/st/t" && mv "$work/st/t" "$work/st/schemas.snap"
out="$("$bin" trace blame "$r8" --state "$work/st" 2>&1)"; rc=$?
[ $rc -eq 0 ] && grep -q "set aside" <<< "$out" && [ -f "$work/st/schemas.snap.bad" ] && grep -q "schemata: 0 of 0" <<< "$out" \
  && ok "a torn snapshot is set aside and blame answers" || bad "torn: rc $rc: $out"

# bad arguments
for args in "blame" "blame $r7 --k 99" "blame $r7 --method llm" "blame $r7 --bogus" "label $r7 --agent finder --state $work/st" \
            "label $r7 --agent nobody --step 1 --state $work/st" "cache stats" "cache show x --state $work/st" "cache frob --state $work/st"; do
  # shellcheck disable=SC2086
  out="$("$bin" trace $args 2>&1)"; rc=$?
  [ $rc -eq 2 ] && ok "exit 2: trace $args" || bad "trace $args: rc $rc: $out"
done
out="$("$bin" trace blame "$work/nope" 2>&1)"; rc=$?
[ $rc -eq 1 ] && grep -q "nope" <<< "$out" && ok "a missing run is named" || bad "missing run: rc $rc: $out"
out="$("$bin" trace cache show 9 --state "$work/st" 2>&1)"; rc=$?
[ $rc -eq 1 ] && grep -q "no entry 9" <<< "$out" && ok "an unknown schema id" || bad "unknown id: rc $rc: $out"

# bench blame: the deterministic Who&When rows (correct.md §9.3) and a small latency run
ww="$shared/data/whowhen/Algorithm-Generated"
if [ -d "$ww" ]; then
  out="$("$bin" bench blame --whowhen "$ww" --runs 4 --mock --inject 20 --warm 30 --entries 300 --queries 20 --json "$work/b.json")"; rc=$?
  [ $rc -eq 0 ] && ok "bench blame runs" || bad "bench blame: rc $rc: $out"
  grep -q "error injection into 12 traced runs of 3 workflows (mock model)" <<< "$out" \
    && ok "bench blame injects into traced runs of three workflows" || bad "run injection: $out"
  grep -qE "prior: most active agent, its first step +54\.0 +19\.0" <<< "$out" && ok "Who&When prior row: 54.0 / 19.0" \
    || bad "prior row: $out"
  grep -qE "knn, TF-IDF \(no term cuts\) +43\.7 +24\.6 +42\.1" <<< "$out" && ok "Who&When TF-IDF row: 43.7 / 24.6 / 42.1" \
    || bad "tfidf row: $out"
  grep -qE "knn, TF-IDF \(512/256 term cuts\) +44\.4 +26\.2 +44\.4" <<< "$out" && ok "Who&When TF-IDF, cuts: 44.4 / 26.2 / 44.4" \
    || bad "tfidf cut row: $out"
  /usr/bin/python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['latency_lsh']['entries']==300" "$work/b.json" \
    && ok "bench blame --json" || bad "bench json"
else
  echo "SKIP Who&When rows: no $ww (../shared data absent)"
fi
out="$("$bin" bench blame --entries x 2>&1)"; rc=$?
[ $rc -eq 2 ] && ok "bench blame: a bad count is exit 2" || bad "bench bad count: rc $rc"

[ $fails -eq 0 ] && echo "all ok" || echo "$fails failed"
exit $((fails > 0))
