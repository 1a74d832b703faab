#!/usr/bin/env bash
# fuzz_jobs.sh - run libFuzzer targets built here on the many cores of the GPU machine (which has neither clang
# nor lua/zmq/cjson: the targets and their Debian libraries travel in a bundle).
#
#   scripts/gpu/fuzz_jobs.sh bundle [FUZZ_BUILD_DIR] TARGET...   # here: .gpu-fuzz/ from build-fuzz/ (scripts/fuzz.sh)
#   scripts/gpu/fuzz_jobs.sh run TARGET JOBS SECONDS [OUTDIR]      # there: JOBS workers, SECONDS each
#
# `run` replays the target's regressions and seeds first, then starts JOBS independent libFuzzer jobs
# (-jobs=JOBS -workers=JOBS, each -max_total_time=SECONDS) sharing one working corpus seeded from
# fuzz/corpus/TARGET, and prints the executions summed over the jobs ("Done N runs" of each job's log), the crashes
# found (artifacts kept in OUTDIR/TARGET-artifacts/) and the coverage of the last job. Logs in OUTDIR (default $OUT).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
B=$root/.gpu-fuzz
if [ "${1:-}" = bundle ]; then
  shift; build=$root/build-fuzz
  if [ -d "${1:-}" ]; then build=$1; shift; fi
  rm -rf "$B"; mkdir -p "$B"
  bins=(); for t in "$@"; do bins+=("$build/fuzz/fuzz_${t#fuzz_}"); done
  bash "$root/../shared/tools/gpu-bundle" "$B" "${bins[@]}" || exit 1
  (cd "$B" && tar cJf bins.tar.xz fuzz_* && rm -f fuzz_*)   # the working tree that travels is at most 64 MiB
  git -C "$root" rev-parse --short HEAD > "$B/VERSION"
  exit 0
fi
[ "${1:-}" = run ] || { sed -n '2,12p' "$0"; exit 2; }
t=${2#fuzz_}; jobs=${3:-8}; secs=${4:-60}; out=${5:-${OUT:-$PWD/fuzz-out}}
bin=$B/fuzz_$t
[ -f "$B/bins.tar.xz" ] && [ ! -x "$bin" ] && tar xJf "$B/bins.tar.xz" -C "$B"
export LD_LIBRARY_PATH=$B/lib ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
[ -x "$bin" ] || { echo "fuzz_jobs: $bin missing (bundle it first)"; exit 1; }
mkdir -p "$out/$t-artifacts" "$out/$t-logs"
work=$(mktemp -d /tmp/fuzz-work-$t.XXXX)
regs=("$root"/fuzz/regressions/"$t"/*)
if [ -e "${regs[0]}" ]; then
  "$bin" "${regs[@]}" > "$out/$t-logs/regressions.log" 2>&1 || { echo "fuzz_$t: a regression crashes again"; tail -30 "$out/$t-logs/regressions.log"; exit 1; }
fi
opts=(); [ -f "$root/fuzz/options/$t" ] && read -r -a opts < "$root/fuzz/options/$t"
dict=(); [ -f "$root/fuzz/dict/$t.dict" ] && dict=(-dict="$root/fuzz/dict/$t.dict")
cd "$out/$t-logs" || exit 1
"$bin" -jobs="$jobs" -workers="$jobs" -max_total_time="$secs" -artifact_prefix="$out/$t-artifacts/" "${opts[@]}" "${dict[@]}" \
  "$work" "$root/fuzz/corpus/$t" > "$out/$t-logs/driver.log" 2>&1
rc=$?
execs=$(cat fuzz-*.log 2>/dev/null | sed -n 's/^Done \([0-9]*\) runs.*/\1/p' | awk '{s+=$1} END {print s+0}')
crashes=$(ls "$out/$t-artifacts" | wc -l)
last=$(grep -h "cov:" fuzz-*.log 2>/dev/null | tail -1)
echo "fuzz_$t: $jobs jobs x ${secs}s: $execs executions, $crashes artifacts, driver rc=$rc; corpus $(ls "$work" | wc -l) files; last: $last"
tar czf "$out/$t-logs.tgz" -C "$out" "$t-logs" "$t-artifacts" 2>/dev/null && rm -rf "$out/$t-logs"
