#!/usr/bin/env bash
# trace_color.sh KVMESH SHARED - the trace debugger's views on a terminal and piped: piped, plain text (no escape
# codes); --color=always, the same text with failures in red (stripping the codes gives the plain text back); on a
# terminal (a pty from script(1)), coloured and through the pager ($PAGER); NO_COLOR and --no-pager honoured; a bad
# --color value is a usage error.
set -euo pipefail
kvmesh="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
esc=$'\033['
cat > "$tmp/bad.lua" <<'LUA'
local g = kvmesh.graph{ name = "bad" }
g:func("f", function() error("no such city") end)
g:edge(kvmesh.START, "f")
return g
LUA
"$kvmesh" run "$tmp/bad.lua" --mock --trace "$tmp/t" -q > /dev/null 2>&1 && fail "the failing workflow passed"
run=$(ls -d "$tmp"/t/*/ | head -1)
"$kvmesh" trace show "$run" > "$tmp/plain"
grep -q "error" "$tmp/plain" || { cat "$tmp/plain"; fail "no error in the view"; }
! grep -qF "$esc" "$tmp/plain" || fail "escape codes in piped output"
"$kvmesh" trace show "$run" --color=always > "$tmp/col"
grep -qF "${esc}31merror" "$tmp/col" || { cat -v "$tmp/col"; fail "--color=always: error not red"; }
sed 's/\x1b\[[0-9;]*m//g' "$tmp/col" | cmp -s - "$tmp/plain" || fail "the coloured text is not the plain text with codes"
"$kvmesh" trace ls "$tmp/t" --color always > "$tmp/ls"
grep -qF "$esc" "$tmp/ls" || fail "trace ls --color always"
if command -v script > /dev/null; then
  PAGER='sed s/^/P:/' script -qec "'$kvmesh' trace show '$run'" /dev/null > "$tmp/tty" 2>&1 || { cat "$tmp/tty"; fail "on a pty"; }
  grep -q "^P:" "$tmp/tty" || { cat -v "$tmp/tty"; fail "a terminal's output did not go through \$PAGER"; }
  grep -qF "$esc" "$tmp/tty" || fail "no colour on a terminal"
  NO_COLOR=1 PAGER='sed s/^/P:/' script -qec "'$kvmesh' trace show --no-pager '$run'" /dev/null > "$tmp/tty2" 2>&1 || fail "pty 2"
  ! grep -q "^P:" "$tmp/tty2" || fail "--no-pager went through the pager"
  ! grep -qF "$esc" "$tmp/tty2" || fail "NO_COLOR: colour"
else
  echo "script(1) missing: the terminal checks are skipped"
fi
rc=0; "$kvmesh" trace show "$run" --color=sometimes > /dev/null 2>&1 || rc=$?
[ "$rc" = 2 ] || fail "--color=sometimes: exit $rc, expected 2"
echo "trace colour ok"
