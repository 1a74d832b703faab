/* vec.h - a growable array of fixed-size elements (Redis's adlist/sds spirit: one small structure,
 * its own file, ownership written down).
 *
 * Ownership: a kvm_vec_t owns `data` (counted memory from kvm_malloc); kvm_vec_free() releases it and
 * kvm_vec_steal() hands it to the caller, who frees it with kvm_free(). Elements are copied in by
 * value (memcpy of elem_size bytes); the vector never frees what an element points to.
 * Errors: a function that must grow returns KVM_ENOMEM (message set) and leaves the vector exactly
 * as it was (same data, length and capacity), still valid and still owning its elements.
 * Not thread-safe: one owner at a time.
 *
 *     kvm_vec_t v = KVM_VEC_INIT(int32_t);
 *     int32_t x = 7;
 *     if (kvm_vec_push(&v, &x)) return kvm_errcode();
 *     int32_t *ids = v.data;            // KVM_VEC_AT(&v, int32_t, 0) == 7
 *     kvm_vec_free(&v);
 */
#ifndef KVM_VEC_H
#define KVM_VEC_H

#include <stdbool.h>
#include <stddef.h>

typedef struct kvm_vec {
    void *data;       /* [cap * elem_size] bytes; NULL until the first growth */
    size_t len;       /* elements in use */
    size_t cap;       /* elements allocated */
    size_t elem_size; /* bytes per element, > 0 */
} kvm_vec_t;

/* An empty vector of `type` (allocates nothing): kvm_vec_t v = KVM_VEC_INIT(float); */
#define KVM_VEC_INIT(type) {NULL, 0, 0, sizeof(type)}
/* Element i as an lvalue of `type` (no bounds check). */
#define KVM_VEC_AT(v, type, i) (((type *)(v)->data)[i])

void kvm_vec_init(kvm_vec_t *v, size_t elem_size);
/* Makes room for at least n elements in all (capacity doubles, from 8). 0 or KVM_ENOMEM. */
int kvm_vec_reserve(kvm_vec_t *v, size_t n);
/* Appends a copy of *elem (elem_size bytes). 0 or KVM_ENOMEM. */
int kvm_vec_push(kvm_vec_t *v, const void *elem);
/* Appends n elements copied from elems (elems may be NULL: the new elements are zeroed). */
int kvm_vec_append(kvm_vec_t *v, const void *elems, size_t n);
/* Grows to n elements, zeroing the new ones, or shrinks the length to n (capacity kept). */
int kvm_vec_resize(kvm_vec_t *v, size_t n);
/* Removes the last element, copying it to *out when out is not NULL; false when empty. */
bool kvm_vec_pop(kvm_vec_t *v, void *out);
/* Length 0, memory kept. */
void kvm_vec_clear(kvm_vec_t *v);
/* Releases the memory; the vector is empty and reusable with the same element size. */
void kvm_vec_free(kvm_vec_t *v);
/* Hands the array to the caller (free it with kvm_free; NULL when nothing was ever allocated) and
 * stores its length in *len when len is not NULL; the vector is left empty. */
void *kvm_vec_steal(kvm_vec_t *v, size_t *len);

/* The growth step the vector uses, for structures that keep their own (pointer, capacity) pair:
 * `arrayp` is the address of the array pointer (a T **, e.g. &l->v); makes the array hold at least
 * `need` elements of elem_size bytes, doubling *cap from min_cap. On KVM_ENOMEM the array and *cap are
 * unchanged.   if ((rc = kvm_array_reserve(&l->v, &l->cap, l->n + 1, sizeof *l->v, 64))) return rc; */
int kvm_array_reserve(void *arrayp, size_t *cap, size_t need, size_t elem_size, size_t min_cap);

#endif
