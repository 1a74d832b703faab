/* tok_internal.h - what the tokenizer files (tokenizer.c, tok_hf.c, tok_pipeline.c, tok_unicode.c) share.
 * Not a public header: everything outside runtime/model/tok*.c goes through tokenizer.h.
 *
 * Layout of a loaded tokenizer:
 *   pieces[id]      the token's string as the model vocabulary spells it ("Ġhello", "▁the", "<0x0A>",
 *                   "<|im_end|>"); NULL for ids no entry uses. Owned.
 *   vocab           string -> id over the model vocabulary (and, for llama2.c, every piece).
 *   merges          (left id, right id) -> (rank, merged id), HF BPE only.
 *   added           HF added tokens, matched in the text before pre-tokenization.
 *   norm/pre/dec    the HF pipeline steps, flattened (Sequence steps are inlined at load). */
#ifndef KVM_TOK_INTERNAL_H
#define KVM_TOK_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../core/map.h"
#include "../core/sb.h"
#include "tokenizer.h"

/* ---- unicode (tok_unicode.c) -------------------------------------------------------------------- */

typedef struct {
    uint32_t lo, hi; /* inclusive */
} tok_range_t;

/* Decodes one UTF-8 sequence at s[0..len) (len >= 1). Returns the bytes consumed (1..4); a malformed
 * or truncated sequence consumes 1 byte and yields *cp = 0xFFFD. */
int tok_utf8_next(const char *s, size_t len, uint32_t *cp);
/* Length (1..4) of the UTF-8 sequence starting with byte b by its lead byte alone (1 if not a lead). */
int tok_utf8_lead_len(unsigned char b);
int tok_utf8_put(uint32_t cp, char out[4]);
bool tok_is_letter(uint32_t cp); /* \p{L} */
bool tok_is_number(uint32_t cp); /* \p{N} */
bool tok_is_space(uint32_t cp);  /* \s: the White_Space property */
/* Appends s[0..len) to out with every maximal invalid UTF-8 subsequence replaced by U+FFFD (Rust's
 * String::from_utf8_lossy). out must hold 3 * len bytes. Returns bytes written. */
size_t tok_utf8_lossy(const char *s, size_t len, char *out);

/* ---- byte buffers: the core string builder (runtime/core/sb.h) ------------------------------- */

/* Appends the NFC (compose) or NFD form of s[0..len) to out (tok_unicode.c, canonical tables from
 * scripts/fixtures/gen_tok_unicode.py). Invalid UTF-8 is appended unchanged. 0 or KVM_ENOMEM. */
int tok_normalize_nf(const char *s, size_t len, bool compose, kvm_sb_t *out);

/* ---- hash maps ---------------------------------------------------------------------------------- */

/* string -> int32 (a core map, KVM_MAP_STR_REF: keys point into memory the owner keeps alive). */
typedef kvm_map_t tok_strmap_t;
int tok_strmap_init(tok_strmap_t *m, size_t expected);
void tok_strmap_free(tok_strmap_t *m);
/* Inserts or overwrites. 0 or KVM_ENOMEM. */
int tok_strmap_put(tok_strmap_t *m, const char *key, size_t klen, int32_t val);
/* Value or -1. */
int32_t tok_strmap_get(const tok_strmap_t *m, const char *key, size_t klen);

/* (left id, right id) -> (rank, merged id) (a core map with u64 keys). */
typedef kvm_map_t tok_pairmap_t;
int tok_pairmap_init(tok_pairmap_t *m, size_t expected);
void tok_pairmap_free(tok_pairmap_t *m);
/* Keeps the first (lowest) rank when a pair repeats, as HF does. */
int tok_pairmap_put(tok_pairmap_t *m, int32_t a, int32_t b, int32_t rank, int32_t merged);
bool tok_pairmap_get(const tok_pairmap_t *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged);

/* ---- growable id list ---------------------------------------------------------------------------- */

typedef struct {
    int32_t *v;
    int n;
    size_t cap;
} tok_ids_t;
int tok_ids_push(tok_ids_t *l, int32_t id);

/* ---- the tokenizer ------------------------------------------------------------------------------- */

enum tok_kind { TOK_LLAMA2C = 0, TOK_BPE_BYTELEVEL = 1, TOK_BPE_SENTENCEPIECE = 2 };

/* Pre-tokenizer regexes we implement as hand-written matchers (tok_pipeline.c). */
enum tok_regex {
    TOK_RE_GPT2 = 1,   /* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
    TOK_RE_LLAMA3 = 2, /* (?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
    TOK_RE_QWEN2 = 3,  /* the same with \p{N} (one digit per piece) */
};

/* HF SplitDelimiterBehavior */
enum tok_split_behavior { TOK_SPLIT_REMOVED, TOK_SPLIT_ISOLATED, TOK_SPLIT_MERGED_PREV, TOK_SPLIT_MERGED_NEXT, TOK_SPLIT_CONTIGUOUS };

enum tok_norm_type { TOK_NORM_IDENTITY, TOK_NORM_PREPEND, TOK_NORM_REPLACE, TOK_NORM_NFC, TOK_NORM_NFD };
typedef struct {
    int type;
    char *a, *b; /* PREPEND: a = text; REPLACE: a = pattern, b = content */
} tok_norm_t;

enum tok_pre_type { TOK_PRE_SPLIT_REGEX, TOK_PRE_SPLIT_STRING, TOK_PRE_BYTELEVEL, TOK_PRE_DIGITS, TOK_PRE_METASPACE, TOK_PRE_WSPLIT };
enum tok_prepend { TOK_PREPEND_ALWAYS, TOK_PREPEND_FIRST, TOK_PREPEND_NEVER };
typedef struct {
    int type;
    int regex;      /* SPLIT_REGEX */
    char *pattern;  /* SPLIT_STRING literal; METASPACE replacement (UTF-8) */
    int behavior;   /* SPLIT_*: enum tok_split_behavior */
    bool invert;    /* SPLIT_* */
    bool flag;      /* BYTELEVEL: add_prefix_space; DIGITS: individual_digits; METASPACE: split */
    bool use_regex; /* BYTELEVEL */
    int prepend;    /* METASPACE: enum tok_prepend */
} tok_pre_t;

enum tok_dec_type { TOK_DEC_BYTELEVEL, TOK_DEC_REPLACE, TOK_DEC_BYTEFALLBACK, TOK_DEC_FUSE, TOK_DEC_STRIP, TOK_DEC_METASPACE };
typedef struct {
    int type;
    char *a, *b;      /* REPLACE: pattern, content; STRIP: a = content char; METASPACE: a = replacement */
    int start, stop;  /* STRIP */
    bool prepend;     /* METASPACE: prepend_scheme != never */
} tok_dec_t;

typedef struct {
    char *content;
    size_t len;
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
} tok_added_t;

struct kvm_tokenizer {
    int kind;
    int vocab_size;        /* ids are 0..vocab_size-1 */
    char **pieces;         /* [vocab_size] */
    uint32_t *piece_len;   /* [vocab_size] */
    uint8_t *special;      /* [vocab_size] 1 = special token (skipped by skip_special) */
    float *scores;         /* [vocab_size] llama2.c only */
    tok_strmap_t vocab;
    tok_pairmap_t merges;
    int32_t byte_ids[256]; /* <0xNN> ids for byte fallback (-1 if absent) */
    int32_t bos, eos;
    bool adds_bos;
    char *chat_template;
    char *path;

    /* HF BPE model */
    bool byte_fallback, fuse_unk, ignore_merges;
    int32_t unk;
    /* HF pipeline */
    tok_added_t *added;
    int n_added;
    int32_t added_by_byte[256]; /* first index into added[] (sorted by first byte, then length desc) */
    tok_norm_t *norm;
    int n_norm;
    tok_pre_t *pre;
    int n_pre;
    tok_dec_t *dec;
    int n_dec;
    int32_t *post_prefix, *post_suffix; /* ids the post-processor puts around a single sequence */
    int n_post_prefix, n_post_suffix;
};

/* tokenizer.c */
kvm_tokenizer_t *tok_alloc(int kind, int vocab_size, const char *path);
/* Sets pieces[id] (copied) and vocab[piece] = id (first setter wins in the map unless overwrite). */
int tok_set_piece(kvm_tokenizer_t *t, int32_t id, const char *s, size_t len, bool map_it);
/* HF BPE model over one pre-tokenized word (already in the vocabulary's alphabet). Appends ids. */
int tok_bpe_word(const kvm_tokenizer_t *t, const char *w, size_t len, tok_ids_t *out);
/* "<0xNN>" (exactly 6 bytes, hex digits of either case) -> the byte, else -1. */
int tok_parse_byte_piece(const char *p, size_t len);
/* The GPT-2 byte -> character map (as UTF-8, 1-2 bytes) and its inverse. */
const char *tok_byte_char(unsigned b, int *len);
int tok_char_byte(uint32_t cp); /* byte or -1 */

/* tok_pipeline.c: the HF encode pipeline (added tokens, normalizers, pre-tokenizers, model). */
int tok_hf_encode(const kvm_tokenizer_t *t, const char *text, size_t len, int flags, tok_ids_t *out);
/* Runs the decoder steps over ids. raw: no lossy UTF-8 repair (streaming); first: the ids start the text.
 * Appends the bytes to out. */
int tok_hf_decode(const kvm_tokenizer_t *t, const int32_t *ids, int n, bool skip_special, bool raw, bool first,
                  kvm_sb_t *out);

#endif
