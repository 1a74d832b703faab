#!/usr/bin/env bash
# serve_tools.sh KVMESH SHARED - client tools through `kvmesh serve` (tool.register, tool.call, tool.result) with the
# pyzmq client (tests/serve/test_tools.py), on loopback with ports the daemon picks.
set -u
/usr/bin/python3 -c "import zmq" 2>/dev/null || { echo "SKIP: no python3-zmq (scripts/deps.sh installs it)"; exit 77; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
exec /usr/bin/python3 tests/serve/test_tools.py "$1" "$tmp"
