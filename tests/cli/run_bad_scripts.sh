#!/usr/bin/env bash
# run_bad_scripts.sh KVMESH SHARED - `kvmesh run` on bad scripts: exit status 1, a message with
# file:line on stderr, never a crash (exit status >= 128).
set -uo pipefail
kvmesh=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
check() { # name, expected text, script
  printf '%s' "$3" > "$tmp/$1.lua"
  "$kvmesh" run "$tmp/$1.lua" --mock --no-trace --instructions 1e6 --input input=x > "$tmp/out" 2>&1
  rc=$?
  if [ $rc -ge 128 ] || [ $rc -eq 0 ]; then echo "$1: exit status $rc"; cat "$tmp/out"; exit 1; fi
  grep -q "$2" "$tmp/out" || { echo "$1: message lacks '$2'"; cat "$tmp/out"; exit 1; }
}
head='local g = kvmesh.graph{}
local m = kvmesh.model("mock:echo")
g:agent("a", { model = m, template = "{input}" })
g:edge(kvmesh.START, "a")
'
check syntax "syntax.lua:5:" "${head}local = 1
return g"
check unknown "unknown.lua:5: g:edge: unknown node 'b'" "${head}g:edge('a', 'b')
return g"
check loop "loop.lua:6:.*instruction budget" "${head}g:func('f', function()
  while true do end end)
g:edge('a', 'f')
return g"
check tool "tool.lua:6: no index" "${head}g:tool('t', function()
  error('no index') end)
g:edge('a', 't')
return g"
check frozen "frozen.lua:6: g:func: the graph, its agents and models are frozen" "${head}g:func('f', function()
  g:func('late', function() end) end)
g:edge('a', 'f')
return g"
check pattern "pattern.lua:6: kvmesh: string.find: the pattern" "${head}g:func('f', function()
  return { x = (('a'):rep(5000)):find(('a-'):rep(20) .. 'b') } end)
g:edge('a', 'f')
return g"
check finalizer "finalizer.lua:5: setmetatable: __gc metamethods are not allowed" "${head}setmetatable({}, { __gc = function() end })
return g"
# misspelled names: an error at the line of the typo, with the nearest name (issue 18)
check reducer "reducer.lua:1: kvmesh.reduce has no 'apend'; did you mean 'append'?" "local g = kvmesh.graph{ state = { notes = kvmesh.reduce.apend } }
return g"
check method "method.lua:5: a graph has no 'agnet'; did you mean 'agent'?" "${head}g:agnet('b', { model = m, template = 'x' })
return g"
# ctx:log(...) logs its arguments, not the ctx table (issue 18)
printf '%s' "${head}g:func('f', function(state, last, ctx) ctx:log('hello', 2); ctx.log('plain') end)
g:edge('a', 'f')
return g" > "$tmp/log.lua"
"$kvmesh" run "$tmp/log.lua" --mock --no-trace --input input=x > "$tmp/out" 2>&1 || { echo "log: failed"; cat "$tmp/out"; exit 1; }
{ grep -q "^\[run 0\] hello	2$" "$tmp/out" && grep -q "^\[run 0\] plain$" "$tmp/out" && ! grep -q "table: 0x" "$tmp/out"; } ||
  { echo "log: ctx:log printed the wrong text"; cat "$tmp/out"; exit 1; }
# a model folder without its tokenizer: refused by name at kvmesh.model, not run on hashed words (issue 18)
mkdir -p "$tmp/notok"
cp models/minillama-2m/config.json models/minillama-2m/model.safetensors "$tmp/notok/"
printf 'local g = kvmesh.graph{}\nlocal m = kvmesh.model("%s")\ng:agent("a", { model = m, template = "{input}" })\ng:edge(kvmesh.START, "a")\nreturn g\n' "$tmp/notok" > "$tmp/notok.lua"
"$kvmesh" run "$tmp/notok.lua" --no-trace --input input=x > "$tmp/out" 2>&1
rc=$?
{ [ $rc -eq 1 ] && grep -q "notok.lua:2: kvmesh.model: model '.*notok': the model has no tokenizer" "$tmp/out"; } ||
  { echo "notok: exit status $rc"; cat "$tmp/out"; exit 1; }
echo "bad scripts ok"
