/* prompt.h - prompt assembly over the shared KV store: the caller says WHAT an agent reads, kv/ + comm/
 * decide HOW its cache is built (dense, exact prefix, KVCOMM).  (L3)
 *
 * Objects (kvm_comm_t, kvm_template_t, kvm_segment_t, kvm_comm_request_t, kvm_prepared_t; one set per model,
 * single-threaded per kvm_comm_t) and one agent step: include/kvmesh_lab.h, where this layer's types and functions
 * are declared (lab/ code and research programs use them through that header; the library's own code includes this
 * one, which adds the internal parts: the store and model of a context, the template grammar, the prepared
 * prompt's fields).
 *
 * Errors: functions return 0 or a negative KVM_E* code with a message (kvm_errmsg()); KVM_ENOMEM when
 * the KV budget cannot hold a request even after evicting unreferenced segments (nothing is changed),
 * KVM_EMODEL for a segment of another model, KVM_EFRAME for a segment in an unexpected frame,
 * KVM_EINVAL for a bad template or a missing binding. */
#ifndef KVM_COMM_PROMPT_H
#define KVM_COMM_PROMPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <kvmesh_lab.h>

#include "../kv/store.h"
#include "../model/generate.h"

/* In include/kvmesh_lab.h: the switches (kvm_kvcomm_config_t, _default, _set, kvm_kvcomm_ablation, _str,
 * KVM_KVCOMM_BLEND_FRAC); the context (kvm_comm_t, kvm_comm_opts_t, kvm_comm_create / _free / _pool / _config);
 * templates (kvm_piece_t, kvm_template_desc_t, kvm_template_t and its functions); segments (kvm_comm_segment_text,
 * _ids); requests; prompt assembly (kvm_binding_t, kvm_prompt_t, KVM_COMM_MAX_PH, KVM_COMM_NAME_MAX, enum
 * kvm_comm_mode, enum kvm_ph_decision, kvm_comm_ph_report_t, kvm_comm_report_t, kvm_comm_report_json,
 * kvm_comm_prepare, kvm_comm_prepare_ids, kvm_comm_complete, kvm_prepared_release and the accessors of
 * kvm_prepared_t); statistics (kvm_comm_stats_t, kvm_comm_pool_stats_t); the oracle (kvm_comm_prepare_oracle). */

/* An agent prompt's text as model m reads it: the system text and the user text rendered with m's chat format and
 * the generation prompt (with no chat format: system, a newline, then the user text). The one rendering of the
 * templates (kvm_template_create) and of C2C's aligned sharer side (agents/llm.c). *out: kvm_malloc. */
int kvm_prompt_render(const kvm_model_t *m, const char *system, const char *user, char **out);

kvm_kv_store_t *kvm_comm_store(kvm_comm_t *c);
kvm_model_t *kvm_comm_model(kvm_comm_t *c);
/* The name of c's anchor file in a state folder: "anchors-<model>-<fingerprint>.kva", the fingerprint covering the
 * model, its weight files, the backend and the KV dtype (comm_state.c), so that a folder holds one file per
 * (model, backend) that wrote into it. */
void kvm_comm_anchors_file_name(const kvm_comm_t *c, char *buf, size_t cap);
/* Anchors held, over every pool. */
int kvm_comm_n_anchors(const kvm_comm_t *c);

/* Parses template text in the one grammar of template_parse.h ("Task: {input}\nPlan:\n{agent.planner}\n...")
 * into pieces with KVCOMM names: {input} -> input, {input.k} -> state:input.k, {agent.x} -> agent:x:current,
 * {agent.x.prev} -> agent:x:prev, {tool.x} -> tool:x, {state.k} -> state:k. "{{" and "}}" are literal
 * braces. *pieces (one allocation holding the strings too) is freed with kvm_free. KVM_EINVAL names the
 * offset of a malformed or unknown placeholder. Implemented in template_parse.c. */
int kvm_template_parse(const char *text, kvm_piece_t **pieces, int *n_pieces);

/* The prepared prompt, open to the library's code (lab code sees kvm_prepared_t through its accessors). */
struct kvm_prepared {
    kvm_seq_t seq;        /* KV of prompt tokens 0..n_cached-1, ready for kvm_generate */
    int n_cached;
    const int32_t *rest_ids; /* prompt tokens still to run (>= 1): pass to kvm_generate */
    int n_rest;
    int32_t *prompt_ids;  /* [n_prompt] the whole prompt (concatenated piece ids, never re-tokenized) */
    int n_prompt;
    kvm_comm_report_t report;
    void *priv;           /* comm/'s bookkeeping for kvm_comm_complete */
};

#endif
