/* test_kvcomm_fidelity.c - KVCOMM fidelity on the bundled trained model (models/minillama-2m): the
 * minitasks team workload (4 agents with different role prompts reading one shared facts segment and the
 * finder's answer) under dense prefill, full KVCOMM, the improved policy, the rotation-only ablation and
 * the oracle offsets (docs/kvcomm.md §5.2).
 *
 * What is asserted does not depend on how well the bundled weights are trained:
 *   - oracle offsets (the true per-request deltas through the same assembly path) reproduce the dense
 *     cache to float rounding and the dense greedy outputs exactly: positions, frames, layer-0 rule,
 *     last-token rule and assembly are right, so any gap is the anchors' estimation error;
 *   - with the facts exact (oracle on {input} only) the finder's answer is still estimated and the cache is
 *     NOT dense (the check above can fail); recomputing the short answer (kvcomm.recompute_below) on top
 *     gives the dense cache again;
 *   - reuse after warm-up >= 60% (issue 5), the offsets bring the reused rows closer to dense than rotation
 *     alone (deepest layer), KVCOMM's accuracy and agreement are at least rotation-only's.
 * The accuracy gaps to dense of the spec's KVCOMM and of the blended policy (kvcomm.preset=blend) are printed.
 * At the acceptance size (300 requests, the default outside the sanitizers; `kvmesh bench kvcomm --workload team`
 * prints the same numbers) the 1-point check (issue 15) holds the default policy (kvcomm.preset=blend, what
 * kv = "kvcomm" runs) to dense over the roles that are not degenerate under dense (the checker, always "no", is left
 * out and named): the test fails if it falls more than 1 point below; that its fidelity guard (kvcomm.guard) checked
 * calls against dense; and its reuse after warm-up to >= 60% (the
 * spec's KVCOMM is 31 points below dense; docs/kvcomm.md §5.2).
 * KVM_FIDELITY_REQUESTS=N sets another size (below 300 the blended policy is measured but the 1-point check runs
 * only with KVM_FIDELITY_STRICT=1). Skipped loudly when the model is not in the tree. Answers of at most 8
 * tokens; the oracle checks 6 requests. About 2-3 minutes on 2 cores.
 * (KVM_SANITIZED) the accuracy checks are skipped and the plumbing runs on 4-6 requests. */
#include <math.h>
#include <setjmp.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "runtime/comm/kvcomm_oracle.h"
#include "lab/team.h"

#define MODEL_DIR KVM_SOURCE_DIR "/models/minillama-2m"

typedef struct fid {
    kvm_model_t *m;
    int requests;
    bool strict; /* the 1-point check of the default policy (300 requests, or KVM_FIDELITY_STRICT) */
    bool sanitized;
    kvm_team_result_t dense; /* the dense reference of `requests` requests, shared by the tests */
    bool have_dense;
} fid_t;

static int setup(void **st) {
    static fid_t f;
    memset(&f, 0, sizeof f);
    *st = &f;
    char cfg[512];
    snprintf(cfg, sizeof cfg, "%s/config.json", MODEL_DIR);
    if (!kvm_file_exists(cfg)) return 0;
    kvm_model_params_t o = {.backend = "cpu", .quiet = true};
    f.m = kvm_model_load(MODEL_DIR, &o);
    if (!f.m) {
        fprintf(stderr, "load failed: %s\n", kvm_errmsg());
        return -1;
    }
    const char *env = getenv("KVM_FIDELITY_REQUESTS");
    f.sanitized = getenv("KVM_SANITIZED") != NULL;
    f.requests = env ? atoi(env) : f.sanitized ? 6 : 300;
    if (f.requests < 6) f.requests = 6;
    f.strict = !f.sanitized && (getenv("KVM_FIDELITY_STRICT") || f.requests >= 300);
    kvm_log_set_level(KVM_LOG_ERROR);
    return 0;
}

static int teardown(void **st) {
    fid_t *f = *st;
    kvm_team_result_free(&f->dense);
    kvm_model_free(f->m);
    return 0;
}

static void team_opts(const fid_t *f, kvm_team_opts_t *o, int requests) {
    kvm_team_opts_default(o);
    o->requests = requests;
    o->warm = requests >= 24 ? 8 : requests / 3;
    o->max_tokens = 8; /* answers are at most 4 digits or a name, then the end marker */
    o->cos_samples = 8;
    o->quiet = true;
    (void)f;
}

/* The model (or a loud skip) and the shared dense reference. */
static fid_t *need(void **st) {
    fid_t *f = *st;
    if (!f->m) {
        fprintf(stderr, "SKIPPED: the bundled model %s is not in the tree\n", MODEL_DIR);
        skip();
    }
    if (!f->have_dense) {
        kvm_team_opts_t o;
        team_opts(f, &o, f->requests);
        o.policy = KVM_KV_PREFIX;
        assert_int_equal(kvm_team_run(f->m, &o, NULL, &f->dense), 0);
        f->have_dense = true;
    }
    return f;
}

static double pct(int a, int b) { return b ? 100.0 * a / b : 0; }

static void print_layers(const char *name, const kvm_team_result_t *r) {
    fprintf(stderr, "  %-14s cos K/V per layer:", name);
    for (int l = 0; l < r->n_layers && r->cos_n; l++)
        fprintf(stderr, " L%d %.3f/%.3f", l, r->cos_k[l] / r->cos_n, r->cos_v[l] / r->cos_n);
    fprintf(stderr, "\n");
}

/* A run that compares every REUSE invocation's cache with a dense prefill of the same ids. */
static void run_measured(fid_t *f, kvm_team_opts_t *o, kvm_team_result_t *r) {
    o->cos_samples = 1 << 20;
    assert_int_equal(kvm_team_run(f->m, o, &f->dense, r), 0);
    assert_true(r->cos_n > 0); /* there were REUSE invocations to compare */
}

static void test_oracle_offsets_reproduce_the_dense_cache_and_greedy_outputs(void **st) {
    fid_t *f = need(st);
    kvm_team_opts_t o;
    team_opts(f, &o, f->sanitized ? 4 : 6); /* requests 3.. reuse */
    o.oracle = KVM_ORACLE_ALL;
    kvm_team_result_t r;
    run_measured(f, &o, &r);
    fprintf(stderr, "oracle: %d REUSE caches compared, max |err| %.3g (dense max %.3g); agreement %d/%d\n", r.cos_n,
            r.max_abs_err, r.max_abs_dense, r.agree, r.agree_n);
    assert_true(r.max_abs_err <= 1e-4 * r.max_abs_dense);
    assert_int_equal(r.agree, r.agree_n); /* every output as dense's, so the accuracy is dense's too */
    kvm_team_result_free(&r);
}

static void test_exact_facts_leave_the_estimated_answer_off_until_it_is_recomputed(void **st) {
    fid_t *f = need(st);
    kvm_team_opts_t o;
    team_opts(f, &o, f->sanitized ? 4 : 6);
    o.oracle = KVM_ORACLE_ALL;
    o.oracle_only = "input";
    kvm_team_result_t est, rec;
    run_measured(f, &o, &est);
    o.cfg.recompute_below = o.max_tokens + 1; /* every answer, however long the model's is */
    run_measured(f, &o, &rec);
    fprintf(stderr, "oracle on {input}: max |err| %.3g, agreement %d/%d; + recompute_below=%d: max |err| %.3g, "
            "agreement %d/%d (%d rows recomputed)\n", est.max_abs_err, est.agree, est.agree_n, o.cfg.recompute_below,
            rec.max_abs_err, rec.agree, rec.agree_n, rec.short_recomputed);
    assert_true(est.max_abs_err > 1e-2 * est.max_abs_dense); /* the finder's answer is still estimated */
    assert_true(rec.short_recomputed > 0);
    assert_true(rec.max_abs_err <= 1e-4 * rec.max_abs_dense);
    assert_int_equal(rec.agree, rec.agree_n);
    kvm_team_result_free(&est);
    kvm_team_result_free(&rec);
}

/* The blended policy with every offset row selected (recompute_frac = 1): the one batched pass of 1-token views
 * recomputes facts, answers and text segments, so the caches and every greedy output are dense's. */
static void test_blend_with_every_row_selected_reproduces_dense(void **st) {
    fid_t *f = need(st);
    kvm_team_opts_t o;
    team_opts(f, &o, f->sanitized ? 4 : 6);
    kvm_team_blend_policy(&o.cfg);
    o.cfg.recompute_frac = 1.0f;
    kvm_team_result_t r;
    run_measured(f, &o, &r);
    fprintf(stderr, "blend, every row selected: %d REUSE caches compared, max |err| %.3g (dense max %.3g); agreement "
            "%d/%d; %d rows selected, %d in spans\n", r.cos_n, r.max_abs_err, r.max_abs_dense, r.agree, r.agree_n,
            r.selected_recomputed, r.short_recomputed);
    assert_true(r.selected_recomputed > 0);
    assert_true(r.max_abs_err <= 1e-4 * r.max_abs_dense);
    assert_int_equal(r.agree, r.agree_n);
    assert_int_equal(r.offset, 0);
    kvm_team_result_free(&r);
}

static void test_kvcomm_offsets_beat_rotation_only_and_reuse_after_warmup(void **st) {
    fid_t *f = need(st);
    kvm_team_opts_t o;
    team_opts(f, &o, f->requests);
    kvm_team_result_t full, imp, rot;
    memset(&imp, 0, sizeof imp);
    assert_int_equal(kvm_team_run(f->m, &o, &f->dense, &full), 0);
    /* the blended policy: measured at the acceptance size (300 requests) or when asked for */
    const bool with_imp = f->strict || getenv("KVM_FIDELITY_REQUESTS");
    kvm_kvcomm_config_t spec = o.cfg;
    kvm_team_blend_policy(&o.cfg);
    if (with_imp) assert_int_equal(kvm_team_run(f->m, &o, &f->dense, &imp), 0);
    o.cfg = spec;
    kvm_kvcomm_ablation(&o.cfg, "rotation");
    o.requests = f->requests < 8 ? f->requests : 8; /* the ablation is measured in full by the bench */
    if (f->sanitized) o.requests = 4;
    assert_int_equal(kvm_team_run(f->m, &o, &f->dense, &rot), 0);
    double ad = kvm_team_accuracy(&f->dense), af = kvm_team_accuracy(&full), ai = kvm_team_accuracy(&imp),
           ar = kvm_team_accuracy(&rot);
    double rw = pct(full.reuse_warm, full.invocations_warm), rwi = pct(imp.reuse_warm, imp.invocations_warm);
    fprintf(stderr, "fidelity (%s, %d requests x 4 agents): dense %.1f%%, KVCOMM (spec) %.1f%% (reuse after warm-up "
            "%.1f%%, agreement %.1f%%), rotation only %.1f%% (agreement %.1f%%)\n", f->m->name, f->requests, ad, af, rw,
            pct(full.agree, full.agree_n), ar, pct(rot.agree, rot.agree_n));
    if (with_imp)
        fprintf(stderr, "blended policy (recompute_frac=%.2f, guard on): %.1f%% (reuse after warm-up %.1f%%, agreement "
                "%.1f%%; the guard checked %d calls, %d served dense, %d differed after the call)\n",
                (double)KVM_KVCOMM_BLEND_FRAC, ai, rwi, pct(imp.agree, imp.agree_n), imp.guard_checked, imp.guard_dense,
                imp.guard_late);
    print_layers("kvcomm", &full);
    print_layers("rotation", &rot);
    assert_true(full.cos_n > 0 && rot.cos_n > 0);
    assert_int_equal(full.invocations, 4 * f->requests);
    if (!f->sanitized) {
        fprintf(stderr, "fidelity gap: spec KVCOMM %.1f points %s dense (preset=spec, lossy: not the default)\n", fabs(af - ad),
                af >= ad ? "above" : "below");
        /* the default policy (what kv = "kvcomm" runs) against dense over the roles that are not degenerate under
         * dense (the checker, whose dense answer is always "no": kvm_team_degenerate_roles) */
        char why[KVM_TEAM_ROLES][96];
        const unsigned degen = kvm_team_degenerate_roles(&f->dense, why);
        for (int k = 0; k < KVM_TEAM_ROLES; k++)
            if (degen >> k & 1) fprintf(stderr, "degenerate role left out: %s (%s)\n", kvm_team_role_name(KVM_WL_TEAM, k), why[k]);
        const double ad1 = kvm_team_accuracy_except(&f->dense, degen), ai1 = kvm_team_accuracy_except(&imp, degen);
        if (with_imp)
            fprintf(stderr, "fidelity gap: default (blended) policy %.1f points %s dense over all roles; %.1f%% vs dense "
                    "%.1f%% over the others (the check allows 1 point below)\n", fabs(ai - ad), ai >= ad ? "above" : "below",
                    ai1, ad1);
        if (f->strict) assert_true(ai1 >= ad1 - 1.0);
        assert_true(af >= ar);
        assert_true(pct(full.agree, full.agree_n) >= pct(rot.agree, rot.agree_n));
        assert_true(rw >= 60.0);
        if (with_imp) assert_true(rwi >= 60.0);
        if (with_imp) assert_true(imp.guard_checked >= 32); /* the default's fidelity guard ran (kvcomm.guard) */
        /* the offsets bring the reused rows closer to dense than rotation alone, in the deepest layer */
        int l = full.n_layers - 1;
        assert_true(full.cos_k[l] / full.cos_n > rot.cos_k[l] / rot.cos_n);
    }
    kvm_team_result_free(&full);
    kvm_team_result_free(&imp);
    kvm_team_result_free(&rot);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oracle_offsets_reproduce_the_dense_cache_and_greedy_outputs),
        cmocka_unit_test(test_exact_facts_leave_the_estimated_answer_off_until_it_is_recomputed),
        cmocka_unit_test(test_blend_with_every_row_selected_reproduces_dense),
        cmocka_unit_test(test_kvcomm_offsets_beat_rotation_only_and_reuse_after_warmup),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
