#!/usr/bin/env bash
# bundle.sh [BUILD_DIR] - packs what scripts/gpu/check.sh needs on the GPU machine into .gpu-cuda/
# (git-excluded; name it in the device run's `carry`): the kvmesh CLI and the CUDA test binaries built
# here for sm_90, the Debian libraries they need (via ../shared/tools/gpu-bundle), and stories260K.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build-cuda}
shared=${KVM_SHARED:-$root/../shared}
out=$root/.gpu-cuda
grep -qx '/.gpu-cuda/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu-cuda/' >> "$root/.git/info/exclude"
rm -rf "$out"
"$shared/tools/gpu-bundle" "$out" "$build/kvmesh" "$build"/test_cuda_*
mkdir -p "$out/shared/models"
cp -r "$shared/models/stories260K" "$out/shared/models/"
du -sh "$out"
