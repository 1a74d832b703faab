#!/usr/bin/env bash
# serve_slow_subscriber.sh KVMESH SHARED - event subscribers that never read cost the daemon nothing (issue 12):
# tests/serve/test_slow_subscriber.py through pyzmq on loopback.
set -u
/usr/bin/python3 -c "import zmq" 2>/dev/null || { echo "SKIP: no python3-zmq (scripts/deps.sh installs it)"; exit 77; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
exec /usr/bin/python3 tests/serve/test_slow_subscriber.py "$1" "$tmp"
