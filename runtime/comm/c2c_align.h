/* c2c_align.h - C2C token alignment across tokenizers (../shared/spec/c2c.md §4) and the aligned-mode prefill
 * (spec §5 "Aligned mode", §6). docs/c2c.md, "Token alignment".
 *
 * The receiver's tokenization is master. Each model renders the conversation with its own chat format; the text
 * is split into alternating template and message sections (the section counts and kinds must match):
 *   - template sections keep each model's own tokens; the shorter side is right-padded with its pad token;
 *   - message sections map 1:1: each receiver id is decoded alone (special tokens kept, no space clean-up) and
 *     re-encoded with the sharer's tokenizer: one id -> it; several -> the first ("first") or the one whose own
 *     decoded string is longest in characters ("longest"; the earlier one on a tie); none -> the sharer's unk
 *     (0 if it has none). Receiver special tokens (and its pad / eos / bos / unk ids) map by role pad -> pad,
 *     eos -> eos, bos -> bos, unk -> unk where the sharer has that role, any other by its string to the sharer id
 *     of the same string, else unk (or 0).
 * Both sequences get the same length N and positions 0..N-1; only message rows are marked for fusion. Each section
 * is tokenized on its own (the reference cuts one tokenization at character offsets: the same wherever no token
 * spans a section boundary).
 *
 * The aligner is pure (no model runs); kvm_c2c_prefill_aligned runs the two models over an alignment. The engine has
 * no attention mask (a sequence's KV row index is its position, and every row attends to all rows before it), so
 * pads cannot be "attention mask 0 but consuming positions" exactly:
 *   - receiver pads before the last section are refused (KVM_EUNSUPPORTED naming spec §4);
 *   - receiver pads of the last section trail the sequence and are not run (nothing attends to them: exact);
 *   - sharer pads are prefilled as the sharer's pad token at their positions, so the sharer's later rows attend
 *     to them (the fuser itself reads only message rows, never a pad): an approximation of spec §4, counted in
 *     kvm_c2c_aligned_t.s_pads_run. */
#ifndef KVM_COMM_C2C_ALIGN_H
#define KVM_COMM_C2C_ALIGN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "c2c.h"
#include "../model/generate.h"
#include "../model/tokenizer.h"

typedef enum kvm_c2c_strategy { KVM_C2C_ALIGN_FIRST = 1, KVM_C2C_ALIGN_LONGEST = 2 } kvm_c2c_strategy_t;

/* One side of the alignment: its tokenizer and its role ids (-1: none). pad is needed only where that side is
 * padded. add_bos: the first section is encoded with BOS (as the model encodes a prompt). */
typedef struct kvm_c2c_align_side {
    const kvm_tokenizer_t *tok;
    int32_t pad, eos, bos, unk;
    bool add_bos;
} kvm_c2c_align_side_t;

/* One section of a rendered conversation: text[0..len), a message's content or template text. */
typedef struct kvm_c2c_section {
    const char *text;
    size_t len;
    bool message;
} kvm_c2c_section_t;

/* An alignment (free with kvm_c2c_aligned_free). Rows 0..n-1 are positions. */
typedef struct kvm_c2c_aligned {
    int n;
    int32_t *r_ids, *s_ids;    /* [n] the receiver's and the sharer's ids */
    uint8_t *fuse;             /* [n] 1 = a message row (fused in aligned mode) */
    uint8_t *r_pad, *s_pad;    /* [n] 1 = a pad row on that side */
    int n_sections;
    int *sec_start;            /* [n_sections + 1] first row of each section; sec_start[n_sections] = n */
    uint8_t *sec_message;      /* [n_sections] */
    int r_pads, s_pads;        /* pad rows on each side */
    int r_pads_trailing;       /* receiver pads at the very end (the last section's, which are never run) */
    int s_pads_run;            /* sharer pads before the last section (prefilled and attended: see above) */
    int mapped_several, mapped_empty, mapped_special; /* message-token rule counts */
    kvm_c2c_strategy_t strategy;
} kvm_c2c_aligned_t;

void kvm_c2c_aligned_free(kvm_c2c_aligned_t *a);

/* "first" / "longest" -> the strategy; 0 for anything else (e.g. "identity"). */
kvm_c2c_strategy_t kvm_c2c_strategy_of(const char *token_alignment);

/* The sharer id for receiver id rid (the message-token rule above). 0 or KVM_EINVAL (bad id) / KVM_ENOMEM. */
int kvm_c2c_map_token(const kvm_c2c_align_side_t *r, const kvm_c2c_align_side_t *s, int32_t rid,
                      kvm_c2c_strategy_t strategy, int32_t *sid);

/* Aligns two section lists (each side's own rendering). Errors (KVM_EINVAL, nothing allocated): the counts differ
 * ("spec §4: the section counts must match"), a section's kind differs, a message's text differs, a side must be
 * padded but has no valid pad id; tokenizer errors name the section. */
int kvm_c2c_align_sections(const kvm_c2c_align_side_t *r, const kvm_c2c_section_t *rsec, int nr,
                           const kvm_c2c_align_side_t *s, const kvm_c2c_section_t *ssec, int ns,
                           kvm_c2c_strategy_t strategy, kvm_c2c_aligned_t *out);

/* Renders msgs[0..n) in each side's chat format (kvm_chat_render; add_generation_prompt appends the assistant
 * header), splits each rendering into template and message sections at the messages' contents, and aligns them
 * (kvm_c2c_align_sections). A role holding the byte 0x1E is refused. */
int kvm_c2c_align_chat(const kvm_c2c_align_side_t *r, kvm_chat_format_t rfmt, const kvm_c2c_align_side_t *s,
                       kvm_chat_format_t sfmt, const kvm_chat_msg_t *msgs, int n, bool add_generation_prompt,
                       kvm_c2c_strategy_t strategy, kvm_c2c_aligned_t *out);

/* The side of a loaded model: its tokenizer, pad = config pad_token_id (else its EOS), eos / bos / unk of its
 * tokenizer, add_bos of its config. KVM_EINVAL for a model without a tokenizer. */
int kvm_c2c_align_side_of(const kvm_model_t *m, kvm_c2c_align_side_t *side);

/* kvm_c2c_align_chat for a fuser and its two loaded models: each model's own chat format, the fuser's
 * token_alignment as the strategy, the generation prompt added. KVM_EINVAL for an identity fuser. */
int kvm_c2c_align_models(const kvm_c2c_fuser_t *f, const kvm_model_t *receiver, const kvm_model_t *sharer,
                         const kvm_chat_msg_t *msgs, int n, kvm_c2c_aligned_t *out);

/* The alignment of one receiver prompt r_ids[0..n) whose rows [at, at + len) are the one message (a placeholder's
 * content: C2C kv_from in aligned mode), in three sections: (0) the receiver's rows [0, at) beside the sharer's own
 * tokens of s_head[0..s_head_len), its rendering of the same prompt up to the message (encoded as a prompt start:
 * BOS where the sharer adds one), the shorter side padded (spec §4); (1) the message rows, each receiver id mapped
 * by the message-token rule; (2) the rows [at + len, n), the receiver's alone (the sharer side holds pads and is
 * never run). Refused (KVM_EINVAL): an identity fuser, an empty message or none after it, a side to pad without a
 * pad id. The receiver rows equal r_ids unless section 0 pads the receiver, which kvm_c2c_prefill_aligned_head
 * refuses. */
int kvm_c2c_align_span(const kvm_c2c_fuser_t *f, const kvm_model_t *receiver, const kvm_model_t *sharer,
                       const int32_t *r_ids, int n, int at, int len, const char *s_head, size_t s_head_len,
                       kvm_c2c_aligned_t *out);

/* kvm_c2c_prefill_aligned without its last section: every section but the last runs (and is fused) as there, with
 * the same checks; the caller runs the last section's rows on the receiver (kv_from leaves them to the scheduler).
 * st: as there, rest_ms 0. */
int kvm_c2c_prefill_aligned_head(kvm_c2c_fuser_t *f, kvm_model_t *receiver, kvm_seq_t *rseq, kvm_model_t *sharer,
                                 kvm_kv_pool_t *spool, const kvm_c2c_aligned_t *a, kvm_c2c_stats_t *st);

/* The aligned-mode prefill (spec §5, §6) of a fuser with token_alignment first / longest and fuse_tokens
 * message_tokens, on an empty receiver sequence rseq: sections in order; each runs on the receiver (attending to
 * the already fused rows before it) and, but for the last, on the sharer (a fresh sequence of spool); a message
 * section's rows are then fused in place (open gates only). The last section runs on the receiver only, without
 * its trailing pads; logits (host [vocab], may be NULL) get its last row. The sharer's sequence is freed.
 * Refused (KVM_EINVAL / KVM_EUNSUPPORTED, rseq unchanged): an identity fuser; an alignment made with another
 * strategy; a non-empty rseq; receiver pads before the last section (spec §4, see above); a last section with no
 * receiver row. st (may be NULL): pos0 0, fused_tokens = message rows, prefill_ms (both models, every section but
 * the last), fuse_ms, rest_ms (the last section). On error rseq is truncated back to empty. */
int kvm_c2c_prefill_aligned(kvm_c2c_fuser_t *f, kvm_model_t *receiver, kvm_seq_t *rseq, kvm_model_t *sharer,
                            kvm_kv_pool_t *spool, const kvm_c2c_aligned_t *a, float *logits, kvm_c2c_stats_t *st);

#endif
