#!/usr/bin/env bash
# fuzz_short.sh - CI's short run of every libFuzzer target of fuzz/ (docs/security.md, "Fuzzing").
# Args: kvmesh binary (its build folder holds the fuzz build, <build>/fuzz-ci), shared data dir.
# Builds the targets with clang (-DKVM_FUZZ=ON: ASan + UBSan + libFuzzer; `make test` has built them already with
# these settings, `make fuzz-ci`, so here the build is only checked) and, for each fuzz/fuzz_*.c,
# replays its reproducers (fuzz/regressions/<name>/) and its seeds (fuzz/corpus/<name>/), then fuzzes it
# for KVM_FUZZ_CI_SECONDS (default 5) seconds, built at -O0. Skips loudly (77) without clang/libFuzzer (scripts/deps.sh
# installs them) and in the ASan build's ctest (KVM_SANITIZED=1: the release build's ctest runs it once).
set -u
bin="$1"
shared="${2:-}"
here="$(cd "$(dirname "$0")/../.." && pwd)"
secs="${KVM_FUZZ_CI_SECONDS:-5}"
# scripts/fuzz.sh refuses an --opt that is not one optimisation level (it goes into the build's flags)
for bad in "" "-O1 -fno-sanitize=all" "O2"; do
  out="$(bash "$here/scripts/fuzz.sh" --no-build --opt "$bad" 2>&1)"; rc=$?
  [ $rc -eq 2 ] && grep -q -- "--opt takes" <<< "$out" || { echo "FAIL fuzz.sh --opt '$bad': exit $rc: $out"; exit 1; }
done
if [ "${KVM_SANITIZED:-0}" = 1 ]; then
  echo "SKIP fuzz short run: this is the sanitizer build's ctest; the release build's ctest runs it"
  exit 77
fi
cc="${CC:-clang}"
case "$cc" in *clang*) ;; *) cc=clang ;; esac
if ! command -v "$cc" >/dev/null; then
  echo "SKIP fuzz short run: clang not found (libFuzzer needs it; scripts/deps.sh installs clang and libclang-rt-dev)"
  exit 77
fi
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
printf '#include <stddef.h>\n#include <stdint.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n' > "$probe/p.c"
if ! "$cc" -fsanitize=fuzzer,address,undefined "$probe/p.c" -o "$probe/p" >"$probe/log" 2>&1; then
  echo "SKIP fuzz short run: $cc cannot link libFuzzer (install libclang-rt-dev):"; cat "$probe/log"
  exit 77
fi
build="$(cd "$(dirname "$bin")" && pwd)/fuzz-ci"
# -O0: half the clang build's CPU time (about 30 of 70 s on 2 cores); the fuzzing time is fixed, and at -O0 it
# runs 60-100% of -O1's executions to the same coverage (docs/perf/cpu.md "The test suite")
args=(--build "$build" --time "$secs" --opt -O0)
[ -n "$shared" ] && export KVM_SHARED_DIR="$shared"
start=$(date +%s)
CC="$cc" bash "$here/scripts/fuzz.sh" "${args[@]}"
rc=$?
echo "fuzz short run: $(( $(date +%s) - start )) s (build included), exit $rc"
exit $rc
