/* vec.c - growable arrays (see vec.h for ownership and error behaviour). */
#include "vec.h"

#include <stdint.h>
#include <string.h>

#include "core.h"

int kvm_array_reserve(void *arrayp, size_t *cap, size_t need, size_t elem_size, size_t min_cap) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : (min_cap ? min_cap : 1);
    while (c < need) c = c > SIZE_MAX / 2 ? need : c * 2;
    if (c > SIZE_MAX / elem_size) return kvm_seterr(KVM_ENOMEM, "array of %zu elements of %zu bytes overflows", c, elem_size);
    void *old; /* the caller's pointer is a T *: copied as bytes, never accessed as a void * */
    memcpy(&old, arrayp, sizeof old);
    void *p = kvm_realloc(old, c * elem_size);
    if (!p) return KVM_ENOMEM;
    memcpy(arrayp, &p, sizeof p);
    *cap = c;
    return 0;
}

void kvm_vec_init(kvm_vec_t *v, size_t elem_size) {
    KVM_ASSERT(elem_size > 0);
    *v = (kvm_vec_t){NULL, 0, 0, elem_size};
}

int kvm_vec_reserve(kvm_vec_t *v, size_t n) { return kvm_array_reserve(&v->data, &v->cap, n, v->elem_size, 8); }

int kvm_vec_append(kvm_vec_t *v, const void *elems, size_t n) {
    if (n > SIZE_MAX - v->len) return kvm_seterr(KVM_ENOMEM, "vector length overflows");
    int rc = kvm_vec_reserve(v, v->len + n);
    if (rc) return rc;
    unsigned char *dst = (unsigned char *)v->data + v->len * v->elem_size;
    if (elems) memcpy(dst, elems, n * v->elem_size);
    else if (n) memset(dst, 0, n * v->elem_size);
    v->len += n;
    return 0;
}

int kvm_vec_push(kvm_vec_t *v, const void *elem) { return kvm_vec_append(v, elem, 1); }

int kvm_vec_resize(kvm_vec_t *v, size_t n) {
    if (n <= v->len) {
        v->len = n;
        return 0;
    }
    return kvm_vec_append(v, NULL, n - v->len);
}

bool kvm_vec_pop(kvm_vec_t *v, void *out) {
    if (v->len == 0) return false;
    v->len--;
    if (out) memcpy(out, (unsigned char *)v->data + v->len * v->elem_size, v->elem_size);
    return true;
}

void kvm_vec_clear(kvm_vec_t *v) { v->len = 0; }

void kvm_vec_free(kvm_vec_t *v) {
    kvm_free(v->data);
    v->data = NULL;
    v->len = v->cap = 0;
}

void *kvm_vec_steal(kvm_vec_t *v, size_t *len) {
    void *p = v->data;
    if (len) *len = v->len;
    v->data = NULL;
    v->len = v->cap = 0;
    return p;
}
