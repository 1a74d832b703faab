#!/usr/bin/env bash
# lab_includes.sh - lab/ is written against the public headers only: every #include of lab/*.c and lab/*.h is a
# system header (<...>: libc, <kvmesh.h>, <kvmesh_lab.h>, <cjson/cJSON.h>) or a header of lab/ itself ("x.h" with
# no path), never the library's internal headers ("runtime/...", "../...", <kernels/...>, "agents/...", "cli/...").
# And the runtime library includes nothing of lab/. Args: kvmesh binary, shared data dir (both unused).
set -u
here="$(cd "$(dirname "$0")/../.." && pwd)"
fails=0
while IFS= read -r line; do
  file="${line%%:*}"; inc="$(sed -n 's/^[0-9]*:[[:space:]]*#[[:space:]]*include[[:space:]]*\(.*\)$/\1/p' <<< "${line#*:}")"
  case "$inc" in
    \<runtime/*|\<kernels/*|\<agents/*|\<cli/*|\<lab/*) echo "FAIL $file: $inc (an internal header)"; fails=$((fails + 1)) ;;
    \<*\>) ;;
    \"*/*\") echo "FAIL $file: $inc (lab/ includes only include/ and its own headers)"; fails=$((fails + 1)) ;;
    \"*\") [ -f "$here/lab/${inc//\"/}" ] || { echo "FAIL $file: $inc is no header of lab/"; fails=$((fails + 1)); } ;;
    *) echo "FAIL $file: cannot read the include '$inc'"; fails=$((fails + 1)) ;;
  esac
done < <(cd "$here" && grep -n '^[[:space:]]*#[[:space:]]*include' lab/*.c lab/*.h | sed 's/^\([^:]*\):/\1:/')
# nothing below lab/ reaches into it
if grep -rnE '^[[:space:]]*#[[:space:]]*include.*lab/' "$here/runtime" "$here/kernels" "$here/agents" > /dev/null; then
  echo "FAIL the library includes lab/:"; grep -rnE '^[[:space:]]*#[[:space:]]*include.*lab/' "$here/runtime" "$here/kernels" "$here/agents"
  fails=$((fails + 1))
fi
[ "$fails" -eq 0 ] || { echo "$fails include(s) break the lab/ rule"; exit 1; }
echo "lab/ includes ok"
