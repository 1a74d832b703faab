#!/usr/bin/env bash
# serve_curve.sh KVMESH SHARED - CURVE authentication of `kvmesh serve`
# (tests/serve/test_curve.py), on loopback with ports the daemon picks.
set -u
. tests/support/serve_lib.sh
serve_need_zmq
serve_setup
/usr/bin/python3 tests/serve/test_curve.py "$1" "$tmp"
