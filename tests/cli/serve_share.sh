#!/usr/bin/env bash
# serve_share.sh KVMESH SHARED - two clients of one `kvmesh serve` sharing KVCOMM anchors
# (tests/serve/test_share.py: examples/team.lua on models/minillama-2m).
set -u
/usr/bin/python3 -c "import zmq" 2>/dev/null || { echo "SKIP: no python3-zmq (scripts/deps.sh installs it)"; exit 77; }
[ -e models/minillama-2m ] || { echo "SKIP: no models/minillama-2m"; exit 77; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
exec /usr/bin/python3 tests/serve/test_share.py "$1" "$tmp"
