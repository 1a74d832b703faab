"""test_generate_jobs.py KVMESH - generate as a job of the runtime's engine (issue 12): while a long generate runs,
the daemon answers pings and runs another client's workflow (latency bounded loosely), the generate shares forward
passes with a run's agent steps and with another generate on the same model (batching), its KV comes from the
model's pool and goes back when generate.cancel stops it (the pool counters in stats), a deadline_ms ends it with
KVM_ETIMEDOUT inside generation, and a greedy generate gives the same tokens whether it ran alone or batched."""
import sys
import time

from daemon import PAIR, Checks, Daemon, KvmeshError

kvmesh = sys.argv[1]
t = Checks()
TINY = "synthetic:tiny-llama"  # 3 layers, context 4096, no tokenizer: token_ids prompts
WF = """local kvm = kvmesh
local m = kvm.model('%s')
local g = kvm.graph{ name = 'tinyrun' }
g:agent('w', { model = m, template = 'write about {input}', max_tokens = 40, ignore_eos = true })
g:edge(kvm.START, 'w')
return g
""" % TINY
PROMPT = [1, 17, 42, 99, 7, 5, 300, 12]
d = Daemon(kvmesh, "--client-timeout-ms", "60000")


def pool(stats):
    for m in stats["runtime"]["models"]:
        if m["path"] == TINY:
            return m["kv_blocks"], m["kv_blocks_free"]
    return None, None


def next_of(c, id, kind):
    """The messages of request id up to the first of type kind (or its terminal one)."""
    for h, _ in c.messages(id, 120):
        if h["type"] in (kind, "done", "error"):
            return h
    return None


try:
    a, b = d.client(120), d.client(120)
    b.workflow_load("pair", PAIR)
    b.workflow_load("tinyrun", WF)
    a.model_load("tiny", TINY, backend="cpu")
    alone = a.generate_sync("tiny", token_ids=PROMPT, max_tokens=24, ignore_eos=True)
    t.check(alone["usage"]["output_tokens"] == 24, "a short generate runs to max_tokens")

    # a long generate; the other client is served meanwhile
    gid = a.generate_start("tiny", token_ids=PROMPT, max_tokens=4000, ignore_eos=True)
    first = next_of(a, gid, "token")
    t.check(first is not None and first["type"] == "token", "the long generate streams tokens")
    lat = []
    for _ in range(5):
        t0 = time.monotonic()
        b.ping()
        lat.append(time.monotonic() - t0)
    print("ping latency during a generate: max %.1f ms" % (1e3 * max(lat)))
    t.check(max(lat) < 1.0, "pings are answered while a generate runs (max %.1f ms < 1 s)" % (1e3 * max(lat)))
    run = b.run_sync("pair", inputs={"input": "hello there"})
    t.check(run["type"] == "done", "another client's run completes while the generate runs")
    mid = b.stats()
    blocks, free = pool(mid)
    t.check(mid["generate"]["going"] == 1, "stats: the generate is still going after the run ended")
    t.check(blocks is not None and free < blocks, "its KV is held in the model's pool (%s of %s blocks free)" % (free, blocks))
    # batching: a run on the same model and a second generate share the generate's forward passes
    passes0 = mid["runtime"]["forward_passes"]
    run2 = b.run_sync("tinyrun", inputs={"input": "the sea"})
    t.check(run2["type"] == "done", "a run on the generate's model completes meanwhile")
    both = b.generate_sync("tiny", token_ids=PROMPT, max_tokens=24, ignore_eos=True)
    t.check(both["token_ids"] == alone["token_ids"], "a greedy generate batched with another gives the tokens it gave alone")
    st = b.stats()
    t.check(st["runtime"]["max_batch_seqs"] >= 2, "forward passes held the generate and other work together (max %d sequences)"
            % st["runtime"]["max_batch_seqs"])
    t.check(st["runtime"]["forward_passes"] > passes0, "the engine ran passes meanwhile")

    # generate.cancel: the stream ends with KVM_ECANCELED, the KV is back in the pool at once
    r = a.generate_cancel(gid)
    t.check(r["canceled"] and r["request_id"] == gid, "generate.cancel answers ok")
    end = None
    for h, _ in a.messages(gid, 60):
        end = h
    t.check(end["type"] == "error" and end["code"] == "KVM_ECANCELED", "the canceled generate ends with KVM_ECANCELED")
    st = a.stats()
    blocks, free = pool(st)
    t.check(free == blocks, "its KV went back to the pool (%s of %s blocks free)" % (free, blocks))
    t.check(st["generate"]["going"] == 0 and st["generate"]["canceled"] == 1, "stats counts the canceled generate")
    try:
        a.generate_cancel(gid)
        t.check(False, "a second generate.cancel is refused")
    except KvmeshError as e:
        t.check(e.code == "KVM_ENOENT" and e.field == "request_id", "a generate.cancel of an ended generate is KVM_ENOENT")
    try:
        b.generate_cancel("r-1")
        t.check(False, "a client cannot cancel another's generate")
    except KvmeshError as e:
        t.check(e.code == "KVM_ENOENT", "generate.cancel names only the client's own generates")

    # a deadline inside generation
    t0 = time.monotonic()
    try:
        a.generate_sync("tiny", token_ids=PROMPT, max_tokens=4000, ignore_eos=True, deadline_ms=200)
        t.check(False, "a generate past its deadline ends with KVM_ETIMEDOUT")
    except KvmeshError as e:
        t.check(e.code == "KVM_ETIMEDOUT", "a generate past its deadline ends with KVM_ETIMEDOUT")
    took = time.monotonic() - t0
    t.check(took < 5.0, "the deadline stopped it inside generation (%.2f s)" % took)
    st = a.stats()
    blocks, free = pool(st)
    t.check(free == blocks and st["generate"]["timed_out"] == 1, "its KV went back too; stats counts it")

    # unloading a model with a generate going is refused, then works
    gid = a.generate_start("tiny", token_ids=PROMPT, max_tokens=4000, ignore_eos=True)
    next_of(a, gid, "token")
    try:
        b.model_unload("tiny")
        t.check(False, "model.unload with a generate going is refused")
    except KvmeshError as e:
        t.check(e.code == "KVM_EBUSY", "model.unload with a generate going is KVM_EBUSY")
    a.generate_cancel(gid)
    for h, _ in a.messages(gid, 60):
        pass
    t.check(b.model_unload("tiny")["name"] == "tiny", "model.unload works once the generate ended")

    # a daemon stopped with a generate going ends it and exits cleanly
    a.model_load("tiny", TINY, backend="cpu")
    gid = a.generate_start("tiny", token_ids=PROMPT, max_tokens=4000, ignore_eos=True)
    next_of(a, gid, "token")
    t.check(d.stop() == 0, "the daemon exits 0 with a generate going")
finally:
    d.kill()
sys.exit(t.done())
