#!/usr/bin/env bash
# serve_tool_client.sh KVMESH SHARED - examples/clients/python/tool_client.py against `kvmesh serve --mock`: the
# client registers its Python 'weather' tool, runs examples/host_tool.lua, answers the daemon's tool call, and the
# tool's result reaches the agent's prompt (the mock model echoes it).
set -u
/usr/bin/python3 -c "import zmq" 2>/dev/null || { echo "SKIP: no python3-zmq (scripts/deps.sh installs it)"; exit 77; }
kvmesh=$1
tmp=$(mktemp -d)
dpid=
cleanup() { [ -n "$dpid" ] && kill "$dpid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
fail() { echo "FAIL $*"; for f in "$tmp"/*; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done; exit 1; }
KVM_THREADS=1 "$kvmesh" serve --mock --bind 'tcp://127.0.0.1:*' --no-events --trace "$tmp/traces" 2> "$tmp/d.log" &
dpid=$!
ep=
for _ in $(seq 100); do
  ep=$(grep -o 'listening on tcp://127.0.0.1:[0-9]*' "$tmp/d.log" | sed 's/listening on //')
  [ -n "$ep" ] && break
  sleep 0.1
done
[ -n "$ep" ] || fail "the daemon did not listen"
/usr/bin/python3 examples/clients/python/tool_client.py --connect "$ep" --input city=Oslo > "$tmp/out" 2> "$tmp/err" || fail "tool_client.py"
grep -q "^  tool weather(city='Oslo', days=3)$" "$tmp/out" || fail "the tool was not called with the schema's arguments"
forecast=$(sed -n "s/.*'forecast': '\([^']*\)'.*/\1/p" "$tmp/out")
[ -n "$forecast" ] || fail "no forecast in the outputs"
grep -q "'report': 'Forecast for Oslo: $forecast Write one line for the radio:'" "$tmp/out" || fail "the result did not reach the agent's prompt"
kill -TERM "$dpid"
wait "$dpid" || fail "the daemon exited non-zero after SIGTERM"
dpid=
echo "serve_tool_client ok"
