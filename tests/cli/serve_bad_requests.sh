#!/usr/bin/env bash
# serve_bad_requests.sh KVMESH SHARED - malformed requests to `kvmesh serve`, each a structured error
# (tests/serve/test_bad_requests.py), on loopback with ports the daemon picks.
set -u
. tests/support/serve_lib.sh
serve_need_zmq
exec /usr/bin/python3 tests/serve/test_bad_requests.py "$1"
