#!/usr/bin/env bash
# serve_tools.sh KVMESH SHARED - client tools through `kvmesh serve` (tool.register, tool.call, tool.result) with the
# pyzmq client (tests/serve/test_tools.py), on loopback with ports the daemon picks.
set -u
. tests/support/serve_lib.sh
serve_need_zmq
serve_setup
/usr/bin/python3 tests/serve/test_tools.py "$1" "$tmp"
