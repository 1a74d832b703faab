/* test_kvcomm_common.h - helpers shared by the KVCOMM tests (test_kvcomm_core.c, test_kvcomm_device_path.c):
 * seeded token ids and the input segment their templates read. Include after <cmocka.h> and
 * runtime/comm/prompt.h. */
#ifndef KVM_TEST_KVCOMM_COMMON_H
#define KVM_TEST_KVCOMM_COMMON_H

/* n token ids in [1, 99], a fixed LCG stream of seed */
static void fill_ids(int32_t *ids, int n, uint64_t seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        ids[i] = 1 + (int32_t)((seed >> 33) % 99);
    }
}

/* the published "input" segment: a fixed 6-token header and n (<= 64) content ids of seed */
static kvm_segment_t *input_segment(kvm_comm_t *c, uint64_t seed, int n) {
    int32_t hdr[6], content[64];
    fill_ids(hdr, 6, 999);
    fill_ids(content, n, seed);
    kvm_segment_t *g = NULL;
    assert_int_equal(kvm_comm_segment_ids(c, KVM_PRODUCER_INPUT, "input", hdr, 6, content, n, &g), 0);
    return g;
}

#endif
