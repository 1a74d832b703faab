/* c2c_kernels.cu - CUDA versions of the C2C ops of ops.h (c2c_gather, gelu_erf, c2c_residual;
 * ../shared/spec/c2c.md §2.2, §6). The CPU reference is kernels/cpu/ops_cpu_c2c.c; the fuser's GEMMs, norms and
 * adds are the backend's own matmul / rmsnorm / add (runtime/comm/c2c.c drives them).
 *
 * All three are memory-bound elementwise passes, one thread per element: the gather reads two paged caches
 * (any dtype each) into the fuser's fp32 input rows, the residual reads one cache element, adds
 * sigmoid(wlogit) * y in fp32 and stores it rounded once to the cache dtype. The cache dtype is a kernel argument
 * (a branch per element is free next to the memory traffic). */
#include "cuda_internal.cuh"

extern "C" int kvm_cuda_c2c_gather(const kvm_c2c_gather_args_t *a);
extern "C" void kvm_cuda_gelu_erf(float *x, size_t n);
extern "C" int kvm_cuda_c2c_residual(const kvm_c2c_residual_args_t *a);

namespace {

__device__ __forceinline__ float c2c_load(const void *p, int dt, size_t i) {
    if (dt == KVM_F32) return ((const float *)p)[i];
    if (dt == KVM_BF16) return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    return __half2float(((const __half *)p)[i]);
}

__device__ __forceinline__ void c2c_store(void *p, int dt, size_t i, float v) {
    if (dt == KVM_F32) ((float *)p)[i] = v;
    else if (dt == KVM_BF16) ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
    else ((__half *)p)[i] = __float2half_rn(v);
}

struct C2cCache {
    const void *kv;
    const int32_t *blocks;
    int L, H, D, dt;
};

__device__ __forceinline__ size_t c2c_index(const C2cCache &c, int layer, int kv, int h, int p, int d) {
    return kvm_kv_index_dev(c.L, c.H, c.D, c.blocks[p / KVM_KV_BLOCK], layer, kv, h, p % KVM_KV_BLOCK) + (size_t)d;
}

__global__ void k_c2c_gather(float *__restrict__ x, int n, int pos0, int kv, C2cCache s, int s_layer, C2cCache r,
                             int r_layer) {
    kvm_pdl_trigger();
    const int cs = s.H * s.D, cr = r.H * r.D, w = cs + cr;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * w) return;
    const int t = (int)(i / w), c = (int)(i % w), p = pos0 + t;
    if (c < cs) x[i] = c2c_load(s.kv, s.dt, c2c_index(s, s_layer, kv, c / s.D, p, c % s.D));
    else x[i] = c2c_load(r.kv, r.dt, c2c_index(r, r_layer, kv, (c - cs) / r.D, p, (c - cs) % r.D));
}

__global__ void k_gelu_erf(float *__restrict__ x, size_t n) {
    kvm_pdl_trigger();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float v = x[i];
        x[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
}

__global__ void k_c2c_residual(C2cCache c, void *kv_out, int layer, int kv, int pos0, int n, const float *__restrict__ y,
                               const float *__restrict__ wlogit) {
    kvm_pdl_trigger();
    const int w = c.H * c.D;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * w) return;
    const int t = (int)(i / w), e = (int)(i % w), h = e / c.D;
    const size_t at = c2c_index(c, layer, kv, h, pos0 + t, e % c.D);
    const float g = 1.0f / (1.0f + expf(-wlogit[(size_t)t * c.H + h]));
    c2c_store(kv_out, c.dt, at, c2c_load(c.kv, c.dt, at) + g * y[i]);
}

C2cCache c2c_cache(const kvm_c2c_cache_view_t &v) {
    C2cCache c;
    c.kv = v.kv;
    c.blocks = v.blocks;
    c.L = v.g.n_layers;
    c.H = v.g.n_kv_heads;
    c.D = v.g.head_dim;
    c.dt = (int)v.g.dtype;
    return c;
}

unsigned c2c_grid(size_t n) { return (unsigned)((n + 255) / 256); }

} // namespace

extern "C" int kvm_cuda_c2c_gather(const kvm_c2c_gather_args_t *a) {
    KVM_OP("c2c_gather");
    const size_t n = (size_t)a->n * (a->s.g.n_kv_heads * a->s.g.head_dim + a->r.g.n_kv_heads * a->r.g.head_dim);
    if (!n) return 0;
    k_c2c_gather<<<c2c_grid(n), 256, 0, g_cuda.stream>>>(a->x, a->n, a->pos0, a->kv, c2c_cache(a->s), a->s_layer,
                                                          c2c_cache(a->r), a->r_layer);
    return KVM_CU_LAUNCH("c2c_gather");
}

extern "C" void kvm_cuda_gelu_erf(float *x, size_t n) {
    KVM_OP("gelu_erf");
    if (!n) return;
    k_gelu_erf<<<c2c_grid(n), 256, 0, g_cuda.stream>>>(x, n);
    KVM_CU_LAUNCH("gelu_erf");
}

extern "C" int kvm_cuda_c2c_residual(const kvm_c2c_residual_args_t *a) {
    KVM_OP("c2c_residual");
    const size_t n = (size_t)a->n * a->c.g.n_kv_heads * a->c.g.head_dim;
    if (!n) return 0;
    k_c2c_residual<<<c2c_grid(n), 256, 0, g_cuda.stream>>>(c2c_cache(a->c), a->c.kv, a->layer, a->kv, a->pos0, a->n, a->y,
                                                            a->wlogit);
    return KVM_CU_LAUNCH("c2c_residual");
}
