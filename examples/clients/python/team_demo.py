"""team_demo.py - KV sharing across requests, as a user of the daemon sees it: the team workflow served twice
over the same N tasks, cold then warm, with the reuse rate of agent calls, TTFT and accuracy of both passes.

    kvmesh serve --workflows DIR_WITH_team.lua --model models/minillama-2m --kv kvcomm &
    python3 examples/clients/python/team_demo.py --n 20
"""
import argparse
import statistics
import sys

from kvmesh_client import Client


def one_pass(c, workflow, seeds):
    dones = [c.run_sync(workflow, dataset=True, seed=s) for s in seeds]
    steps = [s for d in dones for s in d["steps"] if "kv" in s]
    reused = [s for s in steps if s["kv"]["mode"] == "reuse" or s["kv"]["anchors"] > 0]
    scores = [d["score"] for d in dones if "score" in d]
    return {
        "runs": len(dones),
        "reuse": len(reused) / max(1, len(steps)),
        "offset_tokens": sum(s["kv"]["offset"] for s in steps),
        "prompt_tokens": sum(s["usage"]["input_tokens"] for s in steps),
        "ttft_ms": statistics.mean(s["timings"]["ttft_ms"] for s in steps) if steps else 0.0,
        "accuracy": 100 * statistics.mean(scores) if scores else float("nan"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connect", default="tcp://127.0.0.1:5555")
    ap.add_argument("--workflow", default="team")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    seeds = range(a.seed, a.seed + a.n)
    with Client(a.connect, timeout_s=1800) as c:
        c.hello("team_demo.py")
        print("%-5s %5s %8s %14s %13s %9s" % ("pass", "runs", "reuse", "offset tokens", "mean TTFT ms", "accuracy"))
        for name in ("cold", "warm"):
            r = one_pass(c, a.workflow, seeds)
            print("%-5s %5d %7.0f%% %7d/%-6d %13.1f %8.1f%%" % (name, r["runs"], 100 * r["reuse"], r["offset_tokens"],
                                                               r["prompt_tokens"], r["ttft_ms"], r["accuracy"]))
        s = c.stats()["reuse"]
        print("daemon: %d agent calls, %.0f%% reused through KVCOMM anchors" % (s["agent_steps"], 100 * s["rate"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
