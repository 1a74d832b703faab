#!/usr/bin/env bash
# issue17.sh - one GPU call for issue 17 (engine and KVCOMM on the H100) and issue 14 (C2C ops): run from the
# repo root on the GPU machine with .gpu-i17/ carried (make it here: `scripts/gpu/issue17.sh bundle [BUILD_DIR]`,
# default build/, configured with CUDA for sm_90). Logs in $OUT (at most 8 files come back):
#   gpu.txt      card, driver, clocks at start and end, the bundle's commit (appended by each run of a step)
#   parity.log   test_cuda_ops, test_cuda_model, test_kvcomm_ops, test_kvcomm_device_path, test_kvcomm_core,
#                test_comm_state, test_c2c; then compute-sanitizer memcheck of test_c2c, test_kvcomm_ops and
#                test_kvcomm_device_path; the C2C converter round trip (torch)
#   engine.log   kvmesh bench engine --synthetic llama-3.1-8b --profile (beside HF eager)
#   hf.log       HF transformers eager (hf.json) and static cache + torch.compile (hf_compile.json), same card
#   kvcomm.log   kvmesh bench kvcomm --synthetic llama-3.1-8b: the spec's policy, then the blend
#   team.log     kvmesh bench kvcomm --workload W on the bundled models (TEAM_CELLS, TEAM_MODES), accuracy on the GPU
# TEAM_CELLS name models of models/ (they travel with the working tree, so the bundle does not copy them).
# Steps: parity engine hf kvcomm team (default: all of them, in that order; HF_COMPILE=0 skips the compiled HF);
# memcheck (compute-sanitizer memcheck of MEMCHECK_TESTS into memcheck.log) when named.
# HF_EAGER=0 skips HF eager, HF_PHASES names the compiled figures (default "prefill decode1 decodeB"), HF_PHASE_S
# bounds each. BUNDLE=DIR runs another bundle (e.g. an older commit's, as the same-call baseline; give it its own OUT), POLICIES
# the kvcomm step's presets (default "spec blend").
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ "${1:-}" = bundle ]; then
  build=${2:-$root/build}
  bash "$root/scripts/gpu/bundle_tests.sh" i17 "$build" kvmesh test_cuda_ops test_cuda_model test_kvcomm_ops \
    test_kvcomm_device_path test_kvcomm_core test_comm_state test_c2c test_cublas_lazy
  rm -rf "$root/.gpu-i17/models"   # the bundled models travel with the working tree (models/)
  du -sh "$root/.gpu-i17"
  exit 0
fi
shift 0
steps=${*:-parity engine hf kvcomm team}
B=$(cd "${BUNDLE:-$PWD/.gpu-i17}" && pwd)   # BUNDLE=DIR: another bundle (an older commit as the same-call baseline)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$B/lib KVM_SOURCE_DIR=$PWD PYTHONUNBUFFERED=1
if [ -f "$B/bins.tar.xz" ] && [ ! -x "$B/kvmesh" ]; then tar xJf "$B/bins.tar.xz" -C "$B"; fi
want() { [[ " $steps " == *" $1 "* ]]; }
memcheck() {   # compute-sanitizer memcheck of the bundle's test binaries named (NAME or NAME:FILTER, a cmocka test filter)
  local cs t args
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  for t in "$@"; do
    echo "== memcheck $t ($(date -u +%T))"
    args=("$B/${t%%:*}"); [[ "$t" == *:* ]] && args+=("${t#*:}")
    [ -n "$cs" ] && timeout "${MEMCHECK_S:-240}" "$cs" --tool memcheck --leak-check no "${args[@]}" 2>&1 |
      grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" | head -8
  done
}
clocks() { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv,noheader; }
# appended to, not overwritten: anchors.sh and launch17.sh run several steps of this script in one call
{ echo "start ($steps): $(date -u)"; echo "bundle: $(cat "$B/VERSION")"; clocks; nvidia-smi -L; } >> "$OUT/gpu.txt" 2>&1
tail -4 "$OUT/gpu.txt"
if want parity; then
  for t in test_cublas_lazy test_cuda_ops test_cuda_model test_kvcomm_ops test_kvcomm_device_path test_kvcomm_core test_comm_state test_c2c; do
    echo "== $t ($(date -u +%T))"; timeout 240 "$B/$t" 2>&1 | grep -vE "^\[ +(RUN|OK) +\]" | tail -30; echo "rc=${PIPESTATUS[0]}"
  done > "$OUT/parity.log" 2>&1
  memcheck test_c2c test_kvcomm_ops test_kvcomm_device_path >> "$OUT/parity.log" 2>&1
  { echo "== C2C converter round trip ($(date -u +%T))"; python3 -c "import torch; print('torch', torch.__version__)"
    rm -rf /tmp/fx /tmp/conv
    python3 scripts/train/c2c_fixture.py --out /tmp/fx --released &&
    python3 scripts/train/c2c_convert.py --in /tmp/fx/released --pair-json /tmp/fx/released/pair.json --out /tmp/conv \
      --name bf16 --dtype bf16 &&
    cmp /tmp/fx/bf16.c2c.safetensors /tmp/conv/bf16.c2c.safetensors && echo "converter round trip: byte-identical"
    echo "rc=$?"; } >> "$OUT/parity.log" 2>&1
  grep -E "^==|PASSED|FAILED|SKIP|rc=|ERROR SUMMARY|byte-identical" "$OUT/parity.log"
fi
if want memcheck; then   # MEMCHECK_TESTS (default test_cuda_ops): compute-sanitizer memcheck into memcheck.log
  memcheck ${MEMCHECK_TESTS:-test_cuda_ops} > "$OUT/memcheck.log" 2>&1
  cat "$OUT/memcheck.log"
fi
if want engine; then
  timeout 200 "$B/kvmesh" bench engine --synthetic llama-3.1-8b --profile > "$OUT/engine.log" 2>&1
  echo "engine rc=$?"; grep -A12 "^| metric\|^kvmesh bench engine" "$OUT/engine.log" | head -30
fi
if want hf; then
  { if [ "${HF_EAGER:-1}" != 0 ]; then
      timeout 200 python3 scripts/bench/hf_engine.py --model llama-3.1-8b --json "$OUT/hf.json"; echo "hf eager rc=$?"
    fi
    if [ "${HF_COMPILE:-1}" != 0 ]; then   # one process per figure; a compiler crash in CUDA-graph mode retries without
      for ph in ${HF_PHASES:-prefill decode1 decodeB}; do
        timeout ${HF_PHASE_S:-300} python3 scripts/bench/hf_engine.py --model llama-3.1-8b --compile --phase $ph --json "/tmp/hfc_$ph.json"
        rc=$?; echo "hf compile $ph rc=$rc"
        if [ $rc != 0 ] && [ $ph != prefill ]; then
          timeout ${HF_PHASE_S:-300} python3 scripts/bench/hf_engine.py --model llama-3.1-8b --compile --compile-mode default --phase $ph \
            --json "/tmp/hfc_$ph.json"; echo "hf compile $ph (default mode) rc=$?"
        fi
      done
      python3 -c "import json,sys; print(json.dumps({p: json.load(open(f'/tmp/hfc_{p}.json')) for p in ('prefill','decode1','decodeB') if __import__('os').path.exists(f'/tmp/hfc_{p}.json')}))" > "$OUT/hf_compile.json"
    fi; } > "$OUT/hf.log" 2>&1
  grep -E "^HF|rc=|Error|Segmentation" "$OUT/hf.log" | head -16
fi
if want kvcomm; then
  { for pol in ${POLICIES:-spec blend}; do
      echo "==== bench kvcomm kvcomm.preset=$pol ($(date -u +%T))"
      timeout 200 "$B/kvmesh" bench kvcomm --synthetic llama-3.1-8b --set kvcomm.preset=$pol --set kvcomm.force_reuse=on ${KV_ARGS:-} --out /tmp/kvb; echo "rc=$?"
    done; } > "$OUT/kvcomm.log" 2>&1
  grep -E "^====|^agent|^a[0-9] |^alignment|^anchors|rc=|rror" "$OUT/kvcomm.log" | head -30
fi
if want team; then   # TEAM_CELLS: "MODEL:WORKLOAD ..." (models of models/), each with TEAM_MODES; TEAM_SET: more
  # options for every cell (e.g. "--set kvcomm.recompute_rank=attention_spread", the CUDA attention-mass op)
  : > "$OUT/team.log"
  for cell in ${TEAM_CELLS:-minillama-2m:team}; do
    mdl=${cell%%:*} wl=${cell#*:}
    echo "==== $mdl $wl ($(date -u +%T))" >> "$OUT/team.log"
    timeout 240 "$B/kvmesh" bench kvcomm --model "$PWD/models/$mdl" --backend cuda --workload "$wl" --requests 300 \
      --modes "${TEAM_MODES:-dense,full,full+blend}" ${TEAM_SET:-} --out /tmp/team >> "$OUT/team.log" 2>&1
    echo "team $mdl $wl rc=$?" | tee -a "$OUT/team.log"
  done
  grep -E "^====|^mode  |^dense |^default |^spec |^full|^blend|rc=" "$OUT/team.log" | head -40
fi
{ echo "end: $(date -u)"; clocks; } >> "$OUT/gpu.txt" 2>&1
