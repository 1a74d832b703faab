#!/usr/bin/env bash
# serve_curve.sh KVMESH SHARED - CURVE authentication of `kvmesh serve`
# (tests/serve/test_curve.py), on loopback with ports the daemon picks.
set -u
/usr/bin/python3 -c "import zmq" 2>/dev/null || { echo "SKIP: no python3-zmq (scripts/deps.sh installs it)"; exit 77; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
exec /usr/bin/python3 tests/serve/test_curve.py "$1" "$tmp"
