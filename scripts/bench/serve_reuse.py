"""serve_reuse.py KVMESH [--requests N] [--clients 4] [--warmup 20] [--json FILE] - KV reuse across requests of one
`kvmesh serve` (issue 12's acceptance: "after 20 warm-up requests the reuse rate of agent calls is >= 60% and accuracy
is within 2 points of dense; the same after a daemon restart with --state"). A program, not a timed test; figures in
docs/perf/serve.md ("Reuse across requests, 4 clients").

Phases, each with N client threads (own DEALER socket each, the real Python client of examples/clients/python) taking
the phase's dataset seeds from one queue, `run.start` with `dataset: true` on examples/team.lua:
  1. kvcomm: a daemon with `--kv kvcomm` (the default policy of kv = "kvcomm", preset=blend with the fidelity guard,
     docs/kvcomm.md §3) on an empty `--state DIR`: the warm-up seeds 1..W, then the measured seeds W+1..W+R;
  2. dense: a second daemon with `--kv dense` on the measured seeds and on the restart phase's (the accuracy baseline);
  3. restart: the kvcomm daemon is stopped with SIGTERM (it saves its anchors into the state folder) and started again
     on the same folder; new seeds W+R+1..W+2R, reuse from the first request on.
Reuse rate of agent calls = the share of agent steps whose KV came through KVCOMM (mode "reuse" or anchors > 0:
tests/serve/test_share.py's rate()). Accuracy per role from each step's output against the dataset item's answers
(`kvmesh minitasks gen --split eval --task team`, checked against the workflow's own score of every run); a role that is
degenerate under dense (0% right, or the same output on every request: the team's checker, which always says "no") is
named and left out of the headline accuracy, as `kvmesh bench kvcomm` does (docs/kvcomm.md).
Exit status: 0 when every run ended done (the verdict on the issue's thresholds is printed, not the exit status),
1 when a run failed, 2 on a usage error.
"""
import argparse
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "serve"))

from daemon import Daemon  # noqa: E402
from kvmesh_client import KvmeshError  # noqa: E402

ROLES = ("finder", "checker", "reverser", "neighbour")


def loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0


def expected_answers(kvmesh, lo, n):
    """seed -> {"value", "neighbour"}: the team item `index = seed` of the eval split, as team.lua's g:dataset."""
    out = subprocess.run([kvmesh, "minitasks", "gen", "--split", "eval", "--task", "team", "--role", "all",
                          "--start", str(lo), "--n", str(n)], capture_output=True, text=True, check=True).stdout
    ans = {}
    for line in out.splitlines():
        it = json.loads(line)
        seed = int(it["id"].split("/")[3])
        if it["role"] == "finder":
            ans.setdefault(seed, {})["value"] = it["answer"]
        elif it["role"] == "neighbour":
            ans.setdefault(seed, {})["neighbour"] = it["answer"]
    return ans


def role_outputs(done):
    return {m["node"]: (m.get("text") or "").strip() for m in done["state"].get("msgs", [])}


def role_right(out, exp):
    """team.lua's g:score, per role."""
    x = out.get("finder", "")
    return {"finder": x == exp["value"], "checker": out.get("checker") == ("yes" if x == exp["value"] else "no"),
            "reverser": out.get("reverser") == x[::-1], "neighbour": out.get("neighbour") == exp["neighbour"]}


def agent_steps(dones):
    return [s for d in dones for s in d["steps"] if "kv" in s]


def reused(step):
    return step["kv"]["mode"] == "reuse" or step["kv"]["anchors"] > 0


def rate(dones):
    st = agent_steps(dones)
    return sum(1 for s in st if reused(s)) / max(1, len(st))


def run_phase(d, seeds, clients, kv=None):
    """The seeds through `clients` threads; returns (results in completion order, errors, wall seconds). A result:
    {seed, client, nth (the client's how-many-th request), done}."""
    todo = queue.Queue()
    for s in seeds:
        todo.put(s)
    results, errors, lock = [], [], threading.Lock()

    def worker(k):
        c = d.client(600)
        nth = 0
        try:
            while True:
                try:
                    seed = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done = c.run_sync("team", dataset=True, seed=seed, kv=kv)
                except (KvmeshError, TimeoutError) as e:
                    with lock:
                        errors.append("seed %d: %s" % (seed, e))
                    continue
                with lock:
                    results.append({"seed": seed, "client": k, "nth": nth, "done": done})
                nth += 1
        finally:
            c.close()

    t0 = time.time()
    th = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    return results, errors, time.time() - t0


def summarize(results, errors, wall, answers):
    dones = [r["done"] for r in results]
    steps = agent_steps(dones)
    right = {r: 0 for r in ROLES}
    outs = {r: [] for r in ROLES}
    mismatch = []
    for r in results:
        out = role_outputs(r["done"])
        ok = role_right(out, answers[r["seed"]])
        for role in ROLES:
            right[role] += ok[role]
            outs[role].append(out.get(role, ""))
        if "score" in r["done"] and abs(sum(ok.values()) / 4.0 - r["done"]["score"]) > 1e-9:
            mismatch.append(r["seed"])
    n = len(results)
    first = [r["done"] for r in results if r["nth"] == 0]
    return {
        "runs": n, "errors": len(errors), "error_messages": errors[:5], "wall_s": round(wall, 2),
        "seeds": [min(r["seed"] for r in results), max(r["seed"] for r in results)] if results else [],
        "agent_steps": len(steps),
        "reuse": rate(dones),
        "reuse_first": rate(first),  # the first request of each client
        # in the order the runs ended, by quarters: does reuse still grow?
        "reuse_by_quarter": [rate(dones[k * n // 4:(k + 1) * n // 4]) for k in range(4)] if n >= 4 else [],
        "offset_tokens": sum(s["kv"]["offset"] for s in steps),
        "prompt_tokens": sum(s["usage"]["input_tokens"] for s in steps),
        "ttft_ms": sum(s["timings"]["ttft_ms"] for s in steps) / max(1, len(steps)),
        "per_role": {role: 100.0 * right[role] / max(1, n) for role in ROLES},
        "reuse_per_role": {role: sum(1 for s in steps if s["agent"] == role and reused(s))
                           / max(1, sum(1 for s in steps if s["agent"] == role)) for role in ROLES},
        "modes": {m: sum(1 for s in steps if s["kv"]["mode"] == m) for m in sorted(set(s["kv"]["mode"] for s in steps))},
        "score": 100.0 * sum(d.get("score", 0) for d in dones) / max(1, n),
        "score_mismatch": mismatch,
        "_outputs": outs,
    }


def degenerate(dense_phases):
    """Roles degenerate under dense (0% right, or one output for every request), with why."""
    out = {}
    for role in ROLES:
        runs = sum(p["runs"] for p in dense_phases)
        acc = sum(p["per_role"][role] * p["runs"] for p in dense_phases) / max(1, runs)
        seen = set(o for p in dense_phases for o in p["_outputs"][role])
        if acc == 0.0 or (len(seen) == 1 and runs > 1):
            out[role] = "dense %.1f%%%s" % (acc, ", always '%s'" % next(iter(seen)) if len(seen) == 1 else "")
    return out


def headline(p, skip):
    roles = [r for r in ROLES if r not in skip]
    return sum(p["per_role"][r] for r in roles) / max(1, len(roles))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kvmesh")
    ap.add_argument("--requests", type=int, default=100, help="measured requests per phase (default 100)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=20, help="warm-up requests before the measured ones (default 20)")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "minillama-2m"))
    ap.add_argument("--kvcomm", action="append", default=[], metavar="K=V",
                    help="a KVCOMM switch for the kvcomm daemons (repeatable; `kvmesh serve --kvcomm`, docs/kvcomm.md "
                    "§3), for diagnostics; the default policy without it")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args()
    if a.requests < 1 or a.clients < 1 or a.warmup < 0:
        ap.error("--requests and --clients must be at least 1, --warmup at least 0")
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        ap.error("--json %s: no such folder" % a.json)
    if not os.access(a.kvmesh, os.X_OK):
        ap.error("%s: not an executable kvmesh" % a.kvmesh)
    kvmesh = os.path.abspath(a.kvmesh)
    W, R = a.warmup, a.requests
    warm_seeds = list(range(1, W + 1))
    meas_seeds = list(range(W + 1, W + R + 1))
    rest_seeds = list(range(W + R + 1, W + 2 * R + 1))
    answers = expected_answers(kvmesh, 1, W + 2 * R)
    tmp = tempfile.mkdtemp(prefix="serve_reuse.")
    wf, state = os.path.join(tmp, "wf"), os.path.join(tmp, "state")
    os.makedirs(wf)
    shutil.copy(os.path.join(ROOT, "examples", "team.lua"), wf)
    base = ["--workflows", wf, "--model", a.model, "--no-events"]
    load0, t0 = loadavg(), time.time()
    ph, d = {}, None
    failed = []
    try:
        def phase(name, seeds, **kw):
            if not seeds:
                return
            res, errs, wall = run_phase(d, seeds, a.clients, **kw)
            ph[name] = summarize(res, errs, wall, answers)
            failed.extend("%s: %s" % (name, e) for e in errs)
            print("  %-8s %4d runs in %6.1f s, reuse %5.1f%%" % (name, len(res), wall, 100 * ph[name]["reuse"]),
                  file=sys.stderr)

        kvc = ["--kv", "kvcomm", "--state", state] + [x for kv in a.kvcomm for x in ("--kvcomm", kv)]
        d = Daemon(kvmesh, *base, *kvc)
        phase("warmup", warm_seeds)
        phase("measured", meas_seeds)
        stats_before = d.client().stats().get("reuse", {})
        if d.stop() != 0:
            failed.append("the kvcomm daemon did not exit 0 on SIGTERM")
        kva = sorted(f for f in os.listdir(state) if f.endswith(".kva"))
        d = Daemon(kvmesh, *base, "--kv", "dense")
        phase("dense", meas_seeds)
        phase("dense_restart", rest_seeds)
        if d.stop() != 0:
            failed.append("the dense daemon did not exit 0 on SIGTERM")
        d = Daemon(kvmesh, *base, *kvc)
        phase("restart", rest_seeds)
        stats_after = d.client().stats().get("reuse", {})
        if d.stop() != 0:
            failed.append("the restarted daemon did not exit 0 on SIGTERM")
        d = None
    except (RuntimeError, subprocess.TimeoutExpired) as e:  # a daemon that did not start or stop
        print("serve_reuse.py: %s" % e, file=sys.stderr)
        return 1
    finally:
        if d is not None:
            d.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    for name, p in ph.items():
        if p["score_mismatch"]:
            failed.append("%s: the per-role answers disagree with the workflow's score on seeds %s"
                          % (name, p["score_mismatch"][:5]))
    skip = degenerate([ph[k] for k in ("dense", "dense_restart") if k in ph])
    for p in ph.values():
        p["accuracy"] = headline(p, skip)
        del p["_outputs"]
    verdict = {}
    for name, base_name in (("measured", "dense"), ("restart", "dense_restart")):
        p, b = ph[name], ph[base_name]
        verdict[name] = {"reuse": p["reuse"], "accuracy": p["accuracy"], "dense_accuracy": b["accuracy"],
                         "delta_points": p["accuracy"] - b["accuracy"],
                         "meets": p["reuse"] >= 0.60 and abs(p["accuracy"] - b["accuracy"]) <= 2.0}
    doc = {
        "kvmesh": kvmesh, "model": a.model, "workflow": "examples/team.lua", "clients": a.clients,
        "warmup": W, "requests": R,
        "policy": "--kv kvcomm " + (" ".join("--kvcomm " + kv for kv in a.kvcomm) if a.kvcomm else
                                    "(the default preset of kv = \"kvcomm\": blend with the fidelity guard)"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "loadavg_start": load0, "loadavg_end": loadavg()},
        "wall_s": round(time.time() - t0, 1),
        "state_files": kva, "daemon_reuse_stats": {"before_restart": stats_before, "after_restart": stats_after},
        "degenerate_roles": skip, "phases": ph, "acceptance": verdict, "failed": failed,
    }
    hdr = "%-14s %6s %10s %8s %10s %9s" % ("phase", "runs", "seeds", "reuse", "reuse 1st", "TTFT ms")
    hdr += "".join(" %9s" % r for r in ROLES) + " %9s" % "acc%"
    print("team workflow, %d clients, %s, %s" % (a.clients, os.path.basename(a.model), doc["policy"]))
    print("degenerate (left out of acc%%): %s" % (", ".join("%s (%s)" % kv for kv in skip.items()) or "none"))
    print(hdr)
    for name in ("warmup", "measured", "dense", "restart", "dense_restart"):
        if name not in ph:
            continue
        p = ph[name]
        row = "%-14s %6d %10s %7.1f%% %9.1f%% %9.1f" % (name, p["runs"], "%d-%d" % tuple(p["seeds"]),
                                                       100 * p["reuse"], 100 * p["reuse_first"], p["ttft_ms"])
        row += "".join(" %8.1f%%" % p["per_role"][r] for r in ROLES) + " %8.1f%%" % p["accuracy"]
        print(row)
    for name, v in verdict.items():
        print("%-8s reuse %.1f%% (>= 60%%), accuracy %.1f%% vs dense %.1f%% (%+.1f points, within 2): %s" % (
            name, 100 * v["reuse"], v["accuracy"], v["dense_accuracy"], v["delta_points"],
            "meets" if v["meets"] else "does NOT meet"))
    print("load average %.1f -> %.1f, %.0f s" % (load0, doc["machine"]["loadavg_end"], doc["wall_s"]))
    for f in failed:
        print("FAILED: " + f)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
