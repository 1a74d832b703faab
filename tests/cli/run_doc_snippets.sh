#!/usr/bin/env bash
# run_doc_snippets.sh KVMESH SHARED - every ```lua block of docs/lua-api.md whose first line is
# "-- runnable: NAME.lua" runs with `kvmesh run --mock` and finishes ok.
set -euo pipefail
kvmesh=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp" docs/lua-api.md <<'PY'
import re, sys
out, doc = sys.argv[1], open(sys.argv[2]).read()
n = 0
for block in re.findall(r"```lua\n(.*?)```", doc, re.S):
    m = re.match(r"-- runnable: (\S+\.lua)", block)
    if m:
        open(f"{out}/{m.group(1)}", "w").write(block); n += 1
print(f"{n} runnable snippets")
PY
n=0
for f in "$tmp"/*.lua; do
  args=(--mock --no-trace -q --input input="sort 3 1 2" --answer yes) # an answer for snippets that interrupt
  if grep -q "g:dataset" "$f"; then args+=(--n 5); fi
  "$kvmesh" run "$f" "${args[@]}" < /dev/null > "$tmp/out" 2>&1 || { echo "FAILED: $(basename "$f")"; cat "$tmp/out"; exit 1; }
  n=$((n + 1))
done
[ "$n" -ge 4 ] || { echo "expected at least 4 runnable snippets, found $n"; exit 1; }
echo "$n doc snippets ok"
