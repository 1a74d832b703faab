/* fuzz_request.c - libFuzzer target of the daemon's request decoder (runtime/net/request.h, kvm_req_decode):
 * the bytes of one message, as the frames after the client's identity, must decode into a request whose fields
 * are all readable, or into a structured error with a code, a message and a NUL-terminated field path; never a
 * crash, a hang or a leak.
 *
 * Input layout: frames separated by the 3 bytes "\n\x1e\n" (the first frame is the delimiter the daemon expects
 * to be empty), at most 40 frames. Seeds: fuzz/corpus/request/.
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -DKVM_VERSION='"fuzz"' -Iinclude -I. \
 *         fuzz/fuzz_request.c runtime/net/request.c \
 *         runtime/core/map.c runtime/core/core.c runtime/core/status.c -lcjson -lm -o fuzz_request
 *   ./fuzz_request fuzz/corpus/request -runs=1000000 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "runtime/net/request.h"

#define MAX_FRAMES 40

static const uint8_t k_sep[3] = {'\n', 0x1e, '\n'};

/* Splits data into frames at each separator; the number of frames. */
static int split(const uint8_t *data, size_t size, kvm_req_frame_t *frames) {
    int n = 0;
    size_t start = 0;
    for (size_t i = 0; i + 3 <= size && n < MAX_FRAMES - 1; i++) {
        if (memcmp(data + i, k_sep, 3)) continue;
        frames[n++] = (kvm_req_frame_t){data + start, i - start};
        start = i + 3;
        i += 2;
    }
    frames[n++] = (kvm_req_frame_t){data + start, size - start};
    return n;
}

/* Reads every byte a decoded request points at, so that ASan sees a bad pointer. */
static size_t touch(const kvm_req_t *r) {
    size_t n = strlen(r->id) + strlen(r->type_name ? r->type_name : "");
    if (r->client) n += strlen(r->client);
    if (r->name) n += strlen(r->name);
    if (r->run_id) n += strlen(r->run_id);
    if (r->format) n += strlen(r->format);
    const char *more[] = {r->model, r->path, r->backend, r->prompt, r->agent};
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++)
        if (more[i]) n += strlen(more[i]);
    for (int i = 0; i < r->n_stop; i++) n += strlen(r->stop[i]);
    for (int i = 0; r->token_ids && i < r->n_token_ids * 4; i++) n += ((const uint8_t *)r->token_ids)[i] == 0xff;
    if (r->type == KVM_REQ_GENERATE && (r->max_tokens < 1 || (!r->prompt && !r->token_ids))) __builtin_trap();
    if (r->segment_id) n += strlen(r->segment_id);
    if (r->type == KVM_REQ_SEGMENT_PUT) {
        size_t kv = (size_t)r->layers * (size_t)r->kv_heads * (size_t)r->n_tokens * (size_t)r->head_dim * (r->dtype[0] == 'f' && r->dtype[1] == '3' ? 4 : 2);
        if (kv != r->seg_kv_bytes || r->n_tokens < 1) __builtin_trap(); /* the decoder checked the frames against the header */
        for (size_t i = 0; i < (size_t)r->n_tokens * 4; i++) n += ((const uint8_t *)r->seg_ids)[i] == 0xff;
        for (size_t i = 0; i < kv; i++) n += (((const uint8_t *)r->seg_k)[i] ^ ((const uint8_t *)r->seg_v)[i]) == 0xff;
    }
    if (r->description) n += strlen(r->description);
    if (r->error) n += strlen(r->error);
    if (r->schema && !cJSON_IsObject(r->schema)) __builtin_trap();
    if (r->type == KVM_REQ_TOOL_RESULT && (r->call_id == 0 || (r->value && r->error))) __builtin_trap();
    for (size_t i = 0; r->source && i < r->source_len; i++) n += (uint8_t)r->source[i] == 0xff;
    if (r->inputs && !cJSON_IsObject(r->inputs)) __builtin_trap();
    if (kvm_req_type_name(r->type) == NULL) __builtin_trap();
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kvm_req_frame_t frames[MAX_FRAMES];
    int n = split(data, size, frames);
    kvm_req_limits_t lim = kvm_req_default_limits();
    lim.max_header = 4096; /* small limits reach the limit checks with small inputs */
    lim.max_message = 16384;
    lim.max_source = 2048;
    kvm_req_t r;
    kvm_req_error_t e;
    int rc = kvm_req_decode(frames, n, &lim, &r, &e);
    if (rc == 0) {
        volatile size_t sink = touch(&r);
        (void)sink;
        kvm_req_clear(&r);
    } else {
        if (rc != e.code || !e.message[0] || strlen(e.field) >= sizeof e.field) __builtin_trap();
        if (e.has_id && strlen(e.id) == 0) __builtin_trap();
    }
    return 0;
}
