"""test_share.py KVMESH TMP - two clients sharing one daemon's runtime: KVCOMM anchors that client A's runs build
are used by client B's runs (examples/team.lua on models/minillama-2m with kv = kvcomm): B's reuse rate of agent
calls after A's warm-up is above A's cold one, B's steps take KV at an offset through anchors, and every step's
figures partition its prompt. Then the same with --state: a daemon that learned from client A's runs, stopped
with SIGTERM (which saves its state) and started again on the folder, gives client B's runs the anchors A built
(B reuses at once), and a daemon killed with SIGKILL after a save keeps a readable state."""
import os
import shutil
import sys

from daemon import ROOT, Checks, Daemon, partition_ok

kvmesh, tmp = sys.argv[1], sys.argv[2]
N = 4
t = Checks()
wf = os.path.join(tmp, "wf")
os.makedirs(wf)
shutil.copy(os.path.join(ROOT, "examples", "team.lua"), wf)
ARGS = ["--workflows", wf, "--model", os.path.join(ROOT, "models", "minillama-2m"), "--kv", "kvcomm",
        "--client-timeout-ms", "60000"]
d = Daemon(kvmesh, *ARGS)


def agent_steps(dones):
    return [s for x in dones for s in x["steps"] if "kv" in s]


def rate(dones):
    st = agent_steps(dones)
    return sum(1 for s in st if s["kv"]["mode"] == "reuse" or s["kv"]["anchors"] > 0) / max(1, len(st))


try:
    a, b = d.client(300), d.client(300)
    t.check([w["name"] for w in a.workflow_list()] == ["team"], "--workflows loads team.lua as 'team'")
    cold = [a.run_sync("team", dataset=True, seed=s) for s in range(1, N + 1)]
    warm = [b.run_sync("team", dataset=True, seed=s) for s in range(1, N + 1)]
    ra, rb = rate(cold), rate(warm)
    print("reuse rate of agent calls: client A (cold) %.2f, client B (after A) %.2f" % (ra, rb))
    t.check(all(x["type"] == "done" for x in cold + warm), "every run of both clients is done")
    t.check(rb > ra, "client B reuses more than client A did cold (%.2f > %.2f)" % (rb, ra))
    t.check(rb >= 0.25, "client B reuses at least a quarter of its agent calls (%.2f)" % rb)
    t.check(any(s["kv"]["offset"] > 0 and s["kv"]["anchors"] > 0 for s in agent_steps(warm)),
            "client B's steps take KV at an offset through anchors")
    t.check(all(map(partition_ok, agent_steps(cold + warm))), "every step's KV figures partition its prompt")
    t.check(all("ttft_ms" in s["timings"] for s in agent_steps(warm)), "every step carries its TTFT")
    s = a.stats()
    t.check(s["reuse"]["agent_steps"] == len(agent_steps(cold + warm)) and s["reuse"]["rate"] > 0,
            "stats counts the agent steps and the reuse rate (%.2f)" % s["reuse"]["rate"])
    t.check(d.stop() == 0, "the daemon exits 0")

    # restart with --state: what the first daemon learned is there for the second
    state = os.path.join(tmp, "state")
    d = Daemon(kvmesh, *ARGS, "--state", state)
    cold = [d.client(300).run_sync("team", dataset=True, seed=s) for s in range(1, N + 1)]
    t.check(d.stop() == 0, "a daemon with --state exits 0 on SIGTERM")
    files = [f for f in os.listdir(state) if f.endswith(".kva")]
    t.check(len(files) == 1, "SIGTERM saved the anchors (%s)" % files)
    d = Daemon(kvmesh, *ARGS, "--state", state)
    warm = [d.client(300).run_sync("team", dataset=True, seed=s) for s in range(1, N + 1)]
    rs, rw = rate(cold), rate(warm)
    print("reuse rate of agent calls: first daemon %.2f, restarted daemon %.2f" % (rs, rw))
    t.check(rw > rs and rw >= 0.25, "the restarted daemon reuses what the first learned (%.2f > %.2f)" % (rw, rs))
    d.proc.send_signal(9)  # SIGKILL: the state saved by the first daemon stays whole
    d.proc.wait()
    d = Daemon(kvmesh, *ARGS, "--state", state)
    again = [d.client(300).run_sync("team", dataset=True, seed=s) for s in range(1, N + 1)]
    t.check(all(x["type"] == "done" for x in again) and rate(again) == rw,
            "after a SIGKILL the saved state loads whole: the same runs reuse the same (%.2f)" % rate(again))
    t.check(not [f for f in os.listdir(state) if f.endswith(".bad") or ".tmp." in f], "no damaged or temporary file")
    t.check(d.stop() == 0, "the daemon exits 0")
finally:
    d.kill()
sys.exit(t.done())
