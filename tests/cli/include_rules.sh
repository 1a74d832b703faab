#!/usr/bin/env bash
# include_rules.sh - the include graph of docs/architecture.md, checked on the sources:
#   - kernels/ include nothing from runtime/model (nor agents/, lab/, cli/);
#   - runtime/ includes nothing from agents/, lab/ or cli/;
#   - no file outside runtime/comm includes comm_internal.h (the KVCOMM white-box tests use kvcomm_ref.h);
#   - the commands in cli/ include only system and public headers (<kvmesh.h>, <kvmesh_lab.h>, <cjson/...>),
#     cli/'s own headers and lab/lab.h;
#   - the library reads no environment variable (no getenv in runtime/, kernels/, agents/).
# Args: kvmesh binary, shared data dir (both unused).
set -u
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here" || exit 1
fails=0
bad() { echo "FAIL $*"; fails=$((fails + 1)); }
incs() { grep -rnE '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' "$@" 2>/dev/null; }

while IFS= read -r l; do bad "kernel includes a higher layer: $l"; done < <(incs kernels | grep -E 'runtime/model|agents/|lab/|cli/')
while IFS= read -r l; do bad "runtime includes a higher layer: $l"; done < <(incs runtime | grep -E '"(\.\./)*(agents|lab|cli)/')
while IFS= read -r l; do bad "comm's internal header outside runtime/comm: $l"; done < <(incs . --include='*.c' --include='*.h' --include='*.cu' --include='*.cuh' | grep -v '^\./runtime/comm/' | grep -v '^\./build' | grep 'comm_internal\.h')
while IFS= read -r l; do
  case "$l" in
    *'"cli_env.h"'*|*'"cli_tools.h"'*|*'"cmd_replay.h"'*|*'"lab/lab.h"'*) ;;
    *) bad "cli/ includes an internal header: $l" ;;
  esac
done < <(incs cli)
while IFS= read -r l; do bad "the library reads the environment: $l"; done < <(grep -rn 'getenv' runtime kernels agents)
[ "$fails" -eq 0 ] || { echo "$fails include rule(s) broken"; exit 1; }
echo "include rules ok"
