#!/usr/bin/env bash
# bundle_c2c.sh [BUILD_DIR] - packs what scripts/gpu/c2c.sh needs into .gpu-c2c/ (bundle_tests.sh): the C2C and
# CUDA parity test binaries built here for sm_90 (default build-cuda). The fixture is in the tree.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bash "$root/scripts/gpu/bundle_tests.sh" c2c "${1:-$root/build-cuda}" test_c2c test_cuda_ops test_cuda_model test_kvcomm_device_path
du -sh "$root/.gpu-c2c"
