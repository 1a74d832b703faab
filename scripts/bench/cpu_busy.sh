#!/usr/bin/env bash
# cpu_busy.sh KVMESH [MODEL] [REPS] - the CPU engine on an idle and on a busy machine (issue 16): TTFT of a
# 256-token prefill with KVM_THREADS=1 and 2, first as the machine is, then beside one CPU-bound process per
# core (`sh -c 'while :; do :; done'`, not pinned; killed on exit, and after at most 90 s whatever happens).
# Prints min and median TTFT per case, busy/idle and 2-thread/1-thread ratios, and the targets: busy, two
# threads never slower than one; busy prefill at most 3x its idle time. The load average and the busiest
# other processes before the run are printed too: other work on the machine skews the "idle" numbers.
# MODEL defaults to models/minillama-2m, REPS to 10 (2 warm-up reps each).
set -euo pipefail
kvmesh=${1:?usage: cpu_busy.sh KVMESH [MODEL] [REPS]}
model=${2:-models/minillama-2m}
reps=${3:-10}
cores=$(nproc)
tmp=$(mktemp -d)
burners=()
stop_burners() {
  for p in "${burners[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${burners[@]}"; do wait "$p" 2>/dev/null || true; done
  burners=()
}
trap 'stop_burners; rm -rf "$tmp"' EXIT

bench() { # $1 threads, $2 tag
  KVM_THREADS=$1 "$kvmesh" bench engine --model "$model" --backend cpu --prompt 256 --batch 8 --reps "$reps" \
    --warmup 2 --json "$tmp/$2.json" >/dev/null 2>&1
}

echo "cpu_busy: $(date -u '+%Y-%m-%d %H:%M UTC'), $cores cores, $model, $reps reps"
echo "before: $(cut -d' ' -f1-3 /proc/loadavg) (load 1/5/15 min); busiest other processes:"
ps -eo pcpu=,comm= --sort=-pcpu | head -4 | sed 's/^/  /'
bench 1 idle1
bench 2 idle2
for _ in $(seq "$cores"); do
  timeout 90 sh -c 'while :; do :; done' &
  burners+=($!)
done
sleep 0.5
bench 1 busy1
bench 2 busy2
stop_burners

python3 - "$tmp" <<'EOF'
import json, sys, statistics
d = {k: json.load(open(f"{sys.argv[1]}/{k}.json"))["ttft_ms"]["reps"] for k in ("idle1", "idle2", "busy1", "busy2")}
mn = {k: min(v) for k, v in d.items()}
md = {k: statistics.median(v) for k, v in d.items()}
print("| threads | idle TTFT ms (min / median) | busy TTFT ms (min / median) | busy/idle (median) |")
print("|---|---|---|---|")
for t in (1, 2):
    i, b = f"idle{t}", f"busy{t}"
    print(f"| {t} | {mn[i]:.1f} / {md[i]:.1f} | {mn[b]:.1f} / {md[b]:.1f} | {md[b] / md[i]:.2f}x |")
r = md["busy2"] / md["busy1"]
print(f"busy, 2 threads / 1 thread (median): {r:.2f}x (target <= 1.00: {'met' if r <= 1.0 else 'NOT met'})")
worst = max(md["busy1"] / md["idle1"], md["busy2"] / md["idle2"])
print(f"busy / idle prefill, worst of 1 and 2 threads (median): {worst:.2f}x (target <= 3.00: {'met' if worst <= 3.0 else 'NOT met'})")
print(f"idle, 2 threads / 1 thread (median): {md['idle2'] / md['idle1']:.2f}x")
EOF
