/* minitasks.h - the minitasks task suite: a deterministic generator and scorer (lab/, no model needed).
 *
 * Every item is a chat of three messages: a system prompt (the agent's role), a user message (the
 * shared content plus role-specific lines) and the expected assistant answer. The same content under
 * different roles has different answers, which is what KV reuse across prefixes must survive.
 *
 * Determinism: an item is a pure function of (task, split, seed, index, role). The generator uses its
 * own PRNG (splitmix64 seeding xoshiro256**) and integer arithmetic only, so the same arguments give
 * the same bytes on every machine. The content of an item does not depend on its role: item (task,
 * split, seed, index) under role r and under role r' share the facts / numbers / list.
 *
 * Splits: every item's content is hashed (FNV-1a of the role-independent user text) and hash % 8 == 0
 * marks it as held-out. The train split rejects held-out contents and the eval split accepts only
 * them, so no eval item's content can appear in training whatever seeds are used. On top of that the
 * training corpus uses seeds 1..999 and evaluation seeds >= 1000 (docs/minitasks.md). */
#ifndef KVM_MINITASKS_H
#define KVM_MINITASKS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum kvm_mt_task {
    KVM_MT_RECALL = 0,  /* 8-48 facts "<name>: <4 digits>", a question about one */
    KVM_MT_ARITH,       /* a + b, a - b and two-step chains of 2-3 digit numbers */
    KVM_MT_TRANSFORM,   /* reverse / sort / count a short list of digits or words */
    KVM_MT_STORY,       /* free story text from a template grammar (fluency; soft-scored) */
    KVM_MT_TEAM,        /* the multi-agent workload: shared facts + other agents' answers */
    KVM_MT_N_TASKS
} kvm_mt_task_t;

typedef enum kvm_mt_split { KVM_MT_TRAIN = 0, KVM_MT_EVAL = 1 } kvm_mt_split_t;

/* Seeds: the training corpus draws seeds below this, evaluation at or above it (documentation and
 * CLI defaults; the content-hash partition above is what guarantees disjointness). */
#define KVM_MT_EVAL_SEED_MIN 1000u
#define KVM_MT_DEFAULT_EVAL_SEED 1000u
#define KVM_MT_MAX_ROLES 4

typedef struct kvm_mt_item {
    kvm_mt_task_t task;
    kvm_mt_split_t split;
    uint64_t seed, index;
    int role;              /* index into the task's role table */
    bool exact;            /* scored by exact match (all tasks but story) */
    char system[192];      /* role prompt */
    char user[2048];       /* user message */
    char answer[768];      /* expected assistant answer (no end marker) */
    char key[32];          /* story: the hero's name, which a soft-scored output must contain */
    char id[64];           /* "<task>/<split>/<seed>/<index>/<role>" */
} kvm_mt_item_t;

/* Names of tasks ("recall", "arithmetic", "transform", "story", "team") and their roles. */
const char *kvm_mt_task_name(int task);
/* Task id of a name, or -1 (also accepts "arith"). */
int kvm_mt_task_from_name(const char *name);
int kvm_mt_n_roles(int task);
/* Role name ("value", "reverse", ...) or NULL when out of range. */
const char *kvm_mt_role_name(int task, int role);
/* Role index of a name for a task, or -1. */
int kvm_mt_role_from_name(int task, const char *name);
/* System prompt of a role, or NULL. */
const char *kvm_mt_role_system(int task, int role);

/* Fills *it with item `index` of (task, split, seed). task < 0 picks the task from the training mixture
 * (recall 30%, arithmetic 25%, transform 15%, story 5%, team 25%) with its own deterministic draw; role < 0
 * picks a role uniformly with a draw independent of the content. Returns 0, or KVM_EINVAL (bad
 * task/role/split, message names it). */
int kvm_mt_make(kvm_mt_item_t *it, int task, int split, uint64_t seed, uint64_t index, int role);

/* Options of kvm_mt_make_ex (zero = default). A fact range other than the default (recall 8-48, team
 * 8-32) makes training-curriculum items; the eval protocol always uses the defaults. */
typedef struct kvm_mt_opts {
    int min_facts, max_facts; /* 2 <= min <= max <= 48 */
} kvm_mt_opts_t;
/* kvm_mt_make with options (opts may be NULL). KVM_EINVAL on a bad fact range. */
int kvm_mt_make_ex(kvm_mt_item_t *it, int task, int split, uint64_t seed, uint64_t index, int role,
                   const kvm_mt_opts_t *opts);

/* Renders the ChatML prompt of an item into buf:
 *   <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n
 * followed, when with_answer, by "{answer}<|im_end|>\n". Returns the length written, or KVM_ERANGE if
 * cap is too small (buf then holds a truncated NUL-terminated prefix). */
int kvm_mt_render_chatml(const kvm_mt_item_t *it, bool with_answer, char *buf, size_t cap);

/* True when a model's output is right: exact match after trimming whitespace at both ends (exact
 * tasks), or, for story, a non-empty output that mentions the hero's name. */
bool kvm_mt_score(const kvm_mt_item_t *it, const char *output);

/* Writes one JSON line {"task","role","system","user","answer","id"} for the item. Returns 0 or KVM_EIO. */
int kvm_mt_write_jsonl(FILE *f, const kvm_mt_item_t *it);

/* Small helpers shared with the tests (digits of s reversed into out; cap includes the NUL). */
void kvm_mt_reverse_str(const char *s, char *out, size_t cap);

#endif
