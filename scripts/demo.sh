#!/usr/bin/env bash
# demo.sh KVMESH SHARED - the main job of `make demo`.
set -euo pipefail
kvmesh=$1; shared=$2
m=$shared/models/stories260K
if [ ! -f "$m/stories260K.bin" ]; then
  echo "make demo: stories260K is not at $m (the shared models folder is absent); nothing to run." >&2
  exit 1
fi
echo "== kvmesh generate with stories260K (CPU, greedy) =="
"$kvmesh" generate --model "$m/stories260K.bin" --tokenizer "$m/tok512.bin" --prompt "Once upon a time" --max-tokens 200
