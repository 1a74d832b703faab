#!/usr/bin/env bash
# examples_readme.sh - every command of examples/README.md's "Running" block, run as a user would (from the repo
# root, the binary for build/kvmesh). Substitutions, and why: `--n 100` -> `--n 4` (the command, not the figure,
# is under test; CI time), traces go to a temporary folder instead of traces/, and <date>/<run_id> is the first
# traced run. `make build` is the test's own build. Needs models/minillama-2m (in the tree).
# Args: kvmesh binary, shared data dir (unused).
set -u
bin="$1"
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here" || exit 1
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
block="$(python3 - <<'PY'
import re
doc = open("examples/README.md").read()
run = doc[doc.index("## Running"):]
print(re.search(r"```sh\n(.*?)```", run, re.S).group(1))
PY
)"
fails=0 n=0
while IFS= read -r line; do
  case "$line" in ""|\#*|"make build") continue ;; esac
  cmd="${line//build\/kvmesh/$bin}"
  cmd="${cmd//--n 100/--n 4}"
  case "$cmd" in *" run "*) cmd="$cmd --trace $tmp/traces" ;; esac
  cmd="${cmd//traces\/<date>\/<run_id>/$(ls -d "$tmp"/traces/*/ 2>/dev/null | head -1)}"
  cmd="${cmd// traces\// $tmp/traces/}"
  n=$((n + 1))
  if eval "$cmd" > "$tmp/out" 2>&1; then
    echo "ok   $line"
  else
    echo "FAIL $line"; tail -5 "$tmp/out"; fails=$((fails + 1))
  fi
done <<< "$block"
[ "$n" -ge 6 ] || { echo "FAIL expected at least 6 commands in examples/README.md's Running block, found $n"; exit 1; }
[ "$fails" -eq 0 ] || exit 1
