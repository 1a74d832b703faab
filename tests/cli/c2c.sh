#!/usr/bin/env bash
# c2c.sh KVMESH SHARED - C2C on the bundled pair (docs/c2c.md): `kvmesh c2c init` writes the untrained fuser of
# examples/c2c byte for byte again from its seed; examples/c2c.lua runs with it (the answerer's document rows fused from
# the Qwen3 model: fused count, gate states and times in the trace and in `kvmesh trace steps`); bad kv_from options
# and bad fusers are refused at load with the script's file:line; bad `c2c init` calls are usage errors. Checks the
# mechanics, not accuracy (the fuser is untrained).
set -euo pipefail
kvmesh=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
R=models/minillama-2m; S=models/miniqwen3-6m

# --- kvmesh c2c init ---------------------------------------------------------------------------------------------
"$kvmesh" c2c --help > "$tmp/help"; grep -q "UNTRAINED" "$tmp/help" || { cat "$tmp/help"; exit 1; }
"$kvmesh" c2c init --receiver $R --sharer $S -o "$tmp/u.c2c.json" --seed 1 --hidden 16 --dtype bf16 --closed v0,k5 > "$tmp/out"
grep -q "UNTRAINED fuser, seed 1" "$tmp/out" || { cat "$tmp/out"; exit 1; }
cmp "$tmp/u.c2c.safetensors" examples/c2c/untrained.c2c.safetensors || { echo "the committed fuser is not what its seed writes"; exit 1; }
sed 's/"weights_file": "u\./"weights_file": "untrained./' "$tmp/u.c2c.json" | cmp - examples/c2c/untrained.c2c.json ||
  { echo "the committed fuser config differs"; diff "$tmp/u.c2c.json" examples/c2c/untrained.c2c.json; exit 1; }
grep -q '"gates_open": {"k": \[true, true, true, true, true, false\], "v": \[false, true, true, true, true, true\]}' "$tmp/u.c2c.json" ||
  { echo "gates_open:"; cat "$tmp/u.c2c.json"; exit 1; }
usage() { # expected text, args...
  local want=$1; shift
  set +e; "$kvmesh" c2c "$@" > "$tmp/out" 2>&1; local rc=$?; set -e
  [ $rc -eq 1 ] || [ $rc -eq 2 ] || { echo "c2c $*: exit status $rc"; cat "$tmp/out"; exit 1; }
  grep -q -- "$want" "$tmp/out" || { echo "c2c $*: message lacks '$want'"; cat "$tmp/out"; exit 1; }
}
usage "unknown subcommand 'train'" train
usage "are required" init --receiver $R
usage "not a non-negative integer" init --receiver $R --sharer $S -o "$tmp/x.c2c.json" --seed -3
usage "must be a path ending in .c2c.json" init --receiver $R --sharer $S -o "$tmp/x.json"
usage "closed gate 'v9'" init --receiver $R --sharer $S -o "$tmp/x.c2c.json" --closed v9
usage "dtype 'f8'" init --receiver $R --sharer $S -o "$tmp/x.c2c.json" --dtype f8

# --- examples/c2c.lua on the bundled models ---------------------------------------------------------------------
"$kvmesh" run examples/c2c.lua --input docs="Mark: 9442" --input q=Mark --trace "$tmp/t" > "$tmp/out" 2>&1 || { cat "$tmp/out"; exit 1; }
cp "$tmp/out" "$tmp/out0"
grep -q "^  answerer: " "$tmp/out" || { cat "$tmp/out"; exit 1; }
# the per-agent table: the answerer's policy is c2c, 13 of its 20 prompt tokens computed by its own model
grep -q "^answerer  *c2c  *1  *20  *0  *13 " "$tmp/out" || { echo "agent table:"; cat "$tmp/out"; exit 1; }
run=$(ls -d "$tmp"/t/*/ | head -1)
# the answerer's prompt: {input.docs} ("Mark: 9442", 7 tokens) fused, the other 13 computed by the Llama model
# (to files before grep -q: `cmd | grep -q` under pipefail fails at random when grep exits first, SIGPIPE)
grep '"agent":"answerer"' "$run/events.jsonl" > "$tmp/ans"; grep '"agent":"reader"' "$run/events.jsonl" > "$tmp/rdr"
grep -q '"recomputed":13,"fused":7,"mode":"c2c"' "$tmp/ans" || { echo "answerer's kv record:"; cut -c1-600 "$tmp/ans"; exit 1; }
grep -q '"fused":0' "$tmp/rdr" || { echo "reader fused something:"; cut -c1-600 "$tmp/rdr"; exit 1; }
"$kvmesh" trace steps "$run" > "$tmp/steps"
grep -q "KV c2c: 0 exact, 0 offset-corrected, 0 naive, 13 recomputed, 7 fused" "$tmp/steps" &&
  grep -q "c2c: 7 tokens of {state:input.docs} at 3 fused from .*miniqwen3-6m (fuser .*untrained.c2c.json)" "$tmp/steps" &&
  grep -q "gates K open at layers \[0 1 2 3 4\] (5 of 6)" "$tmp/steps" &&
  grep -q "gates V open at layers \[1 2 3 4 5\] (5 of 6)" "$tmp/steps" &&
  grep -q "times: prefix .* ms, section prefill (receiver + sharer) .* ms, fusion .* ms" "$tmp/steps" ||
  { echo "trace steps:"; cat "$tmp/steps"; exit 1; }
# --mock: the option is checked, nothing fused
"$kvmesh" run examples/c2c.lua --mock --input docs=x --input q=y --no-trace > "$tmp/out" 2>&1 || { cat "$tmp/out"; exit 1; }

# --- bad kv_from options: refused at load, naming the script's line ---------------------------------------------
mkdir -p "$tmp/bad/c2c"; cp examples/c2c/untrained.c2c.* "$tmp/bad/c2c/"; ln -s "$PWD/models" "$tmp/models"
bad() { # name, expected text, kv_from table (line 6 of the script), [receiver model variable], [receiver template]
  cat > "$tmp/bad/$1.lua" <<LUA
local q = kvmesh.model("../models/miniqwen3-6m")
local l = kvmesh.model("../models/minillama-2m")
local g = kvmesh.graph{}
g:agent("reader", { model = q, template = "{input.docs} {input.q}" })
g:agent("answerer", { model = ${4:-l}, template = "${5:-{input.docs\} Ask: {input.q\}}",
  kv_from = $3 })
g:edge(kvmesh.START, "reader")
g:edge("reader", "answerer")
return g
LUA
  set +e; "$kvmesh" run "$tmp/bad/$1.lua" --no-trace --input docs=a --input q=b > "$tmp/out" 2>&1; local rc=$?; set -e
  [ $rc -eq 1 ] || { echo "$1: exit status $rc"; cat "$tmp/out"; exit 1; }
  grep -q "$1.lua:5: .*$2" "$tmp/out" || { echo "$1: message lacks '$1.lua:5: ... $2'"; cat "$tmp/out"; exit 1; }
}
F='fuser = "c2c/untrained.c2c.json"'
bad via "field 'via' must be \"c2c\"" "{ agent = 'reader', via = 'kvcomm', $F, section = 'input.docs' }"
bad field "unknown field 'layers'" "{ agent = 'reader', via = 'c2c', $F, section = 'input.docs', layers = 3 }"
bad missing "fields 'agent', 'fuser' and 'section' are required" "{ agent = 'reader', via = 'c2c', section = 'input.docs' }"
bad noagent "agent 'writer' is not an agent defined before this one" "{ agent = 'writer', via = 'c2c', $F, section = 'input.docs' }"
bad nosection "section '{input.text}' is not a placeholder of this agent's template" "{ agent = 'reader', via = 'c2c', $F, section = 'input.text' }"
bad notinsharer "section '{input.tag}' is not in the template of agent 'reader'" "{ agent = 'reader', via = 'c2c', $F, section = 'input.tag' }" l "{input.tag} {input.docs}"
bad table "kv_from must be a table" "'reader'"
bad samemodel "runs on the same model" "{ agent = 'reader', via = 'c2c', $F, section = 'input.docs' }" q
bad nofile "no C2C fuser could be loaded from 'c2c/none.c2c.json'" "{ agent = 'reader', via = 'c2c', fuser = 'c2c/none.c2c.json', section = 'input.docs' }"
# a fuser for another pair (roles swapped): the pairing check names the field
"$kvmesh" c2c init --receiver $S --sharer $R -o "$tmp/bad/c2c/swapped.c2c.json" > /dev/null
bad swapped "fuser is for a receiver with 6 layers\|receiver.n_kv_heads\|receiver.head_dim" "{ agent = 'reader', via = 'c2c', fuser = 'c2c/swapped.c2c.json', section = 'input.docs' }"
# an aligned-mode fuser (token_alignment longest, the same weights as examples/c2c's): kv_from runs it (the sharer
# reads its own rendering of the prompt before the section; one tokenizer here, so the same fused rows and answer)
"$kvmesh" c2c init --receiver $R --sharer $S -o "$tmp/bad/c2c/longest.c2c.json" --align longest --seed 1 --hidden 16 \
  --dtype bf16 --closed v0,k5 > /dev/null
grep -q '"token_alignment": "longest", "fuse_tokens": "message_tokens"' "$tmp/bad/c2c/longest.c2c.json" ||
  { echo "--align longest:"; cat "$tmp/bad/c2c/longest.c2c.json"; exit 1; }
sed 's|c2c/untrained.c2c.json|c2c/longest.c2c.json|' examples/c2c.lua > "$tmp/bad/longest.lua"
"$kvmesh" run "$tmp/bad/longest.lua" --input docs="Mark: 9442" --input q=Mark --trace "$tmp/tl" > "$tmp/outl" 2>&1 ||
  { cat "$tmp/outl"; exit 1; }
grep "^  answerer: " "$tmp/out0" > "$tmp/a0"; grep "^  answerer: " "$tmp/outl" > "$tmp/al"
cmp -s "$tmp/a0" "$tmp/al" || { echo "aligned and identity answers differ:"; cat "$tmp/a0" "$tmp/al"; exit 1; }
"$kvmesh" trace steps "$(ls -d "$tmp"/tl/*/ | head -1)" > "$tmp/stepsl"
grep -q "c2c: 7 tokens of {state:input.docs} at 3 fused" "$tmp/stepsl" &&
  grep -q "aligned (longest): the sharer's own rendering before the section 3 tokens + 0 pads" "$tmp/stepsl" ||
  { echo "trace steps (aligned):"; cat "$tmp/stepsl"; exit 1; }
usage "token_alignment 'nearest'" init --receiver $R --sharer $S -o "$tmp/x.c2c.json" --align nearest
# a damaged weights file: refused (weights_sha256), the reason in the log only
cp "$tmp/bad/c2c/untrained.c2c.json" "$tmp/bad/c2c/dmg.c2c.json"
head -c 1000 examples/c2c/untrained.c2c.safetensors > "$tmp/bad/c2c/untrained.c2c.safetensors"
bad damaged "no C2C fuser could be loaded" "{ agent = 'reader', via = 'c2c', fuser = 'c2c/dmg.c2c.json', section = 'input.docs' }"
echo "c2c ok"
