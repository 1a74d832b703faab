#!/usr/bin/env bash
# bundle_c2c.sh [BUILD_DIR] - packs what scripts/gpu/c2c.sh needs into .gpu-c2c/ (git-excluded; name it in the
# device run's `carry`): the C2C and CUDA parity test binaries built here for sm_90 (default build-cuda), the Debian
# libraries they need (../shared/tools/gpu-bundle), and the commit as VERSION. The fixture is in the tree.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build-cuda}
shared=${KVM_SHARED:-$root/../shared}
out=$root/.gpu-c2c
grep -qx '/.gpu-c2c/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu-c2c/' >> "$root/.git/info/exclude"
rm -rf "$out"
bins=()
for t in test_c2c test_cuda_ops test_cuda_model test_kvcomm_device_path; do
  [ -x "$build/$t" ] && bins+=("$build/$t")
done
"$shared/tools/gpu-bundle" "$out" "${bins[@]}"
names=$(for b in "${bins[@]}"; do basename "$b"; done)
tar cf - -C "$out" $names | xz -T2 -6 > "$out/bins.tar.xz"
(cd "$out" && rm -f $names)
git -C "$root" rev-parse --short HEAD > "$out/VERSION"
du -sh "$out"
