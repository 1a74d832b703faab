"""serve_load.py KVMESH [--clients 64] [--seconds 120] [--mock | --model PATH] [--generate PATH] - load on
`kvmesh serve` (a program, not a timed test; figures in docs/perf/serve.md).

Starts a daemon on loopback, then N client threads, each with its own DEALER socket, send a mix of requests for
the given time: runs of a two-agent workflow (streaming tokens), run.status of their last run, ping, stats,
workflow.list; with --generate PATH also `generate` requests (8 tokens, greedy) on that model, loaded with
model.load. It reports the requests served, errors, latency percentiles per type (ping: the daemon's request
overhead as a client sees it, loopback and Python included), the daemon's own time per request outside model
compute as its `stats` reports it (p50 / p99 / max per request type: decode, handler, encode, send), and the daemon's
RSS sampled every second (warm-up = the first quarter of the time).
"""
import argparse
import os
import random
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "serve"))

from daemon import PAIR, Daemon  # noqa: E402
from kvmesh_client import KvmeshError  # noqa: E402


def rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return -1
    return -1


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))]


def worker(d, end, lat, errs, lock, seed, gen=False):
    rng = random.Random(seed)
    c = d.client(timeout_s=300)
    last_run = None
    mine = {}
    while time.time() < end:
        kind = rng.choices(["run", "status", "ping", "stats", "list", "generate"], [4, 2, 6, 1, 1, 1 if gen else 0])[0]
        t0 = time.perf_counter()
        try:
            if kind == "run":
                done = c.run_sync("pair", inputs={"input": "task %d" % rng.randrange(1000)}, stream=["tokens"])
                last_run = done["run_id"]
            elif kind == "status" and last_run:
                c.run_status(last_run)
            elif kind == "status":
                continue
            elif kind == "ping":
                c.ping()
            elif kind == "stats":
                c.stats()
            elif kind == "generate":
                c.generate_sync("gen", prompt="task %d" % rng.randrange(1000), max_tokens=8)
            else:
                c.workflow_list()
        except (KvmeshError, TimeoutError) as e:
            with lock:
                errs.append("%s: %s" % (kind, e))
            continue
        mine.setdefault(kind, []).append((time.perf_counter() - t0) * 1000)
    c.close()
    with lock:
        for k, v in mine.items():
            lat.setdefault(k, []).extend(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kvmesh")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--model", default=None, help="a model for every kvmesh.model() (default: the mock model)")
    ap.add_argument("--generate", default=None, help="a model for generate requests in the mix (default: none)")
    a = ap.parse_args()
    args = ["--model", a.model] if a.model else ["--mock"]
    d = Daemon(a.kvmesh, *args, "--max-client-runs", "4", "--client-timeout-ms", "60000")
    c = d.client()
    c.workflow_load("pair", PAIR)
    if a.generate:
        c.model_load("gen", a.generate)
    lat, errs, lock = {}, [], threading.Lock()
    end = time.time() + a.seconds
    threads = [threading.Thread(target=worker, args=(d, end, lat, errs, lock, i, bool(a.generate))) for i in range(a.clients)]
    rss = []
    for t in threads:
        t.start()
    while time.time() < end:
        rss.append(rss_kb(d.proc.pid))
        time.sleep(1)
    for t in threads:
        t.join()
    s = c.stats()
    c.close()
    rc = d.stop()
    warm = rss[len(rss) // 4:] or rss
    print("clients %d, %.0f s, daemon exit %d" % (a.clients, a.seconds, rc))
    print("requests: %d, errors: %d%s" % (sum(len(v) for v in lat.values()), len(errs), (" (first: %s)" % errs[0]) if errs else ""))
    print("%-8s %8s %9s %9s %9s" % ("type", "n", "p50 ms", "p99 ms", "max ms"))
    for k in sorted(lat):
        v = lat[k]
        print("%-8s %8d %9.2f %9.2f %9.2f" % (k, len(v), pct(v, 50), pct(v, 99), max(v)))
    print("daemon RSS MiB: start %.1f, after warm-up %.1f, end %.1f (min %.1f, max %.1f after warm-up)"
          % (rss[0] / 1024, warm[0] / 1024, rss[-1] / 1024, min(warm) / 1024, max(warm) / 1024))
    print("daemon: runs started %d, replies sent %d, dropped replies %d, bad requests %d"
          % (s["server"]["runs_started"], s["net"]["sent"], s["net"]["dropped_replies"], s["server"]["bad_requests"]))
    ov = s.get("overhead")
    if ov:
        print("daemon overhead per request (its stats: decode, handler, encode, send; model compute left out)")
        print("%-14s %8s %9s %9s %9s   %s" % ("type", "n", "p50 us", "p99 us", "max us", "CPU time p50 / p99 / max us"))
        for k, h in [("all", ov["all"])] + sorted(ov["by_type"].items()):
            print("%-14s %8d %9.1f %9.1f %9.1f   %.1f / %.1f / %.1f" % (k, h["n"], h["p50_us"], h["p99_us"], h["max_us"],
                                                                     h.get("cpu_p50_us", 0), h.get("cpu_p99_us", 0), h.get("cpu_max_us", 0)))
    return 1 if errs or rc else 0


if __name__ == "__main__":
    sys.exit(main())
