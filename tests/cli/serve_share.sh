#!/usr/bin/env bash
# serve_share.sh KVMESH SHARED - two clients of one `kvmesh serve` sharing KVCOMM anchors
# (tests/serve/test_share.py: examples/team.lua on models/minillama-2m).
set -u
. tests/support/serve_lib.sh
serve_need_zmq
[ -e models/minillama-2m ] || { echo "SKIP: no models/minillama-2m"; exit 77; }
serve_setup
/usr/bin/python3 tests/serve/test_share.py "$1" "$tmp"
