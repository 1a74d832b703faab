#!/usr/bin/env bash
# serve_generate.sh KVMESH - generate as a job of the runtime's engine: served beside other clients, batched,
# canceled, past its deadline (tests/serve/test_generate_jobs.py).
set -u
. tests/support/serve_lib.sh
serve_need_zmq
exec /usr/bin/python3 tests/serve/test_generate_jobs.py "$1"
