#!/usr/bin/env bash
# build_minigen.sh OUT - builds the standalone static minitasks generator (see minigen.c) into OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-.gpu-train/minigen}
mkdir -p "$(dirname "$out")"
cc -std=c11 -D_GNU_SOURCE -O2 -static -Wall -Wextra -Wno-unused-parameter -Iinclude -Ilab -o "$out" \
  scripts/train/minigen.c lab/cmd_minitasks.c lab/minitasks.c runtime/core/rng.c runtime/core/status.c
echo "built $out"
