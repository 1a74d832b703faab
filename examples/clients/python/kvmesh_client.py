"""kvmesh_client.py - a small Python client of `kvmesh serve` (docs/protocol.md), on pyzmq.

    from kvmesh_client import Client
    c = Client("tcp://127.0.0.1:5555")
    c.hello()
    c.workflow_load("pair", open("pair.lua").read())
    for msg in c.run("pair", inputs={"input": "2+2"}, stream=["tokens"]):
        if msg["type"] == "token":
            print(msg["text"], end="", flush=True)
        elif msg["type"] == "done":
            print("\\nreuse:", msg["kv"], "ttft:", msg["timings"].get("ttft_ms"))
    c.model_load("mini", "models/minillama-2m")          # a model for direct generation (no workflow)
    for msg in c.generate("mini", prompt="Once upon a time", max_tokens=32):
        if msg["type"] == "token":                        # then "done": the whole text, usage, timings
            print(msg["text"], end="", flush=True)

One DEALER socket per Client (one ROUTER routing id on the daemon's side); a Client is not thread-safe.
While a run streams, the client sends `ping` every second (the daemon cancels the runs of a client silent for
longer than its client_timeout_ms). Errors come back as KvmeshError with the daemon's code, message and the
offending field.

Tools (docs/protocol.md, tool.register): a client registers a Python function as a tool that workflows call with
ctx:tool(name, args); the daemon sends the call to this client, which answers while it waits for anything (a run's
stream, a request, serve_tools()):

    @c.tool("weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            description="The forecast of a city")
    def weather(city, days=1):
        return {"sky": "sunny", "days": days}

The arguments arrive checked against the schema, as keyword arguments; what the function returns (any JSON value)
is what ctx:tool returns; an exception becomes a Lua error in the run ("ctx:tool: tool 'weather': <message>").
"""

import json
import struct
import time

import zmq

PROTOCOL_VERSION = 1
TERMINAL = {"ok", "hello.ok", "pong", "done", "error", "replay.end"}


class KvmeshError(Exception):
    """A terminal `error` reply: code ("KVM_EINVAL"), errno (-22), message, field (the offending path)."""

    def __init__(self, reply):
        self.reply = reply
        self.code = reply.get("code")
        self.errno = reply.get("errno")
        self.field = (reply.get("detail") or {}).get("field")
        super().__init__("%s: %s%s" % (self.code, reply.get("message"),
                                       " (field %s)" % self.field if self.field else ""))


class Client:
    def __init__(self, endpoint="tcp://127.0.0.1:5555", timeout_s=60.0, ping_s=1.0, context=None, curve=None):
        """curve: (server_public, client_public, client_secret) Z85 keys for a daemon started with --curve-secret."""
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))  # a DEALER with no peer blocks on send
        if curve:
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.sock.connect(endpoint)
        self.timeout_s = timeout_s
        self.ping_s = ping_s
        self._n = 0
        self._pending = {}   # id -> [(header, payloads)] received for requests not being waited on
        self._last_send = 0.0
        self._tools = {}     # name -> function (register_tool)
        self.tool_errors = []  # replies to tool.result that were errors (the run had ended, ...)

    def close(self):
        self.sock.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- frames ----------------------------------------------------------------------------------------
    def new_id(self):
        self._n += 1
        return "r-%d" % self._n

    def send_frames(self, frames):
        """Sends raw frames after the empty delimiter (tests use it for malformed messages)."""
        try:
            self.sock.send_multipart([b""] + [f if isinstance(f, bytes) else f.encode() for f in frames])
        except zmq.Again:
            raise TimeoutError("cannot send to the daemon (not connected)")
        self._last_send = time.monotonic()

    def send(self, type, id=None, payload=None, frames=None, **fields):
        """Sends one request; returns its id. payload: bytes for one u8 payload frame (described in `frames`);
        frames: [(name, dtype, shape, bytes)] for typed payload frames instead (token ids: "i32", [n])."""
        hdr = {"v": PROTOCOL_VERSION, "type": type, "id": id or self.new_id()}
        hdr.update({k: v for k, v in fields.items() if v is not None})
        if payload is not None:
            frames = [("source", "u8", [len(payload)], payload)]
        if frames:
            hdr["frames"] = [{"name": n, "dtype": d, "shape": list(sh)} for n, d, sh, _ in frames]
        self.send_frames([json.dumps(hdr).encode()] + [f[3] for f in (frames or [])])
        return hdr["id"]

    def recv_any(self, timeout_s=None):
        """The next message: (header dict, [payload bytes]); raises TimeoutError."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("no reply from the daemon in %.1f s" % timeout_s)
        parts = self.sock.recv_multipart()
        if len(parts) < 2 or parts[0] != b"":
            raise RuntimeError("malformed reply: %r" % parts[:3])
        return json.loads(parts[1].decode("utf-8", "replace")), parts[2:]

    def messages(self, id, timeout_s=None):
        """Yields (header, payloads) of request `id` up to its terminal one; pings while waiting."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            queue = self._pending.get(id)
            if queue:
                h, p = queue.pop(0)
                yield h, p
                if h.get("type") in TERMINAL:
                    self._pending.pop(id, None)
                    return
                continue
            if time.monotonic() > deadline:
                raise TimeoutError("request %s: no terminal reply in time" % id)
            if time.monotonic() - self._last_send >= self.ping_s:
                self.send("ping", id="ping-%d" % self._n)
                self._n += 1
            try:
                h, p = self.recv_any(timeout_s=min(self.ping_s, max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                continue
            if str(h.get("id", "")).startswith("ping-") and h.get("type") == "pong":
                continue
            if self._tool_message(h):
                continue
            self._pending.setdefault(h.get("id"), []).append((h, p))

    def request(self, type, payload=None, timeout_s=None, frames=None, **fields):
        """One request with a single terminal reply: its header (payload frames under "_payload")."""
        id = self.send(type, payload=payload, frames=frames, **fields)
        for h, p in self.messages(id, timeout_s):
            if h.get("type") in TERMINAL:
                if h["type"] == "error":
                    raise KvmeshError(h)
                h["_payload"] = p
                return h

    # ---- tools ---------------------------------------------------------------------------------------------
    def register_tool(self, name, schema, fn, description=None):
        """Registers fn as the tool `name` for every workflow of the daemon, its arguments checked against `schema`
        (a JSON Schema, the subset of docs/lua-api.md). The tool lives while this client does (it must keep talking
        to the daemon: a stream, a request or serve_tools() pings it)."""
        self._tools[name] = fn
        try:
            return self.request("tool.register", name=name, schema=schema, description=description)
        except Exception:
            self._tools.pop(name, None)
            raise

    def tool(self, name, schema=None, description=None):
        """Decorator form of register_tool."""
        def wrap(fn):
            self.register_tool(name, schema if schema is not None else {"type": "object"}, fn, description)
            return fn
        return wrap

    def _tool_message(self, h):
        """Answers a tool.call (True), or lets the message through (False); drops the replies to tool.result."""
        if str(h.get("id", "")).startswith("tool-"):
            if h.get("type") == "error":
                self.tool_errors.append(h)
            return True
        if h.get("type") != "tool.call":
            return False
        fn = self._tools.get(h.get("tool"))
        fields = {"run_id": h.get("run_id"), "call_id": h.get("call_id")}
        try:
            if fn is None:
                raise LookupError("this client has no tool '%s'" % h.get("tool"))
            args = h.get("args") or {}
            fields["result"] = fn(**args) if isinstance(args, dict) else fn(args)
        except Exception as e:  # the run gets the message as a Lua error
            fields.pop("result", None)
            fields["error"] = "%s: %s" % (type(e).__name__, e)
        self._n += 1
        hdr = {"v": PROTOCOL_VERSION, "type": "tool.result", "id": "tool-%d" % self._n}
        hdr.update(fields)  # result may be None (nil): sent as null
        self.send_frames([json.dumps(hdr).encode()])
        return True

    def serve_tools(self, duration_s, until=None):
        """Answers tool calls (and pings) for duration_s seconds, or until until() is true."""
        end = time.monotonic() + duration_s
        while time.monotonic() < end and not (until and until()):
            if time.monotonic() - self._last_send >= self.ping_s:
                self.send("ping", id="ping-%d" % self._n)
                self._n += 1
            try:
                h, p = self.recv_any(timeout_s=min(0.05, max(0.001, end - time.monotonic())))
            except TimeoutError:
                continue
            if str(h.get("id", "")).startswith("ping-") and h.get("type") == "pong":
                continue
            if not self._tool_message(h):
                self._pending.setdefault(h.get("id"), []).append((h, p))

    # ---- the message types -----------------------------------------------------------------------------
    def hello(self, client="kvmesh_client.py"):
        return self.request("hello", client=client, versions=[PROTOCOL_VERSION])

    def ping(self):
        return self.request("ping")

    def stats(self):
        return self.request("stats")

    def workflow_load(self, name, source):
        return self.request("workflow.load", name=name, source=source)

    def workflow_list(self):
        return self.request("workflow.list")["workflows"]

    def workflow_drop(self, name):
        return self.request("workflow.drop", name=name)

    def run_status(self, run_id):
        return self.request("run.status", run_id=run_id)

    def run_list(self):
        return self.request("run.list")["runs"]

    def run_cancel(self, run_id):
        return self.request("run.cancel", run_id=run_id)

    def run_resume(self, run_id, value=None):
        """Answers a run parked in kvmesh.interrupt (its stream had an `interrupt` message): `value` (any JSON
        value) becomes kvmesh.interrupt's result and the run's stream goes on."""
        return self.request("run.resume", run_id=run_id, value=value)

    def trace_get(self, run_id):
        """The run's trace as a list of records (dicts)."""
        h = self.request("trace.get", run_id=run_id)
        text = h["_payload"][0].decode("utf-8", "replace") if h["_payload"] else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def trace_export(self, run_id, fmt="otlp-json"):
        """The run's trace exported (docs/trace-format.md, "Export"): fmt "otlp-json" (OTLP/JSON spans after the
        OpenTelemetry GenAI conventions) or "whowhen" gives the parsed document (a dict), "jsonl" the records (a
        list of dicts)."""
        h = self.request("trace.export", run_id=run_id, format=fmt)
        text = h["_payload"][0].decode("utf-8") if h["_payload"] else ""
        if fmt == "jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)

    # ---- models and direct generation -------------------------------------------------------------------
    def model_load(self, name, path, backend=None):
        """Loads a model (a Hugging Face directory, a llama2.c .bin, "synthetic:<name>") under name for generate."""
        return self.request("model.load", name=name, path=path, backend=backend)

    def model_unload(self, name):
        return self.request("model.unload", name=name)

    def model_list(self):
        return self.request("model.list")["models"]

    def generate(self, model, prompt=None, token_ids=None, max_tokens=None, temperature=None, top_p=None, seed=None,
                 stop=None, chat=None, ignore_eos=None, deadline_ms=None, timeout_s=None):
        """Generates from a loaded model, yielding each `token` message, then `done` (text, token_ids, usage,
        timings, stop_reason); raises KvmeshError when it ends in error. The prompt is text, or token_ids (a list
        of ints, sent as an i32 frame)."""
        id = self.generate_start(model, prompt, token_ids, max_tokens, temperature, top_p, seed, stop, chat,
                                 ignore_eos, deadline_ms)
        for h, _ in self.messages(id, timeout_s):
            if h.get("type") == "error":
                raise KvmeshError(h)
            yield h

    def generate_start(self, model, prompt=None, token_ids=None, max_tokens=None, temperature=None, top_p=None,
                       seed=None, stop=None, chat=None, ignore_eos=None, deadline_ms=None, id=None):
        """Sends a generate and returns its request id at once (read its stream with messages(id), stop it with
        generate_cancel(id)); the daemon serves other requests while it runs."""
        frames = None
        if token_ids is not None:
            frames = [("token_ids", "i32", [len(token_ids)], struct.pack("<%di" % len(token_ids), *token_ids))]
        return self.send("generate", id=id, frames=frames, model=model, prompt=prompt, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, seed=seed, stop=list(stop) if stop else None, chat=chat,
                         ignore_eos=ignore_eos, deadline_ms=deadline_ms)

    def generate_cancel(self, request_id):
        """Stops a generate of this client (by its request id): its stream ends with an error KVM_ECANCELED and its
        KV goes back to the model's pool."""
        return self.request("generate.cancel", request_id=request_id)

    def generate_sync(self, model, **kw):
        """generate() to its end: the `done` reply."""
        done = None
        for h in self.generate(model, **kw):
            done = h
        return done

    # ---- KV segments -------------------------------------------------------------------------------------
    def segment_put(self, segment_id, model, token_ids, k, v, dtype, layers, kv_heads, head_dim, frame=None):
        """Keeps a KV segment in the daemon: token_ids (ints), k and v (bytes, [layers][kv_heads][T][head_dim] in
        the model's cache dtype, little-endian), checked against the loaded model. Returns {segment_id, tokens, bytes}."""
        T = len(token_ids)
        shape = [layers, kv_heads, T, head_dim]
        frames = [("token_ids", "i32", [T], struct.pack("<%di" % T, *token_ids)), ("k", dtype, shape, k), ("v", dtype, shape, v)]
        return self.request("segment.put", frames=frames, segment_id=segment_id, model=model, frame=frame, dtype=dtype,
                            layers=layers, kv_heads=kv_heads, head_dim=head_dim)

    def segment_get(self, segment_id):
        """A kept segment: its header (model, frame, dtype, dimensions) with "token_ids" (ints), "k" and "v" (bytes)."""
        h = self.request("segment.get", segment_id=segment_id)
        ids, k, v = h.pop("_payload")
        h["token_ids"] = list(struct.unpack("<%di" % (len(ids) // 4), ids))
        h["k"], h["v"] = k, v
        return h

    def segment_drop(self, segment_id):
        return self.request("segment.drop", segment_id=segment_id)

    # ---- failure attribution and the error-schema cache (docs/correct.md) ------------------------------
    def attribute(self, run_id, k=None, verify=None, judge=None, deadline_ms=None):
        """Blame of an ended run: {agent, step, score, evidence[], candidates[], schema_ids[]}. verify (a dict, e.g.
        {"budget": 3}) checks it by replays ("verify": control, replays, confirmed, step, agent, timed_out, schema_id);
        judge names a loaded model (model.load) that writes a confirmed failure's schema text. The daemon's loop waits
        for a verify: deadline_ms bounds it (60 s without)."""
        return self.request("attribute", run_id=run_id, k=k, verify=verify, judge=judge, deadline_ms=deadline_ms)

    def cache_stats(self):
        return self.request("cache.stats")

    def cache_show(self, entry=None):
        """An entry ({entry, schema}), or without one the live ids ({ids, entries})."""
        return self.request("cache.show", entry=entry)

    def cache_pin(self, entry, pinned=True):
        return self.request("cache.pin", entry=entry, pinned=pinned)

    def cache_evict(self, entry):
        return self.request("cache.evict", entry=entry)

    def cache_label(self, run_id, agent, step, human=None):
        """Labels an ended run's failure (the responsible agent and its step) into the cache: {entry}."""
        return self.request("cache.label", run_id=run_id, agent=agent, step=step, human=human)

    def start(self, workflow, inputs=None, seed=None, stream=None, deadline_ms=None, dataset=None, id=None, kv=None):
        """Sends run.start; returns the request id (read its stream with messages(id)). kv: "dense" | "prefix" |
        "kvcomm" for every agent of the run (None: each agent's own)."""
        return self.send("run.start", id=id, workflow=workflow, inputs=inputs, seed=seed, stream=stream,
                         deadline_ms=deadline_ms, dataset=dataset, kv=kv)

    def run(self, workflow, inputs=None, seed=None, stream=("tokens",), deadline_ms=None, dataset=None,
            timeout_s=None, kv=None):
        """Runs a workflow, yielding every message of its stream (run.accepted, token, step, kv, then done);
        raises KvmeshError when it ends in error."""
        id = self.start(workflow, inputs, seed, list(stream) if stream else None, deadline_ms, dataset, kv=kv)
        for h, _ in self.messages(id, timeout_s):
            if h.get("type") == "error":
                raise KvmeshError(h)
            yield h

    def run_sync(self, workflow, **kw):
        """Runs a workflow to its end: the `done` reply (outputs, state, usage, timings, kv, steps)."""
        kw.setdefault("stream", None)
        done = None
        for h in self.run(workflow, **kw):
            done = h
        return done


class Events:
    """The daemon's event stream (PUB): topics run.<run_id>, heartbeat. recv() -> (topic, seq, body)."""

    def __init__(self, endpoint="tcp://127.0.0.1:5556", topics=("",), context=None):
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        for t in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.sock.connect(endpoint)

    def recv(self, timeout_s=5.0):
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("no event in %.1f s" % timeout_s)
        topic, seq, body = self.sock.recv_multipart()
        return topic.decode(), struct.unpack(">Q", seq)[0], json.loads(body.decode("utf-8", "replace"))

    def close(self):
        self.sock.close(0)
