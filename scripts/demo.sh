#!/usr/bin/env bash
# demo.sh KVMESH SHARED - the main job of `make demo`.
#   - with the bundled models (models/minillama-2m): the multi-agent team example, dense, then kvcomm cold and warm
#     (anchors kept across the two runs by --state), then the same tasks through `kvmesh serve` and the Python
#     client, cold then warm (KV sharing across requests of one long-lived runtime);
#   - else, with stories260K from the shared folder: a generation and a small fan-out workflow;
#   - else: a dry run of the team workflow on the mock engine.
set -euo pipefail
kvmesh=$1; shared=$2
traces=$(mktemp -d)

# The team tasks served by one long-lived daemon (kvmesh serve, docs/protocol.md) to the Python client, twice:
# the KVCOMM anchors the cold pass leaves in the daemon make the warm pass reuse KV.
serve_demo() {
  /usr/bin/python3 -c "import zmq" 2>/dev/null || { echo "(python3-zmq is missing: the daemon demo is skipped)"; return 0; }
  local wf log pid ep
  wf=$(mktemp -d); log=$(mktemp)
  cp examples/team.lua "$wf/"
  "$kvmesh" serve --workflows "$wf" --model models/minillama-2m --kv kvcomm --bind 'tcp://127.0.0.1:*' \
    --events 'tcp://127.0.0.1:*' 2> "$log" &
  pid=$!
  ep=
  for _ in $(seq 600); do
    ep=$(grep -o 'listening on tcp://[0-9.:]*' "$log" | sed 's/listening on //' || true)
    [ -n "$ep" ] && break
    sleep 0.1
  done
  [ -n "$ep" ] || { cat "$log"; kill "$pid"; return 1; }
  echo "== kvmesh serve ($ep): the same ${DEMO_SERVE_N:-20} team tasks through the Python client, cold then warm =="
  /usr/bin/python3 examples/clients/python/team_demo.py --connect "$ep" --n "${DEMO_SERVE_N:-20}"
  kill -TERM "$pid"
  wait "$pid"
  rm -rf "$wf" "$log"
}
if [ -f models/minillama-2m/config.json ]; then
  state=$(mktemp -d)
  echo "== kvmesh run examples/team.lua (bundled models, 20 seeded team tasks): dense prefill =="
  "$kvmesh" run examples/team.lua --n 20 --seed 1 --kv dense --trace "$traces"
  echo "== the same with --kv kvcomm and a state folder: cold (no anchors yet; the 20 runs go in one wave) =="
  "$kvmesh" run examples/team.lua --n 20 --seed 1 --kv kvcomm --trace "$traces" --state "$state"
  echo "== again, 20 other tasks: the anchors the first kvcomm run learned are loaded, agents reuse each other's KV =="
  "$kvmesh" run examples/team.lua --n 20 --seed 101 --kv kvcomm --trace "$traces" --state "$state"
  rm -rf "$state"
  echo "== kvmesh trace show (one run) =="
  "$kvmesh" trace show "$(ls -d "$traces"/*/ | head -1)" | head -30
  serve_demo
  exit 0
fi
m=$shared/models/stories260K
if [ -f "$m/stories260K.bin" ]; then
  echo "(models/ is absent: the bundled-model demo is replaced by stories260K)"
  echo "== kvmesh generate with stories260K (CPU, greedy) =="
  "$kvmesh" generate --model "$m/stories260K.bin" --tokenizer "$m/tok512.bin" --prompt "Once upon a time" --max-tokens 200
  echo
  echo "== kvmesh run: a teller and three agents continuing its story (one batch), then 12 runs with kvcomm =="
  "$kvmesh" run examples/stories.lua --model "$m/stories260K.bin" --input input="a girl named Lily" --trace "$traces"
  "$kvmesh" run examples/stories.lua --model "$m/stories260K.bin" --n 12 --kv kvcomm --trace "$traces" -q
  echo "== kvmesh trace steps (what each agent of the first run saw and said) =="
  "$kvmesh" trace steps "$(ls -d "$traces"/*/ | head -1)" | head -40
  exit 0
fi
echo "(neither models/ nor the shared stories260K are here: a dry run on the mock engine)"
"$kvmesh" run examples/team.lua --mock --n 3 --trace "$traces"
