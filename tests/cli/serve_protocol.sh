#!/usr/bin/env bash
# serve_protocol.sh KVMESH SHARED - every request type of `kvmesh serve` through the pyzmq client
# (tests/serve/test_protocol.py), on loopback with ports the daemon picks.
set -u
/usr/bin/python3 -c "import zmq" 2>/dev/null || { echo "SKIP: no python3-zmq (scripts/deps.sh installs it)"; exit 77; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
exec /usr/bin/python3 tests/serve/test_protocol.py "$1" "$tmp"
