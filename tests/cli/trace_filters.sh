#!/usr/bin/env bash
# trace_filters.sh KVMESH SHARED - `kvmesh trace ls` filters (workflow, status, agent, time window) and
# `kvmesh trace search` over traces of mock runs (issue 13).
set -uo pipefail
kvmesh=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
# two workflows: 'alpha' (agent 'writer') ends ok; 'beta' (agent 'reader') fails in a func
cat > "$tmp/alpha.lua" <<'LUA'
local g = kvmesh.graph{ name = "alpha" }
g:agent("writer", { model = kvmesh.model("mock:echo"), template = "{input}" })
g:edge(kvmesh.START, "writer")
return g
LUA
cat > "$tmp/beta.lua" <<'LUA'
local g = kvmesh.graph{ name = "beta" }
g:agent("reader", { model = kvmesh.model("mock:echo"), template = "{input}" })
g:func("boom", function() error("the needle broke") end)
g:edge(kvmesh.START, "reader")
g:edge("reader", "boom")
return g
LUA
"$kvmesh" run "$tmp/alpha.lua" --mock --trace "$tmp/t" -q --input input="hello zebra" > /dev/null 2>&1 || fail "alpha run"
"$kvmesh" run "$tmp/beta.lua" --mock --trace "$tmp/t" -q --input input="hello yak" > /dev/null 2>&1 && fail "beta should fail"
count() { "$kvmesh" trace ls "$tmp/t" "$@" > "$tmp/ls" 2>&1 || { cat "$tmp/ls"; fail "trace ls $*"; }; grep -c " ms " "$tmp/ls"; }
[ "$(count)" = 2 ] || fail "both runs listed: $(cat "$tmp/ls")"
[ "$(count --status ok)" = 1 ] && grep -q " alpha " "$tmp/ls" || fail "--status ok: $(cat "$tmp/ls")"
[ "$(count --status error)" = 1 ] && grep -q " beta " "$tmp/ls" || fail "--status error: $(cat "$tmp/ls")"
[ "$(count --workflow beta)" = 1 ] && grep -q " beta " "$tmp/ls" || fail "--workflow beta: $(cat "$tmp/ls")"
[ "$(count --agent writer)" = 1 ] && grep -q " alpha " "$tmp/ls" || fail "--agent writer: $(cat "$tmp/ls")"
[ "$(count --agent nobody)" = 0 ] || fail "--agent nobody: $(cat "$tmp/ls")"
[ "$(count --since 2000-01-01 --until 2999-01-01T00:00)" = 2 ] || fail "a wide window: $(cat "$tmp/ls")"
[ "$(count --until 2000-01-01)" = 0 ] || fail "a window in the past: $(cat "$tmp/ls")"
"$kvmesh" trace ls "$tmp/t" --since yesterday > "$tmp/out" 2>&1; [ $? -eq 2 ] || fail "a malformed --since should exit 2"
grep -q "YYYY-MM-DD" "$tmp/out" || fail "--since message: $(cat "$tmp/out")"
"$kvmesh" trace ls "$tmp/t" --status maybe > "$tmp/out" 2>&1; [ $? -eq 2 ] || fail "a bad --status should exit 2"
# search: case-insensitive, in inputs, outputs and errors; run ids on each line
"$kvmesh" trace search ZEBRA "$tmp/t" > "$tmp/s" || fail "search zebra"
grep -q "^[0-9a-f]\{32\} .*zebra" "$tmp/s" && ! grep -q "yak" "$tmp/s" || fail "search zebra: $(cat "$tmp/s")"
"$kvmesh" trace search "needle broke" "$tmp/t" > "$tmp/s" || fail "search needle"
grep -q "run.end .*the needle broke" "$tmp/s" || fail "search of an error: $(cat "$tmp/s")"
"$kvmesh" trace search "not in any trace" "$tmp/t" > "$tmp/s" || fail "search nothing"
grep -q "^0 matches in 2 runs" "$tmp/s" || fail "no match: $(cat "$tmp/s")"
echo "trace filters ok"
