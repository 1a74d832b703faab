#!/usr/bin/env bash
# c2c_train.sh - trains, exports and evaluates the C2C fuser of the bundled pair (issue 14; spec c2c.md §8, §9;
# docs/c2c.md "Training the bundled fuser") on one GPU, within one device call:
#
#   scripts/gpu/c2c_train.sh bundle [BUILD_DIR]   here: packs the kvmesh binary (default build-h, which must have
#                                                `kvmesh c2c docs`) and its libraries into .gpu-c2ctrain/ (git-excluded;
#                                                name it in the run's `carry`); models/ travel with the tree
#   scripts/gpu/c2c_train.sh run OUT              on the GPU machine, from the repository root: everything below
#   SMOKE=1 scripts/gpu/c2c_train.sh run OUT      the same end to end on the CPU here, small (< 3 minutes)
#   scripts/gpu/c2c_train.sh install OUT          here: a finished run's fuser -> models/c2c-miniqwen3-to-minillama/,
#                                                its fixture -> tests/fixtures/c2c-trained/ (tests/test_c2c_trained.c)
#
# `run`: (1) `kvmesh c2c docs` writes the training documents (split train, seed 1; N_TRAIN, default 200000) and the
# eval documents (split eval, seed 1000; N_EVAL, default 2000), facts FACTS (default 2-8); (2) c2c_train.py trains
# the fuser S -> R and the control (g) fuser R -> R with wall-clock budgets taken from what is left of BUDGET_S
# (default 540 s for the whole run), exports both (bf16), checks the round trip, evaluates spec §9 (a)-(g), writes the
# C test's fixture; (3) kvmesh's C loader opens the exported fuser for the bundled pair (a workflow with kv_from), and
# `kvmesh bench c2c` (when the binary has it) scores the same eval documents through the C runtime for spec §9 (h).
# Result: OUT/c2c_train_result.tgz (c2c-miniqwen3-to-minillama/: config, weights, README.md model card; control/;
# fixture/rows.safetensors; results.json; h.json; every log); documents and traces in WORK (default
# /tmp/c2ctrain-work). Progress lines carry UTC timestamps. `install OUT` unpacks the tgz into the tree.
# Knobs (environment): BUDGET_S, N_TRAIN, N_EVAL, FACTS, STEPS (3000), CONTROL_STEPS (1000), BATCH (256), LR (1e-3),
# HIDDEN (128: 1.68M parameters, 3.4 MB bf16), GATE_INIT (0, spec §8), BENCH_DOCS (500), KVMESH (a kvmesh binary instead of the bundle's),
# WORK.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cmd=${1:-}
ts() { echo "$(date -u +%H:%M:%S) $*"; }

if [ "$cmd" = bundle ]; then
  build=${2:-$root/build-h}
  "$build/kvmesh" c2c docs --help > /dev/null 2>&1 || { echo "$build/kvmesh has no 'c2c docs' (merge h/c2cbench and build kvmesh_cli)"; exit 1; }
  bash "$root/scripts/gpu/bundle_tests.sh" c2ctrain "$build" kvmesh || exit 1
  du -sh "$root/.gpu-c2ctrain"
  exit 0
fi
if [ "$cmd" = install ]; then
  # the result of a run into the tree: the fuser (config, weights, model card) and the C test's fixture
  src=${2:-}
  if [ -n "$src" ] && [ -f "$src/c2c_train_result.tgz" ]; then # what came back from the device
    x=$(mktemp -d) && tar xzf "$src/c2c_train_result.tgz" -C "$x" && src=$x
  fi
  [ -n "$src" ] && [ -f "$src/c2c-miniqwen3-to-minillama/c2c-miniqwen3-to-minillama.c2c.json" ] &&
    [ -f "$src/fixture/rows.safetensors" ] || { echo "usage: $0 install OUT (OUT of a finished run)"; exit 2; }
  rm -rf "$root/models/c2c-miniqwen3-to-minillama"
  mkdir -p "$root/models/c2c-miniqwen3-to-minillama" "$root/tests/fixtures/c2c-trained"
  cp "$src"/c2c-miniqwen3-to-minillama/* "$root/models/c2c-miniqwen3-to-minillama/"
  cp "$src/fixture/rows.safetensors" "$root/tests/fixtures/c2c-trained/rows.safetensors"
  du -sh "$root/models/c2c-miniqwen3-to-minillama" "$root/tests/fixtures/c2c-trained"
  echo "now: cmake --build build-h --target test_c2c_trained && ./build-h/test_c2c_trained"
  exit 0
fi
[ "$cmd" = run ] && [ -n "${2:-}" ] || { echo "usage: $0 bundle [BUILD_DIR] | run OUT | install OUT   (SMOKE=1: small CPU run)"; exit 2; }
OUT=$(mkdir -p "$2" && cd "$2" && pwd)
# Intermediate files (documents, traces) stay in the work folder W; OUT gets ONE file, at the end or on any exit:
# c2c_train_result.tgz (the fuser folder, the control, the fixture, results.json, h.json and every log). The device
# tool brings back at most 8 files, 2 folders down; the progress is on stdout.
W=${WORK:-${TMPDIR:-/tmp}/c2ctrain-work}
rm -rf "$W" && mkdir -p "$W" || exit 1
pack() {
  local have=()
  for f in c2c-miniqwen3-to-minillama control fixture results.json train.log env.txt docs.log loader.log bench.log \
           bench.json h.json; do [ -e "$W/$f" ] && have+=("$f"); done
  [ ${#have[@]} -gt 0 ] && tar czf "$OUT/c2c_train_result.tgz" -C "$W" "${have[@]}" &&
    ts "packed ${have[*]} into $OUT/c2c_train_result.tgz ($(du -h "$OUT/c2c_train_result.tgz" | cut -f1))"
}
trap pack EXIT
cd "$root"
start=$(date +%s)
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
R=models/minillama-2m S=models/miniqwen3-6m
if [ "$SMOKE" = 1 ]; then
  N_TRAIN=${N_TRAIN:-50} N_EVAL=${N_EVAL:-50} FACTS=${FACTS:-2-3} BUDGET_S=${BUDGET_S:-170}
  TRAIN_ARGS="--steps 30 --control-steps 10 --batch 4 --eval-batch 16 --log-every 10 --device cpu"
  KV=${KVMESH:-$root/build-h/kvmesh}
  [ -x /usr/bin/python3 ] && PY=${PYTHON:-/usr/bin/python3}
else
  N_TRAIN=${N_TRAIN:-200000} N_EVAL=${N_EVAL:-2000} FACTS=${FACTS:-2-8} BUDGET_S=${BUDGET_S:-540}
  TRAIN_ARGS="--steps ${STEPS:-3000} --control-steps ${CONTROL_STEPS:-1000} --batch ${BATCH:-256} --lr ${LR:-1e-3} --hidden ${HIDDEN:-128} --gate-init ${GATE_INIT:-0}"
  B=$root/.gpu-c2ctrain
  if [ -z "${KVMESH:-}" ]; then
    export LD_LIBRARY_PATH=$B/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    [ -f "$B/bins.tar.xz" ] && [ ! -x "$B/kvmesh" ] && tar xJf "$B/bins.tar.xz" -C "$B"
  fi
  KV=${KVMESH:-$B/kvmesh}
fi
left() { echo $((BUDGET_S - ($(date +%s) - start))); }
ts "c2c_train run: OUT=$OUT (work $W) smoke=$SMOKE budget ${BUDGET_S}s; bundle $(cat "$root/.gpu-c2ctrain/VERSION" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null)"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; $PY -c "import torch; print('torch', torch.__version__)"; } | tee "$W/env.txt"

# (1) documents: one source, the emitter of kvmesh (the bench reads the same lines)
ts "documents: $N_TRAIN train (seed 1), $N_EVAL eval (seed 1000), facts $FACTS"
"$KV" c2c docs --model $R --n "$N_TRAIN" --seed 1 --split train --facts "$FACTS" -o "$W/train.jsonl" 2> "$W/docs.log" &
p1=$!
"$KV" c2c docs --model $R --n "$N_EVAL" --seed 1000 --split eval --facts "$FACTS" -o "$W/eval.jsonl" 2>> "$W/docs.log"
rc2=$?
wait $p1; rc1=$?
if [ $rc1 -ne 0 ] || [ $rc2 -ne 0 ]; then ts "kvmesh c2c docs failed ($rc1, $rc2):"; cat "$W/docs.log"; exit 1; fi
ts "documents: $(wc -l < "$W/train.jsonl") train, $(wc -l < "$W/eval.jsonl") eval lines ($(du -sh "$W/train.jsonl" | cut -f1))"

# (2) training, export, evaluation: budgets from what is left (reserve: start-up, loading, export, eval, checks)
rest=$(left)
reserve=$([ "$SMOKE" = 1 ] && echo 60 || echo 110)
avail=$((rest - reserve))
[ $avail -lt 20 ] && avail=20
main_s=$((avail * 3 / 4)) ctrl_s=$((avail - avail * 3 / 4))
ts "training budgets: main ${main_s}s, control ${ctrl_s}s (${rest}s left of ${BUDGET_S}s)"
timeout $((rest > 30 ? rest - 10 : 20)) $PY -u scripts/train/c2c_train.py --train-docs "$W/train.jsonl" \
  --eval-docs "$W/eval.jsonl" --receiver $R --sharer $S --out "$W" \
  --export-dir "$W/c2c-miniqwen3-to-minillama" --control-dir "$W/control" --fixture-dir "$W/fixture" \
  --budget-s $main_s --control-budget-s $ctrl_s --train-seed 1 --eval-seed 1000 --facts "$FACTS" $TRAIN_ARGS \
  2>&1 | tee "$W/train.log"
rc=${PIPESTATUS[0]}
ts "c2c_train.py exit status $rc"
J=$W/c2c-miniqwen3-to-minillama/c2c-miniqwen3-to-minillama.c2c.json
[ -f "$J" ] || { ts "no exported fuser"; exit 1; }

# (3) kvmesh's C loader opens the exported fuser for the bundled pair (every check of spec §7, pairing included)
cat > "$W/loader_check.lua" <<EOF
local kvm = kvmesh
local qwen = kvm.model("$root/$S")
local llama = kvm.model("$root/$R")
local g = kvm.graph{ name = "c2c_trained", state = { notes = kvm.reduce.replace, answer = kvm.reduce.replace } }
g:agent("reader", { model = qwen, max_tokens = 5, stop = "\n", writes = "notes", template = "{input.docs}\nAsk: {input.q}" })
g:agent("answerer", { model = llama, max_tokens = 5, stop = "\n", writes = "answer", template = "{input.docs}\nAsk: {input.q}",
                      kv_from = { agent = "reader", via = "c2c", fuser = "$J", section = "input.docs" } })
g:edge(kvm.START, "reader")
g:edge("reader", "answerer")
return g
EOF
KVM_BACKEND=cpu timeout 60 "$KV" run "$W/loader_check.lua" --input docs="Mark: 9442" --input q=Mark --trace "$W/trace" \
  > "$W/loader.log" 2>&1
lrc=$?
ts "C loader + kv_from run with the trained fuser: exit status $lrc ($(tail -c 300 "$W/loader.log" | tr '\n' ' '))"

# (4) spec §9 (h): the C runtime on the same eval documents, when this kvmesh has `bench c2c` and time is left
if "$KV" bench c2c --help > /dev/null 2>&1 && [ "$(left)" -gt 25 ]; then
  # the bundled binary is a CPU build (KVM_CUDA=OFF): the C runtime's CPU path, all cores
  nb=$([ "$SMOKE" = 1 ] && echo 20 || echo "${BENCH_DOCS:-500}")
  cap=$((($(left) - 10) * 4)) # ~0.1 s a document here on 2 cores (7 conditions): stay inside the budget
  [ "$nb" -gt "$cap" ] && nb=$((cap > 20 ? cap : 20))
  head -n "$nb" "$W/eval.jsonl" > "$W/bench_docs.jsonl"
  ts "kvmesh bench c2c on the first $nb eval documents (CPU, $(($(left) - 8))s at most)"
  KVM_THREADS=${KVM_THREADS:-$(nproc)} timeout $(($(left) - 8)) "$KV" bench c2c --receiver $R --sharer $S --fuser "$J" \
    --identity-fuser "$W/control/identical.c2c.json" --docs-file "$W/bench_docs.jsonl" --backend cpu \
    --json "$W/bench.json" > "$W/bench.log" 2>&1
  ts "bench c2c exit status $?"
  tail -n 24 "$W/bench.log"
  [ -f "$W/bench.json" ] && $PY scripts/train/c2c_train.py compare "$W/results.json" "$W/bench.json" "$W/h.json"
else
  ts "kvmesh bench c2c skipped (not in this binary, or no time left: $(left)s)"
fi
ts "done in $(($(date +%s) - start))s"
[ $rc -eq 0 ] && [ $lrc -eq 0 ]
