#!/usr/bin/env bash
# serve_bad_requests.sh KVMESH SHARED - malformed requests to `kvmesh serve`, each a structured error
# (tests/serve/test_bad_requests.py), on loopback with ports the daemon picks.
set -u
/usr/bin/python3 -c "import zmq" 2>/dev/null || { echo "SKIP: no python3-zmq (scripts/deps.sh installs it)"; exit 77; }
exec /usr/bin/python3 tests/serve/test_bad_requests.py "$1"
