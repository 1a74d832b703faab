#!/usr/bin/env bash
# trace_export.sh KVMESH SHARED - `kvmesh trace export` (issue 13 item 1): mock runs exported as OTLP/JSON (checked
# by tests/support/otlp_check.py: ids, parent links, times, attribute types, GenAI attributes), as Who&When (history
# = the steps blame sees) and as JSONL (the complete records); -o, --content, a torn trace, bad arguments.
set -uo pipefail
kvmesh=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
check=tests/support/otlp_check.py
# 'team': an agent, a tool, and a func that calls an agent twice through ctx:call
cat > "$tmp/team.lua" <<'LUA'
local kvm = kvmesh
local m = kvm.model("mock:echo")
local helper = kvm.agent{ name = "helper", model = m, template = "help with {input}", max_tokens = 6 }
local g = kvm.graph{ name = "team" }
g:agent("writer", { model = m, role = "You write.", template = "write {input}", max_tokens = 8 })
g:tool("lookup", function(state, last) return { found = "yes" } end)
g:func("ask", function(state, last, ctx)
  ctx:call(helper, { input = "one" })
  ctx:call(helper, { input = "two" })
end)
g:edge(kvm.START, "writer")
g:edge("writer", "lookup")
g:edge("lookup", "ask")
return g
LUA
# 'broken': a tool whose Lua fails after the agent answered
cat > "$tmp/broken.lua" <<'LUA'
local kvm = kvmesh
local g = kvm.graph{ name = "broken" }
g:agent("reader", { model = kvm.model("mock:echo"), template = "read {input}", max_tokens = 4 })
g:tool("wheel", function(state, last) if last.reader then error("the wheel came off") end end)
g:edge(kvm.START, "reader")
g:edge("reader", "wheel")
return g
LUA
"$kvmesh" run "$tmp/team.lua" --mock --trace "$tmp/a" -q --input input="a long enough task text" > /dev/null 2>&1 || fail "team run"
"$kvmesh" run "$tmp/broken.lua" --mock --trace "$tmp/b" -q --input input="hello" > /dev/null 2>&1 && fail "broken should fail"
ra=$(ls -d "$tmp"/a/*/ | head -1); rb=$(ls -d "$tmp"/b/*/ | head -1)
ida=$(basename "$ra")

# OTLP/JSON (the default): well formed, the run's span, two agent spans under the func, chat spans, the tool
"$kvmesh" trace export "$ra" > "$tmp/a.json" || fail "export team"
python3 "$check" "$tmp/a.json" || fail "team OTLP: $(head -c 400 "$tmp/a.json")"
python3 - "$tmp/a.json" "$ida" <<'PY' || fail "team OTLP content"
import json, sys
sys.path.insert(0, "tests/support")
from otlp_check import summary
spans = summary(json.load(open(sys.argv[1])))
names = [s[0] for s in spans]
by_id = {s[1]: s for s in spans}
root = [s for s in spans if not s[2]]
assert len(root) == 1 and root[0][0] == "invoke_workflow team", names
assert root[0][3]["gen_ai.conversation.id"] == sys.argv[2] and root[0][4] == 1, root[0]
assert names.count("invoke_agent writer") == 1 and names.count("invoke_agent helper") == 2, names
assert "execute_tool lookup" in names and "kvmesh.func ask" in names, names
ask = [s for s in spans if s[0] == "kvmesh.func ask"][0]
for s in spans:
    if s[0] == "invoke_agent helper":
        assert s[2] == ask[1] and s[3]["kvmesh.step.via"] == "ctx:call", "a ctx:call agent span hangs under its func"
    if s[0] == "invoke_agent writer":
        assert s[2] == root[0][1], "an agent node's span hangs under the run"
        a = s[3]
        assert a["gen_ai.agent.name"] == "writer" and a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0, a
        chat = [c for c in spans if c[2] == s[1]]
        assert len(chat) == 1 and chat[0][0].startswith("chat "), chat
        msgs = json.loads(chat[0][3]["gen_ai.input.messages"])
        assert msgs[0]["role"] == "system" and msgs[0]["parts"][0]["content"] == "You write.", msgs
        assert "write a long enough task text" in msgs[1]["parts"][0]["content"], msgs
        assert json.loads(chat[0][3]["gen_ai.output.messages"])[0]["role"] == "assistant"
print("team OTLP ok:", len(spans), "spans")
PY
# the same trace exports the same text (span ids derive from the run id)
"$kvmesh" trace export "$ra" --otlp-json | cmp -s - "$tmp/a.json" || fail "two exports of one trace differ"
# --content none: no message content; --content truncated cuts to 4 KiB per message (checked in test_trace_export.c)
"$kvmesh" trace export "$ra" --content none -o "$tmp/none.json" || fail "export --content none"
python3 "$check" "$tmp/none.json" > /dev/null || fail "--content none OTLP"
grep -q "gen_ai.input.messages" "$tmp/none.json" && fail "--content none still carries messages"
grep -q "gen_ai.input.messages" "$tmp/a.json" || fail "the default export carries messages"

# a failed run: status ERROR with error.type and an exception event, on the tool's span and the run's
"$kvmesh" trace export "$rb" -o "$tmp/b.json" || fail "export broken"
python3 "$check" "$tmp/b.json" || fail "broken OTLP"
python3 - "$tmp/b.json" <<'PY' || fail "broken OTLP content"
import json, sys
sys.path.insert(0, "tests/support")
from otlp_check import summary
d = json.load(open(sys.argv[1]))
spans = summary(d)
wheel = [s for s in spans if s[0] == "execute_tool wheel"][0]
assert wheel[4] == 2 and wheel[3]["error.type"].startswith("KVM_") and wheel[3]["gen_ai.tool.name"] == "wheel", wheel
root = [s for s in spans if not s[2]][0]
assert root[4] == 2, root
raw = [s for rs in d["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"] if s["name"] == "execute_tool wheel"][0]
ev = raw["events"][0]
assert ev["name"] == "exception" and any(a["key"] == "exception.message" and "the wheel came off" in a["value"]["stringValue"] for a in ev["attributes"]), ev
print("broken OTLP ok")
PY

# Who&When: history[i] = step i as blame sees it (0 = the task), names and roles
"$kvmesh" trace export "$rb" --whowhen > "$tmp/b.ww" || fail "export --whowhen"
python3 - "$tmp/b.ww" <<'PY' || fail "Who&When content: $(head -c 400 "$tmp/b.ww")"
import json, sys
d = json.load(open(sys.argv[1]))
h = d["history"]
assert d["is_correct"] is False and d["workflow"] == "broken", d
assert [m["name"] for m in h] == ["user", "reader", "wheel"], h
assert [m["role"] for m in h] == ["user", "assistant", "tool"], h
assert "hello" in h[0]["content"] and "the wheel came off" in h[2]["content"], h
assert all(set(m) == {"content", "role", "name"} for m in h)
print("Who&When ok:", len(h), "steps")
PY
# JSONL: the complete records, as stored
"$kvmesh" trace export "$ra" --jsonl | cmp -s - "$ra/events.jsonl" || fail "--jsonl is not the stored records"

# a torn trace (killed mid-write): the complete records only, and the run's span left UNSET
mkdir -p "$tmp/torn/run"
head -c -25 "$ra/events.jsonl" > "$tmp/torn/run/events.jsonl"
"$kvmesh" trace export "$tmp/torn/run" --jsonl > "$tmp/torn.jsonl" || fail "export of a torn trace"
[ "$(wc -l < "$tmp/torn.jsonl")" -eq $(( $(wc -l < "$ra/events.jsonl") - 1 )) ] || fail "torn: the complete records only"
"$kvmesh" trace export "$tmp/torn/run" > "$tmp/torn.json" || fail "OTLP export of a torn trace"
python3 "$check" "$tmp/torn.json" > /dev/null || fail "torn OTLP"
grep -q '"kvmesh.run.ended","value":{"boolValue":false}' "$tmp/torn.json" || fail "torn: the run did not end"
# a bad line in the middle: an error naming file:line, exit 1, nothing written with -o
mkdir -p "$tmp/bad/run"
{ head -1 "$ra/events.jsonl"; echo '{"t":"step","idx":"x"'; tail -n +2 "$ra/events.jsonl"; } > "$tmp/bad/run/events.jsonl"
"$kvmesh" trace export "$tmp/bad/run" -o "$tmp/bad.json" 2> "$tmp/err"; [ $? -eq 1 ] || fail "a bad line should exit 1"
grep -q "events.jsonl:2" "$tmp/err" || fail "the error names file:line: $(cat "$tmp/err")"
[ -e "$tmp/bad.json" ] && fail "-o written on an error"
# arguments
"$kvmesh" trace export --help | grep -q "trace export RUN_DIR" || fail "--help"
"$kvmesh" trace export "$ra" --yaml > /dev/null 2>&1; [ $? -eq 2 ] || fail "an unknown option should exit 2"
"$kvmesh" trace export "$ra" --content some > /dev/null 2>&1; [ $? -eq 2 ] || fail "a bad --content should exit 2"
"$kvmesh" trace export "$ra" -o > /dev/null 2>&1; [ $? -eq 2 ] || fail "-o without a file should exit 2"
"$kvmesh" trace export "$tmp/nowhere" > /dev/null 2> "$tmp/err"; [ $? -eq 1 ] || fail "a missing run should exit 1"
grep -q "nowhere" "$tmp/err" || fail "the error names the run: $(cat "$tmp/err")"
"$kvmesh" trace export "$ra" -o "$tmp/no/such/dir/x.json" 2> "$tmp/err"; [ $? -eq 1 ] || fail "an unwritable -o should exit 1"
grep -q "cannot write" "$tmp/err" || fail "unwritable -o message: $(cat "$tmp/err")"
echo "trace export ok"
