#!/usr/bin/env bash
# c2c.sh - the GPU check of the C2C fuser (issue 14): run from the repo root on the GPU machine with .gpu-c2c/
# carried (scripts/gpu/bundle_c2c.sh). Logs in $OUT:
#   gpu.txt      card, driver; the bundle's VERSION
#   parity.log   test_c2c (CPU vs CUDA fused caches; the PyTorch fixture), and the CUDA op/model parity tests
#                (test_cuda_ops, test_cuda_model, test_kvcomm_device_path) after the op table grew
#   memcheck.log compute-sanitizer memcheck of test_c2c
#   torch.log    the fixture writer and the converter under the machine's PyTorch (a released-format checkpoint
#                written, converted to our layout, compared byte for byte)
set -uo pipefail
B=$PWD/.gpu-c2c
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$B/lib
if [ -f "$B/bins.tar.xz" ] && [ ! -x "$B/test_c2c" ]; then tar xJf "$B/bins.tar.xz" -C "$B"; fi
{ echo "start: $(date -u)"; echo "bundle: $(cat "$B/VERSION" 2>/dev/null)"; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
for t in test_c2c test_cuda_ops test_cuda_model test_kvcomm_device_path; do
  [ -x "$B/$t" ] || { echo "== $t: not in the bundle"; continue; }
  echo "== $t ($(date -u +%T))"; timeout 300 "$B/$t" 2>&1 | grep -vE "^\[ +(RUN|OK) +\]" | tail -25; echo "rc=${PIPESTATUS[0]}"
done > "$OUT/parity.log" 2>&1
grep -E "^==|PASSED|FAILED|SKIP|rc=" "$OUT/parity.log"
cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$cs" ]; then
  timeout 300 "$cs" --tool memcheck --leak-check full "$B/test_c2c" > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?"; tail -3 "$OUT/memcheck.log"
else
  echo "no compute-sanitizer" > "$OUT/memcheck.log"
fi
{ python3 -c "import torch; print('torch', torch.__version__)"
  rm -rf /tmp/fx /tmp/conv
  python3 scripts/train/c2c_fixture.py --out /tmp/fx --released &&
  python3 scripts/train/c2c_convert.py --in /tmp/fx/released --pair-json /tmp/fx/released/pair.json --out /tmp/conv \
    --name bf16 --dtype bf16 &&
  cmp /tmp/fx/bf16.c2c.safetensors /tmp/conv/bf16.c2c.safetensors && echo "converter round trip: byte-identical"
  echo "rc=$?"; } > "$OUT/torch.log" 2>&1
tail -4 "$OUT/torch.log"
