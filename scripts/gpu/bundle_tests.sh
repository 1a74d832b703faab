#!/usr/bin/env bash
# bundle_tests.sh NAME BUILD_DIR BINARY... - packs binaries built here (for sm_90) into .gpu-NAME/ for a device run
# (git-excluded; name it in the run's `carry`): the binaries that exist in BUILD_DIR, xz-packed (the carry limit is
# 64 MiB with the tree; the device scripts unpack bins.tar.xz), the Debian libraries they need
# (../shared/tools/gpu-bundle) and the commit as VERSION. The bundle_*.sh scripts call it.
set -euo pipefail
name=$1 build=$2
shift 2
root=$(cd "$(dirname "$0")/../.." && pwd)
shared=${KVM_SHARED:-$root/../shared}
out=$root/.gpu-$name
# (in a git worktree .git is a file: nothing is excluded there, and the bundle travels as an untracked folder)
[ -d "$root/.git" ] && { grep -qx "/.gpu-$name/" "$root/.git/info/exclude" 2>/dev/null || echo "/.gpu-$name/" >> "$root/.git/info/exclude"; }
rm -rf "$out"
bins=()
for b in "$@"; do [ -x "$build/$b" ] && bins+=("$build/$b"); done
"$shared/tools/gpu-bundle" "$out" "${bins[@]}"
names=$(for b in "${bins[@]}"; do basename "$b"; done)
tar cf - -C "$out" $names | xz -T2 -6 > "$out/bins.tar.xz"
(cd "$out" && rm -f $names)
git -C "$root" rev-parse --short HEAD > "$out/VERSION"
