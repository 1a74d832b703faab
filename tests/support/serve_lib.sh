# serve_lib.sh - sourced by shell tests of `kvmesh serve` (tests/cli/serve_*.sh), from the repository root.
#
# serve_need_zmq: exits 77 (skip) when python3 has no pyzmq.
# serve_setup: makes the scratch folder $tmp; on exit the daemon ($dpid) and a client in the background ($cpid), when
#   still set, are killed and $tmp is removed. fail WHAT prints "FAIL WHAT", then every file of $tmp (logs, outputs),
#   and exits 1.
# serve_start KVMESH LOG ARGS...: starts `KVMESH serve --bind tcp://127.0.0.1:* ARGS...` with stderr to LOG, sets
#   dpid (its pid) and ep (its request endpoint); returns 1 when it did not listen within 10 s.
# serve_stop: SIGTERM to the daemon, waits for it, clears dpid; returns its exit status.
serve_need_zmq() {
  /usr/bin/python3 -c "import zmq" 2>/dev/null || { echo "SKIP: no python3-zmq (scripts/deps.sh installs it)"; exit 77; }
}

serve_cleanup() {
  [ -n "$cpid" ] && kill "$cpid" 2>/dev/null
  [ -n "$dpid" ] && kill "$dpid" 2>/dev/null
  rm -rf "$tmp"
}

serve_setup() {
  tmp=$(mktemp -d)
  dpid= cpid=
  trap serve_cleanup EXIT
}

fail() {
  echo "FAIL $*"
  for f in "$tmp"/*; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done
  exit 1
}

serve_start() {
  local kvmesh=$1 log=$2
  shift 2
  KVM_THREADS=1 "$kvmesh" serve --bind 'tcp://127.0.0.1:*' "$@" 2> "$log" &
  dpid=$!
  ep=
  for _ in $(seq 100); do
    ep=$(grep -o 'listening on tcp://127.0.0.1:[0-9]*' "$log" | sed 's/listening on //')
    [ -n "$ep" ] && return 0
    sleep 0.1
  done
  return 1
}

serve_stop() {
  local rc
  kill -TERM "$dpid"
  wait "$dpid"
  rc=$?
  dpid=
  return $rc
}
