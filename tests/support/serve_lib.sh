# serve_lib.sh - sourced by shell tests of `kvmesh serve` (tests/cli/serve_*.sh): a daemon on a port it picks itself.
# serve_start KVMESH LOG ARGS...: starts `KVMESH serve --bind tcp://127.0.0.1:* ARGS...` with stderr to LOG, sets
# dpid (its pid) and ep (its request endpoint); returns 1 when it did not listen within 10 s.
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
