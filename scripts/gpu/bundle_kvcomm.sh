#!/usr/bin/env bash
# bundle_kvcomm.sh [BUILD_DIR] - packs what scripts/gpu/kvcomm.sh needs on the GPU machine into .gpu-kvcomm/
# (git-excluded; name it in the device run's `carry`): the kvmesh CLI, test_kvcomm_ops and
# test_kvcomm_device_path built for sm_90, and the non-CUDA shared libraries they need (../shared/tools/gpu-bundle).
#
# Without BUILD_DIR it builds the COMMITTED HEAD in a detached git worktree (/tmp/kvmesh-kvcomm-wt, kept for
# incremental rebuilds), so teammates' uncommitted edits in the shared working tree cannot break the bundle;
# with BUILD_DIR it takes the binaries from that (already built) folder instead. .gpu-kvcomm/VERSION says which.
# `bundle_kvcomm.sh --old COMMIT` builds kvmesh and test_kvcomm_ops of COMMIT (worktree /tmp/kvmesh-old-wt) into
# .gpu-old/, the same-run baseline kvcomm.sh runs when it is carried too.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
shared=${KVM_SHARED:-$root/../shared}
out=$root/.gpu-kvcomm
bins="kvmesh test_kvcomm_ops test_kvcomm_device_path test_kvcomm_core test_cuda_ops test_cuda_model test_hf_parity test_settings"
bins_targets=${bins#kvmesh }
if [ "${1:-}" = --old ]; then
  commit=$(git -C "$root" rev-parse "$2")
  wt=/tmp/kvmesh-old-wt
  if [ -e "$wt/.git" ]; then git -C "$wt" checkout -q --detach "$commit"; else git -C "$root" worktree add -q --detach "$wt" "$commit"; fi
  cmake -S "$wt" -B "$wt/build" -DKVM_WERROR=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$wt/build" -j"$(nproc)" --target kvmesh_cli test_kvcomm_ops >/dev/null
  grep -qx '/.gpu-old/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu-old/' >> "$root/.git/info/exclude"
  rm -rf "$root/.gpu-old"
  "$shared/tools/gpu-bundle" "$root/.gpu-old" "$wt/build/kvmesh" "$wt/build/test_kvcomm_ops"
  # packed (the carry limit is 64 MiB with the tree); kvcomm.sh unpacks it and uses .gpu-kvcomm/lib
  tar cf - -C "$root/.gpu-old" kvmesh test_kvcomm_ops | xz -T2 -6 > "$root/.gpu-old/old.tar.xz"
  rm -rf "$root/.gpu-old/kvmesh" "$root/.gpu-old/test_kvcomm_ops" "$root/.gpu-old/lib"
  echo "HEAD $commit ($(git -C "$root" log -1 --format=%s "$commit" | cut -c1-80))" > "$root/.gpu-old/VERSION"
  du -sh "$root/.gpu-old"
  exit 0
fi
if [ $# -ge 1 ]; then
  build=$1
  version="working tree of $root ($(git -C "$root" rev-parse --short HEAD) + uncommitted), build $build"
else
  wt=${KVM_KVCOMM_WT:-/tmp/kvmesh-kvcomm-wt}
  head=$(git -C "$root" rev-parse HEAD)
  if [ -d "$wt/.git" ] || [ -f "$wt/.git" ]; then
    git -C "$wt" checkout -q --detach "$head"
  else
    git -C "$root" worktree add -q --detach "$wt" "$head"
  fi
  build=$wt/build-kvgpu
  cmake -S "$wt" -B "$build" -DKVM_WERROR=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" -j"$(nproc)" --target kvmesh_cli $bins_targets >/dev/null
  version="HEAD $head ($(git -C "$root" log -1 --format=%s "$head" | cut -c1-80))"
fi
grep -qx '/.gpu-kvcomm/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu-kvcomm/' >> "$root/.git/info/exclude"
rm -rf "$out"
"$shared/tools/gpu-bundle" "$out" $(for b in $bins; do echo "$build/$b"; done)
# packed (the carry limit is 64 MiB with the tree); kvcomm.sh unpacks them on the GPU machine
tar cf - -C "$out" $bins | xz -T2 -6 > "$out/bins.tar.xz"
(cd "$out" && rm -f $bins)
echo "$version" > "$out/VERSION"
cat "$out/VERSION"
du -sh "$out"
