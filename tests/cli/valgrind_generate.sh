#!/usr/bin/env bash
# valgrind: `kvmesh generate` frees everything it allocates (definite/indirect leaks fail the test).
set -u
kvmesh=$1; shared=$2
m=$shared/models/stories260K
if ! command -v valgrind >/dev/null; then echo "SKIPPED: valgrind not installed"; exit 77; fi
if [ ! -f "$m/stories260K.bin" ]; then echo "SKIPPED: stories260K absent at $m"; exit 77; fi
if [ -n "${KVM_SANITIZED:-}" ]; then echo "SKIPPED: sanitizer build (valgrind runs on the release build)"; exit 77; fi
log=$(mktemp)
here=$(cd "$(dirname "$0")/.." && pwd)
KVM_THREADS=1 OMP_NUM_THREADS=1 valgrind --suppressions="$here/valgrind.supp" --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=9 \
  "$kvmesh" generate --model "$m/stories260K.bin" --prompt "Once upon a time" --max-tokens 24 --backend cpu >/dev/null 2>"$log"
rc=$?
if [ $rc -ne 0 ]; then tail -40 "$log"; rm -f "$log"; echo "FAIL: valgrind exit $rc"; exit 1; fi
grep -E "definitely lost|indirectly lost|ERROR SUMMARY" "$log"
rm -f "$log"; echo ok
