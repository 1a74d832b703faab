#!/usr/bin/env bash
# resume.sh KVMESH SHARED - checkpoints, resume and interrupts through `kvmesh run` (issue 18 items 2 and 3), on
# the bundled model: examples/resume.lua resumed after a crash, from a chosen checkpoint and with a fixed script;
# examples/approval.lua answered by --answer, parked without one (exit 3) and resumed from its trace;
# examples/subgraph_approval.lua parked inside a subgraph and resumed there.
set -euo pipefail
kvmesh=$(realpath "$1")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# the "outputs:" block of a run's stdout, its lines sorted (a Lua table has no key order)
outputs() { sed -n '/^outputs:/,/^$/p' "$1" | sort; }
fail() { echo "FAIL: $*"; for f in "$tmp"/*.out "$tmp"/*.err; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done; exit 1; }

# ---- resume.lua: the uninterrupted run
"$kvmesh" run examples/resume.lua --input input="a cat who learns to fly" --trace "$tmp/t" > "$tmp/a.out" 2> "$tmp/a.err" || fail "resume.lua"
grep -q "checked: true" "$tmp/a.out" || fail "resume.lua did not check"
run=$(ls -d "$tmp"/t/*/); run=${run%/}
[ "$(grep -c '"t":"checkpoint"' "$run/events.jsonl")" = 4 ] || fail "4 checkpoints expected"
outputs "$tmp/a.out" > "$tmp/want"
# a crash after super-step 2: the trace cut after its second checkpoint, no run.end, no index.json
mkdir -p "$tmp/crash/x"
awk '{print} /"t":"checkpoint"/ && ++n == 2 {exit}' "$run/events.jsonl" > "$tmp/crash/x/events.jsonl"
"$kvmesh" run --resume "$tmp/crash/x" --trace "$tmp/t2" > "$tmp/b.out" 2> "$tmp/b.err" || fail "resume after a crash"
outputs "$tmp/b.out" | cmp -s - "$tmp/want" || fail "the resumed run's outputs differ"
grep -q "resuming $tmp/crash/x (graph 'resume') from its last checkpoint" "$tmp/b.err" || fail "no resume banner"
grep -q "\[step 2\]" "$tmp/b.err" && fail "super-step 2 ran again"
grep -q "\[step 3\] count" "$tmp/b.err" && grep -q "\[step 4\] check" "$tmp/b.err" || fail "steps 3 and 4 did not run"
# from a chosen checkpoint of the whole trace
"$kvmesh" run --resume "$run" --from-step 1 --no-trace > "$tmp/c.out" 2> "$tmp/c.err" || fail "--from-step 1"
outputs "$tmp/c.out" | cmp -s - "$tmp/want" || fail "--from-step 1: outputs differ"
grep -q "\[step 2\] draft" "$tmp/c.err" || fail "--from-step 1 did not run super-step 2"
# a run that failed on a bug, resumed with the fixed script: only the failed step runs again
sed 's/local max_words = 200/local max_words = 0/' examples/resume.lua > "$tmp/buggy.lua"
"$kvmesh" run "$tmp/buggy.lua" --model models/minillama-2m --input input="a cat who learns to fly" --trace "$tmp/t3" \
  > "$tmp/d.out" 2> "$tmp/d.err" && fail "the buggy script succeeded"
grep -q "over 0" "$tmp/d.err" || fail "the buggy script failed for another reason"
bad=$(ls -d "$tmp"/t3/*/)
"$kvmesh" run examples/resume.lua --resume "$bad" --no-trace > "$tmp/e.out" 2> "$tmp/e.err" || fail "resume with the fixed script"
outputs "$tmp/e.out" | cmp -s - "$tmp/want" || fail "fixed script: outputs differ"
[ "$(grep -c '\[step' "$tmp/e.err")" = 1 ] || fail "only 'check' should run again"
# the resumed trace names its origin and replays from its checkpoint
r2=$(ls -d "$tmp"/t2/*/)
grep -q "\"resumed_from\":\"$(basename "$run")\"" "$r2/events.jsonl" || fail "resumed_from missing"
"$kvmesh" trace show "$r2" > "$tmp/f.out" 2>&1 || fail "trace show of a resumed run"
grep -q "resumed from run $(basename "$run") after super-step 2" "$tmp/f.out" || fail "trace show: no 'resumed from'"
"$kvmesh" trace replay "$r2" > "$tmp/f.out" 2>&1 || fail "replay of a resumed run"
grep -q " 0 different" "$tmp/f.out" || fail "replay of a resumed run differs"
# bad uses: clear errors
"$kvmesh" run --from-step 2 examples/resume.lua > "$tmp/g.err" 2>&1 && fail "--from-step without --resume"
grep -q "goes with --resume" "$tmp/g.err" || fail "--from-step message"
"$kvmesh" run --resume "$run" --from-step 9 --no-trace > "$tmp/g.err" 2>&1 && fail "--from-step 9"
grep -q "no checkpoint after super-step 9 (its last is after super-step 4)" "$tmp/g.err" || fail "--from-step 9 message"
"$kvmesh" run --resume "$tmp/nothing" > "$tmp/g.err" 2>&1 && fail "--resume of nothing"
grep -q "nothing" "$tmp/g.err" || fail "--resume of nothing: message"

# ---- approval.lua: interrupts
"$kvmesh" run examples/approval.lua --input input="a cat" --answer yes --trace "$tmp/a" < /dev/null > "$tmp/h.out" 2> "$tmp/h.err" ||
  fail "approval --answer yes"
grep -q "decision: published" "$tmp/h.out" && grep -q "announcement: " "$tmp/h.out" || fail "approval: not published"
grep -q "interrupt from node 'approve': .*Publish this line" "$tmp/h.err" || fail "approval: the question was not shown"
rc=0; "$kvmesh" run examples/approval.lua --input input="a cat" --trace "$tmp/p" < /dev/null > "$tmp/i.out" 2> "$tmp/i.err" || rc=$?
[ "$rc" = 3 ] || fail "a parked run must exit 3 (got $rc)"
grep -q "the run is parked waiting for an answer" "$tmp/i.err" || fail "parked: no message"
cmd=$(sed -n 's/^resume it with: //p' "$tmp/i.err"); [ -n "$cmd" ] || fail "parked: no resume command"
parked=$(ls -d "$tmp"/p/*/)
grep -q '"t":"interrupt"' "$parked/events.jsonl" && grep -q 'KVM_EINTERRUPTED' "$parked/events.jsonl" || fail "the trace lacks the interrupt"
"$kvmesh" trace show "$parked" > "$tmp/i2.out" 2>&1 || fail "trace show of a parked run"
grep -q "interrupt from approve: {" "$tmp/i2.out" && grep -q "result: error (KVM_EINTERRUPTED)" "$tmp/i2.out" || fail "trace show: the interrupt"
# the command printed, with an answer (VALUE replaced)
cmd=${cmd/#kvmesh /}
"$kvmesh" ${cmd/--answer VALUE/--answer-json \"no\"} --no-trace < /dev/null > "$tmp/j.out" 2> "$tmp/j.err" || fail "resume with an answer"
grep -q "decision: rejected" "$tmp/j.out" || fail "the answer 'no' did not reject"
grep -q "announcement" "$tmp/j.out" && fail "a rejected line was announced"
"$kvmesh" run --resume "$parked" --answer yes --no-trace < /dev/null > "$tmp/k.out" 2> "$tmp/k.err" || fail "resume with yes"
grep -q "decision: published" "$tmp/k.out" || fail "the answer 'yes' did not publish"
"$kvmesh" run --resume "$run" --answer yes --no-trace < /dev/null > "$tmp/l.err" 2>&1 && fail "an answer to a run that was not parked"
grep -q "nothing to answer" "$tmp/l.err" || fail "answer without interrupt: message"
"$kvmesh" run examples/approval.lua --answer-json '{oops' < /dev/null > "$tmp/l.err" 2>&1 && fail "bad --answer-json accepted"
grep -q "answer-json takes a JSON value" "$tmp/l.err" || fail "bad --answer-json: message"
rc=0; "$kvmesh" run examples/approval.lua --input input="a cat" --json --no-trace < /dev/null > "$tmp/n.out" 2> "$tmp/n.err" || rc=$?
[ "$rc" = 3 ] && grep -q '"status":.*"KVM_EINTERRUPTED"' "$tmp/n.out" && grep -q '"node":.*"approve"' "$tmp/n.out" ||
  fail "--json of a parked run"
# on a terminal the question is asked and the typed line is the answer (script(1) gives the run a pty)
if command -v script > /dev/null; then
  echo no | script -qec "'$kvmesh' run examples/approval.lua --input input='a cat' --no-trace" /dev/null > "$tmp/m.out" 2>&1 ||
    fail "approval on a terminal"
  tr -d '\r' < "$tmp/m.out" > "$tmp/m2.out"
  grep -q "^answer> " "$tmp/m2.out" && grep -q "decision: rejected" "$tmp/m2.out" || fail "approval on a terminal: no question or answer"
else
  echo "SKIP the terminal case: no script(1)"
fi

# ---- subgraph_approval.lua: an interrupt inside a subgraph parks the run; the resume goes on inside the subgraph
sa=examples/subgraph_approval.lua
"$kvmesh" run $sa --input input="a cat" --answer yes --no-trace < /dev/null > "$tmp/s1.out" 2> "$tmp/s1.err" || fail "subgraph_approval --answer yes"
grep -q "interrupt from node 'review/approve': .*Publish this line" "$tmp/s1.err" || fail "subgraph_approval: the question was not shown"
grep -q "verdict: published" "$tmp/s1.out" && grep -q "news: " "$tmp/s1.out" || fail "subgraph_approval: not published"
rc=0; "$kvmesh" run $sa --input input="a cat" --trace "$tmp/sp" < /dev/null > "$tmp/s2.out" 2> "$tmp/s2.err" || rc=$?
[ "$rc" = 3 ] || fail "a run parked in a subgraph must exit 3 (got $rc)"
sparked=$(ls -d "$tmp"/sp/*/); sparked=${sparked%/}
grep -q '"t":"checkpoint".*"path":"review@2"' "$sparked/events.jsonl" || fail "the subgraph's checkpoint is not in the trace"
grep -q '"t":"interrupt".*"path":"review@2"' "$sparked/events.jsonl" || fail "the interrupt names no subgraph path"
"$kvmesh" run --resume "$sparked" --answer yes --no-trace < /dev/null > "$tmp/s3.out" 2> "$tmp/s3.err" || fail "resume inside the subgraph"
outputs "$tmp/s3.out" | cmp -s - <(outputs "$tmp/s1.out") || fail "resumed in the subgraph: outputs differ from the run answered at once"
grep -q "review/draft" "$tmp/s3.err" && fail "the resume made review's draft again (it must go on after it)"
grep -q "review/polish" "$tmp/s3.err" || fail "the resume did not polish"
"$kvmesh" run --resume "$sparked" --answer no --no-trace < /dev/null > "$tmp/s4.out" 2> "$tmp/s4.err" || fail "resume with no"
grep -q "verdict: rejected" "$tmp/s4.out" && ! grep -q "news: [^n]" "$tmp/s4.out" || fail "the answer 'no' did not reject"
echo "resume ok"
