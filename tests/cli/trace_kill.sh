#!/usr/bin/env bash
# trace_kill.sh KVMESH SHARED - a run killed (SIGKILL) in the middle leaves a trace that every `kvmesh trace`
# view reads up to its last complete record, saying that the run did not end (issues 12 and 13).
set -uo pipefail
kvmesh=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
# a run that goes on for long: a Lua loop of agent calls (waits for the model are not charged to Lua)
cat > "$tmp/slow.lua" <<'LUA'
local kvm = kvmesh
local m = kvm.model("mock:echo")
local talker = kvm.agent{ name = "talker", model = m, template = "say {input}", max_tokens = 200, ignore_eos = true }
local g = kvm.graph{ name = "slow" }
g:func("loop", function(state, last, ctx)
  for i = 1, 100000 do ctx:call(talker, { input = "again " .. i }) end
end)
g:edge(kvm.START, "loop")
return g
LUA
for attempt in 1 2 3; do
  "$kvmesh" run "$tmp/slow.lua" --mock --trace "$tmp/t$attempt" -q --input input=x > /dev/null 2>&1 &
  pid=$!
  # kill it once its trace has a few records, while it is writing
  for _ in $(seq 200); do
    f=$(ls "$tmp"/t$attempt/*/events.jsonl 2>/dev/null | head -1)
    [ -n "$f" ] && [ "$(wc -l < "$f")" -ge 5 ] && break
    sleep 0.05
  done
  kill -9 $pid; wait $pid 2>/dev/null
  run=$(ls -d "$tmp"/t$attempt/*/ | head -1)
  [ -n "$run" ] || fail "no run directory after the kill"
  [ ! -f "$run/index.json" ] || fail "a killed run has no index.json"
  "$kvmesh" trace show "$run" > "$tmp/show" 2>&1 || { cat "$tmp/show"; fail "trace show of a killed run"; }
  grep -q "no run.end record" "$tmp/show" || fail "trace show should say the run did not end: $(tail -3 "$tmp/show")"
  "$kvmesh" trace steps "$run" > "$tmp/steps" 2>&1 || { cat "$tmp/steps"; fail "trace steps of a killed run"; }
  "$kvmesh" trace ls "$tmp/t$attempt" > "$tmp/ls" 2>&1 || fail "trace ls"
  grep -q "running?" "$tmp/ls" || fail "trace ls should show the killed run as running?: $(cat "$tmp/ls")"
  # every complete line of the log is one JSON record
  python3 - "$run/events.jsonl" <<'PY' || fail "a complete line of the killed run's log is not JSON"
import json, sys
data = open(sys.argv[1], "rb").read()
lines = data.split(b"\n")
for l in lines[:-1]:
    json.loads(l)
PY
done
echo "killed runs read ok"
