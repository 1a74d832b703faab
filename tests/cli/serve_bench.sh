#!/usr/bin/env bash
# serve_bench.sh KVMESH SHARED - `kvmesh client bench` (the C load client of scripts/gpu/serve_load_gpu.sh) against
# a `kvmesh serve --mock` daemon for 3 s: 8 clients, a mix of every request type including generate; none answered
# with an error, the daemon's stats line follows; a bad option is refused with exit 2.
set -u
kvmesh=$1
. tests/support/serve_lib.sh
serve_setup
mkdir "$tmp/wf"
cat > "$tmp/wf/duo.lua" <<'LUA'
-- two mock agents, the second reading the first
local m = kvmesh.model('mock:echo')
local g = kvmesh.graph{ name = 'duo' }
g:agent('first', { model = m, template = 'Task: {input}\nFirst:', max_tokens = 3 })
g:agent('second', { model = m, template = 'Task: {input}\nFirst: {agent.first}\nSecond:', max_tokens = 5 })
g:edge(kvmesh.START, 'first')
g:edge('first', 'second')
return g
LUA
"$kvmesh" client bench --help 2> "$tmp/help"; [ $? = 0 ] || fail "client bench --help"
grep -q -- "--clients" "$tmp/help" || fail "client bench --help lacks --clients"
"$kvmesh" client bench --mix 1,2 2> /dev/null; [ $? = 2 ] || fail "a bad --mix is not refused with exit 2"
serve_start "$kvmesh" "$tmp/d.log" --mock --workflows "$tmp/wf" --no-events || fail "the daemon did not listen"
"$kvmesh" client --connect "$ep" model-load gen synthetic:tiny-llama --backend cpu > /dev/null || fail "model-load"
"$kvmesh" client --connect "$ep" bench --clients 8 --seconds 3 --workflow duo --generate gen --gen-tokens 4 --prompt-ids 8 \
  --mix 2,1,3,1,1,2 > "$tmp/out" 2> "$tmp/err" || fail "bench exit $?: $(cat "$tmp/err")"
# how many of each type complete in 3 s depends on the build (sanitizers) and the load: these always do
for t in run.start ping generate; do
  grep -q "^{\"type\":\"$t\",\"n\":[1-9][0-9]*,\"errors\":0," "$tmp/out" || fail "no error-free $t line: $(cat "$tmp/out")"
done
! grep -v daemon_stats "$tmp/out" | grep -q '"errors":[1-9]' || fail "a request failed: $(cat "$tmp/out")"
grep -q '^{"type":"all","clients":8,"seconds":[0-9.]*,"n":[1-9][0-9]*,"errors":0,' "$tmp/out" || fail "no error-free total line"
grep -q '^{"type":"daemon_stats","stats":{.*"overhead"' "$tmp/out" || fail "no daemon stats line"
serve_stop || fail "the daemon exited $?"
echo "ok: client bench (8 clients, 3 s): $(grep -c . "$tmp/out") lines, no error"
