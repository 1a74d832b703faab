"""otlp_check.py [FILE] - checks an OTLP/JSON trace export (`kvmesh trace export --otlp-json`, the daemon's
trace.export) structurally, with the standard library only: the OTLP/JSON rules of interfaces.md §4.4 (lowerCamelCase
fields, hex ids of 32 / 16 characters, 64-bit integers as decimal strings, integer kind and status code, typed
attribute values), parent links that resolve inside the trace, one root, no cycles, times ordered (start <= end, a
child inside its parent, events inside their span), and the GenAI attributes kvmesh promises (operation names,
agent name, usage tokens, the KV partition). Prints "otlp ok: N spans" or each problem; exit status 0 / 1.
Imported by tests/serve/test_protocol.py: check(doc) returns the list of problems and summary(doc) the spans."""
import json
import re
import sys

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")
UINT = re.compile(r"^(0|[1-9][0-9]*)$")
INT = re.compile(r"^-?(0|[1-9][0-9]*)$")
VALUE_KINDS = ("stringValue", "intValue", "doubleValue", "boolValue", "arrayValue", "kvlistValue", "bytesValue")
KV_KEYS = ("kvmesh.kv.exact_tokens", "kvmesh.kv.offset_tokens", "kvmesh.kv.naive_tokens",
           "kvmesh.kv.recomputed_tokens", "kvmesh.kv.fused_tokens")


def _value(v, where, errs):
    if not isinstance(v, dict) or len(v) != 1 or next(iter(v)) not in VALUE_KINDS:
        errs.append(f"{where}: a value is an object with one of {VALUE_KINDS}, got {v!r:.80}")
        return None
    kind, x = next(iter(v.items()))
    ok = {
        "stringValue": lambda: isinstance(x, str),
        "intValue": lambda: isinstance(x, str) and INT.match(x) and -2**63 <= int(x) < 2**63,
        "doubleValue": lambda: isinstance(x, (int, float)) and not isinstance(x, bool),
        "boolValue": lambda: isinstance(x, bool),
        "arrayValue": lambda: isinstance(x, dict) and isinstance(x.get("values", []), list),
        "kvlistValue": lambda: isinstance(x, dict) and isinstance(x.get("values", []), list),
        "bytesValue": lambda: isinstance(x, str),
    }[kind]()
    if not ok:
        errs.append(f"{where}: {kind} has the wrong type or form: {x!r:.80}")
        return None
    if kind == "arrayValue":
        return [_value(e, f"{where}[{i}]", errs) for i, e in enumerate(x.get("values", []))]
    return int(x) if kind == "intValue" else x


def attributes(lst, where, errs):
    """The attributes as a dict key -> Python value; problems appended to errs."""
    out = {}
    if not isinstance(lst, list):
        errs.append(f"{where}: attributes must be an array")
        return out
    for i, a in enumerate(lst):
        if not isinstance(a, dict) or set(a) != {"key", "value"} or not isinstance(a["key"], str) or not a["key"]:
            errs.append(f"{where}.attributes[{i}]: an attribute is {{key, value}} with a non-empty key, got {a!r:.80}")
            continue
        if a["key"] in out:
            errs.append(f"{where}: attribute {a['key']} twice")
        out[a["key"]] = _value(a["value"], f"{where}.{a['key']}", errs)
    return out


def _time(s, what, errs):
    if not isinstance(s, str) or not UINT.match(s) or int(s) >= 2**64:
        errs.append(f"{what} must be a decimal string of a 64-bit unsigned integer, got {s!r}")
        return None
    return int(s)


def check(doc):
    """The problems of an OTLP/JSON document (a parsed dict); [] when it is well formed."""
    errs, spans = [], []
    if not isinstance(doc, dict) or not isinstance(doc.get("resourceSpans"), list) or not doc["resourceSpans"]:
        return ["the document is an object with a non-empty resourceSpans array"]
    for ri, rs in enumerate(doc["resourceSpans"]):
        w = f"resourceSpans[{ri}]"
        if not isinstance(rs, dict) or not isinstance(rs.get("scopeSpans"), list):
            errs.append(f"{w}: needs scopeSpans (an array)")
            continue
        res = attributes(rs.get("resource", {}).get("attributes", []), w + ".resource", errs)
        if res.get("service.name") != "kvmesh" or not isinstance(res.get("service.version"), str):
            errs.append(f"{w}: resource needs service.name = kvmesh and service.version")
        for si, ss in enumerate(rs["scopeSpans"]):
            ws = f"{w}.scopeSpans[{si}]"
            if not isinstance(ss, dict) or not isinstance(ss.get("scope", {}).get("name"), str) or not isinstance(ss.get("spans"), list):
                errs.append(f"{ws}: needs scope.name and spans")
                continue
            for k, s in enumerate(ss["spans"]):
                spans.append((f"{ws}.spans[{k}]", s))
    by_id, parsed = {}, []
    for w, s in spans:
        if not isinstance(s, dict):
            errs.append(f"{w}: a span is an object")
            continue
        for f in ("traceId", "spanId", "name", "kind", "startTimeUnixNano", "endTimeUnixNano"):
            if f not in s:
                errs.append(f"{w}: no {f}")
        tid, sid, pid = s.get("traceId"), s.get("spanId"), s.get("parentSpanId")
        if not isinstance(tid, str) or not HEX32.match(tid) or tid == "0" * 32:
            errs.append(f"{w}: traceId must be 32 lowercase hex characters, not all zero: {tid!r}")
        if not isinstance(sid, str) or not HEX16.match(sid) or sid == "0" * 16:
            errs.append(f"{w}: spanId must be 16 lowercase hex characters, not all zero: {sid!r}")
        if pid not in (None, "") and (not isinstance(pid, str) or not HEX16.match(pid)):
            errs.append(f"{w}: parentSpanId must be 16 lowercase hex characters: {pid!r}")
        if not isinstance(s.get("name"), str) or not s.get("name"):
            errs.append(f"{w}: name must be a non-empty string")
        if not isinstance(s.get("kind"), int) or isinstance(s.get("kind"), bool) or not 0 <= s["kind"] <= 5:
            errs.append(f"{w}: kind must be an integer 0..5")
        t0, t1 = _time(s.get("startTimeUnixNano"), w + ".startTimeUnixNano", errs), _time(s.get("endTimeUnixNano"), w + ".endTimeUnixNano", errs)
        if t0 is not None and t1 is not None and t1 < t0:
            errs.append(f"{w}: ends ({t1}) before it starts ({t0})")
        st = s.get("status", {})
        code = st.get("code", 0) if isinstance(st, dict) else None
        if not isinstance(code, int) or isinstance(code, bool) or code not in (0, 1, 2):
            errs.append(f"{w}: status.code must be the integer 0, 1 or 2")
        if isinstance(st, dict) and "message" in st and not isinstance(st["message"], str):
            errs.append(f"{w}: status.message must be a string")
        attrs = attributes(s.get("attributes", []), w, errs)
        if code == 2 and not isinstance(attrs.get("error.type"), str):
            errs.append(f"{w}: an ERROR span needs error.type")
        for ei, ev in enumerate(s.get("events", [])):
            we = f"{w}.events[{ei}]"
            if not isinstance(ev, dict) or not isinstance(ev.get("name"), str):
                errs.append(f"{we}: an event needs a name")
                continue
            te = _time(ev.get("timeUnixNano"), we + ".timeUnixNano", errs)
            if te is not None and t0 is not None and t1 is not None and not t0 <= te <= t1:
                errs.append(f"{we}: at {te}, outside its span [{t0}, {t1}]")
            attributes(ev.get("attributes", []), we, errs)
        if isinstance(sid, str):
            if (tid, sid) in by_id:
                errs.append(f"{w}: spanId {sid} twice in the trace")
            by_id[(tid, sid)] = (w, s, t0, t1, attrs)
        parsed.append((w, s, t0, t1, attrs))
    roots = {}
    for w, s, t0, t1, attrs in parsed:
        tid, pid = s.get("traceId"), s.get("parentSpanId")
        if not pid:
            roots.setdefault(tid, []).append(w)
            continue
        p = by_id.get((tid, pid))
        if not p:
            errs.append(f"{w}: parentSpanId {pid} names no span of its trace")
            continue
        if None not in (t0, t1, p[2], p[3]) and not (p[2] <= t0 and t1 <= p[3]):
            errs.append(f"{w}: [{t0}, {t1}] lies outside its parent {p[0]} [{p[2]}, {p[3]}]")
        seen, cur = set(), (tid, pid)
        while cur in by_id and cur not in seen:
            seen.add(cur)
            nxt = by_id[cur][1].get("parentSpanId")
            cur = (tid, nxt) if nxt else None
        if cur in seen:
            errs.append(f"{w}: its parent links form a cycle")
    for tid, ws in roots.items():
        if len(ws) != 1:
            errs.append(f"trace {tid}: {len(ws)} root spans ({', '.join(ws)}), expected one")
    # the GenAI conventions, as kvmesh emits them
    for w, s, t0, t1, a in parsed:
        op = a.get("gen_ai.operation.name")
        name = s.get("name", "")
        if op and not name.startswith(op + " "):
            errs.append(f"{w}: name {name!r} does not start with its operation {op!r}")
        if op == "invoke_workflow" and not (isinstance(a.get("gen_ai.workflow.name"), str) and isinstance(a.get("gen_ai.conversation.id"), str)):
            errs.append(f"{w}: invoke_workflow needs gen_ai.workflow.name and gen_ai.conversation.id")
        if op == "invoke_agent":
            need = ("gen_ai.agent.name", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "kvmesh.step.index") + KV_KEYS
            for k in need:
                if k not in a:
                    errs.append(f"{w}: invoke_agent needs {k}")
            if all(isinstance(a.get(k), int) for k in KV_KEYS + ("gen_ai.usage.input_tokens", "gen_ai.usage.cache_read.input_tokens")):
                if a["gen_ai.usage.cache_read.input_tokens"] != sum(a[k] for k in KV_KEYS[:3]):
                    errs.append(f"{w}: cache_read.input_tokens is not exact + offset + naive")
                if sum(a[k] for k in KV_KEYS) not in (0, a["gen_ai.usage.input_tokens"]):
                    errs.append(f"{w}: the KV partition does not sum to the input tokens")
        if op == "chat" and not isinstance(a.get("gen_ai.request.model"), str):
            errs.append(f"{w}: chat needs gen_ai.request.model")
        if op == "execute_tool" and not isinstance(a.get("gen_ai.tool.name"), str):
            errs.append(f"{w}: execute_tool needs gen_ai.tool.name")
        for k in ("gen_ai.input.messages", "gen_ai.output.messages"):
            if k in a:
                try:
                    msgs = json.loads(a[k])
                    assert isinstance(msgs, list) and all(isinstance(m.get("role"), str) and isinstance(m.get("parts"), list) for m in msgs)
                except Exception:
                    errs.append(f"{w}: {k} is not a JSON array of {{role, parts}} messages")
    return errs


def summary(doc):
    """[(name, spanId, parentSpanId, attributes dict, status code)] of every span, in document order."""
    out = []
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                out.append((s.get("name"), s.get("spanId"), s.get("parentSpanId"), attributes(s.get("attributes", []), "", []),
                            s.get("status", {}).get("code", 0)))
    return out


if __name__ == "__main__":
    text = open(sys.argv[1], encoding="utf-8").read() if len(sys.argv) > 1 else sys.stdin.read()
    try:
        d = json.loads(text)
    except ValueError as e:
        print(f"not JSON: {e}")
        sys.exit(1)
    problems = check(d)
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"otlp ok: {len(summary(d))} spans")
