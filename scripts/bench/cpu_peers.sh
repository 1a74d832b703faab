#!/usr/bin/env bash
# cpu_peers.sh [KVMESH] [REPS] - stories260K decode speed of kvmesh beside llama2.c's run.c (the reference C
# decoder, ../shared/tools/peers/llama2c, built here with -O3 -fopenmp -march=native) on the same machine in the
# same run, with 1 and 2 threads: greedy, the same prompt, 256 steps; median tokens/s of REPS runs of each.
# llama2.c's 'achieved tok/s' counts its whole loop (prompt tokens included); ours is the decode rate that
# `kvmesh generate` prints (prompt excluded), and its end-to-end rate (prompt tokens + generated over TTFT + decode)
# is printed beside it for the like-for-like ratio.
set -euo pipefail
kvmesh=${1:-build/kvmesh}; reps=${2:-7}
shared=${KVM_SHARED_DIR:-../shared}
model=$shared/models/stories260K/stories260K.bin; tok=$shared/models/stories260K/tok512.bin
runc=$shared/tools/peers/llama2c/run.c
for f in "$model" "$tok" "$runc"; do
  [ -f "$f" ] || { echo "cpu_peers.sh: $f not found (set KVM_SHARED_DIR to the shared data folder)" >&2; exit 2; }
done
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
gcc -O3 -fopenmp -march=native -o "$work/run" "$runc" -lm
prompt="Once upon a time"
echo "cpu_peers.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')), $reps runs each"
for t in 1 2; do
  ours=(); ours_e2e=(); peer=()
  for r in $(seq "$reps"); do
    line=$(OMP_NUM_THREADS=$t "$work/run" "$model" -z "$tok" -t 0 -n 256 -i "$prompt" 2>&1 >/dev/null | grep 'achieved tok/s')
    peer+=("$(echo "$line" | sed 's/.*: *//')")
    line=$(KVM_THREADS=$t "$kvmesh" generate --model "$model" --tokenizer "$tok" --prompt "$prompt" --steps 256 \
      --temperature 0 --no-echo 2>&1 >/dev/null | grep 'tokens/s')
    # "prompt tokens: 5, generated tokens: 251, TTFT: 1.4 ms, decode: 4542.1 tokens/s, ..."
    read -r np ng ttft dec < <(echo "$line" | sed -E 's/prompt tokens: ([0-9]+), generated tokens: ([0-9]+), TTFT: ([0-9.]+) ms, decode: ([0-9.]+) tokens\/s.*/\1 \2 \3 \4/')
    ours+=("$dec")
    ours_e2e+=("$(python3 -c "print(($np + $ng) / ($ttft / 1e3 + ($ng - 1) / $dec))")")
  done
  python3 - "$t" "${peer[*]}" "${ours[*]}" "${ours_e2e[*]}" <<'PY'
import statistics as st, sys
t, peer, ours, e2e = sys.argv[1], *[[float(x) for x in a.split()] for a in sys.argv[2:]]
p, o, e = st.median(peer), st.median(ours), st.median(e2e)
print(f"threads {t}: llama2.c run.c {p:8.0f} tok/s | kvmesh decode {o:8.0f} tok/s ({o / p:.2f}x) | "
      f"kvmesh end-to-end {e:8.0f} tok/s ({e / p:.2f}x)")
PY
done
