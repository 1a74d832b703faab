"""test_tools.py KVMESH TMP - client tools through `kvmesh serve` and the pyzmq client (docs/protocol.md,
tool.register / tool.call / tool.result): a client registers a Python function with a JSON Schema, a run's node
calls it with ctx:tool and gets its result; arguments the schema refuses never reach the client; a tool's exception,
a client that is gone and the run's wall-time budget end the wait with a clear error in the run; registrations the
library refuses get structured errors."""
import sys
import threading
import time

from daemon import Checks, Daemon, KvmeshError

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "minLength": 1}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city"], "additionalProperties": False}

# a func node that asks the tool; `call` is the Lua of the call
TOOLS = """local kvm = kvmesh
local g = kvm.graph{ name = 'tools', state = { out = kvm.reduce.replace } %s }
g:func('ask', function(state, last, ctx)
  return { out = %s }
end)
g:edge(kvm.START, 'ask')
g:output(function(state) return { out = state.out } end)
return g
"""


def wf(call, limit=""):
    return TOOLS % (limit, call)


def run_error(c, name, inputs=None):
    try:
        c.run_sync(name, inputs=inputs or {})
    except KvmeshError as e:
        return e
    return None


kvmesh, tmp = sys.argv[1], sys.argv[2]
t = Checks()
d = Daemon(kvmesh, "--mock", "--trace", tmp + "/traces", "--client-timeout-ms", "1500")
try:
    a = d.client()
    a.hello()
    t.check("tool.register" in a.hello()["capabilities"]["types"], "hello lists tool.register among the types")
    calls = []

    @a.tool("weather", WEATHER, description="The forecast of a city")
    def weather(city, days=1):
        calls.append((city, days))
        if city == "Atlantis":
            raise ValueError("no weather under the sea")
        return {"city": city, "sky": ["sunny", "rainy"][:days], "ok": True}

    a.workflow_load("ok", wf("ctx:tool('weather', { city = ctx.inputs.city, days = 2 }).sky[2]"))
    done = a.run_sync("ok", inputs={"city": "Oslo"})
    t.check(done["outputs"] == {"out": "rainy"}, "a run calls the client's tool and gets its result (%s)" % done.get("outputs"))
    t.check(calls == [("Oslo", 2)], "the tool got the arguments as keyword arguments")

    a.workflow_load("bad_args", wf("ctx:tool('weather', { city = 12 })"))
    e = run_error(a, "bad_args")
    t.check(e is not None and "ctx:tool: tool 'weather': args.city: expected string, got integer" in str(e),
            "arguments the schema refuses fail the run naming the field (%s)" % e)
    t.check(len(calls) == 1, "... and never reach the client")

    e = run_error(a, "ok", {"city": "Atlantis"})
    t.check(e is not None and "ctx:tool: tool 'weather': ValueError: no weather under the sea" in str(e),
            "the tool's exception is a Lua error in the run (%s)" % e)

    a.workflow_load("nil", wf("tostring(ctx:tool('void'))"))

    @a.tool("void")
    def void():
        return None
    t.check(a.run_sync("nil")["outputs"] == {"out": "nil"}, "a tool returning None gives nil")

    # registrations the library refuses
    for name, schema, want in [("weather", WEATHER, "registered already"),
                               ("w2", {"type": "object", "properties": {"c": {"pattern": "x"}}}, "unsupported keyword 'pattern'"),
                               ("bad name", {}, "a tool name")]:
        try:
            a.request("tool.register", name=name, schema=schema)
            t.check(False, "tool.register %r refused" % name)
        except KvmeshError as e:
            t.check(e.code == "KVM_EINVAL" and want in str(e), "tool.register %r refused: %s" % (name, e))

    # a second client runs; the first serves its tool meanwhile
    b = d.client()
    b.hello()
    stop = []
    server = threading.Thread(target=lambda: a.serve_tools(60, until=lambda: stop))
    server.start()
    done = b.run_sync("ok", inputs={"city": "Bergen"})
    stop.append(1)
    server.join()
    t.check(done["outputs"] == {"out": "rainy"} and calls[-1] == ("Bergen", 2), "another client's run calls the tool")
    try:
        b.request("tool.result", run_id=done["run_id"], call_id="1", result={})
        t.check(False, "a tool.result for no waiting call is refused")
    except KvmeshError as e:
        t.check(e.code == "KVM_ENOENT" and e.field == "call_id", "a tool.result for no waiting call is refused (%s)" % e)

    # the run's wall-time budget covers the wait: a tool answering after it ends the run there
    b.workflow_load("late", wf("ctx:tool('slow', {})", ", limit = { wall_ms = 300 }"))

    @a.tool("slow")
    def slow():
        time.sleep(1.0)
        return 1
    stop.clear()
    server = threading.Thread(target=lambda: a.serve_tools(60, until=lambda: stop))
    server.start()
    t0 = time.monotonic()
    e = run_error(b, "late")
    took = time.monotonic() - t0
    stop.append(1)
    server.join()
    a.serve_tools(5, until=lambda: a.tool_errors)  # the reply to the late tool.result
    t.check(e is not None and e.code == "KVM_EBUDGET" and "waiting for tool 'slow' to answer" in str(e),
            "a wait past the run's wall-time budget ends the run (%s)" % e)
    t.check(took < 0.95, "... at the budget, not when the tool answers (%.2f s)" % took)
    t.check(any(h.get("code") in ("KVM_ENOENT", "KVM_ESTALE") for h in a.tool_errors), "... and the late answer is refused")

    # a client that registered a tool and went silent: the calls of its tool fail after client_timeout_ms
    gone = d.client()
    gone.hello()
    gone.register_tool("ghost", {"type": "object"}, lambda: 1)
    b.workflow_load("ghost", wf("ctx:tool('ghost', {})"))
    t0 = time.monotonic()
    e = run_error(b, "ghost")
    t.check(e is not None and "ctx:tool: tool 'ghost': the client serving it" in str(e),
            "a silent tool client: the run fails naming it (%s)" % e)
    t.check(time.monotonic() - t0 < 10, "... within the client timeout")
    e = run_error(b, "ghost")
    t.check(e is not None and "no tool 'ghost' is registered" in str(e), "... and its tool is gone (%s)" % e)
    gone.close()
    t.check(d.stop() == 0, "the daemon exits 0 on SIGTERM")
finally:
    d.kill()
sys.exit(t.done())
