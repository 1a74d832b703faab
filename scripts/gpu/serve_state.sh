#!/usr/bin/env bash
# serve_state.sh - the H100 check of issues 12 and 19's new code: run from the repo root on the GPU machine with
# .gpu-serve/ carried (scripts/gpu/bundle_serve.sh). Logs in $OUT:
#   gpu.txt     card, driver, clocks; the bundle's VERSION
#   parity.log  test_cuda_ops, test_cuda_model, test_kvcomm_device_path, test_comm_state, test_runtime_step
#   team.log    examples/team.lua on models/minillama-2m with --backend cuda: dense on seeds 1-20 and 101-120,
#               then kvcomm (the default, blended policy) with --state: seeds 1-20 cold, seeds 101-120 warm
#               (the CPU figures: dense 75.0 / 72.5; kvcomm cold 75.0 reuse 0%, warm 72.5 reuse 22.5%)
#   state.log   tests/cli/state.sh with KVM_BACKEND=cuda (anchors saved from the GPU, loaded and mirrored back)
#   serve.log   kvmesh serve on the GPU with synthetic Llama-3.1-8B weights (timing only): the review_8b workflow
#               served to kvmesh client, one run then 8 concurrent clients; per-run TTFT and wall, daemon stats
# Usage: scripts/gpu/serve_state.sh [parity|team|state|serve]...   (default: all)
set -uo pipefail
steps=${*:-parity team state serve}
B=$PWD/.gpu-serve
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export KVM_SOURCE_DIR=$PWD KVM_SHARED_DIR=$B/shared LD_LIBRARY_PATH=$B/lib
clocks() { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv,noheader; }
if [ -f "$B/bins.tar.xz" ] && [ ! -x "$B/kvmesh" ]; then tar xJf "$B/bins.tar.xz" -C "$B"; fi
{ echo "start: $(date -u)"; echo "bundle: $(cat "$B/VERSION" 2>/dev/null)"; clocks; nvidia-smi -L; } >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
want() { [[ " $steps " == *" $1 "* ]]; }
K=$B/kvmesh
rc=0
if want parity; then
  for t in test_cuda_ops test_cuda_model test_kvcomm_device_path test_comm_state test_runtime_step; do
    [ -x "$B/$t" ] || { echo "== $t: not in the bundle"; continue; }
    echo "== $t ($(date -u +%T))"; timeout 300 "$B/$t" 2>&1 | tail -4; echo "rc=${PIPESTATUS[0]}"
  done > "$OUT/parity.log" 2>&1
  grep -E "^==|PASSED|FAILED|rc=" "$OUT/parity.log"; grep -q "FAILED" "$OUT/parity.log" && rc=1
fi
if want team; then
  st=$(mktemp -d)
  { for args in "--seed 1 --kv dense" "--seed 101 --kv dense" "--seed 1 --kv kvcomm --state $st" "--seed 101 --kv kvcomm --state $st"; do
      echo "== team.lua --n 20 $args --backend cuda ($(date -u +%T))"
      timeout 300 "$K" run examples/team.lua --n 20 $args --backend cuda --no-trace -q 2>&1 | grep -E "accuracy|reuse rate|^(finder|checker|neighbour|reverser) "
    done; ls -la "$st"; } > "$OUT/team.log" 2>&1
  cat "$OUT/team.log"
fi
if want state; then
  KVM_BACKEND=cuda timeout 600 bash tests/cli/state.sh "$K" > "$OUT/state.log" 2>&1; echo "state.sh rc=$?" >> "$OUT/state.log"
  tail -14 "$OUT/state.log"
fi
if want serve; then
  w=$(mktemp -d); cp examples/review_8b.lua "$w/review.lua"
  { echo "== serve (synthetic llama-3.1-8b, cuda) ($(date -u +%T))"
    "$K" serve --bind tcp://127.0.0.1:5655 --events tcp://127.0.0.1:5656 --workflows "$w" --model synthetic:llama-3.1-8b \
      --backend cuda --kv kvcomm > "$OUT/serve-daemon.log" 2>&1 &
    d=$!
    for i in $(seq 1 60); do "$K" client --connect tcp://127.0.0.1:5655 ping > /dev/null 2>&1 && break; sleep 1; done
    echo "daemon up after ${i} s"
    for r in 1 2; do
      s=$(date +%s.%N); timeout 120 "$K" client --connect tcp://127.0.0.1:5655 --timeout-s 110 run review --input input="Write is_prime(n) in C" --no-stream 2>&1 | tail -3
      echo "run $r wall $(python3 -c "print(round($(date +%s.%N) - $s, 2))") s"
    done
    s=$(date +%s.%N)
    for c in $(seq 1 8); do timeout 300 "$K" client --connect tcp://127.0.0.1:5655 --timeout-s 290 run review --input input="Task $c: parse a CSV line" --no-stream > "$w/c$c.txt" 2>&1 & done
    wait $(jobs -p | grep -v "^$d$") 2>/dev/null
    echo "8 concurrent clients: wall $(python3 -c "print(round($(date +%s.%N) - $s, 2))") s"; tail -q -n 2 "$w"/c*.txt
    "$K" client --connect tcp://127.0.0.1:5655 stats 2>&1 | head -40
    kill -TERM $d; wait $d; echo "daemon exit $?"; tail -5 "$OUT/serve-daemon.log"; } > "$OUT/serve.log" 2>&1
  cat "$OUT/serve.log"
fi
{ echo "end: $(date -u)"; clocks; } >> "$OUT/gpu.txt" 2>&1
exit $rc
