#!/usr/bin/env bash
# serve_reuse.sh KVMESH SHARED - a short run of scripts/bench/serve_reuse.py (issue 12's reuse figures across
# requests, docs/perf/serve.md): 8 warm-up and 16 measured team requests per phase from 4 clients of a kvcomm daemon,
# the same seeds on a dense daemon, then the kvcomm daemon restarted on its --state folder. The JSON has every phase
# with its figures, the degenerate checker is named, no run failed, and agent calls reuse KV after the warm-up and
# after the restart. Release build only: under the sanitizers its 72 model runs take ~10 minutes (it adds no C path
# that cli_serve_share does not run there).
set -u
if [ -n "${KVM_SANITIZED:-}" ]; then echo "SKIP: sanitizer build (the release build runs it)"; exit 77; fi
. tests/support/serve_lib.sh
serve_need_zmq
[ -e models/minillama-2m ] || { echo "SKIP: no models/minillama-2m"; exit 77; }
serve_setup
/usr/bin/python3 scripts/bench/serve_reuse.py "$1" --requests 16 --warmup 8 --json "$tmp/r.json" > "$tmp/out" 2>&1 ||
  { echo "FAIL serve_reuse.py exit $?"; cat "$tmp/out"; exit 1; }
cat "$tmp/out"
/usr/bin/python3 - "$tmp/r.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
fails = []
def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    cond or fails.append(what)
ph = d["phases"]
check(sorted(ph) == ["dense", "dense_restart", "measured", "restart", "warmup"], "the five phases: %s" % sorted(ph))
want = {"warmup": 8, "measured": 16, "dense": 16, "restart": 16, "dense_restart": 16}
check(all(ph[k]["runs"] == n and ph[k]["errors"] == 0 for k, n in want.items()), "every run of every phase ended done")
check(ph["measured"]["seeds"] == ph["dense"]["seeds"] == [9, 24] and ph["restart"]["seeds"] == [25, 40],
      "measured and dense on the same seeds, the restart on new ones")
roles = ["checker", "finder", "neighbour", "reverser"]
check(all(sorted(p["per_role"]) == roles and 0 <= p["accuracy"] <= 100 and 0 <= p["reuse"] <= 1 for p in ph.values()),
      "every phase has accuracy per role, a headline accuracy and a reuse rate")
check(list(d["degenerate_roles"]) == ["checker"], "the degenerate checker is named: %s" % d["degenerate_roles"])
check(ph["dense"]["reuse"] == 0 and ph["dense_restart"]["reuse"] == 0, "the dense daemon reuses nothing")
check(ph["measured"]["reuse"] > 0, "agent calls reuse KV after the warm-up (%.3f)" % ph["measured"]["reuse"])
check(ph["restart"]["reuse"] > 0, "and after the restart on --state (%.3f)" % ph["restart"]["reuse"])
check(len(d["state_files"]) == 1, "SIGTERM saved the anchors: %s" % d["state_files"])
check(set(d["acceptance"]) == {"measured", "restart"} and
      all(set(v) >= {"reuse", "accuracy", "dense_accuracy", "delta_points", "meets"} for v in d["acceptance"].values()),
      "the verdict on the issue's thresholds for both")
check(d["failed"] == [], "nothing failed: %s" % d["failed"])
sys.exit(1 if fails else 0)
PY
