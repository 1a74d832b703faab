"""daemon.py - what the daemon tests share: start `kvmesh serve` on loopback with ports it picks itself (so tests
running in parallel never collide), wait for its endpoints, stop it and check that it exited cleanly."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "examples", "clients", "python"))

from kvmesh_client import Client, Events, KvmeshError  # noqa: E402,F401

PAIR = """local kvm = kvmesh
local m = kvm.model('mock:echo')
local g = kvm.graph{ name = 'pair' }
g:agent('a', { model = m, template = 'Q: {input}\\nA:', max_tokens = 4 })
g:agent('b', { model = m, template = 'Q: {input}\\nA: {agent.a}\\nB:', max_tokens = 6 })
g:edge(kvm.START, 'a')
g:edge('a', 'b')
return g
"""

# one agent that talks for long (the mock echoes its prompt, ignore_eos keeps it going)
LONG = """local kvm = kvmesh
local m = kvm.model('mock:echo')
local g = kvm.graph{ name = 'long' }
g:agent('talker', { model = m, template = 'say {input}', max_tokens = %d, ignore_eos = true })
g:edge(kvm.START, 'talker')
return g
"""

# a run that goes on for long: a Lua node calling a talkative agent again and again (waits for the model do not
# count against the Lua budgets)
SLOW = """local kvm = kvmesh
local m = kvm.model('mock:echo')
local talker = kvm.agent{ name = 'talker', model = m, template = 'say {input}', max_tokens = 2000, ignore_eos = true }
local g = kvm.graph{ name = 'slow' }
g:func('loop', function(state, last, ctx)
  for i = 1, 1000 do ctx:call(talker, { input = 'again ' .. i }) end
end)
g:edge(kvm.START, 'loop')
return g
"""


class Daemon:
    def __init__(self, kvmesh, *args, env=None, events="tcp://127.0.0.1:*"):
        e = dict(os.environ, KVM_THREADS="1", OMP_WAIT_POLICY="passive")
        e.update(env or {})
        cmd = [kvmesh, "serve", "--bind", "tcp://127.0.0.1:*", "--events", events] + list(args)
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT)
        self.log = []
        deadline = time.time() + 120
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("the daemon exited before listening:\n" + "".join(self.log))
            self.log.append(line)
            m = re.search(r"listening on (\S+) events (\S+)", line)
            if m:
                self.ctl, self.events = m.group(1), m.group(2)
                break
            if time.time() > deadline:
                raise RuntimeError("the daemon did not listen in time")
        # keep reading stderr so the daemon never blocks on a full pipe
        self.reader = threading.Thread(target=lambda: self.log.extend(iter(self.proc.stderr.readline, "")), daemon=True)
        self.reader.start()

    def client(self, timeout_s=120):
        return Client(self.ctl, timeout_s=timeout_s)

    def stop(self, timeout_s=60):
        """SIGTERM; returns the exit status (a test fails on anything but 0)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout_s)
        self.reader.join(5)
        if rc != 0:  # show why (a sanitizer report, a message)
            print("daemon exit %d; the end of its stderr:\n%s" % (rc, "".join(self.log[-80:])))
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Checks:
    """Named checks: each prints ok/FAIL; exit status 1 if any failed."""

    def __init__(self):
        self.failed = 0
        self.n = 0

    def check(self, cond, what):
        self.n += 1
        if cond:
            print("ok   %s" % what)
        else:
            self.failed += 1
            print("FAIL %s" % what)
        sys.stdout.flush()
        return cond

    def done(self):
        print("%d checks, %d failed" % (self.n, self.failed))
        return 1 if self.failed else 0


def partition_ok(step):
    kv, u = step.get("kv"), step["usage"]
    return kv is None or kv["exact"] + kv["offset"] + kv["naive"] + kv["recomputed"] + kv["fused"] == u["input_tokens"]
