#!/usr/bin/env bash
# serve_client.sh KVMESH SHARED - `kvmesh client` against a `kvmesh serve` daemon on the mock model: load a
# workflow from a file, run it streaming tokens, load a model and generate from it, errors with a non-zero exit,
# SIGTERM stops the daemon cleanly.
set -u
kvmesh=$1
. tests/support/serve_lib.sh
serve_setup
cat > "$tmp/pair.lua" <<'LUA'
local kvm = kvmesh
local m = kvm.model('mock:echo')
local g = kvm.graph{ name = 'pair' }
g:agent('a', { model = m, template = 'Q: {input}\nA:', max_tokens = 4 })
g:agent('b', { model = m, template = 'Q: {input}\nA: {agent.a}\nB:', max_tokens = 6 })
g:edge(kvm.START, 'a')
g:edge('a', 'b')
return g
LUA
"$kvmesh" client --help > "$tmp/help" || fail "client --help"
grep -q "run WORKFLOW" "$tmp/help" || fail "client --help lacks 'run WORKFLOW'"
"$kvmesh" serve --help > "$tmp/help" || fail "serve --help"
grep -q -- "--workflows" "$tmp/help" || fail "serve --help lacks --workflows"
serve_start "$kvmesh" "$tmp/d.log" --mock --no-events || fail "the daemon did not listen"
"$kvmesh" client --connect "$ep" load pair "$tmp/pair.lua" > "$tmp/out" || fail "client load"
grep -q '"name":.*"pair"' "$tmp/out" || fail "load reply lacks the name"
"$kvmesh" client --connect "$ep" run pair --input input="two plus two" > "$tmp/out" 2> "$tmp/err" || fail "client run: $(cat "$tmp/err")"
grep -q "two plus two" "$tmp/out" || fail "client run streamed no tokens"
grep -q "done: 2 agent steps" "$tmp/err" || fail "client run printed no summary: $(cat "$tmp/err")"
"$kvmesh" client --connect "$ep" --json run pair --input input=x > "$tmp/out" 2>&1 || fail "client --json run"
grep -q '"type":.*"done"' "$tmp/out" || fail "client --json run printed no done reply"
"$kvmesh" client --connect "$ep" run nope > "$tmp/out" 2>&1 && fail "client run of an unknown workflow succeeded"
grep -q "KVM_ENOENT" "$tmp/out" || fail "unknown workflow: no KVM_ENOENT ($(cat "$tmp/out"))"
"$kvmesh" client --connect "$ep" runs > "$tmp/out" || fail "client runs"
[ "$(grep -c '"run_id"' "$tmp/out")" -eq 2 ] || fail "client runs does not list the two runs"
# models and generate (docs/protocol.md: model.load, generate, model.unload)
grep -q "generate MODEL PROMPT" <("$kvmesh" client --help) || fail "client --help lacks 'generate MODEL PROMPT'"
"$kvmesh" client --connect "$ep" model-load mini models/minillama-2m --backend cpu > "$tmp/out" || fail "client model-load: $(cat "$tmp/out")"
grep -q '"arch":.*"LlamaForCausalLM"' "$tmp/out" || fail "model-load reply lacks the arch"
"$kvmesh" client --connect "$ep" models > "$tmp/out" || fail "client models"
grep -q '"name":.*"mini"' "$tmp/out" || fail "client models does not list mini"
"$kvmesh" client --connect "$ep" generate mini "Once upon a time" --max-tokens 6 --ignore-eos --seed 3 > "$tmp/out" 2> "$tmp/err" || fail "client generate: $(cat "$tmp/err")"
[ -s "$tmp/out" ] || fail "client generate streamed no text"
grep -q "6 generated, stop: length" "$tmp/err" || fail "client generate printed no summary: $(cat "$tmp/err")"
"$kvmesh" client --connect "$ep" --json generate mini "Once upon a time" --max-tokens 6 --ignore-eos --seed 3 > "$tmp/json" || fail "client --json generate"
/usr/bin/python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(d["text"] != open(sys.argv[2]).read())' "$tmp/json" "$tmp/out" \
  || fail "the streamed text is not done's text"
"$kvmesh" client --connect "$ep" generate mini "x" --temperature -1 > "$tmp/out" 2>&1 && fail "generate with temperature -1 succeeded"
grep -q "KVM_EINVAL.*field temperature" "$tmp/out" || fail "temperature -1: no KVM_EINVAL at temperature ($(cat "$tmp/out"))"
"$kvmesh" client --connect "$ep" generate mini "x" --max-tokens abc > "$tmp/out" 2>&1; [ $? -eq 2 ] || fail "--max-tokens abc: not a usage error"
"$kvmesh" client --connect "$ep" model-unload mini > "$tmp/out" || fail "client model-unload"
"$kvmesh" client --connect "$ep" generate mini "x" > "$tmp/out" 2>&1 && fail "generate on an unloaded model succeeded"
grep -q "KVM_ENOENT" "$tmp/out" || fail "unloaded model: no KVM_ENOENT ($(cat "$tmp/out"))"
serve_stop || fail "the daemon exited non-zero after SIGTERM"
grep -q "stopped" "$tmp/d.log" || fail "the daemon did not say it stopped"
echo "serve_client ok"
