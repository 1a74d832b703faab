"""test_protocol.py KVMESH TMP - every request type of `kvmesh serve` through the pyzmq client, on the mock model:
hello, ping, stats, workflow.load/list/drop, run.start with each stream, run.status/list, trace.get, trace.export
(OTLP/JSON checked by tests/support/otlp_check.py, Who&When, JSONL, bad format, unknown run), run.cancel,
run.resume of a run parked in kvmesh.interrupt, model.load/list/unload, generate (text and token_ids, streamed),
segment.put/get/drop, attribute, cache.stats/show/pin/evict/label, the overhead figures in stats,
deadline_ms, the event stream (per-topic order, one seq across topics), a silent client losing its run, and
SIGTERM draining a run going."""
import os
import struct
import subprocess
import sys
import time

from daemon import LONG, PAIR, ROOT, SLOW, Checks, Daemon, Events, KvmeshError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
import otlp_check  # noqa: E402  (tests/support/otlp_check.py: the OTLP/JSON structural check)

ASK = """local kvm = kvmesh
local m = kvm.model('mock:echo')
local g = kvm.graph{ name = 'ask', state = { answer = kvm.reduce.replace } }
g:agent('draft', { model = m, template = '{input}', max_tokens = 4 })
g:func('ask', function(state, last) return { answer = kvm.interrupt({ question = 'ok?', draft = last.draft }) } end)
g:edge(kvm.START, 'draft')
g:edge('draft', 'ask')
g:output(function(state) return { answer = state.answer } end)
return g
"""

kvmesh, tmp = sys.argv[1], sys.argv[2]
t = Checks()
d = Daemon(kvmesh, "--mock", "--trace", tmp + "/traces", "--client-timeout-ms", "1500", "--recycle-runs", "3")
try:
    c = d.client()
    ev = Events(d.events)
    h = c.hello()
    t.check(h["type"] == "hello.ok" and h["version"] == 1 and "run.start" in h["capabilities"]["types"], "hello answers hello.ok with version 1 and the types")
    t.check(h["seq"] == 0 and h["id"].startswith("r-"), "a reply echoes the request id with seq 0")
    t.check({"model.load", "generate", "segment.put", "attribute", "cache.label"} <= set(h["capabilities"]["types"]),
            "hello lists the model, generate, segment, attribute and cache types")
    t.check(c.ping()["type"] == "pong", "ping answers pong")
    ok = c.workflow_load("pair", PAIR)
    t.check(ok["name"] == "pair" and [a["name"] for a in ok["agents"]] == ["a", "b"], "workflow.load names the agents")
    c.workflow_load("long", LONG % 4000)
    c.workflow_load("slow", SLOW)
    t.check(sorted(w["name"] for w in c.workflow_list()) == ["long", "pair", "slow"], "workflow.list lists the workflows")

    # a run with every stream
    time.sleep(0.3)  # the subscription reaches the daemon
    msgs = list(c.run("pair", inputs={"input": "two plus two"}, seed=7, stream=["tokens", "steps", "kv"]))
    types = [m["type"] for m in msgs]
    t.check(types[0] == "run.accepted" and types[-1] == "done", "a run streams run.accepted first and done last")
    t.check([m["seq"] for m in msgs] == list(range(len(msgs))), "the replies of a request carry seq 0, 1, 2, ...")
    t.check(types.count("step") == 2 and types.count("kv") == 2, "two agent steps give two step and two kv messages")
    text = "".join(m["text"] for m in msgs if m["type"] == "token" and m["agent"] == "a")
    t.check("two plus two" in text, "token messages carry the agents' text as it is made")
    done = msgs[-1]
    t.check(done["outputs"] is not None and done["usage"]["agent_steps"] == 2, "done carries outputs and usage")
    t.check(all(s["agent"] in ("a", "b") and "ttft_ms" in s["timings"] for s in done["steps"]), "done carries the TTFT of each agent step")
    t.check(all(map(__import__("daemon").partition_ok, done["steps"])), "each step's KV partition sums to its input tokens")
    run_id = done["run_id"]

    st = c.run_status(run_id)
    t.check(st["state"] == "done" and st["code"] == "KVM_OK" and len(st["steps"]) == 2, "run.status of an ended run: done, its steps")
    t.check(any(r["run_id"] == run_id and r["mine"] for r in c.run_list()), "run.list shows the run as this client's")
    recs = c.trace_get(run_id)
    t.check(recs and recs[0].get("t") == "run.start" and recs[-1].get("t") == "run.end", "trace.get returns the run's trace, run.start to run.end")
    otlp = c.trace_export(run_id)
    problems = otlp_check.check(otlp)
    t.check(not problems, "trace.export answers OTLP/JSON that tests/support/otlp_check.py accepts %s" % problems[:3])
    names = [s[0] for s in otlp_check.summary(otlp)]
    t.check(names.count("invoke_workflow pair") == 1 and names.count("invoke_agent a") == 1 and names.count("invoke_agent b") == 1,
            "trace.export: the run's span and one invoke_agent span per agent step (%s)" % names)
    t.check(all(s[1] and s[0] for s in otlp_check.summary(otlp)) and
            otlp["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] == run_id, "trace.export: the trace id is the run id")
    ww = c.trace_export(run_id, "whowhen")
    t.check([m["name"] for m in ww["history"]] == ["user", "a", "b"] and ww["is_correct"] is True, "trace.export whowhen: the task, then the steps")
    t.check(c.trace_export(run_id, "jsonl") == recs, "trace.export jsonl: the records trace.get gives")
    for bad, field, code in ((dict(run_id=run_id, format="xml"), "format", "KVM_EINVAL"), (dict(run_id="no-such-run"), "run_id", "KVM_ENOENT")):
        try:
            c.request("trace.export", **bad)
            t.check(False, "trace.export %s should fail" % bad)
        except KvmeshError as e:
            t.check(e.code == code and e.field == field, "trace.export %s: %s on '%s'" % (bad, code, field))

    # the events of that run: start, step, step, end, in order, seq increasing
    seen, seqs = [], []
    t0 = time.time()
    while time.time() - t0 < 5 and "end" not in seen:
        topic, seq, body = ev.recv()
        if topic == "run." + run_id:
            seen.append(body["type"])
            seqs.append(seq)
    t.check(seen == ["start", "step", "step", "end"], "the run's topic carries start, step, step, end (%s)" % seen)
    t.check(seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "event seqs increase")

    # cancel a run going
    rid = c.start("long", inputs={"input": "a b c d e f g h"}, stream=["tokens"])
    accepted, ended = None, None
    for m, _ in c.messages(rid):
        if m["type"] == "run.accepted":
            accepted = m["run_id"]
        elif m["type"] == "token" and accepted and ended is None:
            ended = c.run_cancel(accepted)
        elif m["type"] in ("done", "error"):
            last = m
    t.check(ended is not None and ended["type"] == "ok", "run.cancel of a run going answers ok")
    t.check(last["type"] == "error" and last["code"] == "KVM_ECANCELED", "the canceled run's stream ends with error KVM_ECANCELED")
    t.check(last["run"]["state"] == "error", "the canceled run's error carries its figures")
    try:
        c.run_cancel(accepted)
        t.check(False, "canceling an ended run is refused")
    except KvmeshError as e:
        t.check(e.code == "KVM_ESTALE", "canceling an ended run is KVM_ESTALE")

    # an interrupt: the run parks, its stream gets `interrupt`, run.resume answers it (issue 12 item 2)
    c.workflow_load("ask", ASK)
    rid = c.start("ask", inputs={"input": "ship it"}, stream=["steps"])
    asked, resumed, last = None, None, None
    for m, _ in c.messages(rid):
        if m["type"] == "interrupt":
            asked = m
            try:
                c.run_resume(m["run_id"] + "0")
                t.check(False, "run.resume of an unknown run is refused")
            except KvmeshError as e:
                t.check(e.code == "KVM_ENOENT", "run.resume of an unknown run is KVM_ENOENT")
            resumed = c.run_resume(m["run_id"], {"go": True})
        elif m["type"] in ("done", "error"):
            last = m
    t.check(asked is not None and asked["node"] == "ask" and asked["payload"] == {"question": "ok?", "draft": "ship it"},
            "a parked run's stream carries interrupt{node, payload} (%s)" % asked)
    t.check(resumed is not None and resumed["type"] == "ok", "run.resume answers ok")
    t.check(last is not None and last["type"] == "done" and last["outputs"] == {"answer": {"go": True}},
            "the answer becomes kvmesh.interrupt's result (%s)" % (last and last.get("outputs")))
    try:
        c.run_resume(asked["run_id"], 1)
        t.check(False, "run.resume of an ended run is refused")
    except KvmeshError as e:
        t.check(e.code == "KVM_ESTALE", "run.resume of an ended run is KVM_ESTALE")
    c.workflow_drop("ask")

    # deadline
    try:
        c.run_sync("long", inputs={"input": "x y z"}, deadline_ms=1)
        t.check(False, "a run past its deadline ends with KVM_ETIMEDOUT")
    except KvmeshError as e:
        t.check(e.code == "KVM_ETIMEDOUT", "a run past its deadline ends with KVM_ETIMEDOUT")

    # a client that starts a run and then sends nothing loses it
    silent = d.client()
    silent.ping_s = 1e9  # never pings
    sid = silent.start("slow", inputs={"input": "silent client"}, id="s-1")
    acc, _ = next(silent.messages(sid))
    time.sleep(2.5)
    st = c.run_status(acc["run_id"])
    t.check(st["state"] == "error" and st["code"] == "KVM_ECANCELED", "a client silent past client_timeout_ms loses its run (%s)" % st.get("code"))
    silent.close()

    # a client that goes away mid-stream: its run is canceled at the next message the daemon cannot deliver
    gone = d.client()
    gid = gone.start("slow", inputs={"input": "vanishing client"}, stream=["tokens"], id="g-1")
    acc, _ = next(gone.messages(gid))
    gone.close()
    t0 = time.time()
    while time.time() - t0 < 10 and c.run_status(acc["run_id"])["state"] == "running":
        time.sleep(0.1)
    st = c.run_status(acc["run_id"])
    # (which comes first depends on the load: a send failing to the vanished peer, or its silence)
    t.check(st["state"] == "error" and st["code"] == "KVM_ECANCELED" and ("gone" in st.get("message", "") or "sent nothing" in st.get("message", "")),
            "a client gone mid-stream loses its run (%s: %s)" % (st.get("code"), st.get("message")))

    # the streaming example of examples/clients/python
    ex = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "clients", "python", "stream.py"), "pair",
                         "--connect", d.ctl, "--input", "input=streamed words"], capture_output=True, text=True, timeout=120)
    t.check(ex.returncode == 0 and "[a] " in ex.stdout and "streamed words" in ex.stdout and "done" in ex.stdout,
            "examples/clients/python/stream.py streams a run's tokens (%r)" % ex.stdout[-200:])

    # workflow instances recycled every 3 runs: runs go on, the old runs stay queryable, memory is given back
    more = [c.run_sync("pair", inputs={"input": "recycle %d" % i})["run_id"] for i in range(7)]
    s = c.stats()["server"]
    t.check(s["workflow_reloads"] >= 2, "a workflow is loaded afresh every --recycle-runs runs (%d reloads)" % s["workflow_reloads"])
    st = c.run_status(run_id)
    t.check(st["state"] == "done" and len(st["steps"]) == 2 and st["outputs"], "a run of a recycled instance keeps its status, steps and outputs")
    t.check(len(c.trace_get(run_id)) > 2 and len(c.trace_get(more[0])) > 2, "and its trace")
    t.check([w["runs"] for w in c.workflow_list() if w["name"] == "pair"] == [9], "workflow.list counts the runs over the instances")

    # models and direct generation: model.load / model.list / generate (text prompt or token_ids frame) / model.unload
    mini = os.path.join(ROOT, "models", "minillama-2m")
    m = c.model_load("mini", mini, backend="cpu")
    t.check(m["arch"] == "LlamaForCausalLM" and m["n_layers"] > 0 and m["tokenizer"] and m["backend"] == "cpu", "model.load answers the model's shape")
    t.check([x["name"] for x in c.model_list()] == ["mini"], "model.list lists the loaded model")
    msgs = list(c.generate("mini", prompt="Once upon a time", max_tokens=8, seed=3))
    g = msgs[-1]
    t.check(g["type"] == "done" and all(x["type"] == "token" for x in msgs[:-1]) and [x["seq"] for x in msgs] == list(range(len(msgs))),
            "generate streams token messages, then done, seq 0, 1, 2, ...")
    t.check("".join(x["text"] for x in msgs[:-1]) == g["text"] and [x["token_id"] for x in msgs[:-1]] == g["token_ids"],
            "the streamed tokens are done's text and token_ids")
    t.check(all(x["agent"] == "mini" for x in msgs[:-1]), "token messages name the model as their agent (the run event schema)")
    t.check(g["usage"]["output_tokens"] == len(g["token_ids"]) and g["usage"]["input_tokens"] > 0 and g["stop_reason"] in ("eos", "length"),
            "done carries usage and the stop reason (%s)" % g["stop_reason"])
    t.check(c.generate_sync("mini", prompt="Once upon a time", max_tokens=8, seed=3)["token_ids"] == g["token_ids"], "greedy generate repeats exactly")
    ids = [1, 100, 200, 300, 400]
    gi = c.generate_sync("mini", token_ids=ids, max_tokens=6, ignore_eos=True)
    t.check(gi["usage"]["input_tokens"] == len(ids) and gi["usage"]["output_tokens"] == 6 and gi["stop_reason"] == "length",
            "generate from a token_ids frame: its ids are the prompt, ignore_eos runs to max_tokens")
    gs = c.generate_sync("mini", token_ids=ids, max_tokens=64, ignore_eos=True, temperature=0.8, top_p=0.9, seed="18446744073709551615")
    t.check(gs["usage"]["output_tokens"] == 64, "sampled generate (temperature, top_p, a 64-bit seed string) runs")
    try:
        c.generate_sync("mini", token_ids=ids, max_tokens=400, ignore_eos=True, deadline_ms=1)
        t.check(False, "a generate past its deadline ends with KVM_ETIMEDOUT")
    except KvmeshError as e:
        t.check(e.code == "KVM_ETIMEDOUT", "a generate past its deadline ends with KVM_ETIMEDOUT")
    try:
        c.model_load("mini", mini)
        t.check(False, "model.load of a taken name is refused")
    except KvmeshError as e:
        t.check(e.code == "KVM_EINVAL" and e.field == "name", "model.load of a taken name is KVM_EINVAL at 'name'")
    # KV segments: put checked against the model, get gives the same bytes back, drop
    L, H, D, T = m["n_layers"], m["n_kv_heads"], m["head_dim"], 5
    n = L * H * T * D
    kb = struct.pack("<%df" % n, *[i * 0.25 for i in range(n)])
    vb = struct.pack("<%df" % n, *[-i * 0.5 for i in range(n)])
    put = c.segment_put("seg-1", "mini", [1, 5, 9, 13, 17], kb, vb, "f32", L, H, D, frame=7)
    t.check(put["tokens"] == T and put["bytes"] == 4 * T + 2 * len(kb) and m["kv_dtype"] == "f32",
            "segment.put keeps a segment in the model's cache dtype (%s)" % m["kv_dtype"])
    got = c.segment_get("seg-1")
    t.check(got["token_ids"] == [1, 5, 9, 13, 17] and got["k"] == kb and got["v"] == vb, "segment.get gives the token ids, K and V back byte for byte")
    t.check(got["frame"] == 7 and (got["layers"], got["kv_heads"], got["head_dim"], got["dtype"]) == (L, H, D, "f32"),
            "and its frame, dimensions and dtype")
    for what, kw, code, field in [("layers", dict(layers=L + 1), "KVM_ESHAPE", "layers"),
                                  ("head_dim", dict(head_dim=D * 2), "KVM_ESHAPE", "head_dim"),
                                  ("dtype", dict(dtype="bf16"), "KVM_EDTYPE", "dtype"),
                                  ("segment_id (one taken)", dict(segment_id="seg-1"), "KVM_EINVAL", "segment_id")]:
        a = dict(segment_id="seg-2", model="mini", token_ids=[1, 2, 3, 4, 5], k=kb, v=vb, dtype="f32", layers=L, kv_heads=H, head_dim=D)
        a.update(kw)
        if a["dtype"] == "bf16":
            a["k"] = a["v"] = kb[: len(kb) // 2]
        if a["layers"] != L or a["head_dim"] != D:
            a["k"] = a["v"] = bytes(4 * a["layers"] * H * T * a["head_dim"])
        try:
            c.segment_put(**a)
            t.check(False, "segment.put with a wrong %s is refused" % what)
        except KvmeshError as e:
            t.check(e.code == code and e.field == field, "segment.put with a wrong %s is %s at '%s' (%s %s)" % (what, code, field, e.code, e.field))
    t.check(c.stats()["segments"]["count"] == 1, "stats counts the segments")
    c.segment_drop("seg-1")
    try:
        c.segment_get("seg-1")
        t.check(False, "segment.get of a dropped segment is refused")
    except KvmeshError as e:
        t.check(e.code == "KVM_ENOENT" and e.field == "segment_id", "segment.get of a dropped segment is KVM_ENOENT")
    c.segment_put("seg-3", "mini", [1, 2, 3, 4, 5], kb, vb, "f32", L, H, D)
    un = c.model_unload("mini")
    t.check(un["generates"] == 5 and un["segments_dropped"] == 1 and c.model_list() == [], "model.unload frees the model and its segments")
    try:
        c.generate_sync("mini", prompt="x")
        t.check(False, "generate on an unloaded model is refused")
    except KvmeshError as e:
        t.check(e.code == "KVM_ENOENT" and e.field == "model", "generate on an unloaded model is KVM_ENOENT at 'model'")

    # failure attribution and the error-schema cache over the traced run
    a = c.attribute(run_id, k=3)
    t.check(a["run_id"] == run_id and 0 <= a["step"] < a["steps"] and a["agent"] and len(a["evidence"]) == len(a["candidates"]) >= 1,
            "attribute answers the blamed agent and step with ranked candidates (%s at %d)" % (a["agent"], a["step"]))
    # attribute with verify: the run passed (no g:score, it ended ok): the control replay says so, nothing is replayed
    a = c.attribute(run_id, verify={"budget": 2})
    v = a["verify"]
    t.check(v["control"]["passed"] and not v["failed"] and v["replays"] == [] and not v["confirmed"] and not v["timed_out"],
            "attribute verify of a run that passed: the control passes, nothing replayed")
    t.check(a["agent"] and a["step"] >= 0, "attribute verify still answers blame's agent and step")
    # a run that fails by its workflow's measure (g:score 0): replayed within the budget, not confirmed (the mock
    # model says the same again), the replays traced
    c.workflow_load("zero", PAIR.replace("return g", "g:score(function(result, inputs) return 0 end)\nreturn g"))
    zmsgs = list(c.run("zero", inputs={"input": "two plus two"}, seed=3))
    zid = zmsgs[-1]["run_id"]
    v = c.attribute(zid, verify={"budget": 2, "pass": 1})["verify"]
    t.check(v["failed"] and not v["control"]["passed"] and len(v["replays"]) == 2 and not v["confirmed"]
            and all(r["status"] == "ok" and r["score"] == 0 and not r["passed"] and os.path.isdir(r["trace"]) for r in v["replays"]),
            "attribute verify of a failed run: 2 replays (budget 2), traced, none passes: not confirmed (%s)" % v)
    v = c.attribute(zid, verify={"budget": 0})["verify"]
    t.check(v["failed"] and v["replays"] == [], "verify budget 0: the control only")
    for what, kw, code, field in [("a budget of 17", dict(verify={"budget": 17}), "KVM_EINVAL", "budget"),
                                  ("an unknown verify field", dict(verify={"budgets": 1}), "KVM_EINVAL", "verify"),
                                  ("verify not an object", dict(verify=3), "KVM_EINVAL", "verify"),
                                  ("a judge without verify", dict(judge="mini"), "KVM_EINVAL", "judge"),
                                  ("a judge not loaded", dict(verify={}, judge="nobody"), "KVM_ENOENT", "judge"),
                                  ("a judge name with a slash", dict(verify={}, judge="../x"), "KVM_EINVAL", "judge")]:
        try:
            c.attribute(zid, **kw)
            t.check(False, "attribute with %s is refused" % what)
        except KvmeshError as e:
            t.check(e.code == code and e.field == field, "attribute with %s is %s at '%s' (%s %s)" % (what, code, field, e.code, e.field))
    # the deadline bounds verify (the daemon's loop waits for it): a long failing run, deadline 1 ms
    c.workflow_load("zlong", (LONG % 3000).replace("return g", "g:score(function(result, inputs) return 0 end)\nreturn g"))
    lmsgs = list(c.run("zlong", inputs={"input": "long"}, seed=3))
    t0 = time.time()
    v = c.attribute(lmsgs[-1]["run_id"], verify={"budget": 3}, deadline_ms=1)["verify"]
    t.check(v["timed_out"] and not v["confirmed"] and len(v["replays"]) <= 1, "verify past its deadline_ms stops: timed_out (%s)" % v)
    t.check(time.time() - t0 < 5, "and answers at once (%.2f s)" % (time.time() - t0))
    # the judge: a loaded model is accepted; it writes only a confirmed failure's text (none here: nothing flips)
    c.model_load("judge", os.path.join(ROOT, "models", "minillama-2m"), backend="cpu")
    v = c.attribute(zid, verify={"budget": 1}, judge="judge")["verify"]
    t.check(not v["confirmed"] and "judge" not in v, "attribute verify with a judge: nothing confirmed, nothing written")
    c.model_unload("judge")
    c.workflow_drop("zero")
    c.workflow_drop("zlong")
    n0 = c.cache_stats()["entries"]
    lab = c.cache_label(run_id, "b", 2)
    t.check(c.cache_stats()["entries"] == n0 + 1 and lab["entry"] in c.cache_show()["ids"], "cache.label puts the labelled run into the cache")
    sch = c.cache_show(lab["entry"])["schema"]
    t.check(run_id in sch["source_traces"] and "HUMAN_LABEL" in sch["flags"], "cache.show shows the entry (its source trace, the human label)")
    try:
        c.cache_label(run_id, "b", 9)
        t.check(False, "cache.label past the run's last step is refused")
    except KvmeshError as e:
        t.check(e.code == "KVM_EINVAL" and e.field == "step", "cache.label past the run's last step is KVM_EINVAL at 'step'")
    c.cache_pin(lab["entry"])
    try:
        c.cache_evict(lab["entry"])
        t.check(False, "cache.evict of a pinned entry is refused")
    except KvmeshError as e:
        t.check(e.code == "KVM_EBUSY", "cache.evict of a pinned entry is KVM_EBUSY")
    c.cache_pin(lab["entry"], pinned=False)
    t.check(c.cache_evict(lab["entry"])["evicted"] and c.cache_stats()["entries"] == n0, "cache.evict of an unpinned entry removes it")
    try:
        c.cache_show(lab["entry"])
        t.check(False, "cache.show of an evicted entry is refused")
    except KvmeshError as e:
        t.check(e.code == "KVM_ENOENT" and e.field == "entry", "cache.show of an evicted entry is KVM_ENOENT at 'entry'")

    # the daemon's own time per request, outside model compute
    ov = c.stats()["overhead"]
    p = ov["by_type"].get("ping", {})
    t.check(p.get("n", 0) >= 1 and 0 < p["p50_us"] <= p["p99_us"] <= p["max_us"], "stats reports the overhead per request type (ping %s)" % p)
    gen = ov["by_type"].get("generate", {})
    t.check(gen.get("n") == 6 and ov["all"]["n"] == sum(h["n"] for h in ov["by_type"].values()),
            "every generate is counted, the total covers every type")

    # workflow.drop
    c.workflow_drop("pair")
    t.check(sorted(w["name"] for w in c.workflow_list()) == ["long", "slow"], "workflow.drop removes the workflow")
    t.check(c.run_status(run_id)["state"] == "done", "a dropped workflow's ended runs stay queryable")

    s = c.stats()
    t.check(s["server"]["runs_started"] >= 4 and "models" in s["runtime"] and s["reuse"]["agent_steps"] >= 2, "stats reports runs, the runtime's models and reuse")
    t.check(s["net"]["subscriptions"] >= 1, "stats counts the event subscription")

    # SIGTERM drains: a run going still completes, then the daemon exits 0
    c.workflow_load("mid", LONG % 300)
    rid = c.start("mid", inputs={"input": "drain me"})
    first, _ = next(c.messages(rid))
    d.proc.send_signal(15)
    last = None
    for m, _ in c.messages(rid):
        last = m
    t.check(first["type"] == "run.accepted" and last["type"] == "done", "after SIGTERM the run going still ends with done")
    t.check(d.stop() == 0, "the daemon exits 0 after draining")
    t.check(any("stopping" in l for l in d.log), "the daemon says it is stopping")
finally:
    d.kill()
sys.exit(t.done())
