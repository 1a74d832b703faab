/* trace_schema.c - the trace schema of docs/trace-format.md, spelled once.
 *
 * Every record type is a table of fields (JSON name, kind, offset in its struct). One generic writer
 * turns a struct into a JSON object through its table and one generic reader turns an object back
 * into the struct, so the field names exist here and nowhere else, and the writer and the reader
 * cannot disagree. The reader is written for hostile input: a known field of the wrong type or out
 * of range is KVM_EFORMAT naming file:line and the field; unknown fields are ignored. */
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "../core/core.h"
#include "trace_internal.h"

/* ---- field tables ------------------------------------------------------------------------------------ */

typedef enum ftype {
    F_END = 0,
    F_INT,     /* int */
    F_LONG,    /* long */
    F_DBL,     /* double */
    F_BOOL,    /* bool */
    F_STR,     /* const char * (NULL -> null) */
    F_U64,     /* uint64_t as a decimal string */
    F_HEX64,   /* uint64_t as 16 hex digits */
    F_JSON,    /* const char * holding JSON text, embedded as is (NULL -> null) */
    F_FLAG,    /* bool written as words[0] (false) or words[1] (true) */
    F_STATUS,  /* int code -> "ok" | "error" */
    F_ERRNAME, /* int code -> its KVM_E* name (left out when 0) */
    F_ERROR,   /* kvm_trace_error_t -> {code, message, traceback} (left out when code is 0) */
    F_OBJ,     /* a nested object whose fields (sub) are relative to base + off */
    F_STRUCTS, /* array of structs: pointer at off, int count at count_off, elements of elem_size */
    F_STRS,    /* array of strings: const char *const * at off, count at count_off */
    F_I32S,    /* array of int32_t: pointer at off, count at count_off */
} ftype_t;

enum { OMIT_NULL = 1, OMIT_FALSE = 2, OMIT_ZERO = 4 };

typedef struct field {
    const char *name;
    ftype_t type;
    size_t off;
    int flags;
    const struct field *sub;
    size_t count_off, elem_size;
    const char *words[2];
} field_t;

#define F(n, ty, T, m, fl) {.name = n, .type = ty, .off = offsetof(T, m), .flags = fl}
#define OBJ(n, T, m, sub_) {.name = n, .type = F_OBJ, .off = offsetof(T, m), .sub = sub_}
#define FLAT(n, sub_) {.name = n, .type = F_OBJ, .off = 0, .sub = sub_}
#define ARR(n, ty, T, p, c, sub_, E) \
    {.name = n, .type = ty, .off = offsetof(T, p), .count_off = offsetof(T, c), .sub = sub_, .elem_size = sizeof(E)}
#define END {.name = NULL}

/* run.start */
static const field_t part_f[] = {F("slot", F_STR, kvm_trace_part_t, slot, OMIT_NULL), F("src", F_STR, kvm_trace_part_t, src, OMIT_NULL),
                                 F("text", F_STR, kvm_trace_part_t, text, OMIT_NULL),
                                 F("missing", F_BOOL, kvm_trace_part_t, missing, OMIT_FALSE), END};
static const field_t agent_sampling_f[] = {
    F("temperature", F_DBL, kvm_trace_sampling_t, temperature, 0), F("top_k", F_INT, kvm_trace_sampling_t, top_k, 0),
    F("top_p", F_DBL, kvm_trace_sampling_t, top_p, 0), F("repetition_penalty", F_DBL, kvm_trace_sampling_t, repetition_penalty, 0), END};
static const field_t model_f[] = {
    F("index", F_INT, kvm_trace_model_t, index, 0), F("script_path", F_STR, kvm_trace_model_t, script_path, 0),
    F("path", F_STR, kvm_trace_model_t, path, 0), F("engine", F_STR, kvm_trace_model_t, engine, 0),
    F("name", F_STR, kvm_trace_model_t, name, OMIT_NULL), F("arch", F_STR, kvm_trace_model_t, arch, OMIT_NULL),
    F("n_layers", F_INT, kvm_trace_model_t, n_layers, OMIT_ZERO), F("dim", F_INT, kvm_trace_model_t, dim, OMIT_ZERO),
    F("vocab_size", F_INT, kvm_trace_model_t, vocab_size, OMIT_ZERO), F("max_seq_len", F_INT, kvm_trace_model_t, max_seq_len, OMIT_ZERO),
    F("chat_format", F_STR, kvm_trace_model_t, chat_format, OMIT_NULL), F("model_id", F_STR, kvm_trace_model_t, model_id, OMIT_NULL),
    F("describe", F_STR, kvm_trace_model_t, describe, OMIT_NULL), F("kvcomm", F_STR, kvm_trace_model_t, kvcomm, OMIT_NULL), END};
static const field_t agent_f[] = {
    F("name", F_STR, kvm_trace_agent_t, name, 0), F("model", F_INT, kvm_trace_agent_t, model, 0), F("role", F_STR, kvm_trace_agent_t, role, 0),
    F("template", F_STR, kvm_trace_agent_t, template_text, 0),
    ARR("parts", F_STRUCTS, kvm_trace_agent_t, parts, n_parts, part_f, kvm_trace_part_t),
    OBJ("sampling", kvm_trace_agent_t, sampling, agent_sampling_f), F("max_tokens", F_INT, kvm_trace_agent_t, max_tokens, 0),
    ARR("stop", F_STRS, kvm_trace_agent_t, stop, n_stop, NULL, char *), F("budget_tokens", F_LONG, kvm_trace_agent_t, budget_tokens, 0),
    F("kv", F_STR, kvm_trace_agent_t, kv, 0), F("where", F_STR, kvm_trace_agent_t, where, 0), END};
static const field_t node_f[] = {F("name", F_STR, kvm_trace_node_t, name, 0), F("kind", F_STR, kvm_trace_node_t, kind, 0),
                                 F("agent", F_STR, kvm_trace_node_t, agent, OMIT_NULL), F("writes", F_STR, kvm_trace_node_t, writes, OMIT_NULL),
                                 F("router", F_BOOL, kvm_trace_node_t, router, 0), END};
static const field_t edge_def_f[] = {F("from", F_STR, kvm_trace_edge_def_t, from, 0), F("to", F_STR, kvm_trace_edge_def_t, to, 0),
                                     F("conditional", F_BOOL, kvm_trace_edge_def_t, conditional, 0),
                                     F("on_error", F_BOOL, kvm_trace_edge_def_t, on_error, OMIT_FALSE), END};
static const field_t join_f[] = {ARR("sources", F_STRS, kvm_trace_join_t, sources, n_sources, NULL, char *),
                                 F("target", F_STR, kvm_trace_join_t, target, 0),
                                 {.name = "mode", .type = F_FLAG, .off = offsetof(kvm_trace_join_t, all), .words = {"any", "all"}}, END};
static const field_t workflow_f[] = {F("path", F_STR, kvm_trace_run_start_t, workflow_path, 0), F("graph", F_STR, kvm_trace_run_start_t, graph, 0),
                                     F("source_fnv64", F_HEX64, kvm_trace_run_start_t, source_hash, 0),
                                     F("source", F_STR, kvm_trace_run_start_t, source, 0), END};
static const field_t limits_f[] = {F("steps", F_LONG, kvm_trace_limits_t, steps, 0), F("tokens", F_LONG, kvm_trace_limits_t, tokens, 0),
                                   F("wall_ms", F_LONG, kvm_trace_limits_t, wall_ms, 0), F("instructions", F_DBL, kvm_trace_limits_t, instructions, 0),
                                   F("lua_ms", F_DBL, kvm_trace_limits_t, lua_ms, 0), F("memory_bytes", F_DBL, kvm_trace_limits_t, memory_bytes, 0), END};
static const field_t config_f[] = {F("kv_override", F_STR, kvm_trace_run_start_t, kv_override, 0), F("mock", F_BOOL, kvm_trace_run_start_t, mock, 0),
                                   OBJ("limits", kvm_trace_run_start_t, limits, limits_f), END};
static const field_t graph_f[] = {ARR("nodes", F_STRUCTS, kvm_trace_run_start_t, nodes, n_nodes, node_f, kvm_trace_node_t),
                                  ARR("edges", F_STRUCTS, kvm_trace_run_start_t, edges, n_edges, edge_def_f, kvm_trace_edge_def_t),
                                  ARR("joins", F_STRUCTS, kvm_trace_run_start_t, joins, n_joins, join_f, kvm_trace_join_t), END};
static const field_t build_f[] = {F("version", F_STR, kvm_trace_run_start_t, build_version, 0), F("lua", F_STR, kvm_trace_run_start_t, build_lua, 0),
                                  F("cjson", F_STR, kvm_trace_run_start_t, build_cjson, 0), END};
static const field_t run_start_f[] = {
    F("v", F_INT, kvm_trace_run_start_t, version, 0), F("run_id", F_STR, kvm_trace_run_start_t, run_id, 0),
    F("run", F_INT, kvm_trace_run_start_t, run, 0), FLAT("workflow", workflow_f), F("inputs", F_JSON, kvm_trace_run_start_t, inputs_json, 0),
    F("seed", F_U64, kvm_trace_run_start_t, seed, 0), FLAT("config", config_f),
    ARR("models", F_STRUCTS, kvm_trace_run_start_t, models, n_models, model_f, kvm_trace_model_t),
    ARR("agents", F_STRUCTS, kvm_trace_run_start_t, agents, n_agents, agent_f, kvm_trace_agent_t), FLAT("graph", graph_f),
    FLAT("build", build_f), F("resumed_from", F_STR, kvm_trace_run_start_t, resumed_run_id, OMIT_NULL),
    F("resumed_superstep", F_INT, kvm_trace_run_start_t, resumed_superstep, OMIT_ZERO),
    F("replay", F_JSON, kvm_trace_run_start_t, replay_json, OMIT_NULL), END};

/* edge, superstep, log, checkpoint */
static const field_t edge_f[] = {F("superstep", F_INT, kvm_trace_edge_t, superstep, 0), F("from", F_STR, kvm_trace_edge_t, from, 0),
                                 F("to", F_STR, kvm_trace_edge_t, to, 0), F("kind", F_STR, kvm_trace_edge_t, kind, 0), END};
static const field_t superstep_f[] = {F("superstep", F_INT, kvm_trace_superstep_t, superstep, 0),
                                      ARR("nodes", F_STRS, kvm_trace_superstep_t, nodes, n_nodes, NULL, char *), END};
static const field_t log_f[] = {F("level", F_STR, kvm_trace_log_rec_t, level, 0), F("msg", F_STR, kvm_trace_log_rec_t, msg, 0),
                                F("superstep", F_INT, kvm_trace_log_rec_t, superstep, 0), END};
static const field_t ckpt_rng_f[] = {F("s0", F_HEX64, kvm_trace_checkpoint_t, rng0, 0), F("s1", F_HEX64, kvm_trace_checkpoint_t, rng1, 0), END};
static const field_t ckpt_usage_f[] = {F("input_tokens", F_LONG, kvm_trace_checkpoint_t, input_tokens, 0),
                                       F("output_tokens", F_LONG, kvm_trace_checkpoint_t, output_tokens, 0),
                                       F("agent_calls", F_INT, kvm_trace_checkpoint_t, agent_calls, 0),
                                       F("steps", F_INT, kvm_trace_checkpoint_t, steps, 0),
                                       F("agents", F_JSON, kvm_trace_checkpoint_t, agent_tokens_json, OMIT_NULL), END};
static const field_t checkpoint_f[] = {F("superstep", F_INT, kvm_trace_checkpoint_t, superstep, 0),
                                       F("state", F_JSON, kvm_trace_checkpoint_t, state_json, 0),
                                       ARR("next", F_STRS, kvm_trace_checkpoint_t, next, n_next, NULL, char *),
                                       F("v_resume", F_BOOL, kvm_trace_checkpoint_t, resumable, OMIT_FALSE),
                                       F("last", F_JSON, kvm_trace_checkpoint_t, last_json, OMIT_NULL),
                                       F("nodes", F_JSON, kvm_trace_checkpoint_t, nodes_json, OMIT_NULL),
                                       F("joins", F_JSON, kvm_trace_checkpoint_t, joins_json, OMIT_NULL),
                                       F("outputs", F_JSON, kvm_trace_checkpoint_t, outputs_json, OMIT_NULL),
                                       FLAT("rng", ckpt_rng_f), FLAT("usage", ckpt_usage_f),
                                       F("path", F_STR, kvm_trace_checkpoint_t, path, OMIT_NULL),
                                       F("restored", F_BOOL, kvm_trace_checkpoint_t, restored, OMIT_FALSE), END};
static const field_t interrupt_f[] = {F("superstep", F_INT, kvm_trace_interrupt_t, superstep, 0), F("node", F_STR, kvm_trace_interrupt_t, node, 0),
                                      F("payload", F_JSON, kvm_trace_interrupt_t, payload_json, 0),
                                      F("answers", F_JSON, kvm_trace_interrupt_t, answers_json, 0),
                                      F("path", F_STR, kvm_trace_interrupt_t, path, OMIT_NULL), END};
static const field_t resume_f[] = {F("superstep", F_INT, kvm_trace_resume_t, superstep, 0), F("node", F_STR, kvm_trace_resume_t, node, 0),
                                   F("value", F_JSON, kvm_trace_resume_t, value_json, 0),
                                   F("path", F_STR, kvm_trace_resume_t, path, OMIT_NULL), END};

/* step: the fields every step has, then those of agent calls or of func/tool nodes */
static const field_t step_head_f[] = {
    F("idx", F_INT, kvm_trace_step_t, idx, 0), F("superstep", F_INT, kvm_trace_step_t, superstep, 0), F("node", F_STR, kvm_trace_step_t, node, 0),
    F("agent", F_STR, kvm_trace_step_t, agent, OMIT_NULL), F("op", F_STR, kvm_trace_step_t, op, 0), F("via", F_STR, kvm_trace_step_t, via, OMIT_NULL),
    F("status", F_STATUS, kvm_trace_step_t, error, 0), F("t_start", F_U64, kvm_trace_step_t, t_start, 0),
    F("t_end", F_U64, kvm_trace_step_t, t_end, 0), END};
static const field_t prompt_f[] = {F("text", F_STR, kvm_trace_step_t, prompt_text, 0), F("tokens", F_INT, kvm_trace_step_t, prompt_tokens, 0),
                                   ARR("ids", F_I32S, kvm_trace_step_t, prompt_ids, n_prompt_ids, NULL, int32_t), END};
static const field_t kv_f[] = {F("exact", F_INT, kvm_trace_kv_t, exact, 0), F("offset", F_INT, kvm_trace_kv_t, offset, 0),
                               F("naive", F_INT, kvm_trace_kv_t, naive, 0), F("recomputed", F_INT, kvm_trace_kv_t, recomputed, 0),
                               F("fused", F_INT, kvm_trace_kv_t, fused, 0), F("mode", F_STR, kvm_trace_kv_t, mode, 0),
                               F("anchors", F_INT, kvm_trace_kv_t, anchors, 0), F("decisions", F_JSON, kvm_trace_kv_t, decisions_json, OMIT_NULL), END};
static const field_t step_sampling_f[] = {F("temperature", F_DBL, kvm_trace_sampling_t, temperature, 0), F("top_k", F_INT, kvm_trace_sampling_t, top_k, 0),
                                          F("top_p", F_DBL, kvm_trace_sampling_t, top_p, 0), F("max_tokens", F_INT, kvm_trace_sampling_t, max_tokens, 0), END};
static const field_t output_f[] = {F("text", F_STR, kvm_trace_step_t, output_text, 0), F("tokens", F_INT, kvm_trace_step_t, output_tokens, 0),
                                   F("stop", F_STR, kvm_trace_step_t, stop, 0), END};
static const field_t timings_f[] = {F("queue_ms", F_DBL, kvm_trace_timings_t, queue_ms, 0), F("ttft_ms", F_DBL, kvm_trace_timings_t, ttft_ms, 0),
                                    F("decode_ms", F_DBL, kvm_trace_timings_t, decode_ms, 0), F("total_ms", F_DBL, kvm_trace_timings_t, total_ms, 0),
                                    F("tokens_per_s", F_DBL, kvm_trace_timings_t, tokens_per_s, 0), END};
static const field_t batch_f[] = {F("forwards", F_INT, kvm_trace_batch_t, forwards, 0), F("max_seqs", F_INT, kvm_trace_batch_t, max_seqs, 0),
                                  F("mean_seqs", F_DBL, kvm_trace_batch_t, mean_seqs, 0), F("max_rows", F_INT, kvm_trace_batch_t, max_rows, 0), END};
static const field_t step_agent_f[] = {
    F("model", F_STR, kvm_trace_step_t, model, 0), F("system", F_STR, kvm_trace_step_t, system, 0),
    ARR("pieces", F_STRUCTS, kvm_trace_step_t, pieces, n_pieces, part_f, kvm_trace_part_t), FLAT("prompt", prompt_f),
    OBJ("kv", kvm_trace_step_t, kv, kv_f), OBJ("sampling", kvm_trace_step_t, sampling, step_sampling_f), FLAT("output", output_f),
    OBJ("timings", kvm_trace_step_t, timings, timings_f), OBJ("batch", kvm_trace_step_t, batch, batch_f),
    F("error", F_ERROR, kvm_trace_step_t, error, 0), END};
static const field_t step_fn_error_f[] = {F("error", F_ERROR, kvm_trace_step_t, error, 0), END};
static const field_t step_fn_ok_f[] = {F("output", F_JSON, kvm_trace_step_t, output_json, 0), END};
/* steps of a subgraph's run: written when depth > 0 (older readers ignore them) */
static const field_t step_nest_f[] = {F("graph", F_STR, kvm_trace_step_t, graph, 0), F("depth", F_INT, kvm_trace_step_t, depth, 0),
                                      F("parent", F_INT, kvm_trace_step_t, parent, 0), END};
static const field_t step_fn_f[] = {F("error", F_ERROR, kvm_trace_step_t, error, 0), F("output", F_JSON, kvm_trace_step_t, output_json, 0), END};

/* run.end, index.json */
static const field_t usage_f[] = {F("input_tokens", F_LONG, kvm_trace_run_end_t, input_tokens, 0),
                                  F("output_tokens", F_LONG, kvm_trace_run_end_t, output_tokens, 0),
                                  F("agent_calls", F_INT, kvm_trace_run_end_t, agent_calls, 0), END};
static const field_t end_timings_f[] = {F("wall_ms", F_DBL, kvm_trace_run_end_t, wall_ms, 0), F("lua_ms", F_DBL, kvm_trace_run_end_t, lua_ms, 0), END};
static const field_t budget_used_f[] = {F("steps", F_INT, kvm_trace_run_end_t, steps, 0), F("tokens", F_LONG, kvm_trace_run_end_t, tokens, 0),
                                        F("instructions", F_DBL, kvm_trace_run_end_t, instructions, 0),
                                        F("lua_bytes_peak", F_DBL, kvm_trace_run_end_t, lua_bytes_peak, 0), END};
static const field_t run_end_f[] = {
    F("run_id", F_STR, kvm_trace_run_end_t, run_id, 0), F("status", F_STATUS, kvm_trace_run_end_t, error, 0),
    F("error", F_ERROR, kvm_trace_run_end_t, error, 0), F("outputs", F_JSON, kvm_trace_run_end_t, outputs_json, 0),
    F("state", F_JSON, kvm_trace_run_end_t, state_json, 0), FLAT("usage", usage_f), FLAT("timings", end_timings_f),
    FLAT("budget_used", budget_used_f), END};
static const field_t index_f[] = {
    F("run_id", F_STR, kvm_trace_index_t, run_id, 0), F("workflow", F_STR, kvm_trace_index_t, workflow, 0),
    F("graph", F_STR, kvm_trace_index_t, graph, 0), F("status", F_STATUS, kvm_trace_index_t, error, 0),
    F("error", F_ERRNAME, kvm_trace_index_t, error, 0), F("started", F_U64, kvm_trace_index_t, started, 0),
    F("wall_ms", F_DBL, kvm_trace_index_t, wall_ms, 0), F("supersteps", F_INT, kvm_trace_index_t, supersteps, 0),
    F("steps", F_INT, kvm_trace_index_t, steps, 0), F("agent_calls", F_INT, kvm_trace_index_t, agent_calls, 0),
    F("input_tokens", F_LONG, kvm_trace_index_t, input_tokens, 0), F("output_tokens", F_LONG, kvm_trace_index_t, output_tokens, 0),
    F("seed", F_U64, kvm_trace_index_t, seed, 0), END};

/* ---- record types -------------------------------------------------------------------------------------- */

static const char *const type_names[] = {
    [KVM_TRACE_OTHER] = "?", [KVM_TRACE_RUN_START] = "run.start", [KVM_TRACE_EDGE] = "edge", [KVM_TRACE_SUPERSTEP] = "superstep",
    [KVM_TRACE_STEP] = "step", [KVM_TRACE_LOG] = "log", [KVM_TRACE_CHECKPOINT] = "checkpoint", [KVM_TRACE_RUN_END] = "run.end",
    [KVM_TRACE_INTERRUPT] = "interrupt", [KVM_TRACE_RESUME] = "resume",
    [KVM_TRACE_INDEX] = "index"};

static const field_t *const type_fields[] = {[KVM_TRACE_RUN_START] = run_start_f, [KVM_TRACE_EDGE] = edge_f,
                                             [KVM_TRACE_SUPERSTEP] = superstep_f, [KVM_TRACE_LOG] = log_f,
                                             [KVM_TRACE_CHECKPOINT] = checkpoint_f, [KVM_TRACE_RUN_END] = run_end_f,
                                             [KVM_TRACE_INTERRUPT] = interrupt_f, [KVM_TRACE_RESUME] = resume_f,
                                             [KVM_TRACE_INDEX] = index_f};

const char *kvm_trace_type_name(kvm_trace_type_t t) {
    return (unsigned)t < sizeof type_names / sizeof *type_names ? type_names[t] : "?";
}

static kvm_trace_type_t type_of(const char *name) {
    for (int t = KVM_TRACE_RUN_START; t < KVM_TRACE_INDEX; t++)
        if (!strcmp(type_names[t], name)) return (kvm_trace_type_t)t;
    return KVM_TRACE_OTHER;
}

#define AT(base, off, T) ((T *)(void *)((char *)(base) + (off)))
#define CAT(base, off, T) ((const T *)(const void *)((const char *)(base) + (off)))

/* ---- writer ---------------------------------------------------------------------------------------------- */

static cJSON *error_json(const kvm_trace_error_t *e) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "code", kvm_errname(e->code));
    const char *msg = e->message ? e->message : kvm_strerror(e->code);
    const char *nl = e->traceback ? NULL : strchr(msg, '\n');
    if (!nl) {
        cJSON_AddStringToObject(o, "message", msg);
        if (e->traceback) cJSON_AddStringToObject(o, "traceback", e->traceback);
        return o;
    }
    char *first = kvm_malloc((size_t)(nl - msg) + 1); /* message = the first line, traceback = the rest */
    if (first) {
        memcpy(first, msg, (size_t)(nl - msg));
        first[nl - msg] = '\0';
        cJSON_AddStringToObject(o, "message", first);
        kvm_free(first);
    }
    cJSON_AddStringToObject(o, "traceback", nl + 1);
    return o;
}

static void put_fields(cJSON *o, const void *base, const field_t *f);

/* The JSON of one field, or NULL when the field is left out. */
static cJSON *put_value(const void *base, const field_t *f) {
    const void *p = CAT(base, f->off, char);
    switch (f->type) {
    case F_INT: return f->flags & OMIT_ZERO && !*(const int *)p ? NULL : cJSON_CreateNumber(*(const int *)p);
    case F_LONG: return cJSON_CreateNumber((double)*(const long *)p);
    case F_DBL: return cJSON_CreateNumber(*(const double *)p);
    case F_BOOL: return f->flags & OMIT_FALSE && !*(const bool *)p ? NULL : cJSON_CreateBool(*(const bool *)p);
    case F_FLAG: return cJSON_CreateString(f->words[*(const bool *)p]);
    case F_STR:
    case F_JSON: {
        const char *s = *(const char *const *)p;
        if (!s) return f->flags & OMIT_NULL ? NULL : cJSON_CreateNull();
        return f->type == F_STR ? cJSON_CreateString(s) : cJSON_CreateRaw(s);
    }
    case F_U64:
    case F_HEX64: {
        char b[24];
        snprintf(b, sizeof b, f->type == F_U64 ? "%llu" : "%016llx", (unsigned long long)*(const uint64_t *)p);
        return cJSON_CreateString(b);
    }
    case F_STATUS: return cJSON_CreateString(*(const int *)p ? "error" : "ok");
    case F_ERRNAME: return *(const int *)p ? cJSON_CreateString(kvm_errname(*(const int *)p)) : NULL;
    case F_ERROR: return ((const kvm_trace_error_t *)p)->code ? error_json(p) : NULL;
    case F_OBJ: {
        cJSON *o = cJSON_CreateObject();
        put_fields(o, p, f->sub);
        return o;
    }
    case F_STRUCTS:
    case F_STRS:
    case F_I32S: {
        const char *arr; /* the array pointer, whatever its element type */
        memcpy(&arr, p, sizeof arr);
        int n = *CAT(base, f->count_off, int);
        if (f->type == F_I32S) return arr && n > 0 ? cJSON_CreateIntArray((const int *)(const void *)arr, n) : NULL;
        cJSON *a = cJSON_CreateArray();
        for (int i = 0; arr && i < n; i++) {
            if (f->type == F_STRS) {
                cJSON_AddItemToArray(a, cJSON_CreateString(((const char *const *)(const void *)arr)[i]));
                continue;
            }
            cJSON *o = cJSON_CreateObject();
            put_fields(o, arr + (size_t)i * f->elem_size, f->sub);
            cJSON_AddItemToArray(a, o);
        }
        return a;
    }
    case F_END: break;
    }
    return NULL;
}

static void put_fields(cJSON *o, const void *base, const field_t *f) {
    for (; f->name; f++) {
        cJSON *v = put_value(base, f);
        if (v) cJSON_AddItemToObject(o, f->name, v);
    }
}

/* Length of the valid UTF-8 sequence at s (n bytes left), 0 when the bytes there are not one: no overlong
 * forms, no surrogates, nothing above U+10FFFF. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
    if (s[0] < 0x80) return 1;
    size_t len = s[0] >= 0xF0 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC2 ? 2 : 0;
    if (!len || len > n || s[0] > 0xF4) return 0;
    for (size_t i = 1; i < len; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    if ((s[0] == 0xE0 && s[1] < 0xA0) || (s[0] == 0xED && s[1] >= 0xA0) || (s[0] == 0xF0 && s[1] < 0x90) || (s[0] == 0xF4 && s[1] >= 0x90))
        return 0;
    return len;
}

/* s with every byte that is not part of valid UTF-8 replaced by U+FFFD (a new cJSON string), or NULL when
 * s is valid (or out of memory: the string is then left as it is). */
static char *utf8_clean(const char *s) {
    size_t n = strlen(s), bad = 0;
    for (size_t i = 0; i < n;) {
        size_t l = utf8_seq((const unsigned char *)s + i, n - i);
        bad += l == 0;
        i += l ? l : 1;
    }
    char *o = bad ? cJSON_malloc(n + 2 * bad + 1) : NULL;
    if (!o) return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        size_t l = utf8_seq((const unsigned char *)s + i, n - i);
        if (l) memcpy(o + k, s + i, l);
        else memcpy(o + k, "\xEF\xBF\xBD", 3);
        k += l ? l : 3;
        i += l ? l : 1;
    }
    o[k] = '\0';
    return o;
}

/* Makes every string of the record valid UTF-8 (keys, string values and raw JSON values: bytes that are not
 * UTF-8 only occur inside JSON strings, so the raw text stays valid JSON), so that a strict JSON reader
 * accepts every line. docs/trace-format.md, "Text". */
static void utf8_clean_tree(cJSON *j) {
    for (; j; j = j->next) {
        char *c;
        if (j->string && !(j->type & cJSON_StringIsConst) && (c = utf8_clean(j->string))) {
            cJSON_free(j->string);
            j->string = c;
        }
        if ((cJSON_IsString(j) || cJSON_IsRaw(j)) && j->valuestring && !(j->type & cJSON_IsReference) && (c = utf8_clean(j->valuestring))) {
            cJSON_free(j->valuestring);
            j->valuestring = c;
        }
        if (j->child && !(j->type & cJSON_IsReference)) utf8_clean_tree(j->child);
    }
}

void trace_utf8_clean(cJSON *j) { utf8_clean_tree(j); }

static int write_rec3(kvm_trace_t *t, kvm_trace_type_t type, const void *r, const field_t *f1, const field_t *f2, const field_t *f3) {
    if (!t || !r) return kvm_seterr(KVM_EINVAL, "trace: write without a trace or record");
    cJSON *o = cJSON_CreateObject();
    if (!o) return kvm_seterr(KVM_ENOMEM, "trace: out of memory building a %s record", type_names[type]);
    cJSON_AddStringToObject(o, "t", type_names[type]);
    put_fields(o, r, f1);
    if (f2) put_fields(o, r, f2);
    if (f3) put_fields(o, r, f3);
    utf8_clean_tree(o);
    int rc = trace_write_json(t, o);
    cJSON_Delete(o);
    return rc;
}

static int write_rec(kvm_trace_t *t, kvm_trace_type_t type, const void *r, const field_t *f1, const field_t *f2) {
    return write_rec3(t, type, r, f1, f2, NULL);
}

int kvm_trace_write_run_start(kvm_trace_t *t, const kvm_trace_run_start_t *r) {
    kvm_trace_run_start_t v = *r;
    v.version = KVM_TRACE_VERSION;
    return write_rec(t, KVM_TRACE_RUN_START, &v, run_start_f, NULL);
}
int kvm_trace_write_edge(kvm_trace_t *t, const kvm_trace_edge_t *r) { return write_rec(t, KVM_TRACE_EDGE, r, edge_f, NULL); }
int kvm_trace_write_superstep(kvm_trace_t *t, const kvm_trace_superstep_t *r) {
    return write_rec(t, KVM_TRACE_SUPERSTEP, r, superstep_f, NULL);
}
int kvm_trace_write_step(kvm_trace_t *t, const kvm_trace_step_t *r) {
    const field_t *rest = r->agent ? step_agent_f : r->error.code ? step_fn_error_f : step_fn_ok_f;
    return write_rec3(t, KVM_TRACE_STEP, r, step_head_f, r->depth > 0 ? step_nest_f : NULL, rest);
}
int kvm_trace_write_log(kvm_trace_t *t, const kvm_trace_log_rec_t *r) { return write_rec(t, KVM_TRACE_LOG, r, log_f, NULL); }
int kvm_trace_write_checkpoint(kvm_trace_t *t, const kvm_trace_checkpoint_t *r) {
    return write_rec(t, KVM_TRACE_CHECKPOINT, r, checkpoint_f, NULL);
}
int kvm_trace_write_interrupt(kvm_trace_t *t, const kvm_trace_interrupt_t *r) {
    return write_rec(t, KVM_TRACE_INTERRUPT, r, interrupt_f, NULL);
}
int kvm_trace_write_resume(kvm_trace_t *t, const kvm_trace_resume_t *r) { return write_rec(t, KVM_TRACE_RESUME, r, resume_f, NULL); }
int kvm_trace_write_run_end(kvm_trace_t *t, const kvm_trace_run_end_t *r) { return write_rec(t, KVM_TRACE_RUN_END, r, run_end_f, NULL); }

int kvm_trace_write_index(kvm_trace_t *t, const kvm_trace_index_t *r) {
    if (!t || !r) return kvm_seterr(KVM_EINVAL, "trace: index without a trace");
    cJSON *o = cJSON_CreateObject();
    if (!o) return kvm_seterr(KVM_ENOMEM, "trace: out of memory building the index of '%s'", t->dir);
    put_fields(o, r, index_f);
    utf8_clean_tree(o);
    int rc = trace_write_file_json(t, "index.json", o);
    cJSON_Delete(o);
    return rc;
}

/* ---- reader ---------------------------------------------------------------------------------------------- */

typedef struct rd {
    kvm_trace_mem_t **mem;
    const char *file;
    int line;
} rd_t;

static int bad(const rd_t *rd, const char *parent, const field_t *f, const char *want) {
    return kvm_seterr(KVM_EFORMAT, "%s:%d: field '%s%s%s' must be %s", rd->file, rd->line, parent, *parent ? "." : "", f->name, want);
}

static int no_mem(void) { return kvm_seterr(KVM_ENOMEM, "trace: out of memory reading a record"); }

static const char *keep_str(rd_t *rd, const char *s) {
    size_t n = strlen(s) + 1;
    char *d = trace_mem_alloc(rd->mem, n);
    if (d) memcpy(d, s, n);
    return d;
}

static int code_of(const char *name) {
#define KVM_X_CODE(n, val, desc) if (!strcmp(name, #n)) return n;
    KVM_STATUS_TABLE(KVM_X_CODE)
#undef KVM_X_CODE
    return KVM_EINTERNAL; /* a code this build does not know: still an error */
}

/* A whole number in [lo, hi]. */
static bool whole(const cJSON *v, double lo, double hi) {
    return cJSON_IsNumber(v) && v->valuedouble >= lo && v->valuedouble <= hi && v->valuedouble == floor(v->valuedouble);
}

static int get_fields(rd_t *rd, const cJSON *o, void *base, const field_t *f, const char *parent);

static int get_array(rd_t *rd, const cJSON *v, void *base, const field_t *f, const char *parent) {
    if (!cJSON_IsArray(v)) return bad(rd, parent, f, "an array");
    int n = cJSON_GetArraySize(v);
    size_t esz = f->type == F_STRUCTS ? f->elem_size : f->type == F_STRS ? sizeof(char *) : sizeof(int32_t);
    char *arr = n ? trace_mem_alloc(rd->mem, (size_t)n * esz) : NULL;
    if (n && !arr) return no_mem();
    if (arr) memset(arr, 0, (size_t)n * esz);
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, v) {
        if (f->type == F_STRS) {
            if (!cJSON_IsString(e)) return bad(rd, parent, f, "an array of strings");
            if (!(((const char **)(void *)arr)[i] = keep_str(rd, e->valuestring))) return no_mem();
        } else if (f->type == F_I32S) {
            if (!whole(e, INT32_MIN, INT32_MAX)) return bad(rd, parent, f, "an array of 32-bit integers");
            ((int32_t *)(void *)arr)[i] = (int32_t)e->valuedouble;
        } else {
            if (!cJSON_IsObject(e)) return bad(rd, parent, f, "an array of objects");
            int rc = get_fields(rd, e, arr + (size_t)i * esz, f->sub, f->name);
            if (rc) return rc;
        }
        i++;
    }
    memcpy(AT(base, f->off, char), &arr, sizeof arr);
    *AT(base, f->count_off, int) = n;
    return 0;
}

static int get_error(rd_t *rd, const cJSON *v, kvm_trace_error_t *e, const field_t *f, const char *parent) {
    if (!cJSON_IsObject(v)) return bad(rd, parent, f, "an object");
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(v, "code"), *m = cJSON_GetObjectItemCaseSensitive(v, "message"),
                *tb = cJSON_GetObjectItemCaseSensitive(v, "traceback");
    if ((c && !cJSON_IsString(c)) || (m && !cJSON_IsString(m)) || (tb && !cJSON_IsString(tb)))
        return bad(rd, parent, f, "an object of strings {code, message, traceback}");
    e->code = c ? code_of(c->valuestring) : KVM_EINTERNAL;
    if ((m && !(e->message = keep_str(rd, m->valuestring))) || (tb && !(e->traceback = keep_str(rd, tb->valuestring)))) return no_mem();
    return 0;
}

/* Reads one field present in the object as v. */
static int get_value(rd_t *rd, const cJSON *v, void *base, const field_t *f, const char *parent) {
    void *p = AT(base, f->off, char);
    switch (f->type) {
    case F_INT:
        if (!whole(v, INT_MIN, INT_MAX)) return bad(rd, parent, f, "an integer");
        *(int *)p = (int)v->valuedouble;
        return 0;
    case F_LONG:
        if (!whole(v, -9.0e15, 9.0e15)) return bad(rd, parent, f, "an integer");
        *(long *)p = (long)v->valuedouble;
        return 0;
    case F_DBL:
        if (!cJSON_IsNumber(v)) return bad(rd, parent, f, "a number");
        *(double *)p = v->valuedouble;
        return 0;
    case F_BOOL:
        if (!cJSON_IsBool(v)) return bad(rd, parent, f, "true or false");
        *(bool *)p = cJSON_IsTrue(v);
        return 0;
    case F_FLAG:
        if (!cJSON_IsString(v) || (strcmp(v->valuestring, f->words[0]) && strcmp(v->valuestring, f->words[1])))
            return bad(rd, parent, f, f->words[1][0] == 'a' ? "\"all\" or \"any\"" : "a known word");
        *(bool *)p = !strcmp(v->valuestring, f->words[1]);
        return 0;
    case F_STR:
        if (cJSON_IsNull(v)) return 0;
        if (!cJSON_IsString(v)) return bad(rd, parent, f, "a string");
        return (*(const char **)p = keep_str(rd, v->valuestring)) ? 0 : no_mem();
    case F_JSON: {
        if (cJSON_IsNull(v)) return 0;
        char *s = cJSON_PrintUnformatted(v);
        if (!s) return no_mem();
        *(const char **)p = keep_str(rd, s);
        cJSON_free(s);
        return *(const char **)p ? 0 : no_mem();
    }
    case F_U64:
    case F_HEX64: {
        char *end = NULL;
        if (!cJSON_IsString(v) || !v->valuestring[0]) return bad(rd, parent, f, "a string of digits");
        *(uint64_t *)p = strtoull(v->valuestring, &end, f->type == F_U64 ? 10 : 16);
        return *end || v->valuestring[0] == '-' ? bad(rd, parent, f, "a string of digits") : 0;
    }
    case F_STATUS: /* "error" without an error object still reads as an error */
        if (!cJSON_IsString(v)) return bad(rd, parent, f, "\"ok\" or \"error\"");
        if (!strcmp(v->valuestring, "error") && !*(int *)p) *(int *)p = KVM_EINTERNAL;
        return 0;
    case F_ERRNAME:
        if (!cJSON_IsString(v)) return bad(rd, parent, f, "a KVM_E* name");
        *(int *)p = code_of(v->valuestring);
        return 0;
    case F_ERROR: return get_error(rd, v, p, f, parent);
    case F_OBJ:
        if (!cJSON_IsObject(v)) return bad(rd, parent, f, "an object");
        return get_fields(rd, v, p, f->sub, f->name);
    case F_STRUCTS:
    case F_STRS:
    case F_I32S: return get_array(rd, v, base, f, parent);
    case F_END: break;
    }
    return 0;
}

static int get_fields(rd_t *rd, const cJSON *o, void *base, const field_t *f, const char *parent) {
    for (; f->name; f++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, f->name);
        if (!v) continue; /* absent: zero / NULL */
        int rc = get_value(rd, v, base, f, parent);
        if (rc) return rc;
    }
    return 0;
}

int trace_rec_from_json(const cJSON *o, kvm_trace_rec_t *rec, kvm_trace_mem_t **mem, const char *file, int line) {
    rd_t rd = {.mem = mem, .file = file, .line = line};
    memset(rec, 0, sizeof *rec);
    rec->line = line;
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "t"), *ts = cJSON_GetObjectItemCaseSensitive(o, "ts");
    if (!cJSON_IsString(t)) return kvm_seterr(KVM_EFORMAT, "%s:%d: a record without a string field 't' (its type)", file, line);
    rec->type = type_of(t->valuestring);
    if (!(rec->type_name = keep_str(&rd, t->valuestring))) return no_mem();
    static const field_t ts_f[] = {F("ts", F_U64, kvm_trace_rec_t, ts, 0), END};
    if (ts) {
        int rc = get_value(&rd, ts, rec, ts_f, "");
        if (rc) return rc;
    }
    if (rec->type == KVM_TRACE_RUN_START) { /* the version first: a newer major version may mean anything */
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "v");
        if (v && !whole(v, 0, INT_MAX)) return kvm_seterr(KVM_EFORMAT, "%s:%d: field 'v' must be an integer", file, line);
        if (v && v->valuedouble > KVM_TRACE_VERSION)
            return kvm_seterr(KVM_EVERSION, "%s:%d: trace format version %d is newer than this build reads (%d): use a newer kvmesh",
                              file, line, (int)v->valuedouble, KVM_TRACE_VERSION);
    }
    if (rec->type == KVM_TRACE_STEP) {
        int rc = get_fields(&rd, o, &rec->step, step_head_f, "");
        if (!rc) rc = get_fields(&rd, o, &rec->step, step_nest_f, "");
        if (rc) return rc;
        return get_fields(&rd, o, &rec->step, rec->step.agent ? step_agent_f : step_fn_f, "");
    }
    if (rec->type == KVM_TRACE_OTHER) return 0;
    return get_fields(&rd, o, (char *)rec + offsetof(kvm_trace_rec_t, run_start), type_fields[rec->type], ""); /* the union */
}

int trace_index_from_json(const cJSON *o, kvm_trace_rec_t *rec, kvm_trace_mem_t **mem, const char *file) {
    rd_t rd = {.mem = mem, .file = file, .line = 1};
    memset(rec, 0, sizeof *rec);
    rec->type = KVM_TRACE_INDEX;
    rec->type_name = type_names[KVM_TRACE_INDEX];
    rec->line = 1;
    if (!cJSON_IsObject(o)) return kvm_seterr(KVM_EFORMAT, "%s: not a JSON object", file);
    return get_fields(&rd, o, &rec->index, index_f, "");
}
