#!/usr/bin/env bash
# serve_load_gpu.sh - issue 12's load test: 64 concurrent clients with mixed requests on one `kvmesh serve` for 10
# minutes, synthetic Llama-3.1-8B weights on the GPU (--backend cuda). The load client is C (`kvmesh client bench`:
# the GPU machine's python3 has no pyzmq). Run from the repo root; logs in $OUT:
#   load.jsonl        per request type: n, errors, client-side p50 / p99 / max ms; then the daemon's stats (its own
#                     time per request outside model compute: overhead.all / by_type p50 / p99 / max)
#   load-rss.log      the daemon's RSS (KiB) every 5 s;  load-daemon.log  its stderr;  load-summary.txt  the verdict
# The mix per client (weights): run.start of a two-agent workflow 4, run.status 2, ping 6, stats 1, workflow.list 1,
# generate (16 tokens from 32 random ids, a model.load of the same weights) 1.
# Environment: KVMESH (default .gpu-serve/kvmesh, else build/kvmesh), MODEL (synthetic:llama-3.1-8b), BACKEND (cuda),
# LOAD_SECONDS (600), CLIENTS (64), PORT (5755; events on PORT+1), OUT (./gpu-out).
# On the CPU (a check of the script, not the figures): MODEL=synthetic:tiny-llama BACKEND=cpu LOAD_SECONDS=20.
# Exit 0 only when no request failed, the daemon exited 0, and the RSS after warm-up stayed within 5 %.
set -uo pipefail
MODEL=${MODEL:-synthetic:llama-3.1-8b}
BACKEND=${BACKEND:-cuda}
LOAD_SECONDS=${LOAD_SECONDS:-600}
CLIENTS=${CLIENTS:-64}
PORT=${PORT:-5755}
OUT=${OUT:-$PWD/gpu-out}
K=${KVMESH:-}
if [ -z "$K" ]; then
  B=$PWD/.gpu-serve
  if [ -f "$B/bins.tar.xz" ] && [ ! -x "$B/kvmesh" ]; then tar xJf "$B/bins.tar.xz" -C "$B"; fi
  if [ -x "$B/kvmesh" ]; then K=$B/kvmesh; export LD_LIBRARY_PATH=$B/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; else K=$PWD/build/kvmesh; fi
fi
[ -x "$K" ] || { echo "serve_load_gpu.sh: no kvmesh binary at $K (set KVMESH)"; exit 2; }
mkdir -p "$OUT"
EP=tcp://127.0.0.1:$PORT
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
cat > "$w/pair.lua" <<'LUA'
local kvm = kvmesh
local m = kvm.model('load-model')   -- every kvmesh.model resolves to the daemon's --model
local g = kvm.graph{ name = 'pair' }
g:agent('a', { model = m, template = 'Question: {input}\nAnswer:', max_tokens = 8, ignore_eos = true })
g:agent('b', { model = m, template = 'Question: {input}\nFirst answer: {agent.a}\nBetter answer:', max_tokens = 8, ignore_eos = true })
g:edge(kvm.START, 'a')
g:edge('a', 'b')
return g
LUA
{ echo "start: $(date -u)  model $MODEL  backend $BACKEND  $CLIENTS clients  $LOAD_SECONDS s  binary $K"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader; } | tee "$OUT/load-summary.txt"
"$K" serve --bind "$EP" --events "tcp://127.0.0.1:$((PORT + 1))" --workflows "$w" --model "$MODEL" --backend "$BACKEND" \
  --client-timeout-ms 120000 > "$OUT/load-daemon.log" 2>&1 &
d=$!
up=0
for i in $(seq 1 300); do
  "$K" client --connect "$EP" --timeout-s 2 ping > /dev/null 2>&1 && { up=1; break; }
  kill -0 "$d" 2> /dev/null || break
  sleep 1
done
[ "$up" = 1 ] || { echo "the daemon did not come up:"; tail -20 "$OUT/load-daemon.log"; kill "$d" 2> /dev/null; exit 1; }
echo "daemon up after ${i} s" | tee -a "$OUT/load-summary.txt"
"$K" client --connect "$EP" --timeout-s 600 model-load gen "$MODEL" --backend "$BACKEND" > "$OUT/load-model.json" 2>&1 ||
  { echo "model.load failed:"; cat "$OUT/load-model.json"; kill "$d"; wait "$d"; exit 1; }
(while kill -0 "$d" 2> /dev/null; do echo "$(date +%s) $(awk '/^VmRSS/{print $2}' /proc/$d/status 2> /dev/null)"; sleep 5; done) > "$OUT/load-rss.log" &
sampler=$!
"$K" client --connect "$EP" --timeout-s 900 bench --clients "$CLIENTS" --seconds "$LOAD_SECONDS" --workflow pair \
  --generate gen --vocab 1000 > "$OUT/load.jsonl" 2>> "$OUT/load-summary.txt"
brc=$?
kill -TERM "$d"
wait "$d"
drc=$?
kill "$sampler" 2> /dev/null
wait "$sampler" 2> /dev/null
# RSS after warm-up (the first quarter of the samples left out): first, last, max
rss=$(awk 'NF == 2 && $2 != "" {v[n++] = $2} END {s = int(n / 4); if (n - s < 2) {print "n/a"; exit}
           mx = 0; for (i = s; i < n; i++) if (v[i] > mx) mx = v[i];
           printf "%d %d %d %s", v[s], v[n - 1], mx, (v[n - 1] <= v[s] * 1.05 && mx <= v[s] * 1.10) ? "flat" : "GROWING"}' "$OUT/load-rss.log")
{ echo "== requests (client side):"; grep -v daemon_stats "$OUT/load.jsonl"
  echo "== the daemon's own time per request (outside model compute), from its stats:"
  grep daemon_stats "$OUT/load.jsonl" | sed -e 's/.*"overhead":{[^}]*"all":\({[^}]*}\).*/overhead.all \1/' | cut -c1-400
  echo "== RSS KiB after warm-up: first last max verdict: $rss"
  echo "bench rc=$brc daemon rc=$drc  end: $(date -u)"; } | tee -a "$OUT/load-summary.txt"
[ "$brc" = 0 ] && [ "$drc" = 0 ] && [[ "$rss" == *flat* ]]
