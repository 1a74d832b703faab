#!/usr/bin/env bash
# serve_interrupt.sh KVMESH SHARED - human in the loop through `kvmesh serve` (interfaces.md §7, issue 12 item 2):
# a run parks in kvmesh.interrupt, its client gets an `interrupt` message, another client answers with run.resume
# (`kvmesh client resume`), the run goes on with the answer (also when the node is in a subgraph); bad resumes get
# structured errors; a run parked when the daemon stops ends KVM_EINTERRUPTED and resumes later from its trace with
# `kvmesh run --resume`.
set -u
kvmesh=$(realpath "$1")
. tests/support/serve_lib.sh
serve_setup
cat > "$tmp/ask.lua" <<'LUA'
local kvm = kvmesh
local m = kvm.model('mock:echo')
local g = kvm.graph{ name = 'ask', state = { answer = kvm.reduce.replace } }
g:agent('draft', { model = m, template = '{input}', max_tokens = 4 })
g:func('ask', function(state, last)
  return { answer = kvm.interrupt({ question = 'ok?', draft = last.draft }) }
end)
g:edge(kvm.START, 'draft')
g:edge('draft', 'ask')
g:output(function(state) return { answer = state.answer } end)
return g
LUA
start_daemon() {
  serve_start "$kvmesh" "$tmp/d.log" --mock --no-events --trace "$tmp/traces" || fail "the daemon did not listen"
  "$kvmesh" client --connect "$ep" load ask "$tmp/ask.lua" > "$tmp/load.out" || fail "client load"
}
wait_interrupt() { # $1: the client's stderr; sets run
  run=
  for _ in $(seq 100); do
    run=$(sed -n 's/^(answer: kvmesh client resume \([0-9a-f]*\) VALUE)$/\1/p' "$1")
    [ -n "$run" ] && break
    sleep 0.1
  done
  [ -n "$run" ] || fail "no interrupt message reached the client"
}
start_daemon
"$kvmesh" client --connect "$ep" --json run ask --input input="ship it" > "$tmp/c.out" 2> "$tmp/c.err" &
cpid=$!
wait_interrupt "$tmp/c.err"
grep "interrupt from node 'ask': {" "$tmp/c.err" | grep -q '"question":"ok?"' &&
  grep "interrupt from node 'ask': {" "$tmp/c.err" | grep -q '"draft":"ship it"' || fail "the payload"
"$kvmesh" client --connect "$ep" status "$run" > "$tmp/s.out" || fail "status of a parked run"
"$kvmesh" client --connect "$ep" resume nope yes > "$tmp/e.out" 2>&1 && fail "resume of an unknown run"
grep -q "KVM_ENOENT" "$tmp/e.out" || fail "unknown run: no KVM_ENOENT"
"$kvmesh" client --connect "$ep" resume-json "$run" '{bad' > "$tmp/e.out" 2>&1 && fail "bad resume-json accepted"
"$kvmesh" client --connect "$ep" resume-json "$run" '{"go": true}' > "$tmp/r.out" 2>&1 || fail "resume"
grep -q '"type":.*"ok"' "$tmp/r.out" || fail "resume reply"
wait "$cpid" || fail "the streaming client failed"
cpid=
grep -q '"answer":.*{' "$tmp/c.out" && grep -q '"go":.*true' "$tmp/c.out" || fail "the answer is not in the outputs"
"$kvmesh" client --connect "$ep" resume "$run" again > "$tmp/e.out" 2>&1 && fail "resume of an ended run"
grep -q "KVM_ESTALE" "$tmp/e.out" || fail "ended run: no KVM_ESTALE"
# an interrupt inside a subgraph parks the run the same way; run.resume reaches the subgraph's node (issue 18)
cat > "$tmp/subask.lua" <<'LUA'
local kvm = kvmesh
local m = kvm.model('mock:echo')
local c = kvm.graph{ name = 'check', state = { draft = kvm.reduce.replace, answer = kvm.reduce.replace } }
c:agent('draft', { model = m, template = '{input}', max_tokens = 4, writes = 'draft' })
c:func('ask', function(state) return { answer = kvm.interrupt({ question = 'sub ok?', draft = state.draft }) } end)
c:edge(kvm.START, 'draft')
c:edge('draft', 'ask')
local g = kvm.graph{ name = 'subask', state = { answer = kvm.reduce.replace } }
g:subgraph('check', c, { output = { answer = 'answer' } })
g:edge(kvm.START, 'check')
g:output(function(state) return { answer = state.answer } end)
return g
LUA
"$kvmesh" client --connect "$ep" load subask "$tmp/subask.lua" > "$tmp/load2.out" || fail "client load subask"
"$kvmesh" client --connect "$ep" --json run subask --input input="sub it" > "$tmp/sc.out" 2> "$tmp/sc.err" &
cpid=$!
wait_interrupt "$tmp/sc.err"
grep "interrupt from node 'check/ask': {" "$tmp/sc.err" | grep -q '"draft":"sub it"' || fail "the subgraph's interrupt"
"$kvmesh" client --connect "$ep" resume-json "$run" '"sub yes"' > "$tmp/r2.out" 2>&1 || fail "resume inside a subgraph"
wait "$cpid" || fail "the subgraph's streaming client failed"
cpid=
grep -q '"answer":.*"sub yes"' "$tmp/sc.out" || fail "the subgraph's answer is not in the outputs"
# parked when the daemon stops: the run ends KVM_EINTERRUPTED, its trace resumes with the CLI
"$kvmesh" client --connect "$ep" run ask --input input="later" > "$tmp/c2.out" 2> "$tmp/c2.err" &
cpid=$!
wait_interrupt "$tmp/c2.err"
serve_stop || fail "the daemon exited non-zero after SIGTERM"
wait "$cpid"; cpid=
grep -q "KVM_EINTERRUPTED" "$tmp/c2.err" || fail "the parked run did not end KVM_EINTERRUPTED"
"$kvmesh" run --mock --resume "$tmp/traces/$run" --answer yes --no-trace < /dev/null > "$tmp/x.out" 2> "$tmp/x.err" ||
  fail "resume from the daemon's trace"
grep -q "answer: yes" "$tmp/x.out" || fail "the resumed run lacks the answer"
echo "serve_interrupt ok"
