#!/usr/bin/env bash
# serve_protocol.sh KVMESH SHARED - every request type of `kvmesh serve` through the pyzmq client
# (tests/serve/test_protocol.py), on loopback with ports the daemon picks.
set -u
. tests/support/serve_lib.sh
serve_need_zmq
serve_setup
/usr/bin/python3 tests/serve/test_protocol.py "$1" "$tmp"
