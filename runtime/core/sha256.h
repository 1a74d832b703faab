/* sha256.h - SHA-256 (FIPS 180-4) over bytes and files (L1).
 *
 * Used where a file format pins content by hash (the C2C fuser's weights_sha256 and tokenizer_sha256,
 * docs/c2c.md). Incremental: init, update any number of times, final. No allocation. */
#ifndef KVM_SHA256_H
#define KVM_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvm_sha256 {
    uint32_t h[8];     /* chaining state */
    uint64_t n_bytes;  /* bytes hashed so far */
    uint8_t buf[64];   /* a partial block */
    size_t buf_len;
} kvm_sha256_t;

void kvm_sha256_init(kvm_sha256_t *s);
void kvm_sha256_update(kvm_sha256_t *s, const void *data, size_t n);
/* Writes the 32-byte digest; s must be re-initialised before reuse. */
void kvm_sha256_final(kvm_sha256_t *s, uint8_t out[32]);
/* One-shot digest of data[0..n). */
void kvm_sha256(const void *data, size_t n, uint8_t out[32]);
/* The digest as 64 lowercase hex characters and a NUL. */
void kvm_sha256_hex(const uint8_t digest[32], char out[65]);
/* The lowercase hex digest of the file at path into out (read in chunks, not mapped). 0, or KVM_ENOENT /
 * KVM_EIO naming the file. */
int kvm_sha256_file_hex(const char *path, char out[65]);

#endif
