#!/usr/bin/env bash
# state.sh - `kvmesh run --state DIR`: what the runtime learns (KVCOMM anchors) outlives the process. A first run
# of the bundled team workflow reuses no agent call; the same command again loads the anchors the first one saved
# and reuses, at the accuracy of dense (the default policy, preset=blend). A damaged state file is set aside with a warning and the
# run goes on cold; an empty --state is refused. Args: kvmesh binary. Needs only the bundled models.
set -u
bin="$1"
. "$(dirname "$0")/../support/checks.sh"
field() { /usr/bin/python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
run() { "$bin" run examples/team.lua --n 6 --kv kvcomm --no-trace -q --json "$@"; }

grep -q -- "--state DIR" <<< "$("$bin" run --help)" && ok "run --help names --state" || bad "run --help names --state"

dense="$("$bin" run examples/team.lua --n 6 --kv dense --no-trace -q --json 2>/dev/null | field accuracy)"
cold="$(run --state "$work/st" 2>"$work/err1")"
[ "$(field reuse_rate <<< "$cold")" == "0" ] && ok "first run: no agent call reused" || bad "first run reused: $cold"
n_files=$(ls "$work/st"/anchors-minillama-2m-*.kva 2>/dev/null | wc -l)
[ "$n_files" == "1" ] && ok "the anchors were saved (one file for the model)" || bad "anchor files: $n_files ($(ls "$work/st"))"
ls "$work/st" | grep -q tmp && bad "a temporary file was left behind" || ok "no temporary file left behind"
warm="$(run --state "$work/st" 2>"$work/err2")"
rate="$(field reuse_rate <<< "$warm")"
/usr/bin/python3 -c "import sys; sys.exit(0 if float('$rate') >= 0.5 else 1)" && ok "second run reuses $rate of agent calls" \
  || bad "second run reuse rate $rate (wanted >= 0.5)"
[ "$(field accuracy <<< "$warm")" == "$dense" ] && ok "second run keeps the accuracy of dense ($dense)" \
  || bad "second run accuracy $(field accuracy <<< "$warm"), dense $dense"

# a damaged file: set aside as .bad, a warning names it, the run goes on cold
f="$(ls "$work/st"/anchors-minillama-2m-*.kva)"
printf 'garbage' | dd of="$f" bs=1 seek=200 conv=notrunc status=none
third="$("$bin" run examples/team.lua --n 6 --kv kvcomm --no-trace --json --state "$work/st" 2>"$work/err3")"
[ "$(field reuse_rate <<< "$third")" == "0" ] && ok "damaged state: the run goes on cold" || bad "damaged state run: $third"
grep -q "checksum" "$work/err3" && grep -q "set aside as" "$work/err3" && ok "damaged state: a warning says what and where" \
  || bad "damaged state warning: $(cat "$work/err3")"
[ -f "$f.bad" ] && [ -f "$f" ] && ok "damaged file kept as .bad, a fresh one saved" || bad "files after damage: $(ls "$work/st")"

out="$("$bin" run examples/team.lua --n 1 --no-trace -q --state '' 2>&1)"; rc=$?
[ $rc -ne 0 ] && grep -q "state_dir" <<< "$out" && ok "empty --state refused" || bad "empty --state: rc $rc, $out"
touch "$work/file"
out="$("$bin" run examples/team.lua --n 1 --no-trace -q --state "$work/file/sub" 2>&1)"; rc=$?
[ $rc -ne 0 ] && grep -q "state_dir" <<< "$out" && ok "--state under a file refused" || bad "--state under a file: rc $rc, $out"

[ $fails -eq 0 ] && echo "state: all passed" || echo "state: $fails failed"
exit $((fails > 0))
