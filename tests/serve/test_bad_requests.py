"""test_bad_requests.py KVMESH - malformed and invalid requests, each answered with one structured error (code,
errno, message, the offending field path, the request id or null) while another client's run completes unharmed
and the daemon keeps serving."""
import json
import os
import struct
import sys
import time

import zmq

from daemon import LONG, PAIR, ROOT, Checks, Daemon

kvmesh = sys.argv[1]
t = Checks()
d = Daemon(kvmesh, "--mock", "--max-message-mb", "1", "--client-timeout-ms", "30000")


MINI = os.path.join(ROOT, "models", "minillama-2m")
IDS_DESC = {"name": "token_ids", "dtype": "i32", "shape": [2]}
IDS = struct.pack("<2i", 1, 100)


def hdr(**kw):
    h = {"v": 1, "id": "bad"}
    h.update(kw)
    return json.dumps(h)


def seg(ids=(1,), names=("token_ids", "k", "v"), kshape=None, **kw):
    """The frames of a segment.put of one token for "mini" (6 layers, 2 KV heads, head_dim 32), a field changed or
    dropped (None) by kw."""
    f = dict(segment_id="s", model="mini", dtype="f32", layers=6, kv_heads=2, head_dim=32)
    f.update(kw)
    f = {k: v for k, v in f.items() if v is not None}
    es = {"f32": 4, "bf16": 2}.get(f.get("dtype"), 4)
    fd = f.get("dtype") if f.get("dtype") in ("f32", "bf16") else "f32"  # frames of a valid dtype: the header's is checked
    L, H, D = f.get("layers") or 6, f.get("kv_heads") or 2, f.get("head_dim") or 32
    shape = [L, H, len(ids), D]
    kv = bytes(es * L * H * len(ids) * D)
    ks = kshape or shape
    kb = bytes(es * ks[0] * ks[1] * ks[2] * ks[3])
    desc = [{"name": names[0], "dtype": "i32", "shape": [len(ids)]}, {"name": names[1], "dtype": fd, "shape": ks},
            {"name": names[2], "dtype": fd, "shape": shape}]
    if names[0] == "k":  # out of order: the descriptors follow the names, the bytes stay
        desc[0], desc[1] = {"name": "k", "dtype": "i32", "shape": [len(ids)]}, {"name": "token_ids", "dtype": fd, "shape": ks}
    return [b"", hdr(type="segment.put", frames=desc, **f), struct.pack("<%di" % len(ids), *ids), kb, kv]


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
    # models, generate, attribute, the error-schema cache ("mini" is loaded, the daemon keeps no traces)
    ("model.load without path", [b"", hdr(type="model.load", name="m")], "KVM_EINVAL", "path", "bad"),
    ("model.load with path a number", [b"", hdr(type="model.load", name="m", path=5)], "KVM_EINVAL", "path", "bad"),
    ("model.load named '../m'", [b"", hdr(type="model.load", name="../m", path="x")], "KVM_EINVAL", "name", "bad"),
    ("model.load on backend 'tpu'", [b"", hdr(type="model.load", name="m", path="x", backend="tpu")], "KVM_EINVAL", "backend", "bad"),
    ("model.load of a missing directory", [b"", hdr(type="model.load", name="m", path="/nonexistent/model")], None, "path", "bad"),
    ("model.load of a taken name", [b"", hdr(type="model.load", name="mini", path=MINI)], "KVM_EINVAL", "name", "bad"),
    ("model.unload of an unknown model", [b"", hdr(type="model.unload", name="nope")], "KVM_ENOENT", "name", "bad"),
    ("generate without model", [b"", hdr(type="generate", prompt="x")], "KVM_EINVAL", "model", "bad"),
    ("generate on an unknown model", [b"", hdr(type="generate", model="nope", prompt="x")], "KVM_ENOENT", "model", "bad"),
    ("generate without prompt", [b"", hdr(type="generate", model="mini")], "KVM_EINVAL", "prompt", "bad"),
    ("generate with an empty prompt", [b"", hdr(type="generate", model="mini", prompt="")], "KVM_EINVAL", "prompt", "bad"),
    ("generate with max_tokens 0", [b"", hdr(type="generate", model="mini", prompt="x", max_tokens=0)], "KVM_EINVAL", "max_tokens", "bad"),
    ("generate with max_tokens 1.5", [b"", hdr(type="generate", model="mini", prompt="x", max_tokens=1.5)], "KVM_EINVAL", "max_tokens", "bad"),
    ("generate with max_tokens '8'", [b"", hdr(type="generate", model="mini", prompt="x", max_tokens="8")], "KVM_EINVAL", "max_tokens", "bad"),
    ("generate with temperature -1", [b"", hdr(type="generate", model="mini", prompt="x", temperature=-1)], "KVM_EINVAL", "temperature", "bad"),
    ("generate with top_p 0", [b"", hdr(type="generate", model="mini", prompt="x", top_p=0)], "KVM_EINVAL", "top_p", "bad"),
    ("generate with seed -1", [b"", hdr(type="generate", model="mini", prompt="x", seed=-1)], "KVM_EINVAL", "seed", "bad"),
    ("generate with stop a string", [b"", hdr(type="generate", model="mini", prompt="x", stop="\n")], "KVM_EINVAL", "stop", "bad"),
    ("generate with an empty stop string", [b"", hdr(type="generate", model="mini", prompt="x", stop=[""])], "KVM_EINVAL", "stop[0]", "bad"),
    ("generate with 9 stop strings", [b"", hdr(type="generate", model="mini", prompt="x", stop=["a"] * 9)], "KVM_EINVAL", "stop", "bad"),
    ("generate with prompt and token_ids", [b"", hdr(type="generate", model="mini", prompt="x", frames=[IDS_DESC]), IDS],
     "KVM_EINVAL", "prompt", "bad"),
    ("generate with token_ids of f32", [b"", hdr(type="generate", model="mini", frames=[{"name": "token_ids", "dtype": "f32", "shape": [2]}]), IDS],
     "KVM_EINVAL", "frames[0]", "bad"),
    ("generate with token_ids shorter than their shape", [b"", hdr(type="generate", model="mini", frames=[{"dtype": "i32", "shape": [3]}]), IDS],
     "KVM_EPROTO", "frames[0]", "bad"),
    ("generate with a token id past the vocabulary", [b"", hdr(type="generate", model="mini", frames=[IDS_DESC]), struct.pack("<2i", 1, 1 << 30)],
     "KVM_ERANGE", "frames[0]", "bad"),
    ("generate.cancel without request_id", [b"", hdr(type="generate.cancel")], "KVM_EINVAL", "request_id", "bad"),
    ("generate.cancel with a numeric request_id", [b"", hdr(type="generate.cancel", request_id=7)], "KVM_EINVAL", "request_id", "bad"),
    ("generate.cancel of no generate going", [b"", hdr(type="generate.cancel", request_id="r-404")], "KVM_ENOENT", "request_id", "bad"),
    ("generate.cancel with an unknown field", [b"", hdr(type="generate.cancel", request_id="r-1", run_id="x")], "KVM_EINVAL", "run_id", "bad"),
    ("attribute without run_id", [b"", hdr(type="attribute")], "KVM_EINVAL", "run_id", "bad"),
    ("attribute of an unknown run", [b"", hdr(type="attribute", run_id="0123")], "KVM_ENOENT", "run_id", "bad"),
    ("attribute with k 0", [b"", hdr(type="attribute", run_id="0123", k=0)], "KVM_EINVAL", "k", "bad"),
    ("cache.show of entry -1", [b"", hdr(type="cache.show", entry=-1)], "KVM_EINVAL", "entry", "bad"),
    ("cache.show of an unknown entry", [b"", hdr(type="cache.show", entry=99)], "KVM_ENOENT", "entry", "bad"),
    ("cache.pin without entry", [b"", hdr(type="cache.pin")], "KVM_EINVAL", "entry", "bad"),
    ("cache.pin with pinned 'yes'", [b"", hdr(type="cache.pin", entry=0, pinned="yes")], "KVM_EINVAL", "pinned", "bad"),
    ("cache.evict of an unknown entry", [b"", hdr(type="cache.evict", entry=7)], "KVM_ENOENT", "entry", "bad"),
    ("cache.label without step", [b"", hdr(type="cache.label", run_id="0123", agent="a")], "KVM_EINVAL", "step", "bad"),
    ("cache.label without agent", [b"", hdr(type="cache.label", run_id="0123", step=1)], "KVM_EINVAL", "agent", "bad"),
    ("cache.label of an unknown run", [b"", hdr(type="cache.label", run_id="0123", agent="a", step=1)], "KVM_ENOENT", "run_id", "bad"),
    # segments ("mini": 6 layers, 2 KV heads, head_dim 32, f32 KV on the CPU)
    ("segment.put without segment_id", seg(segment_id=None), "KVM_EINVAL", "segment_id", "bad"),
    ("segment.put without layers", seg(layers=None), "KVM_EINVAL", "layers", "bad"),
    ("segment.put with head_dim 0", seg(head_dim=0), "KVM_EINVAL", "head_dim", "bad"),
    ("segment.put in dtype f64", seg(dtype="f64"), "KVM_EINVAL", "dtype", "bad"),
    ("segment.put with two frames", seg()[:-1], "KVM_EPROTO", "frames", "bad"),
    ("segment.put with four frames", seg() + [b"x"], "KVM_EPROTO", "frames", "bad"),
    ("segment.put with k of another shape", seg(kshape=[6, 2, 2, 16]), "KVM_EINVAL", "frames[1]", "bad"),
    ("segment.put with frames out of order", seg(names=["k", "token_ids", "v"]), "KVM_EINVAL", "frames[0]", "bad"),
    ("segment.put of an unknown model", seg(model="nope"), "KVM_ENOENT", "model", "bad"),
    ("segment.put with kv_heads the model lacks", seg(kv_heads=4), "KVM_ESHAPE", "kv_heads", "bad"),
    ("segment.put in the wrong cache dtype", seg(dtype="bf16"), "KVM_EDTYPE", "dtype", "bad"),
    ("segment.put with a token id past the vocabulary", seg(ids=[1 << 20]), "KVM_ERANGE", "frames[0]", "bad"),
    ("segment.put past the model's context", seg(frame=100000), "KVM_ERANGE", "frame", "bad"),
    ("segment.get of an unknown segment", [b"", hdr(type="segment.get", segment_id="nope")], "KVM_ENOENT", "segment_id", "bad"),
    ("segment.drop of '../x'", [b"", hdr(type="segment.drop", segment_id="../x")], "KVM_EINVAL", "segment_id", "bad"),
]

try:
    good = d.client()
    good.hello()
    good.workflow_load("pair", PAIR)
    good.workflow_load("long", LONG % 3000)
    good.model_load("mini", MINI)
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
        ok = (r.get("type") == "error" and (code is None or r.get("code") == code) and isinstance(r.get("errno"), int) and r.get("message")
              and r.get("id") == rid_exp and (field is None or r.get("detail", {}).get("field") == field))
        kinds += bool(ok)
        t.check(ok, "%s: %s%s (got %s %s %r)" % (what, code or "an error", " at '%s'" % field if field else "", r.get("code"),
                                                   r.get("detail", {}).get("field"), r.get("message")))
        # exactly one reply: nothing more comes for it
        if bad.poll(0):
            t.check(False, "%s: exactly one reply (got another: %r)" % (what, bad.recv_multipart()[:2]))
    t.check(kinds >= 60, "at least 60 kinds of bad requests answered with a structured error (%d)" % kinds)

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
    g = good.generate_sync("mini", prompt="after the barrage", max_tokens=4)
    t.check(g["type"] == "done" and g["usage"]["input_tokens"] > 0, "and generates on its model")
    s = good.stats()
    t.check(s["server"]["bad_requests"] >= 30, "stats counts the bad requests (%d)" % s["server"]["bad_requests"])
    bad.close(0)
    t.check(d.stop() == 0, "the daemon exits 0")
finally:
    d.kill()
sys.exit(t.done())
