#!/usr/bin/env bash
# fuzz.sh - builds the libFuzzer targets of fuzz/ (clang, -DKVM_FUZZ=ON) and runs them one after the other.
#
#   scripts/fuzz.sh [--build DIR] [--time S] [--runs N] [--replay] [--no-build | --build-only] [--opt -O0|-O1]
#                   [TARGET...]
#
# TARGET: safetensors, config, ... (with or without the fuzz_ prefix); default every fuzz/fuzz_*.c.
# For each target: the reproducers of fuzz/regressions/<name>/ are run once each, then the fuzzer runs for
# S seconds (default 60) or N executions, whichever ends first, from the seeds of fuzz/corpus/<name>/ (read
# only) and the working corpus DIR/work/<name>/ (what it finds is kept there between runs, never committed),
# with fuzz/dict/<name>.dict and the libFuzzer flags of fuzz/options/<name> (one line) when they exist.
# --replay runs the regressions and the seeds once each, no fuzzing; --build-only builds the targets and stops
# (`make test` builds CI's short-run targets that way before its tests, so the test finds them built). Crashes are
# saved as DIR/artifacts/<name>/crash-*; the log of each run is DIR/logs/<name>.log.
# --opt sets the targets' optimisation (default -O1, what a fuzzing campaign wants; CI's short run, whose
# fuzzing time is fixed, builds at -O0: half the compile time, docs/perf/cpu.md "The test suite").
# Prints one line per target (executions, cov, ft) and exits non-zero if any target failed.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
build="$here/build-fuzz"
time_s=60
runs=""
replay=0
do_build=1
build_only=0
opt=-O1
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    --time) time_s="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --replay) replay=1; shift ;;
    --no-build) do_build=0; shift ;;
    --build-only) build_only=1; shift ;;
    --opt) opt="${2:-}"; shift $(( $# > 1 ? 2 : 1 ))
           case "$opt" in -O0|-O1|-O2|-O3|-Os) ;; *) echo "fuzz.sh: --opt takes -O0, -O1, -O2, -O3 or -Os, not '$opt'" >&2; exit 2 ;; esac ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("${1#fuzz_}"); shift ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  for src in "$here"/fuzz/fuzz_*.c; do
    n="$(basename "$src" .c)"
    [ "$n" = fuzz_util ] || targets+=("${n#fuzz_}")
  done
fi
cc="${CC:-clang}"
if [ "$do_build" = 1 ]; then
  command -v "$cc" >/dev/null || { echo "fuzz.sh: $cc not found (libFuzzer needs clang: scripts/deps.sh installs it)" >&2; exit 77; }
  cmake -S "$here" -B "$build" -DCMAKE_C_COMPILER="$cc" -DKVM_FUZZ=ON -DKVM_FUZZ_OPT="$opt" -DCMAKE_BUILD_TYPE=Debug -DKVM_CUDA=OFF \
        -DKVM_SHARED_DIR="${KVM_SHARED_DIR:-$here/../shared}" >/dev/null || exit 1
  tl=(); for t in "${targets[@]}"; do tl+=(--target "fuzz_$t"); done
  cmake --build "$build" "${tl[@]}" -j "${JOBS:-2}" >"$build/build.log" 2>&1 || { tail -30 "$build/build.log"; echo "fuzz.sh: build failed"; exit 1; }
fi
[ "$build_only" = 1 ] && exit 0
mkdir -p "$build/logs"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"
fails=0
for t in "${targets[@]}"; do
  bin="$build/fuzz/fuzz_$t"
  log="$build/logs/$t.log"
  seeds="$here/fuzz/corpus/$t"
  [ -x "$bin" ] || { echo "FAIL fuzz_$t: $bin not built"; fails=$((fails + 1)); continue; }
  regs=("$here"/fuzz/regressions/"$t"/*)
  if [ -e "${regs[0]}" ]; then
    if ! "$bin" "${regs[@]}" >"$build/logs/$t.regressions.log" 2>&1; then
      echo "FAIL fuzz_$t: a reproducer of fuzz/regressions/$t crashes again (see $build/logs/$t.regressions.log)"
      tail -40 "$build/logs/$t.regressions.log"; fails=$((fails + 1)); continue
    fi
  fi
  mkdir -p "$build/work/$t" "$build/artifacts/$t"
  args=(-timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$build/artifacts/$t/")
  [ -f "$here/fuzz/dict/$t.dict" ] && args+=(-dict="$here/fuzz/dict/$t.dict")
  [ -f "$here/fuzz/options/$t" ] && read -r -a extra < "$here/fuzz/options/$t" && args+=("${extra[@]}")
  if [ "$replay" = 1 ]; then
    args+=(-runs=0)
  else
    args+=(-max_total_time="$time_s")
    [ -n "$runs" ] && args+=(-runs="$runs")
  fi
  dirs=("$build/work/$t"); [ -d "$seeds" ] && dirs+=("$seeds")
  start=$(date +%s)
  "$bin" "${args[@]}" "${dirs[@]}" >"$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  covft="$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)"
  if [ $rc -ne 0 ]; then
    echo "FAIL fuzz_$t (exit $rc after ${execs:-?} executions, ${secs} s; $covft): see $log"
    grep -E "ERROR|runtime error|invariant broken|Test unit written" "$log" | head -5
    fails=$((fails + 1))
  else
    echo "ok   fuzz_$t: ${execs:-?} executions in ${secs} s, $covft, corpus $(ls "$build/work/$t" | wc -l) (+ $(ls "$seeds" 2>/dev/null | wc -l) seeds)"
  fi
done
[ $fails -eq 0 ] || { echo "fuzz.sh: $fails target(s) failed"; exit 1; }
