#!/usr/bin/env bash
# launch17.sh - one GPU call for issue 17 against the previous path (BASE) in the same call: this commit's default
# and what a commit adds behind a switch that is off until measured (NEW: a '+'-joined list of KVM_CUDA_* settings
# without the prefix; default ATTN_WG=7, the wgmma prefill attention on 128-byte-swizzled tiles). Run from the repo root on the GPU machine with .gpu-i17/ (this commit:
# `scripts/gpu/issue17.sh bundle` here) and BASE=DIR carried (default .gpu-base: kvmesh of 5fc863f, the decode path
# before the 2026-12-07 changes; remade by `scripts/gpu/bundle_tests.sh base BUILD kvmesh` in a build of that
# commit). Steps in order of need, so that a call cut
# short keeps the first; STEPS trims them (default: parity engine profile memcheck kvcomm hf). Logs in $OUT:
#   gpu.txt       card, driver, clocks at start and end, both bundles' commits
#   parity.log    test_cuda_ops, test_cuda_model (with the launch-settings test: the same logits bit for bit with
#                 PDL off and on, and each weight prefetch), the KVCOMM device tests, test_c2c
#   engine.log    kvmesh bench engine --synthetic llama-3.1-8b --no-eager for each of CONFIGS, ROUNDS rounds
#                 alternated (a config is "base" or a list of KVM_CUDA_* settings joined by '+', "default" for none)
#   profile.log   the per-op profiles (eager) and the timeline between ops of this commit's default and of NEW
#   prefill4k.log (STEPS=... p4k) the 4K prompt's TTFT for each of CONFIGS4K, and their per-op prefill profiles
#   ncu.log       (STEPS=... ncu) Nsight Compute sections of one prefill attention launch
#   nsys.log      (STEPS=... nsys) Nsight Systems over a 4K prefill: CUDA API calls over 0.1 ms, GPU idle gaps
#   memcheck.log  compute-sanitizer memcheck of test_cuda_ops and test_cuda_model
#   kvcomm.log    kvmesh bench kvcomm --synthetic llama-3.1-8b: the spec's policy, the blend without its guard at
#                 recompute_frac 0.5 and 0.25 (5th-agent TTFT)
#   hf.log        HF transformers eager on the same card (issue17.sh hf; HF_COMPILE=1 adds torch.compile)
set -uo pipefail
B=$PWD/.gpu-i17
BASE=$(cd "${BASE:-$PWD/.gpu-base}" && pwd)
OUT=${OUT:-$PWD/gpu-out}
export OUT
mkdir -p "$OUT"
export KVM_SOURCE_DIR=$PWD
for d in "$B" "$BASE"; do if [ -f "$d/bins.tar.xz" ] && [ ! -x "$d/kvmesh" ]; then tar xJf "$d/bins.tar.xz" -C "$d"; fi; done
steps=" ${STEPS:-parity wgprobe engine profile memcheck kvcomm hf} "
want() { [[ "$steps" == *" $1 "* ]]; }
clocks() { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader; }
{ echo "start: $(date -u)"; echo "bundle: $(cat "$B/VERSION"), base: $(cat "$BASE/VERSION")"; clocks; nvidia-smi -L; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if want parity; then
  for t in test_cuda_ops test_cuda_model test_kvcomm_ops test_kvcomm_device_path test_kvcomm_core test_comm_state test_c2c; do
    echo "== $t ($(date -u +%T))"
    LD_LIBRARY_PATH=$B/lib timeout 200 "$B/$t" 2>&1 | grep -vE "^\[ +(RUN|OK) +\]" | tail -80; echo "rc=${PIPESTATUS[0]}"
  done > "$OUT/parity.log" 2>&1
  grep -E "^==|launch settings|rope_qk_kv_write|skinny GEMM after|gemv|PASSED|FAILED|rc=" "$OUT/parity.log" | head -60
fi
if want wgprobe; then   # the wgmma kernel's swizzled settings (attn_wg 7, 8: V's descriptor offsets read either
  # way), one process each: which passes (then time it with CONFIGS / CONFIGS4K)
  for v in ${WG_PROBE:-7 8}; do
    echo "== test_cuda_ops '*wgmma*' $v ($(date -u +%T))"
    LD_LIBRARY_PATH=$B/lib timeout 60 "$B/test_cuda_ops" '*wgmma*' $v 2>&1 | grep -E "attention|attn_wg|PASSED|FAILED|rror" | tail -12
    echo "rc=${PIPESTATUS[0]}"
  done > "$OUT/wgprobe.log" 2>&1
  grep -E "^==|probe|rc=" "$OUT/wgprobe.log"
fi
# one engine run: $1 = base | default | KEY=V[+KEY=V...] (KVM_CUDA_ settings without the prefix)
engine() {   # $1 = config; more arguments go to bench engine
  local cfg=$1 bin=$B lib=$B/lib envs=()
  shift
  if [ "$cfg" = base ]; then bin=$BASE lib=$BASE/lib; elif [ "$cfg" != default ]; then
    IFS=+ read -ra kv <<< "$cfg"; for x in "${kv[@]}"; do envs+=("KVM_CUDA_$x"); done
  fi
  echo "==== $cfg ($(date -u +%T))"
  env LD_LIBRARY_PATH="$lib" "${envs[@]}" timeout 120 "$bin/kvmesh" bench engine --synthetic llama-3.1-8b --no-eager "$@" 2>&1 |
    grep -E "^\| (TTFT prefill  |decode b=1 \(graph|decode b=16 step \(graph)|^spread|rror"
}
NEW=${NEW:-ATTN_WG=7}   # what a commit adds behind a switch, off by default until measured
if want engine; then
  { for round in $(seq 1 "${ROUNDS:-3}"); do
      for c in ${CONFIGS:-base default $NEW}; do engine "$c"; done
    done; } > "$OUT/engine.log" 2>&1
  cat "$OUT/engine.log"
fi
if want profile; then   # this commit's default, then with $NEW (eager per-op profiles and the timeline between ops)
  { echo "==== default"; LD_LIBRARY_PATH=$B/lib timeout 120 "$B/kvmesh" bench engine --synthetic llama-3.1-8b --profile
    if [ -n "$NEW" ]; then
      echo "==== $NEW"; IFS=+ read -ra kv <<< "$NEW"
      env LD_LIBRARY_PATH=$B/lib $(for x in "${kv[@]}"; do echo "KVM_CUDA_$x"; done) timeout 120 "$B/kvmesh" bench engine \
        --synthetic llama-3.1-8b --profile
    fi; } > "$OUT/profile.log" 2>&1
  grep -E "^====|^profile|^timeline|rope|attention decode|m=16 mma|m=1 gemv|rmsnorm" "$OUT/profile.log" | head -70
fi
if want p4k; then   # the 4K prompt's TTFT for each of CONFIGS4K (alternated, ROUNDS4K rounds), then the per-op
  # profile of each config but base (the attention's time per layer at 4K)
  { for round in $(seq 1 "${ROUNDS4K:-2}"); do
      for c in ${CONFIGS4K:-base default $NEW}; do engine "$c" --prompt 4096 --batch 1 --reps 5; done
    done
    for c in ${CONFIGS4K:-base default $NEW}; do
      [ "$c" = base ] && continue
      echo "==== profile 4K: $c"
      envs=(); if [ "$c" != default ]; then IFS=+ read -ra kv <<< "$c"; for x in "${kv[@]}"; do envs+=("KVM_CUDA_$x"); done; fi
      env LD_LIBRARY_PATH=$B/lib "${envs[@]}" timeout 120 "$B/kvmesh" bench engine --synthetic llama-3.1-8b --prompt 4096 \
        --batch 1 --reps 3 --no-eager --profile 2>&1 | sed -n '/^profile: prefill/,/^profile: decode/p' | head -14
    done; } > "$OUT/prefill4k.log" 2>&1
  cat "$OUT/prefill4k.log"
fi
if want ncu; then   # Nsight Compute on the prefill's attention kernel (NCU_PROMPT, default 4K, the 5th layer's launch): why it runs at
  # ~110 TFLOP/s (speed of light, occupancy, warp stalls, scheduler). Not in the default steps. NCU_KERNEL (default
  # k_attn_mma) and NCU_ENV (KVM_CUDA_ settings, e.g. KVM_CUDA_ATTN_WG=1) pick another kernel.
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  { echo "==== 4K prefill, this commit's default, with the per-op profile ($(date -u +%T))"
    LD_LIBRARY_PATH=$B/lib timeout 120 "$B/kvmesh" bench engine --synthetic llama-3.1-8b --prompt 4096 --batch 1 --reps 5 \
      --no-eager --profile 2>&1 | grep -E "^\| TTFT|^profile|^timeline|attention|matmul|rope|norm" | head -60
    echo "==== ncu ${NCU_KERNEL:-k_attn_mma} ${NCU_ENV:-} ($(date -u +%T)) ${ncu:-no ncu}"
    [ -n "$ncu" ] && env LD_LIBRARY_PATH=$B/lib ${NCU_ENV:-} timeout ${NCU_S:-150} "$ncu" --kernel-name regex:${NCU_KERNEL:-k_attn_mma} --launch-skip 4 \
      --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section ComputeWorkloadAnalysis "$B/kvmesh" bench engine --synthetic llama-3.1-8b \
      --no-eager --reps 1 --prompt ${NCU_PROMPT:-4096} --batch 1 2>&1 | grep -vE "^\| (TTFT|decode)" | tail -120; } > "$OUT/ncu.log" 2>&1
  tail -60 "$OUT/ncu.log"
fi
if want nsys; then   # Nsight Systems over a 4K prefill bench (NSYS_PROMPT): the CUDA API calls that took over 0.1 ms
  # (host stalls: where the TTFT's time outside the ops goes) and the GPU's idle gaps over 0.1 ms, with what ran before
  nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
  { echo "==== nsys, prefill ${NSYS_PROMPT:-4096} tokens ($(date -u +%T)) ${nsys:-no nsys}"
    if [ -n "$nsys" ]; then
      LD_LIBRARY_PATH=$B/lib timeout 200 "$nsys" profile -q -t cuda,osrt -o /tmp/k17 --force-overwrite true "$B/kvmesh" \
        bench engine --synthetic llama-3.1-8b --prompt ${NSYS_PROMPT:-4096} --batch 1 --reps 3 --warmup 1 --no-eager 2>&1 |
        grep -E "^\| TTFT|rror"
      "$nsys" stats -q -r cuda_api_sum,cuda_gpu_kern_sum,cuda_gpu_mem_time_sum -f csv /tmp/k17.nsys-rep 2>&1 | head -80
      echo "==== CUDA API calls over 0.1 ms (start ns, duration ns, name)"
      "$nsys" stats -q -r cuda_api_trace -f csv /tmp/k17.nsys-rep 2>/dev/null | python3 -c '
import csv, sys
r = csv.DictReader(sys.stdin)
for row in r:
    d = int(row.get("Duration (ns)", 0) or 0)
    if d > 100000: print(row.get("Start (ns)"), d, row.get("Name"))' | tail -60
      echo "==== GPU idle gaps over 0.1 ms (start of the gap ns, gap ns, the op before, the op after)"
      "$nsys" stats -q -r cuda_gpu_trace -f csv /tmp/k17.nsys-rep 2>/dev/null | python3 -c '
import csv, sys
rows = sorted(csv.DictReader(sys.stdin), key=lambda r: int(r["Start (ns)"]))
for a, b in zip(rows, rows[1:]):
    end = int(a["Start (ns)"]) + int(a["Duration (ns)"])
    if int(b["Start (ns)"]) - end > 100000: print(end, int(b["Start (ns)"]) - end, a["Name"][:60], "->", b["Name"][:60])' | tail -40
    fi; } > "$OUT/nsys.log" 2>&1
  tail -70 "$OUT/nsys.log"
fi
if want dec3k; then   # decode at the KVCOMM 5th agent's context (3.6K): batch 1 and 16 steps, each of DEC3K_CONFIGS
  { for round in $(seq 1 "${ROUNDS:-3}"); do
      for c in ${DEC3K_CONFIGS:-default $NEW}; do engine "$c" --prompt 3584 --reps 5; done
    done; } > "$OUT/dec3k.log" 2>&1
  cat "$OUT/dec3k.log"
fi
if want memcheck; then
  MEMCHECK_TESTS="${MEMCHECK_TESTS:-test_cuda_ops test_cuda_model}" MEMCHECK_S=${MEMCHECK_S:-200} bash scripts/gpu/issue17.sh memcheck
fi
if want kvcomm; then   # the spec's policy, then the blend's mechanics without the guard (random weights make every
  # guard check differ, so the guarded blend recomputes everything) at two recompute fractions: its 5th-agent TTFT
  # (KVCOMM_CFGS: a '|'-separated list of "preset [key=value ...]")
  IFS='|' read -ra kcfgs <<< "${KVCOMM_CFGS:-spec|blend guard=off recompute_frac=0.5|blend guard=off recompute_frac=0.25}"
  { for cfg in "${kcfgs[@]}"; do
      set -- $cfg; pol=$1; shift; sets=(--set kvcomm.preset=$pol --set kvcomm.force_reuse=on)
      for x in "$@"; do sets+=(--set "kvcomm.$x"); done
      echo "==== bench kvcomm ${sets[*]} ($(date -u +%T))"
      LD_LIBRARY_PATH=$B/lib timeout 200 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b "${sets[@]}" --out /tmp/kvb
      echo "rc=$?"
    done; } > "$OUT/kvcomm.log" 2>&1
  grep -E "^====|^agent|^a[0-9] |^alignment|^anchors|rc=|rror" "$OUT/kvcomm.log" | head -40
fi
if want hf; then
  HF_COMPILE=${HF_COMPILE:-0} bash scripts/gpu/issue17.sh hf
fi
{ echo "end: $(date -u)"; clocks; } >> "$OUT/gpu.txt" 2>&1
