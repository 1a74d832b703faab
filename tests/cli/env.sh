#!/usr/bin/env bash
# env.sh - the environment variables of the kvmesh command (cli/cli_env.c, docs/cli.md): each reaches its
# setting, and a bad value stops the command with exit status 2 and a message naming the variable and its
# values. Runs on the synthetic tiny-qwen3 (no shared data needed); never exits 77.
set -u
bin="$1"
fails=0
model=synthetic:tiny-qwen3
ok() { echo "ok   $1"; }
fail() { echo "FAIL $1"; fails=$((fails + 1)); }

# VAR=VALUE, then the text the message must hold
bad_values=(
  "KVM_BACKEND=gpu|KVM_BACKEND: backend: 'gpu' is not one of auto, cpu, cuda"
  "KVM_DEVICE_DTYPE=f8|KVM_DEVICE_DTYPE: weight_dtype: 'f8' is not one of f32, f16, bf16"
  "KVM_KV_DTYPE=bf61|KVM_KV_DTYPE: kv_dtype: 'bf61' is not one of f32, f16, bf16"
  "KVM_CUDA_GRAPHS=no|KVM_CUDA_GRAPHS: 'no' is not one of 0, 1"
  "KVM_SYNTHETIC_SEED=12x|KVM_SYNTHETIC_SEED: '12x' is not one of"
  "KVM_THREADS=-3|KVM_THREADS: '-3' is not one of"
  "KVM_LOG=loud|KVM_LOG: 'loud' is not one of debug, info, warn, error"
  "KVM_CUDA_PREFETCH=5|KVM_CUDA_PREFETCH: cuda prefetch: '5' is not one of 0, 1, 2"
  "KVM_CUDA_SKINNY=gemm|KVM_CUDA_SKINNY: cuda skinny: 'gemm' is not one of auto, gemv, mma"
  "KVM_CUDA_SKINNY_ROWS=48|KVM_CUDA_SKINNY_ROWS: cuda skinny_rows: '48' is not one of 16, 32, 64"
  "KVM_CUDA_PDL_CHAIN=1|KVM_CUDA_PDL_CHAIN: not a setting of the CUDA backend"
  "KVM_CUDA_NO_MMA_ATTN=yes|KVM_CUDA_NO_MMA_ATTN: cuda no_mma_attn: 'yes' is not one of 0, 1"
  "KVM_KVCOMM_DIST=v3|KVM_KVCOMM_DIST: cuda kvcomm_dist: 'v3' is not one of v2, v1, v2u4"
  "KVM_CUDA_PREFETCHH=1|KVM_CUDA_PREFETCHH: not a setting of the CUDA backend"
)
for case in "${bad_values[@]}"; do
  assign="${case%%|*}"
  want="${case#*|}"
  err="$(env "$assign" "$bin" info --model "$model" 2>&1 >/dev/null)"
  rc=$?
  if [ $rc -eq 2 ] && grep -qF -- "$want" <<< "$err"; then ok "$assign rejected"; else fail "$assign: rc $rc, '$err'"; fi
done

# every subcommand that loads a model reads the per-model variables
for cmd in "generate --prompt x" "eval minitasks --n 1" "bench engine --prompt 8 --batch 1 --reps 1 --warmup 0" \
           "bench kvcomm --agents 1"; do
  sub="${cmd%% -*}"
  if [[ "$cmd" == bench* ]]; then args=(${cmd} --synthetic tiny-qwen3); else args=(${cmd} --model "$model"); fi
  err="$(KVM_KV_DTYPE=bf61 "$bin" "${args[@]}" 2>&1 >/dev/null)"
  rc=$?
  if [ $rc -eq 2 ] && grep -qF "KVM_KV_DTYPE: kv_dtype: 'bf61'" <<< "$err"; then ok "kvmesh $sub reads KVM_KV_DTYPE"
  else fail "kvmesh $sub with KVM_KV_DTYPE=bf61: rc $rc, '$err'"; fi
done
err="$(KVM_KV_DTYPE=bf61 "$bin" run --mock "$(dirname "$0")/../../examples/stories.lua" 2>&1 >/dev/null)"
rc=$?
if [ $rc -eq 2 ] && grep -qF "KVM_KV_DTYPE" <<< "$err"; then ok "kvmesh run reads KVM_KV_DTYPE"; else fail "kvmesh run: rc $rc, '$err'"; fi

# good values reach their settings
out="$(KVM_BACKEND=cpu "$bin" info --model "$model" 2>&1)"
grep -q "backend cpu" <<< "$out" && ok "KVM_BACKEND=cpu" || fail "KVM_BACKEND=cpu: $out"
out="$(KVM_BACKEND=gpu "$bin" info --backend cpu --model "$model" 2>&1)"
[ $? -eq 0 ] && ok "--backend wins over KVM_BACKEND" || fail "--backend with KVM_BACKEND=gpu: $out"
out="$(KVM_BACKEND=cpu KVM_DEVICE_DTYPE=f32 "$bin" info --model "$model" 2>&1)"
grep -q "F32 weights" <<< "$out" && ok "KVM_DEVICE_DTYPE=f32" || fail "KVM_DEVICE_DTYPE=f32: $out"
out="$(KVM_BACKEND=cpu KVM_LOG=info KVM_SYNTHETIC_SEED=77 "$bin" info --model "$model" 2>&1)"
grep -q "(seed 77)" <<< "$out" && ok "KVM_SYNTHETIC_SEED=77 (and KVM_LOG=info)" || fail "KVM_SYNTHETIC_SEED=77: $out"
out="$(KVM_BACKEND=cpu KVM_KV_DTYPE=f16 KVM_CUDA_GRAPHS=0 KVM_THREADS=1 "$bin" bench engine --synthetic tiny-qwen3 \
       --prompt 8 --batch 1 --reps 1 --warmup 0 2>&1)"
grep -q "KV F16" <<< "$out" && ok "KVM_KV_DTYPE=f16 (bench engine)" || fail "KVM_KV_DTYPE=f16: $out"
out="$(KVM_CUDA_SKINNY=gemv KVM_CUDA_PDL=0 KVM_KVCOMM_DIST=v1 KVM_CUDA_DEVICE=0 "$bin" info --backend cpu --model "$model" 2>&1)"
[ $? -eq 0 ] && ok "valid CUDA switches accepted" || fail "valid CUDA switches: $out"
out="$(KVM_KV_DTYPE= "$bin" info --backend cpu --model "$model" 2>&1)"
[ $? -eq 0 ] && ok "an empty variable counts as unset" || fail "KVM_KV_DTYPE=: $out"

# --backend cuda where no GPU can run it: an error that says what to do, not "running on the CPU" (issue 18)
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
  out="$("$bin" info --backend cuda --model "$model" 2>&1)"
  rc=$?
  if [ $rc -ne 0 ] && grep -q "backend cuda was asked for" <<< "$out" && ! grep -q "running on the CPU" <<< "$out"; then
    ok "--backend cuda without a GPU: a clear error"
  else
    fail "--backend cuda without a GPU: rc $rc, '$out'"
  fi
fi

[ $fails -eq 0 ] && echo "all env checks passed" || echo "$fails env check(s) FAILED"
[ $fails -eq 0 ]
