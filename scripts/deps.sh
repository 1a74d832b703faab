#!/usr/bin/env bash
# deps.sh - makes sure the Debian packages kvmesh builds with are present.
# As root it installs what is missing; otherwise it prints the exact apt command and fails.
set -euo pipefail
# clang + libclang-rt-dev: the libFuzzer targets of fuzz/ (scripts/fuzz.sh, tests/cli/fuzz_short.sh); python3-zmq:
# the daemon's Python client and its tests
pkgs=(build-essential cmake pkg-config liblua5.4-dev libzmq3-dev libcjson-dev libcmocka-dev valgrind clang libclang-rt-dev python3-zmq)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  echo "kvmesh: installing missing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "kvmesh: missing Debian packages: ${missing[*]}" >&2
  echo "kvmesh: install them with:  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
