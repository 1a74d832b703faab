/* comm_state.c - KVCOMM anchor pools saved to a file and loaded back (docs/kvcomm.md §"Anchors across
 * processes"), so that a runtime restarted with the same state folder keeps what it learned.
 *
 * The file (little-endian, the host's layout of the numbers; version 2, which adds the guard records; version 1
 * files, anchors only, still load):
 *   header   "KVMANCH1" | u32 version | u32 L | u32 H | u32 D | u64 fingerprint | u64 insert_seq
 *            | char tag[48] (backend/dtype, for messages) | u64 FNV-1a of the bytes before it
 *   records  u32 'ANCR' | u32 0 | u64 payload bytes | payload | u64 FNV-1a of the payload
 *            payload: char pool[KVM_COMM_NAME_MAX] | u64 key | i32 T | u32 activation | u64 insert_seq
 *                     | i32 n_deltas | f32 base[L][2][H][T][D]
 *                     | n_deltas x (char consumer[KVM_COMM_NAME_MAX] | u64 template_hash | i32 S
 *                                   | f32 d_ph[L-1][2][H][T][D] | f32 d_pf[L-1][2][H][S][D])
 *            or u32 'GRD1' | u32 0 | u64 payload bytes | payload | u64 FNV-1a of the payload (the fidelity guard's
 *            state of one consumer, guard.c, so that a restarted runtime neither checks its first calls again nor
 *            lowers a fraction it raised)
 *            payload: char consumer[KVM_COMM_NAME_MAX] | f32 frac | u32 reused | u32 checked | u32 disagreed
 *   trailer  u32 'END!' | u32 0 | u64 number of anchor records
 * A file is written beside its final name, flushed to the disk and renamed over it (then the folder is
 * synced): a crash leaves the old file or the new one, never a torn one. Every length read is checked against
 * what is left of the file before anything is allocated. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "comm_internal.h"

#define STATE_MAGIC "KVMANCH1"
#define STATE_VERSION 2u
#define TAG_ANCHOR 0x52434e41u /* "ANCR" */
#define TAG_GUARD 0x31445247u  /* "GRD1" */
#define GUARD_PAYLOAD (KVM_COMM_NAME_MAX + 4 * 4)
#define TAG_END 0x21444e45u    /* "END!" */
#define STATE_MAX_T (1 << 20)

typedef struct state_header {
    char magic[8];
    uint32_t version, L, H, D;
    uint64_t fingerprint, insert_seq;
    char tag[48];
    uint64_t check;
} state_header_t;

/* What identifies the numbers an anchor holds: the model (its id: name and shape), the contents of its weight
 * files (sizes and a hash of their first and last 64 KiB), the backend and the dtypes the KV was computed in. */
static uint64_t state_fingerprint(const kvm_comm_t *c, char *tag, size_t tag_cap) {
    const kvm_model_t *m = c->m;
    uint64_t h = kvm_hash64(&m->model_id, sizeof m->model_id, KVM_HASH_SEED);
    for (int i = 0; i < m->n_maps; i++) {
        const kvm_mmap_t *f = &m->maps[i];
        size_t k = f->size < 65536 ? f->size : 65536;
        h = kvm_hash64(&f->size, sizeof f->size, h);
        if (f->data && k) {
            h = kvm_hash64(f->data, k, h);
            h = kvm_hash64((const char *)f->data + f->size - k, k, h);
        }
    }
    snprintf(tag, tag_cap, "%s/kv %s/weights %s", m->ops ? m->ops->name : "?", kvm_dtype_name(c->pool->geom.dtype),
             kvm_dtype_name(m->device_dtype));
    h = kvm_hash64(tag, strlen(tag), h);
    return kvm_hash64(&c->g, sizeof c->g, h);
}

void kvm_comm_anchors_file_name(const kvm_comm_t *c, char *buf, size_t cap) {
    char tag[48], name[64];
    uint64_t fp = state_fingerprint(c, tag, sizeof tag);
    size_t k = 0;
    for (const char *p = c->m->name; *p && k + 1 < sizeof name; p++)
        name[k++] = (isalnum((unsigned char)*p) || *p == '-' || *p == '_' || *p == '.') ? *p : '_';
    name[k] = '\0';
    snprintf(buf, cap, "anchors-%s-%016llx.kva", k ? name : "model", (unsigned long long)fp);
}

int kvm_comm_n_anchors(const kvm_comm_t *c) {
    int n = 0;
    for (int i = 0; i < c->n_pools; i++) n += c->pools[i].n;
    return n;
}

/* ---- writing ---------------------------------------------------------------------------------------- */

typedef struct state_out {
    FILE *f;
    uint64_t h; /* FNV-1a of the current record's payload */
    int err;
} state_out_t;

static void out_bytes(state_out_t *o, const void *p, size_t n) {
    if (o->err || !n) return;
    o->h = kvm_hash64(p, n, o->h);
    if (fwrite(p, 1, n, o->f) != n) o->err = errno ? errno : EIO;
}
static void out_u32(state_out_t *o, uint32_t v) { out_bytes(o, &v, sizeof v); }
static void out_i32(state_out_t *o, int32_t v) { out_bytes(o, &v, sizeof v); }
static void out_u64(state_out_t *o, uint64_t v) { out_bytes(o, &v, sizeof v); }

static uint64_t anchor_payload_bytes(const comm_geom_t *g, const comm_anchor_t *a) {
    uint64_t n = KVM_COMM_NAME_MAX + 8 + 4 + 4 + 8 + 4 + comm_rows_elems(g, a->T) * sizeof(float);
    size_t per_row = (size_t)(g->L - 1) * 2 * g->H * g->D * sizeof(float);
    for (int i = 0; i < a->n_deltas; i++) n += KVM_COMM_NAME_MAX + 8 + 4 + per_row * (size_t)(a->T + a->deltas[i].S);
    return n;
}

static void write_anchor(state_out_t *o, const comm_geom_t *g, const char *pool, const comm_anchor_t *a) {
    out_u32(o, TAG_ANCHOR);
    out_u32(o, 0);
    out_u64(o, anchor_payload_bytes(g, a));
    o->h = KVM_HASH_SEED;
    char name[KVM_COMM_NAME_MAX] = {0};
    snprintf(name, sizeof name, "%s", pool);
    out_bytes(o, name, sizeof name);
    out_u64(o, a->key);
    out_i32(o, a->T);
    out_u32(o, a->activation);
    out_u64(o, a->insert_seq);
    out_i32(o, a->n_deltas);
    out_bytes(o, a->base, comm_rows_elems(g, a->T) * sizeof(float));
    size_t per_row = (size_t)(g->L - 1) * 2 * g->H * g->D;
    for (int i = 0; i < a->n_deltas; i++) {
        const comm_delta_t *d = &a->deltas[i];
        char cons[KVM_COMM_NAME_MAX] = {0};
        snprintf(cons, sizeof cons, "%s", d->consumer);
        out_bytes(o, cons, sizeof cons);
        out_u64(o, d->template_hash);
        out_i32(o, d->S);
        out_bytes(o, d->d_ph, per_row * (size_t)a->T * sizeof(float));
        out_bytes(o, d->d_pf, per_row * (size_t)d->S * sizeof(float));
    }
    uint64_t check = o->h;
    out_u64(o, check);
}

static void write_guard(state_out_t *o, const comm_guard_t *g) {
    out_u32(o, TAG_GUARD);
    out_u32(o, 0);
    out_u64(o, GUARD_PAYLOAD);
    o->h = KVM_HASH_SEED;
    char name[KVM_COMM_NAME_MAX] = {0};
    snprintf(name, sizeof name, "%s", g->agent);
    out_bytes(o, name, sizeof name);
    out_bytes(o, &g->frac, sizeof g->frac);
    out_u32(o, g->reused);
    out_u32(o, g->checked);
    out_u32(o, g->disagreed);
    uint64_t check = o->h;
    out_u64(o, check);
}

/* fsync of the folder that holds path, so that a rename into it is on the disk */
static void sync_dir_of(const char *path) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = '\0';
    else snprintf(dir, sizeof dir, ".");
    int fd = open(dir[0] ? dir : "/", O_RDONLY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

int kvm_comm_save_anchors(const kvm_comm_t *c, const char *path) {
    if (!c || !path || !*path) return kvm_seterr(KVM_EINVAL, "comm: save anchors: a context and a path are required");
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    state_out_t o = {.f = fopen(tmp, "wb")};
    if (!o.f) return kvm_seterr(KVM_EIO, "anchors: cannot create '%s': %s", tmp, strerror(errno));
    state_header_t h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, STATE_MAGIC, 8);
    h.version = STATE_VERSION;
    h.L = (uint32_t)c->g.L, h.H = (uint32_t)c->g.H, h.D = (uint32_t)c->g.D;
    h.fingerprint = state_fingerprint(c, h.tag, sizeof h.tag);
    h.insert_seq = c->insert_seq;
    h.check = kvm_hash64(&h, offsetof(state_header_t, check), KVM_HASH_SEED);
    out_bytes(&o, &h, sizeof h);
    uint64_t n = 0;
    /* the file holds fp32: each anchor's backend data widened into a temporary host copy (kvcomm_dev.c) */
    kvm_comm_t *cw = (kvm_comm_t *)c;
    for (int i = 0; i < c->n_pools && !o.err; i++)
        for (int k = 0; k < c->pools[i].n && !o.err; k++, n++) {
            comm_anchor_t *a = c->pools[i].a[k];
            if (comm_anchor_host(cw, a)) {
                o.err = ENOMEM;
                break;
            }
            write_anchor(&o, &c->g, c->pools[i].name, a);
            comm_anchor_host_drop(cw, a);
        }
    for (int i = 0; i < c->n_guards && !o.err; i++) write_guard(&o, &c->guards[i]);
    out_u32(&o, TAG_END);
    out_u32(&o, 0);
    out_u64(&o, n);
    if (!o.err && fflush(o.f) != 0) o.err = errno ? errno : EIO;
    if (!o.err && fsync(fileno(o.f)) != 0) o.err = errno ? errno : EIO;
    if (fclose(o.f) != 0 && !o.err) o.err = errno ? errno : EIO;
    if (!o.err && rename(tmp, path) != 0) o.err = errno ? errno : EIO;
    if (o.err) {
        unlink(tmp);
        return kvm_seterr(KVM_EIO, "anchors: cannot write '%s': %s", path, strerror(o.err));
    }
    sync_dir_of(path);
    return 0;
}

/* ---- reading ---------------------------------------------------------------------------------------- */

typedef struct state_in {
    const char *path;
    const unsigned char *p; /* the payload being parsed */
    size_t n, at;
} state_in_t;

static int in_bytes(state_in_t *in, void *dst, size_t n) {
    if (n > in->n - in->at) return kvm_seterr(KVM_EFORMAT, "anchors: '%s': a record is shorter than its contents", in->path);
    memcpy(dst, in->p + in->at, n);
    in->at += n;
    return 0;
}

/* a name field: NUL-terminated within its bytes, not empty */
static int in_name(state_in_t *in, char *dst) {
    int rc = in_bytes(in, dst, KVM_COMM_NAME_MAX);
    if (!rc && (!memchr(dst, '\0', KVM_COMM_NAME_MAX) || !dst[0]))
        rc = kvm_seterr(KVM_EFORMAT, "anchors: '%s': a name that is empty or not terminated", in->path);
    return rc;
}

/* floats of n rows (per_row each) into a fresh array */
static int in_floats(state_in_t *in, size_t per_row, int rows, float **out) {
    size_t n = per_row * (size_t)rows;
    if (n > (in->n - in->at) / sizeof(float))
        return kvm_seterr(KVM_EFORMAT, "anchors: '%s': a record is shorter than its contents", in->path);
    *out = kvm_malloc(n ? n * sizeof(float) : 1);
    if (!*out) return KVM_ENOMEM;
    return in_bytes(in, *out, n * sizeof(float));
}

/* One anchor record's payload into a new anchor (*pool: its pool name). */
static int parse_anchor(state_in_t *in, const comm_geom_t *g, char *pool, comm_anchor_t **out) {
    comm_anchor_t *a = kvm_calloc(1, sizeof *a);
    if (!a) return KVM_ENOMEM;
    a->refs = 1;
    int32_t n_deltas = 0;
    int rc = in_name(in, pool);
    if (!rc) rc = in_bytes(in, &a->key, 8);
    if (!rc) rc = in_bytes(in, &a->T, 4);
    if (!rc) rc = in_bytes(in, &a->activation, 4);
    if (!rc) rc = in_bytes(in, &a->insert_seq, 8);
    if (!rc) rc = in_bytes(in, &n_deltas, 4);
    if (!rc && (a->T < 1 || a->T > STATE_MAX_T || n_deltas < 0 || n_deltas > 4096))
        rc = kvm_seterr(KVM_EFORMAT, "anchors: '%s': an anchor of %d rows with %d deltas", in->path, a->T, n_deltas);
    if (!rc) rc = in_floats(in, comm_rows_elems(g, 1), a->T, &a->base);
    if (!rc && n_deltas && !(a->deltas = kvm_calloc((size_t)n_deltas, sizeof *a->deltas))) rc = KVM_ENOMEM;
    if (!rc) a->cap_deltas = n_deltas;
    size_t per_row = (size_t)(g->L - 1) * 2 * g->H * g->D;
    for (int i = 0; !rc && i < n_deltas; i++) {
        comm_delta_t *d = &a->deltas[i];
        a->n_deltas = i + 1;
        rc = in_name(in, d->consumer);
        if (!rc) rc = in_bytes(in, &d->template_hash, 8);
        if (!rc) rc = in_bytes(in, &d->S, 4);
        if (!rc && (d->S < 0 || d->S > STATE_MAX_T))
            rc = kvm_seterr(KVM_EFORMAT, "anchors: '%s': a delta of %d rows", in->path, d->S);
        if (!rc) rc = in_floats(in, per_row, a->T, &d->d_ph);
        if (!rc) rc = in_floats(in, per_row, d->S, &d->d_pf);
    }
    if (!rc && in->at != in->n) rc = kvm_seterr(KVM_EFORMAT, "anchors: '%s': a record longer than its contents", in->path);
    if (rc) comm_anchor_unref(NULL, a); /* refs 1: frees it */
    else *out = a;
    return rc;
}

static int read_exact(FILE *f, void *dst, size_t n) { return fread(dst, 1, n, f) == n ? 0 : -1; }

static int check_header(const kvm_comm_t *c, const char *path, const state_header_t *h) {
    char tag[48];
    uint64_t fp = state_fingerprint(c, tag, sizeof tag);
    if (memcmp(h->magic, STATE_MAGIC, 8) != 0)
        return kvm_seterr(KVM_EFORMAT, "anchors: '%s' is not a kvmesh anchor file (no KVMANCH1 at its start)", path);
    if (h->check != kvm_hash64(h, offsetof(state_header_t, check), KVM_HASH_SEED))
        return kvm_seterr(KVM_EFORMAT, "anchors: '%s': the header's checksum does not match (a damaged file)", path);
    if (h->version < 1 || h->version > STATE_VERSION)
        return kvm_seterr(KVM_EFORMAT, "anchors: '%s' is version %u; this kvmesh reads versions 1 to %u", path, h->version,
                          STATE_VERSION);
    if (h->fingerprint != fp || h->L != (uint32_t)c->g.L || h->H != (uint32_t)c->g.H || h->D != (uint32_t)c->g.D) {
        char theirs[49];
        memcpy(theirs, h->tag, 48);
        theirs[48] = '\0';
        return kvm_seterr(KVM_EMODEL, "anchors: '%s' was made by another model or backend (%s; this one: %s)", path,
                          memchr(theirs, '\0', 48) ? theirs : "?", tag);
    }
    return 0;
}

/* One guard record's payload (written by write_guard): the figures must be ones a guard can reach. */
static int parse_guard(state_in_t *in, comm_guard_t *g) {
    memset(g, 0, sizeof *g);
    int rc = in_name(in, g->agent);
    if (!rc) rc = in_bytes(in, &g->frac, 4);
    if (!rc) rc = in_bytes(in, &g->reused, 4);
    if (!rc) rc = in_bytes(in, &g->checked, 4);
    if (!rc) rc = in_bytes(in, &g->disagreed, 4);
    if (!rc && in->at != in->n) rc = kvm_seterr(KVM_EFORMAT, "anchors: '%s': a guard record longer than its contents", in->path);
    if (!rc && (!(g->frac >= 0.0f && g->frac <= 1.0f) || g->checked > g->reused || g->disagreed > g->checked))
        rc = kvm_seterr(KVM_EFORMAT, "anchors: '%s': the guard state of '%s' is impossible (fraction %g, %u checked of %u "
                        "reused, %u disagreed)", in->path, g->agent, (double)g->frac, g->checked, g->reused, g->disagreed);
    return rc;
}

/* The records read from a file, put into the context only once the whole file checked out. */
typedef struct state_read {
    comm_anchor_t **as;
    char (*pools)[KVM_COMM_NAME_MAX];
    int n, cap;
    comm_guard_t *gs;
    int ng, gcap;
} state_read_t;

/* Reads every record of f into r (nothing is put into c until the whole file checked out). */
static int read_records(FILE *f, const char *path, const comm_geom_t *g, uint64_t left, state_read_t *r) {
    comm_anchor_t ***as = &r->as;
    char (**pools)[KVM_COMM_NAME_MAX] = &r->pools;
    int *n = &r->n, *cap = &r->cap;
    for (;;) {
        uint32_t tag, pad;
        uint64_t len;
        long at = ftell(f);
        if (read_exact(f, &tag, 4) || read_exact(f, &pad, 4) || read_exact(f, &len, 8))
            return kvm_seterr(KVM_EFORMAT, "anchors: '%s' ends at byte %ld, inside a record header (a torn file)", path, at);
        left -= left < 16 ? left : 16;
        if (tag == TAG_END) {
            if (len != (uint64_t)*n)
                return kvm_seterr(KVM_EFORMAT, "anchors: '%s' says %llu anchors and holds %d", path, (unsigned long long)len, *n);
            return 0;
        }
        if ((tag != TAG_ANCHOR && tag != TAG_GUARD) || len + 8 > left)
            return kvm_seterr(KVM_EFORMAT, "anchors: '%s': byte %ld holds no record of the file's %llu bytes left", path, at,
                              (unsigned long long)left);
        unsigned char *buf = kvm_malloc(len ? len : 1);
        if (!buf) return KVM_ENOMEM;
        uint64_t check;
        int rc = read_exact(f, buf, len) || read_exact(f, &check, 8) ? kvm_seterr(KVM_EFORMAT, "anchors: '%s': a torn record", path) : 0;
        if (!rc && check != kvm_hash64(buf, len, KVM_HASH_SEED))
            rc = kvm_seterr(KVM_EFORMAT, "anchors: '%s': the record at byte %ld fails its checksum (a damaged file)", path, at);
        left -= len + 8;
        if (tag == TAG_GUARD) {
            state_in_t in = {.path = path, .p = buf, .n = len};
            if (!rc) rc = comm_reserve(&r->gs, &r->gcap, r->ng, sizeof *r->gs);
            if (!rc) rc = parse_guard(&in, &r->gs[r->ng]);
            kvm_free(buf);
            if (rc) return rc;
            r->ng++;
            continue;
        }
        if (!rc) rc = comm_reserve(as, cap, *n, sizeof **as);
        int cap2 = *cap;
        if (!rc && !(*pools = kvm_realloc(*pools, (size_t)cap2 * sizeof **pools))) rc = KVM_ENOMEM;
        state_in_t in = {.path = path, .p = buf, .n = len};
        if (!rc) rc = parse_anchor(&in, g, (*pools)[*n], &(*as)[*n]);
        kvm_free(buf);
        if (rc) return rc;
        (*n)++;
    }
}

int kvm_comm_load_anchors(kvm_comm_t *c, const char *path, int *n_loaded) {
    if (n_loaded) *n_loaded = 0;
    if (!c || !path) return kvm_seterr(KVM_EINVAL, "comm: load anchors: a context and a path are required");
    FILE *f = fopen(path, "rb");
    if (!f) return kvm_seterr(errno == ENOENT ? KVM_ENOENT : KVM_EIO, "anchors: cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    state_header_t h;
    int rc = fstat(fileno(f), &st) != 0 ? kvm_seterr(KVM_EIO, "anchors: cannot stat '%s'", path) : 0;
    if (!rc && read_exact(f, &h, sizeof h)) rc = kvm_seterr(KVM_EFORMAT, "anchors: '%s' is shorter than a header", path);
    if (!rc) rc = check_header(c, path, &h);
    state_read_t r = {0};
    int i = 0;
    if (!rc) rc = read_records(f, path, &c->g, (uint64_t)st.st_size - sizeof h, &r);
    fclose(f);
    const int n = r.n;
    for (; !rc && i < n; i++) {
        comm_pool_t *p = comm_pool_get(c, r.pools[i], true);
        r.as[i]->q8 = c->cfg.deltas == KVM_KVCOMM_DELTAS_Q8; /* the file holds fp32; the backend's form is ours */
        rc = p ? comm_pool_insert(c, p, r.as[i]) : KVM_ENOMEM;
        if (!rc) r.as[i] = NULL;
    }
    for (int k = 0; !rc && k < r.ng; k++) rc = comm_guard_restore(c, &r.gs[k]);
    for (int k = 0; k < n; k++) comm_anchor_unref(c, r.as[k]);
    kvm_free(r.as);
    kvm_free(r.pools);
    kvm_free(r.gs);
    if (!rc && h.insert_seq > c->insert_seq) c->insert_seq = h.insert_seq;
    if (!rc && n_loaded) *n_loaded = n;
    return rc;
}
