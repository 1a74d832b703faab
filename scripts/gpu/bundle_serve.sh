#!/usr/bin/env bash
# bundle_serve.sh [BUILD_DIR] - packs what scripts/gpu/serve_state.sh needs into .gpu-serve/ (bundle_tests.sh): the
# kvmesh CLI and the test binaries built here for sm_90 (default build-cuda), and stories260K.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
shared=${KVM_SHARED:-$root/../shared}
bash "$root/scripts/gpu/bundle_tests.sh" serve "${1:-$root/build-cuda}" kvmesh test_cuda_ops test_cuda_model \
  test_kvcomm_device_path test_comm_state test_runtime_step
mkdir -p "$root/.gpu-serve/shared/models"
cp -r "$shared/models/stories260K" "$root/.gpu-serve/shared/models/"
du -sh "$root/.gpu-serve"
