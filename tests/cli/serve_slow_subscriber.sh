#!/usr/bin/env bash
# serve_slow_subscriber.sh KVMESH SHARED - event subscribers that never read cost the daemon nothing (issue 12):
# tests/serve/test_slow_subscriber.py through pyzmq on loopback.
set -u
. tests/support/serve_lib.sh
serve_need_zmq
serve_setup
/usr/bin/python3 tests/serve/test_slow_subscriber.py "$1" "$tmp"
