"""stream.py - run a workflow on a `kvmesh serve` daemon and print its agents' tokens as they come.

    kvmesh serve --mock --workflows examples/ &          # or your models
    python3 examples/clients/python/stream.py team --dataset --seed 3
    python3 examples/clients/python/stream.py pair --input input="two plus two" --connect tcp://127.0.0.1:5555
"""
import argparse
import sys

from kvmesh_client import Client, KvmeshError


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workflow")
    ap.add_argument("--connect", default="tcp://127.0.0.1:5555")
    ap.add_argument("--input", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dataset", action="store_true", help="inputs from the workflow's g:dataset(seed)")
    a = ap.parse_args()
    inputs = dict(kv.split("=", 1) for kv in a.input)
    agent = None
    with Client(a.connect) as c:
        try:
            for m in c.run(a.workflow, inputs=inputs, seed=a.seed, dataset=a.dataset or None, stream=["tokens", "steps"]):
                if m["type"] == "token":
                    if m["agent"] != agent:
                        agent = m["agent"]
                        print("\n[%s] " % agent, end="")
                    print(m["text"], end="", flush=True)
                elif m["type"] == "step":
                    s = m["step"]
                    kv = s.get("kv") or {}
                    print("\n  (%s: %s; prompt %d tokens, %d reused at an offset, ttft %.1f ms)"
                          % (s["node"], s["status"], s["usage"]["input_tokens"], kv.get("offset", 0), s["timings"]["ttft_ms"]))
                elif m["type"] == "done":
                    print("\nrun %s done: %s" % (m["run_id"], m["outputs"]))
        except KvmeshError as e:
            print("\nerror: %s" % e, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
