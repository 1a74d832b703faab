# checks.sh - sourced by shell tests (tests/cli/*.sh) as `. "$(dirname "$0")/../support/checks.sh"`: moves to the
# repository root ($here), counts named checks (ok WHAT prints "ok   WHAT"; bad WHAT prints "FAIL WHAT" and adds to
# $fails) and makes a scratch folder $work, removed on exit.
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here" || exit 1
fails=0
ok() { echo "ok   $1"; }
bad() { echo "FAIL $1"; fails=$((fails + 1)); }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
