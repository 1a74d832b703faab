#!/usr/bin/env bash
# run_tools.sh KVMESH SHARED - `kvmesh run --tool NAME=COMMAND [--tool-schema NAME=FILE]`: host tools of the command
# line. examples/host_tool.lua through the CLI with examples/tools/weather.sh gives the forecast the C host program
# (examples/tools/host_tool.c) gives; a call the schema refuses never reaches the command; a command that fails,
# prints no JSON or outlives the run's wall-time budget fails the node with a message naming it (and is killed);
# bad options are usage errors (exit 2).
set -euo pipefail
kvmesh=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tool=(--tool weather=examples/tools/weather.sh --tool-schema weather=examples/tools/weather.schema.json)
fail() { echo "FAIL: $*"; exit 1; }
"$kvmesh" run examples/host_tool.lua --mock --input city=Oslo "${tool[@]}" --json --trace "$tmp/t" > "$tmp/out" 2> "$tmp/err" ||
  { cat "$tmp/out" "$tmp/err"; fail "the example through --tool"; }
grep -q '"forecast":[[:space:]]*"1 snowy 18C, 2 sunny 15C, 3 rainy 24C"' "$tmp/out" || { cat "$tmp/out"; fail "forecast"; }
# the mock echoes its prompt: the tool's result reached the agent
grep -q '"report":[[:space:]]*"Forecast for Oslo: 1 snowy 18C, 2 sunny 15C, 3 rainy 24C Write one line for the radio:"' "$tmp/out" ||
  { cat "$tmp/out"; fail "report"; }
grep -q "a bad call: ctx:tool: tool 'weather': args.days: 30 is above the maximum 7" "$tmp/err" || { cat "$tmp/err"; fail "schema"; }
# the same forecast as the C host program's function
host="$(dirname "$kvmesh")/host_tool"
if [ -x "$host" ]; then
  "$host" examples/host_tool.lua --input city=Oslo --mock --trace "$tmp/ht" > "$tmp/host" 2>&1 || { cat "$tmp/host"; fail "host_tool"; }
  grep -q '"forecast":"1 snowy 18C, 2 sunny 15C, 3 rainy 24C"' "$tmp/host" || { cat "$tmp/host"; fail "host_tool forecast"; }
fi
# the command sees the call's names in its environment and the arguments on stdin
cat > "$tmp/echo.lua" <<'LUA'
local g = kvmesh.graph{ name = "echo", state = { r = kvmesh.reduce.replace }, limit = { wall_ms = 1500 } }
g:tool("t", function(state, last, ctx) return ctx:tool(ctx.inputs.tool, { x = 1, s = "a b" }) end, { writes = "r" })
g:edge(kvmesh.START, "t")
g:output(function(state) return { r = state.r } end)
return g
LUA
"$kvmesh" run "$tmp/echo.lua" --mock --no-trace --json --input tool=env \
  --tool 'env=printf "{\"tool\":\"%s\",\"node\":\"%s\",\"args\":%s}" "$KVMESH_TOOL" "$KVMESH_NODE" "$(cat)"' > "$tmp/env" 2>&1 ||
  { cat "$tmp/env"; fail "env tool"; }
grep -q '"tool":[[:space:]]*"env"' "$tmp/env" && grep -q '"node":[[:space:]]*"t"' "$tmp/env" && grep -q '"x":[[:space:]]*1' "$tmp/env" || { cat "$tmp/env"; fail "env and stdin"; }
# failures of the command: each fails the node, naming the command and what went wrong
check_fail() { # NAME COMMAND EXPECTED
  local rc=0
  "$kvmesh" run "$tmp/echo.lua" --mock --no-trace --input tool=t --tool "t=$2" > "$tmp/$1" 2>&1 || rc=$?
  [ "$rc" = 1 ] || { cat "$tmp/$1"; fail "$1: exit $rc, expected 1"; }
  grep -q -- "$3" "$tmp/$1" || { cat "$tmp/$1"; fail "$1: no '$3'"; }
}
check_fail status 'echo no such city >&2; exit 4' "ctx:tool: tool 't': 'echo no such city >&2; exit 4' exited with status 4: no such city"
check_fail notjson 'echo sunny' "printed no JSON value on stdout (it begins 'sunny')"
check_fail signal 'kill -9 $$' "was killed by signal 9"
t0=$(date +%s%N)
check_fail slow 'sleep 30' "'sleep 30' gave no answer within"
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
[ "$ms" -lt 15000 ] || fail "a slow tool held the run ${ms} ms past its 1.5 s budget"
# usage errors
for bad in "--tool weather" "--tool =cat" "--tool-schema weather=$tmp/none.json --tool weather=cat" "--tool-schema other=examples/tools/weather.schema.json --tool weather=cat"; do
  rc=0; "$kvmesh" run examples/host_tool.lua --mock --no-trace $bad > "$tmp/u" 2>&1 || rc=$?
  [ "$rc" = 2 ] || { cat "$tmp/u"; fail "'$bad': exit $rc, expected 2"; }
done
echo '{"type": "object", "pattern": "x"}' > "$tmp/s.json"
rc=0; "$kvmesh" run examples/host_tool.lua --mock --no-trace --tool weather=cat --tool-schema "weather=$tmp/s.json" > "$tmp/u" 2>&1 || rc=$?
[ "$rc" = 2 ] && grep -q "unsupported keyword 'pattern'" "$tmp/u" || { cat "$tmp/u"; fail "a schema the library refuses"; }
echo "run --tool ok"
