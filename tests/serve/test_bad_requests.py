"""test_bad_requests.py KVMESH - malformed and invalid requests, each answered with one structured error (code,
errno, message, the offending field path, the request id or null) while another client's run completes unharmed
and the daemon keeps serving."""
import json
import sys
import time

import zmq

from daemon import LONG, PAIR, Checks, Daemon

kvmesh = sys.argv[1]
t = Checks()
d = Daemon(kvmesh, "--mock", "--max-message-mb", "1", "--client-timeout-ms", "30000")


def hdr(**kw):
    h = {"v": 1, "id": "bad"}
    h.update(kw)
    return json.dumps(h)


# (what, frames after the identity (bytes or str), expected code, expected field (None = not checked), id expected)
BAD = [
    ("no delimiter frame", [hdr(type="ping")], "KVM_EPROTO", None, None),
    ("only the delimiter", [b""], "KVM_EPROTO", None, None),
    ("an empty header frame", [b"", b""], "KVM_EPROTO", None, None),
    ("a header that is not JSON", [b"", "hello there"], "KVM_EPROTO", None, None),
    ("truncated JSON", [b"", '{"v": 1, "type": "ping", '], "KVM_EPROTO", None, None),
    ("text after the JSON object", [b"", hdr(type="ping") + " trailing"], "KVM_EPROTO", None, None),
    ("a JSON array header", [b"", "[1, 2, 3]"], "KVM_EPROTO", None, None),
    ("a JSON string header", [b"", '"ping"'], "KVM_EPROTO", None, None),
    ("a NUL byte inside the header", [b"", b'{"v":1,"type":"ping",\x00"id":"x"}'], "KVM_EPROTO", None, None),
    ("no v", [b"", json.dumps({"type": "ping", "id": "bad"})], "KVM_EPROTO", "v", "bad"),
    ("v as a string", [b"", hdr(v="1", type="ping")], "KVM_EPROTO", "v", "bad"),
    ("v = 2", [b"", hdr(v=2, type="ping")], "KVM_EVERSION", "v", "bad"),
    ("no type", [b"", hdr()], "KVM_EPROTO", "type", "bad"),
    ("type not a string", [b"", hdr(type=5)], "KVM_EPROTO", "type", "bad"),
    ("an unknown type", [b"", hdr(type="run.explode")], "KVM_EINVAL", "type", "bad"),
    ("no id", [b"", json.dumps({"v": 1, "type": "ping"})], "KVM_EPROTO", "id", None),
    ("id a number", [b"", json.dumps({"v": 1, "type": "ping", "id": 7})], "KVM_EINVAL", "id", None),
    ("id empty", [b"", json.dumps({"v": 1, "type": "ping", "id": ""})], "KVM_EINVAL", "id", None),
    ("id of 65 bytes", [b"", json.dumps({"v": 1, "type": "ping", "id": "x" * 65})], "KVM_EINVAL", "id", None),
    ("an unknown field", [b"", hdr(type="ping", colour="red")], "KVM_EINVAL", "colour", "bad"),
    ("a duplicate key", [b"", '{"v":1,"type":"ping","id":"bad","id":"other"}'], "KVM_EINVAL", "id", "bad"),
    ("a duplicate key inside inputs", [b"", '{"v":1,"type":"run.start","id":"bad","workflow":"pair","inputs":{"a":1,"a":2}}'],
     "KVM_EINVAL", "inputs.a", "bad"),
    ("nesting 100 deep", [b"", '{"v":1,"type":"run.start","id":"bad","workflow":"pair","inputs":{"a":' + "[" * 100 + "]" * 100 + "}}"],
     "KVM_EINVAL", None, "bad"),
    ("deadline_ms negative", [b"", hdr(type="ping", deadline_ms=-5)], "KVM_EINVAL", "deadline_ms", "bad"),
    ("deadline_ms a string", [b"", hdr(type="ping", deadline_ms="5")], "KVM_EINVAL", "deadline_ms", "bad"),
    ("run.start without workflow", [b"", hdr(type="run.start")], "KVM_EINVAL", "workflow", "bad"),
    ("run.start of an unknown workflow", [b"", hdr(type="run.start", workflow="nope")], "KVM_ENOENT", "workflow", "bad"),
    ("run.start with inputs an array", [b"", hdr(type="run.start", workflow="pair", inputs=[1])], "KVM_EINVAL", "inputs", "bad"),
    ("run.start with seed -1", [b"", hdr(type="run.start", workflow="pair", seed=-1)], "KVM_EINVAL", "seed", "bad"),
    ("run.start with seed 'abc'", [b"", hdr(type="run.start", workflow="pair", seed="abc")], "KVM_EINVAL", "seed", "bad"),
    ("run.start with seed 1.5", [b"", hdr(type="run.start", workflow="pair", seed=1.5)], "KVM_EINVAL", "seed", "bad"),
    ("run.start streaming 'bogus'", [b"", hdr(type="run.start", workflow="pair", stream=["bogus"])], "KVM_EINVAL", "stream[0]", "bad"),
    ("run.start streaming a string", [b"", hdr(type="run.start", workflow="pair", stream="tokens")], "KVM_EINVAL", "stream", "bad"),
    ("run.start repeating a stream", [b"", hdr(type="run.start", workflow="pair", stream=["kv", "kv"])], "KVM_EINVAL", "stream[1]", "bad"),
    ("run.start with dataset 'yes'", [b"", hdr(type="run.start", workflow="pair", dataset="yes")], "KVM_EINVAL", "dataset", "bad"),
    ("run.start with kv 'fast'", [b"", hdr(type="run.start", workflow="pair", kv="fast")], "KVM_EINVAL", "kv", "bad"),
    ("run.start with kv 3", [b"", hdr(type="run.start", workflow="pair", kv=3)], "KVM_EINVAL", "kv", "bad"),
    ("run.start from a dataset the graph lacks", [b"", hdr(type="run.start", workflow="pair", dataset=True)], "KVM_EINVAL", "dataset", "bad"),
    ("run.cancel of an unknown run", [b"", hdr(type="run.cancel", run_id="0123")], "KVM_ENOENT", "run_id", "bad"),
    ("run.status without run_id", [b"", hdr(type="run.status")], "KVM_EINVAL", "run_id", "bad"),
    ("run.status with run_id a list", [b"", hdr(type="run.status", run_id=["x"])], "KVM_EINVAL", "run_id", "bad"),
    ("trace.get in format xml", [b"", hdr(type="trace.get", run_id="x", format="xml")], "KVM_EINVAL", "format", "bad"),
    ("trace.export in format otlp", [b"", hdr(type="trace.export", run_id="x", format="otlp")], "KVM_EINVAL", "format", "bad"),
    ("trace.export of an unknown run", [b"", hdr(type="trace.export", run_id="0123")], "KVM_ENOENT", "run_id", "bad"),
    ("workflow.load with a Lua syntax error", [b"", hdr(type="workflow.load", name="broken", source="return {")], "KVM_ELUA_SYNTAX", "source", "bad"),
    ("workflow.load of a script that errors", [b"", hdr(type="workflow.load", name="broken", source="error('no')")], "KVM_ELUA_RUNTIME", "source", "bad"),
    ("workflow.load named '../x'", [b"", hdr(type="workflow.load", name="../x", source="return 1")], "KVM_EINVAL", "name", "bad"),
    ("workflow.load of a taken name", [b"", hdr(type="workflow.load", name="pair", source=PAIR)], "KVM_EINVAL", "name", "bad"),
    ("workflow.load without source", [b"", hdr(type="workflow.load", name="w")], "KVM_EINVAL", "source", "bad"),
    ("workflow.load with source and a frame", [b"", hdr(type="workflow.load", name="w", source="x",
                                                     frames=[{"dtype": "u8", "shape": [1]}]), b"x"], "KVM_EINVAL", "source", "bad"),
    ("workflow.drop of an unknown name", [b"", hdr(type="workflow.drop", name="nope")], "KVM_ENOENT", "name", "bad"),
    ("frames described but not sent", [b"", hdr(type="workflow.load", name="w", frames=[{"dtype": "u8", "shape": [4]}])],
     "KVM_EPROTO", "frames", "bad"),
    ("a frame whose size is not its shape's", [b"", hdr(type="workflow.load", name="w", frames=[{"dtype": "i32", "shape": [4]}]), b"abc"],
     "KVM_EPROTO", "frames[0]", "bad"),
    ("a frame of an unknown dtype", [b"", hdr(type="workflow.load", name="w", frames=[{"dtype": "q7", "shape": [1]}]), b"a"],
     "KVM_EPROTO", "frames[0]", "bad"),
    ("a payload frame on ping", [b"", hdr(type="ping"), b"extra"], "KVM_EPROTO", "frames", "bad"),
    ("a header over 64 KiB", [b"", hdr(type="ping", trace="x" * 70000)], "KVM_EPROTO", None, None),
    ("a message over max_message", [b"", hdr(type="workflow.load", name="big", frames=[{"dtype": "u8", "shape": [2 << 20]}]),
                                    b"x" * (2 << 20)], "KVM_EPROTO", None, None),
    ("40 frames", [b"", hdr(type="ping")] + [b"x"] * 38, "KVM_EPROTO", None, None),
    ("hello without version 1", [b"", hdr(type="hello", versions=[2, 3])], "KVM_EVERSION", "versions", "bad"),
    ("hello with versions of strings", [b"", hdr(type="hello", versions=["1"])], "KVM_EINVAL", "versions[0]", "bad"),
]

try:
    good = d.client()
    good.hello()
    good.workflow_load("pair", PAIR)
    good.workflow_load("long", LONG % 3000)
    # another client's run goes on during the whole barrage
    rid = good.start("long", inputs={"input": "unharmed run"}, stream=["tokens"])
    stream = good.messages(rid)
    first, _ = next(stream)
    t.check(first["type"] == "run.accepted", "the other client's run is accepted")

    ctx = zmq.Context.instance()
    bad = ctx.socket(zmq.DEALER)
    bad.setsockopt(zmq.LINGER, 0)
    bad.connect(d.ctl)
    kinds = 0
    for what, frames, code, field, rid_exp in BAD:
        bad.send_multipart([f if isinstance(f, bytes) else f.encode() for f in frames])
        if not bad.poll(30000):
            t.check(False, "%s: answered" % what)
            continue
        parts = bad.recv_multipart()
        r = json.loads(parts[1]) if len(parts) == 2 and parts[0] == b"" else {}
        ok = (r.get("type") == "error" and r.get("code") == code and isinstance(r.get("errno"), int) and r.get("message")
              and r.get("id") == rid_exp and (field is None or r.get("detail", {}).get("field") == field))
        kinds += bool(ok)
        t.check(ok, "%s: %s%s (got %s %s %r)" % (what, code, " at '%s'" % field if field else "", r.get("code"),
                                                   r.get("detail", {}).get("field"), r.get("message")))
        # exactly one reply: nothing more comes for it
        if bad.poll(0):
            t.check(False, "%s: exactly one reply (got another: %r)" % (what, bad.recv_multipart()[:2]))
    t.check(kinds >= 30, "at least 30 kinds of bad requests answered with a structured error (%d)" % kinds)

    # a duplicate id among a client's requests going
    dup = d.client()
    a = dup.start("long", inputs={"input": "first"}, id="same")
    b = dup.start("long", inputs={"input": "second"}, id="same")
    got = [m for m, _ in dup.messages("same")]
    errs = [m for m in got if m["type"] == "error"]
    t.check(errs and errs[0]["code"] == "KVM_EINVAL" and errs[0]["detail"]["field"] == "id", "a duplicate id of a request going is KVM_EINVAL at 'id'")

    tokens, last = 0, None
    for m, _ in stream:
        tokens += m["type"] == "token"
        last = m
    t.check(last["type"] == "done" and last["usage"]["output_tokens"] == 3000, "the other client's run completes unharmed (%s, %d tokens)" % (last["type"], last.get("usage", {}).get("output_tokens", -1)))
    t.check(tokens >= 1, "and it streamed its tokens")
    t.check(good.ping()["type"] == "pong", "the daemon still serves")
    s = good.stats()
    t.check(s["server"]["bad_requests"] >= 30, "stats counts the bad requests (%d)" % s["server"]["bad_requests"])
    bad.close(0)
    t.check(d.stop() == 0, "the daemon exits 0")
finally:
    d.kill()
sys.exit(t.done())
