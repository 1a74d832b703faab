#!/usr/bin/env bash
# serve_generate.sh KVMESH - generate as a job of the runtime's engine: served beside other clients, batched,
# canceled, past its deadline (tests/serve/test_generate_jobs.py).
set -u
/usr/bin/python3 -c "import zmq" 2>/dev/null || { echo "SKIP: no python3-zmq (scripts/deps.sh installs it)"; exit 77; }
exec /usr/bin/python3 tests/serve/test_generate_jobs.py "$1"
