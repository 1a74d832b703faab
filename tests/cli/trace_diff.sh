#!/usr/bin/env bash
# trace_diff.sh - `kvmesh trace diff` and the readable reuse decisions of `trace steps`. Two runs of the same seed
# agree (exit 0); an agent output changed in one trace is the first divergence, named with its node, and the
# outputs after it differ (exit 1); a bad argument is exit 2. The mock model runs everywhere; with the bundled
# model a dense and a kvcomm run of the same seed are compared too. Args: kvmesh binary.
set -u
bin="$1"
. "$(dirname "$0")/../support/checks.sh"

grep -q "trace diff RUN_A RUN_B" <<< "$("$bin" trace --help)" && ok "trace --help names diff" || bad "trace --help names diff"
"$bin" run examples/team.lua --mock --n 1 --seed 7 --trace "$work/a" -q > /dev/null 2>&1
"$bin" run examples/team.lua --mock --n 1 --seed 7 --trace "$work/b" -q > /dev/null 2>&1
ra="$(ls -d "$work"/a/*/)"; rb="$(ls -d "$work"/b/*/)"
out="$("$bin" trace diff "$ra" "$rb")"; rc=$?
[ $rc -eq 0 ] && grep -q "the same outputs" <<< "$out" && grep -q "^0 of 5 aligned steps" <<< "$out" \
  && ok "the same seed twice: no difference, exit 0" || bad "same seed: rc $rc: $out"

# change the finder's output in b's trace: the first divergence is the finder, its consumers follow
/usr/bin/python3 - "$rb/events.jsonl" <<'PY'
import json, sys
p = sys.argv[1]
lines = open(p).read().splitlines()
for i, l in enumerate(lines):
    d = json.loads(l)
    if d.get("t") == "step" and d.get("node") == "finder":
        d["output"]["text"] = "4242"
        lines[i] = json.dumps(d, separators=(",", ":"))
        break
open(p, "w").write("\n".join(lines) + "\n")
PY
out="$("$bin" trace diff "$ra" "$rb")"; rc=$?
[ $rc -eq 1 ] && ok "an edited output: exit 1" || bad "edited output: rc $rc"
grep -q "first divergence: super-step 1, node 'finder'" <<< "$out" && grep -q "said: 4242" <<< "$out" \
  && ok "the first divergence is the edited step, with both outputs" || bad "first divergence: $out"
grep -qE "^  s1 +finder +OUTPUT" <<< "$out" && ok "the edited step is marked OUTPUT" || bad "step marks: $out"

out="$("$bin" trace diff "$ra" 2>&1)"; rc=$?
[ $rc -eq 2 ] && grep -q "two run directories" <<< "$out" && ok "one run: usage error" || bad "one run: rc $rc $out"
out="$("$bin" trace diff "$ra" "$work/nope" 2>&1)"; rc=$?
[ $rc -eq 2 ] && grep -q "nope" <<< "$out" && ok "a missing run is named" || bad "missing run: rc $rc $out"
out="$("$bin" trace diff "$ra" "$work/b" 2>&1)"; rc=$?
[ $rc -eq 2 ] && grep -q "is a folder of 1 run" <<< "$out" && ok "a trace root is named as such" || bad "trace root: rc $rc $out"

# the bundled model: dense against kvcomm (the paper's policy, which changes answers) on the same seeds
if [ -f models/minillama-2m/config.json ]; then
  "$bin" run examples/team.lua --n 4 --seed 1 --kv dense --trace "$work/d" -q > /dev/null 2>&1
  "$bin" run examples/team.lua --n 4 --seed 1 --kv kvcomm --kvcomm preset=spec --concurrency 1 --trace "$work/k" -q > /dev/null 2>&1
  pairs=0; agreed=0; parted=0
  for d in "$work"/d/*/; do
    seed="$("$bin" trace show "$d" | head -1 | grep -o 'seed [0-9]*$')"
    for k in "$work"/k/*/; do
      [ "$("$bin" trace show "$k" | head -1 | grep -o 'seed [0-9]*$')" == "$seed" ] || continue
      pairs=$((pairs + 1))
      out="$("$bin" trace diff "$d" "$k")"; rc=$?
      if [ $rc -eq 0 ]; then agreed=$((agreed + 1));
      elif [ $rc -eq 1 ] && grep -q "^first d" <<< "$out"; then parted=$((parted + 1));
      else bad "dense vs kvcomm, $seed: rc $rc: $out"; fi
    done
  done
  [ $pairs -eq 4 ] && ok "dense vs kvcomm: $pairs pairs by seed ($agreed agree, $parted part at a named step)" || bad "pairs: $pairs"
  steps="$("$bin" trace steps "$(ls -d "$work"/k/*/ | tail -1)")"
  grep -qE "^    state:input.facts +[0-9]+ tokens at [0-9]+ +(shared|new_anchor|dense)" <<< "$steps" \
    && ok "trace steps: one readable line per placeholder decision" || bad "decisions: $(grep -A4 'reuse decisions' <<< "$steps" | head -8)"
  grep -q "reuse decisions (JSON)" <<< "$steps" && bad "raw decision JSON without --full" || ok "raw decision JSON only with --full"
else
  echo "SKIP dense vs kvcomm diff: models/minillama-2m is not here"
fi

[ $fails -eq 0 ] && echo "trace_diff: all passed" || echo "trace_diff: $fails failed"
exit $((fails > 0))
