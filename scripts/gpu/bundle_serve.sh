#!/usr/bin/env bash
# bundle_serve.sh [BUILD_DIR] - packs what scripts/gpu/serve_state.sh needs into .gpu-serve/ (git-excluded; name it
# in the device run's `carry`): the kvmesh CLI and the test binaries built here for sm_90 (default build-cuda), the
# Debian libraries they need (../shared/tools/gpu-bundle), stories260K, and the commit as VERSION.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build-cuda}
shared=${KVM_SHARED:-$root/../shared}
out=$root/.gpu-serve
grep -qx '/.gpu-serve/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu-serve/' >> "$root/.git/info/exclude"
rm -rf "$out"
bins=("$build/kvmesh")
for t in test_cuda_ops test_cuda_model test_kvcomm_device_path test_comm_state test_runtime_step; do
  [ -x "$build/$t" ] && bins+=("$build/$t")
done
"$shared/tools/gpu-bundle" "$out" "${bins[@]}"
# packed (the carry limit is 64 MiB with the tree); serve_state.sh unpacks them on the GPU machine
names=$(for b in "${bins[@]}"; do basename "$b"; done)
tar cf - -C "$out" $names | xz -T2 -6 > "$out/bins.tar.xz"
(cd "$out" && rm -f $names)
mkdir -p "$out/shared/models"
cp -r "$shared/models/stories260K" "$out/shared/models/"
git -C "$root" rev-parse --short HEAD > "$out/VERSION"
du -sh "$out"
