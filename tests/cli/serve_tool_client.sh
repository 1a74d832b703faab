#!/usr/bin/env bash
# serve_tool_client.sh KVMESH SHARED - examples/clients/python/tool_client.py against `kvmesh serve --mock`: the
# client registers its Python 'weather' tool, runs examples/host_tool.lua, answers the daemon's tool call, and the
# tool's result reaches the agent's prompt (the mock model echoes it).
set -u
. tests/support/serve_lib.sh
serve_need_zmq
kvmesh=$1
serve_setup
serve_start "$kvmesh" "$tmp/d.log" --mock --no-events --trace "$tmp/traces" || fail "the daemon did not listen"
/usr/bin/python3 examples/clients/python/tool_client.py --connect "$ep" --input city=Oslo > "$tmp/out" 2> "$tmp/err" || fail "tool_client.py"
grep -q "^  tool weather(city='Oslo', days=3)$" "$tmp/out" || fail "the tool was not called with the schema's arguments"
forecast=$(sed -n "s/.*'forecast': '\([^']*\)'.*/\1/p" "$tmp/out")
[ -n "$forecast" ] || fail "no forecast in the outputs"
grep -q "'report': 'Forecast for Oslo: $forecast Write one line for the radio:'" "$tmp/out" || fail "the result did not reach the agent's prompt"
serve_stop || fail "the daemon exited non-zero after SIGTERM"
echo "serve_tool_client ok"
