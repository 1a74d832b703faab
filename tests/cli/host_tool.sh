#!/usr/bin/env bash
# host_tool.sh KVMESH SHARED - the host-tool example: examples/tools/host_tool.c (built beside kvmesh) registers the
# 'weather' tool with its JSON Schema and runs examples/host_tool.lua, whose nodes call it through ctx:tool; checked
# on its output (the tool's result reaches the agent's prompt, a call the schema refuses is an error naming the
# field, the call is in the trace), on the mock model and on the bundled tiny model. Then a script that names a tool
# the program did not register fails with a clear message.
set -euo pipefail
kvmesh=$1
host="$(dirname "$kvmesh")/host_tool"
[ -x "$host" ] || { echo "no $host: build the host_tool target"; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# outputs go to files before grep (pipefail + grep -q would fail at random on SIGPIPE)
"$host" examples/host_tool.lua --input city=Oslo --mock --trace "$tmp/t" > "$tmp/out" 2> "$tmp/err" || { cat "$tmp/out" "$tmp/err"; exit 1; }
forecast=$(sed -n 's/.*"forecast":"\([^"]*\)".*/\1/p' "$tmp/out")
[ -n "$forecast" ] || { echo "no forecast in the outputs:"; cat "$tmp/out"; exit 1; }
grep -q '^  tool weather{.*"city":"Oslo".*} from node .forecast.$' "$tmp/out" || { echo "no tool call line:"; cat "$tmp/out"; exit 1; }
# the mock model echoes its prompt: the tool's result went through {tool.forecast} into the reporter's prompt
grep -q "\"report\":\"Forecast for Oslo: $forecast Write one line for the radio:\"" "$tmp/out" || { cat "$tmp/out"; exit 1; }
grep -q "^status: ok (1 tool calls)$" "$tmp/out" || { cat "$tmp/out"; exit 1; }
grep -q "a bad call: ctx:tool: tool 'weather': args.days: 30 is above the maximum 7" "$tmp/err" || { cat "$tmp/err"; exit 1; }
run=$(ls -d "$tmp"/t/*/ | head -1)
"$kvmesh" trace show "$run" > "$tmp/show"
grep -q 'log \[info\] tool weather({.*"city":"Oslo".*}) -> {"days": \[{"day": 1' "$tmp/show" ||
  { echo "trace show lacks the tool call:"; cat "$tmp/show"; exit 1; }
# the same forecast on the bundled tiny model (the made-up forecast depends on the city alone)
if [ -d models/minillama-2m ]; then
  "$host" examples/host_tool.lua --input city=Oslo > "$tmp/real" 2>&1 || { cat "$tmp/real"; exit 1; }
  grep -q "\"forecast\":\"$forecast\"" "$tmp/real" && grep -q "^status: ok (1 tool calls)$" "$tmp/real" || { cat "$tmp/real"; exit 1; }
fi
# a tool the program did not register: the run fails, naming it and the tools there are
cat > "$tmp/missing.lua" <<'LUA'
local kvm = kvmesh
local g = kvm.graph{ name = "missing" }
g:func("ask", function(state, last, ctx) return ctx:tool("search", { q = "x" }) end)
g:edge(kvm.START, "ask")
return g
LUA
"$host" "$tmp/missing.lua" --mock > "$tmp/out" 2> "$tmp/err" && { echo "a missing tool did not fail"; exit 1; }
grep -q "missing.lua:3: ctx:tool: no tool 'search' is registered (tools: weather)" "$tmp/err" || { cat "$tmp/out" "$tmp/err"; exit 1; }
grep -q "^status: KVM_ELUA_RUNTIME" "$tmp/out" || { cat "$tmp/out"; exit 1; }
echo "host_tool: ok"
