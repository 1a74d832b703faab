/* cuda_backend.cu - the CUDA backend's context, memory functions and op table.
 *
 * kvm_ops_cuda() initialises the context once (GPU opts.device, 0 by default): one non-blocking stream,
 * one cuBLAS handle with a fixed workspace, and a grow-only scratch buffer. Every op enqueues on that
 * stream; sync() waits for it and reports the first error any void op hit since the last sync. When
 * there is no driver or no GPU it returns NULL with a message (the caller then runs on the CPU). */
#include "cuda_internal.cuh"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Zero-initialised, with no constructor: kvm_cuda_set_opts may run before any C++ initialiser (from a C
 * constructor, as the tests' environment does), and nothing may overwrite what it stored. */
kvm_cuda_ctx g_cuda;

extern "C" int kvm_cuda_set_opts(const kvm_cuda_opts_t *o) {
    int rc = kvm_cuda_opts_check(o);
    if (rc) return rc;
    if (g_cuda.ready && o->device != g_cuda.device)
        return kvm_seterr(KVM_EINVAL, "cuda device: the backend already runs on GPU %d (set the device before its first use)",
                          g_cuda.device);
    g_cuda.opts = *o;
    g_cuda.opts_set = true;
    if (g_cuda.ready && o->profile) g_kvm_prof_on = 1;
    return 0;
}

extern "C" kvm_cuda_opts_t kvm_cuda_get_opts(void) {
    return g_cuda.opts_set ? g_cuda.opts : kvm_cuda_opts_default();
}

int kvm_cuda_fail(int code, const char *fmt, ...) {
    if (g_cuda.err_code == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(g_cuda.err_msg, sizeof g_cuda.err_msg, fmt, ap);
        va_end(ap);
        g_cuda.err_code = code;
    }
    return code;
}

int kvm_cuda_check(cudaError_t e, const char *what, const char *file, int line) {
    if (e == cudaSuccess) return 0;
    kvm_cuda_fail(KVM_EDEVICE, "cuda: %s failed: %s (%s:%d)", what, cudaGetErrorString(e), file, line);
    return KVM_EDEVICE;
}

int kvm_cuda_capturing(void) {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(g_cuda.stream, &st) != cudaSuccess) return 0;
    return st != cudaStreamCaptureStatusNone;
}

void *kvm_cuda_scratch(size_t bytes) {
    if (bytes <= g_cuda.ws_bytes) return g_cuda.ws;
    if (kvm_cuda_capturing()) {
        kvm_cuda_fail(KVM_EDEVICE, "cuda: scratch of %zu bytes needed while capturing a graph (have %zu); "
                      "run the step once eagerly first", bytes, g_cuda.ws_bytes);
        return NULL;
    }
    size_t nb = g_cuda.ws_bytes ? g_cuda.ws_bytes : ((size_t)64 << 20);
    while (nb < bytes) nb *= 2;
    /* the old scratch is retired, not freed: queued work and captured graphs may still point into it
     * (growth is geometric, so the retired buffers total less than the live one) */
    if (g_cuda.ws) {
        if (g_cuda.n_retired < (int)(sizeof g_cuda.retired / sizeof g_cuda.retired[0])) {
            g_cuda.retired[g_cuda.n_retired++] = g_cuda.ws;
        }
        g_cuda.ws = NULL;
        g_cuda.ws_bytes = 0;
    }
    void *p = NULL;
    if (KVM_CU(cudaMalloc(&p, nb), "cudaMalloc(scratch)")) return NULL;
    g_cuda.ws = p;
    g_cuda.ws_bytes = nb;
    return p;
}

/* ---- profiling ---------------------------------------------------------------------------------------- */

int g_kvm_prof_on = 0;
struct prof_rec {
    char name[64];
    cudaEvent_t a, b;
};
static prof_rec *g_prof;
static int g_prof_n, g_prof_cap;

/* Room for at least `need` records; the events are created here (thousands of cudaEventCreate calls take
 * milliseconds of host time, which must not land inside a timed span). */
static bool prof_reserve(int need) {
    if (need <= g_prof_cap) return true;
    int cap = g_prof_cap ? g_prof_cap : 4096;
    while (cap < need) cap *= 2;
    prof_rec *n = (prof_rec *)realloc(g_prof, (size_t)cap * sizeof(prof_rec));
    if (!n) return false;
    for (int i = g_prof_cap; i < cap; i++) {
        cudaEventCreate(&n[i].a);
        cudaEventCreate(&n[i].b);
    }
    g_prof = n;
    g_prof_cap = cap;
    return true;
}

static uint64_t g_prof_host0, g_prof_host1; /* host ns at kvm_cuda_profile_begin and at the first op's enqueue */

int kvm_prof_start(const char *name) {
    if (kvm_cuda_capturing()) return -1; /* events cannot be timed inside a graph */
    if (!prof_reserve(g_prof_n + 1)) return -1;
    if (g_prof_n == 0) g_prof_host1 = kvm_now_ns();
    prof_rec *r = &g_prof[g_prof_n];
    snprintf(r->name, sizeof r->name, "%s", name);
    cudaEventRecord(r->a, g_cuda.stream);
    return g_prof_n++;
}

void kvm_prof_stop(int idx) { cudaEventRecord(g_prof[idx].b, g_cuda.stream); }

/* events at kvm_cuda_profile_begin and _end: what the stream did outside the timed ops (uploads before the first op,
 * the outputs' download after the last one) and how long the host took to enqueue the first op */
static cudaEvent_t g_prof_edge[2];
static bool g_prof_edge_ok;

extern "C" void kvm_cuda_profile_begin(void) {
    g_prof_n = 0;
    g_kvm_prof_on = 1;
    prof_reserve(4096); /* the events exist before the leading edge is recorded */
    g_prof_host1 = 0;
    if (!g_prof_edge_ok)
        g_prof_edge_ok = cudaEventCreate(&g_prof_edge[0]) == cudaSuccess && cudaEventCreate(&g_prof_edge[1]) == cudaSuccess;
    if (g_prof_edge_ok && !kvm_cuda_capturing()) cudaEventRecord(g_prof_edge[0], g_cuda.stream);
    g_prof_host0 = kvm_now_ns();
}

/* Prints the ops timed since kvm_cuda_profile_begin, summed per name, largest first; returns the total ms. */
extern "C" double kvm_cuda_profile_end(FILE *f, const char *title) {
    g_kvm_prof_on = 0;
    const bool edges = g_prof_edge_ok && !kvm_cuda_capturing() && cudaEventRecord(g_prof_edge[1], g_cuda.stream) == cudaSuccess;
    cudaStreamSynchronize(g_cuda.stream);
    struct agg {
        char name[64];
        double ms;
        int n;
    };
    agg *a = (agg *)calloc((size_t)(g_prof_n ? g_prof_n : 1), sizeof(agg));
    int na = 0;
    double total = 0;
    for (int i = 0; i < g_prof_n; i++) {
        float ms = 0;
        cudaEventElapsedTime(&ms, g_prof[i].a, g_prof[i].b);
        total += ms;
        int j = 0;
        while (j < na && strcmp(a[j].name, g_prof[i].name)) j++;
        if (j == na) {
            snprintf(a[na].name, sizeof a[na].name, "%s", g_prof[i].name);
            na++;
        }
        a[j].ms += ms;
        a[j].n++;
    }
    for (int i = 0; i < na; i++) /* sort by time, descending */
        for (int j = i + 1; j < na; j++)
            if (a[j].ms > a[i].ms) {
                agg t = a[i];
                a[i] = a[j];
                a[j] = t;
            }
    /* the device timeline between ops: the span from the first op's start to the last op's end, and the time
     * between one op's end and the next op's start (the largest three named by the ops around them) */
    float span = 0, gaps = 0, top[3] = {0, 0, 0};
    int top_i[3] = {-1, -1, -1};
    if (g_prof_n > 0) cudaEventElapsedTime(&span, g_prof[0].a, g_prof[g_prof_n - 1].b);
    for (int i = 0; i + 1 < g_prof_n; i++) {
        float gms = 0;
        if (cudaEventElapsedTime(&gms, g_prof[i].b, g_prof[i + 1].a) != cudaSuccess || gms <= 0) continue;
        gaps += gms;
        for (int k = 0; k < 3; k++)
            if (gms > top[k]) {
                for (int m = 2; m > k; m--) top[m] = top[m - 1], top_i[m] = top_i[m - 1];
                top[k] = gms, top_i[k] = i;
                break;
            }
    }
    cudaGetLastError();
    if (f) {
        fprintf(f, "\nprofile: %s (eager; sum of per-op event times %.3f ms)\n", title ? title : "", total);
        fprintf(f, "timeline: first op start to last op end %.3f ms; between ops %.3f ms over %d boundaries", span, gaps,
                g_prof_n > 0 ? g_prof_n - 1 : 0);
        for (int k = 0; k < 3 && top_i[k] >= 0; k++)
            fprintf(f, "%s %.1f us (%s -> %s)", k ? "," : "; largest:", 1000.0 * top[k], g_prof[top_i[k]].name,
                    g_prof[top_i[k] + 1].name);
        float lead = 0, tail = 0; /* profile_begin -> first op's start, last op's end -> profile_end */
        if (edges && g_prof_n > 0 && cudaEventElapsedTime(&lead, g_prof_edge[0], g_prof[0].a) == cudaSuccess &&
            cudaEventElapsedTime(&tail, g_prof[g_prof_n - 1].b, g_prof_edge[1]) == cudaSuccess)
            fprintf(f, "; before the first op %.3f ms (the host enqueued it %.3f ms after the start), after the last "
                       "%.3f ms (uploads, host work, outputs)",
                    lead, g_prof_host1 > g_prof_host0 ? (double)(g_prof_host1 - g_prof_host0) / 1e6 : 0.0, tail);
        cudaGetLastError();
        fprintf(f, "\n");
        fprintf(f, "| op | calls | total ms | %% | us/call |\n|---|---|---|---|---|\n");
        for (int i = 0; i < na; i++)
            fprintf(f, "| %s | %d | %.3f | %.1f | %.1f |\n", a[i].name, a[i].n, a[i].ms, total > 0 ? 100.0 * a[i].ms / total : 0,
                    1000.0 * a[i].ms / a[i].n);
    }
    free(a);
    g_prof_n = 0;
    return total;
}

/* ---- memory ------------------------------------------------------------------------------------ */

static void *cu_alloc(size_t bytes) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 256);
    if (e != cudaSuccess) {
        size_t fr = 0, tot = 0;
        cudaGetLastError();
        cudaMemGetInfo(&fr, &tot);
        kvm_seterr(KVM_ENOMEM, "cuda: cannot allocate %zu bytes of device memory (%zu MiB free of %zu MiB): %s", bytes,
                   fr >> 20, tot >> 20, cudaGetErrorString(e));
        return NULL;
    }
    return p;
}

static void cu_free(void *p) {
    if (!p) return;
    /* queued work may still use p */
    cudaStreamSynchronize(g_cuda.stream);
    cudaFree(p);
}

static int cu_take_error(void) {
    if (g_cuda.err_code) {
        int c = g_cuda.err_code;
        kvm_seterr(c, "%s", g_cuda.err_msg);
        g_cuda.err_code = 0;
        g_cuda.err_msg[0] = 0;
        return c;
    }
    return 0;
}

static int cu_sync(void) {
    cudaError_t e = cudaStreamSynchronize(g_cuda.stream);
    if (e != cudaSuccess) kvm_cuda_check(e, "stream synchronize", __FILE__, __LINE__);
    return cu_take_error();
}

static int cu_h2d(void *dst, const void *src, size_t n) {
    if (!n) return 0;
    kvm_cuda_touch();
    if (KVM_CU(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, g_cuda.stream), "copy host to device"))
        return cu_take_error();
    /* the source is pageable host memory the caller may reuse at once */
    return cu_sync();
}

static int cu_d2h(void *dst, const void *src, size_t n) {
    if (!n) return 0;
    if (KVM_CU(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, g_cuda.stream), "copy device to host"))
        return cu_take_error();
    return cu_sync();
}

static int cu_d2d(void *dst, const void *src, size_t n) {
    if (!n) return 0;
    KVM_OP("d2d copy");
    if (KVM_CU(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, g_cuda.stream), "copy device to device"))
        return cu_take_error();
    return 0;
}

static int cu_memset0(void *dst, size_t n) {
    if (!n) return 0;
    kvm_cuda_touch();
    if (KVM_CU(cudaMemsetAsync(dst, 0, n, g_cuda.stream), "memset")) return cu_take_error();
    return 0;
}

/* ---- graphs (optional ops) --------------------------------------------------------------------- */

static int cu_graph_begin(void) {
    int rc = cu_take_error();
    if (rc) return rc;
    if (KVM_CU(cudaStreamBeginCapture(g_cuda.stream, cudaStreamCaptureModeThreadLocal), "begin graph capture"))
        return cu_take_error();
    return 0;
}

static int cu_graph_end(void **out) {
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    *out = NULL;
    cudaError_t e = cudaStreamEndCapture(g_cuda.stream, &graph);
    int rc = cu_take_error(); /* an op failed during capture */
    if (e != cudaSuccess || rc) {
        if (graph) cudaGraphDestroy(graph);
        cudaGetLastError();
        if (rc) return rc;
        return kvm_seterr(KVM_EDEVICE, "cuda: graph capture failed: %s", cudaGetErrorString(e));
    }
    e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (e != cudaSuccess) return kvm_seterr(KVM_EDEVICE, "cuda: graph instantiate failed: %s", cudaGetErrorString(e));
    *out = exec;
    return 0;
}

static int cu_graph_launch(void *g) {
    if (KVM_CU(cudaGraphLaunch((cudaGraphExec_t)g, g_cuda.stream), "graph launch")) return cu_take_error();
    return 0;
}

static void cu_graph_free(void *g) {
    if (g) cudaGraphExecDestroy((cudaGraphExec_t)g);
}

/* ---- timing (optional ops, for benchmarks) ------------------------------------------------------- */

static void *cu_event_record(void) {
    cudaEvent_t ev = NULL;
    if (cudaEventCreate(&ev) != cudaSuccess) return NULL;
    cudaEventRecord(ev, g_cuda.stream);
    return ev;
}

static float cu_event_elapsed_ms(void *a, void *b) {
    float ms = -1.0f;
    cudaEventSynchronize((cudaEvent_t)b);
    if (cudaEventElapsedTime(&ms, (cudaEvent_t)a, (cudaEvent_t)b) != cudaSuccess) ms = -1.0f;
    return ms;
}

static void cu_event_free(void *e) {
    if (e) cudaEventDestroy((cudaEvent_t)e);
}

/* ---- the table ------------------------------------------------------------------------------------ */

static kvm_ops_t make_ops(void);
static kvm_ops_t cuda_ops = make_ops();

static void cu_describe(char *buf, size_t cap) {
    int drv = 0, rt = 0;
    cudaDriverGetVersion(&drv);
    cudaRuntimeGetVersion(&rt);
    snprintf(buf, cap, "%s (sm_%d%d, %d SMs, L2 %d MiB, %zu MiB), driver CUDA %d.%d, runtime %d.%d", g_cuda.prop.name,
             g_cuda.prop.major, g_cuda.prop.minor, g_cuda.prop.multiProcessorCount, g_cuda.prop.l2CacheSize >> 20,
             g_cuda.prop.totalGlobalMem >> 20, drv / 1000, (drv % 1000) / 10, rt / 1000, (rt % 1000) / 10);
}

static int cu_init(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return kvm_seterr(KVM_EUNSUPPORTED, "cuda: no usable GPU (%s)", cudaGetErrorString(e));
    }
    if (n <= 0) return kvm_seterr(KVM_EUNSUPPORTED, "cuda: no GPU found");
    if (!g_cuda.opts_set) g_cuda.opts = kvm_cuda_opts_default(); /* the ops read g_cuda.opts from here on */
    g_cuda.opts_set = true;
    const int dev = g_cuda.opts.device;
    if (dev < 0 || dev >= n) return kvm_seterr(KVM_EINVAL, "cuda device: GPU %d asked for, but %d GPU(s) present", dev, n);
    if ((e = cudaSetDevice(dev)) != cudaSuccess ||
        (e = cudaGetDeviceProperties(&g_cuda.prop, dev)) != cudaSuccess) {
        cudaGetLastError();
        return kvm_seterr(KVM_EDEVICE, "cuda: cannot open GPU %d: %s", dev, cudaGetErrorString(e));
    }
    if (g_cuda.prop.major < 8)
        return kvm_seterr(KVM_EUNSUPPORTED, "cuda: %s (sm_%d%d) is too old; kvmesh needs sm_80 or newer", g_cuda.prop.name,
                          g_cuda.prop.major, g_cuda.prop.minor);
    g_cuda.device = dev;
    if ((e = cudaStreamCreateWithFlags(&g_cuda.stream, cudaStreamNonBlocking)) != cudaSuccess)
        return kvm_seterr(KVM_EDEVICE, "cuda: cannot create a stream: %s", cudaGetErrorString(e));
    if (const char *le = kvm_cublas_load_error()) /* cublas_lazy.c: loaded on first use */
        return kvm_seterr(KVM_EDEVICE, "cuda: cannot load %s (%s): install the CUDA Toolkit's cuBLAS or put its "
                          "folder in LD_LIBRARY_PATH", kvm_cublas_soname(), le);
    if (cublasCreate(&g_cuda.blas) != CUBLAS_STATUS_SUCCESS)
        return kvm_seterr(KVM_EDEVICE, "cuda: cublasCreate failed (is libcublas usable?)");
    cublasSetStream(g_cuda.blas, g_cuda.stream);
    /* fp32 GEMMs must stay true fp32 (parity mode): no TF32 */
    cublasSetMathMode(g_cuda.blas, CUBLAS_DEFAULT_MATH);
    g_cuda.blas_ws_bytes = (size_t)32 << 20;
    if ((e = cudaMalloc(&g_cuda.blas_ws, g_cuda.blas_ws_bytes)) != cudaSuccess)
        return kvm_seterr(KVM_ENOMEM, "cuda: cannot allocate the cuBLAS workspace: %s", cudaGetErrorString(e));
    cublasSetWorkspace(g_cuda.blas, g_cuda.blas_ws, g_cuda.blas_ws_bytes);
    if (!kvm_cuda_scratch((size_t)64 << 20)) return cu_take_error();
    if (g_cuda.opts.profile) g_kvm_prof_on = 1;
    g_cuda.ready = 1;
    return 0;
}

extern "C" const kvm_ops_t *kvm_ops_cuda(void) {
    static int tried = 0, rc = 0;
    static char msg[512];
    if (!tried) {
        tried = 1;
        rc = cu_init();
        if (rc) snprintf(msg, sizeof msg, "%s", kvm_errmsg());
    }
    if (rc) {
        kvm_seterr(rc, "%s", msg);
        return NULL;
    }
    return &cuda_ops;
}

extern "C" int kvm_cuda_describe(char *buf, size_t cap) {
    if (!kvm_ops_cuda()) return kvm_errcode();
    cu_describe(buf, cap);
    return 0;
}

/* kvcomm_kernels.cu */
extern "C" int kvm_cuda_kvcomm_dist(const kvm_kvcomm_dist_args_t *a);
extern "C" int kvm_cuda_kvcomm_softmax(float *w, const float *d, int n, size_t cols, int mode);
extern "C" int kvm_cuda_kvcomm_apply(const kvm_kvcomm_apply_args_t *a);
extern "C" int kvm_cuda_kvcomm_spread(const kvm_kvcomm_spread_args_t *a);
extern "C" int kvm_cuda_kvcomm_diff(const kvm_kvcomm_diff_args_t *a);

/* c2c_kernels.cu */
extern "C" int kvm_cuda_c2c_gather(const kvm_c2c_gather_args_t *a);
extern "C" void kvm_cuda_gelu_erf(float *x, size_t n);
extern "C" int kvm_cuda_c2c_residual(const kvm_c2c_residual_args_t *a);

static kvm_ops_t make_ops(void) {
    kvm_ops_t o;
    memset(&o, 0, sizeof o);
    o.name = "cuda";
    o.alloc = cu_alloc;
    o.free = cu_free;
    o.h2d = cu_h2d;
    o.d2h = cu_d2h;
    o.d2d = cu_d2d;
    o.memset0 = cu_memset0;
    o.sync = cu_sync;
    o.embed = kvm_cuda_embed;
    o.rmsnorm = kvm_cuda_rmsnorm;
    o.head_rmsnorm = kvm_cuda_head_rmsnorm;
    o.matmul = kvm_cuda_matmul;
    o.rope = kvm_cuda_rope;
    o.swiglu = kvm_cuda_swiglu;
    o.add = kvm_cuda_add;
    o.kv_write = kvm_cuda_kv_write;
    o.attention = kvm_cuda_attention;
    o.attn_mass = kvm_cuda_attn_mass;
    o.rope_shift = kvm_cuda_rope_shift;
    o.argmax = kvm_cuda_argmax;
    o.add_rmsnorm = kvm_cuda_add_rmsnorm;
    o.argmax_rows = kvm_cuda_argmax_rows;
    o.fill_synthetic = kvm_cuda_fill_synthetic;
    o.graph_begin = cu_graph_begin;
    o.graph_end = cu_graph_end;
    o.graph_launch = cu_graph_launch;
    o.graph_free = cu_graph_free;
    o.event_record = cu_event_record;
    o.event_elapsed_ms = cu_event_elapsed_ms;
    o.event_free = cu_event_free;
    o.matmul_multi = kvm_cuda_matmul_multi;
    o.rope_qk = kvm_cuda_rope_qk;
    o.kvcomm_dist = kvm_cuda_kvcomm_dist;
    o.kvcomm_softmax = kvm_cuda_kvcomm_softmax;
    o.kvcomm_apply = kvm_cuda_kvcomm_apply;
    o.kvcomm_spread = kvm_cuda_kvcomm_spread;
    o.kvcomm_diff = kvm_cuda_kvcomm_diff;
    o.rope_qk_kv_write = kvm_cuda_rope_qk_kv_write;
    o.swiglu_matmul = kvm_cuda_swiglu_matmul;
    o.ffn = kvm_cuda_ffn;
    o.add_rmsnorm_16 = kvm_cuda_add_rmsnorm_16;
    o.qkv_rope_kv = kvm_cuda_qkv_rope_kv;
    o.matmul_add_rmsnorm_16 = kvm_cuda_matmul_add_rmsnorm_16;
    o.ffn_add_rmsnorm_16 = kvm_cuda_ffn_add_rmsnorm_16;
    o.c2c_gather = kvm_cuda_c2c_gather;
    o.gelu_erf = kvm_cuda_gelu_erf;
    o.c2c_residual = kvm_cuda_c2c_residual;
    return o;
}
