#!/usr/bin/env bash
# tokenize.sh - `kvmesh tokenize` end to end: JSON ids for llama2.c and HF tokenizers, flags, errors.
# Args: kvmesh binary, shared data dir. Checks needing absent data (shared tok512.bin, the fetched Qwen3
# tokenizer) say SKIP; the rest runs on the committed hand-made tokenizer, so this never exits 77.
set -u
bin="$1"
shared="${2:-}"
here="$(cd "$(dirname "$0")/../.." && pwd)"
tiny="$here/tests/data/tokenizer/tiny-digits.json"
fails=0
check() { # name expected actual
  if [ "$2" == "$3" ]; then echo "ok   $1"; else echo "FAIL $1: expected '$2' got '$3'"; fails=$((fails + 1)); fi
}

grep -q -- "--text" <<< "$("$bin" tokenize --help)" && echo "ok   --help" || { echo "FAIL --help"; fails=$((fails + 1)); }

# hand-made byte-level tokenizer (tests/data/tokenizer): <|im_end|> is id 401, <|bos|> 398, '7' is 55
check "special token parsed" "[401]" "$("$bin" tokenize --tokenizer "$tiny" --text '<|im_end|>')"
check "--bos adds the template BOS" "[398, 55]" "$("$bin" tokenize --tokenizer "$tiny" --bos --text '7')"
out="$("$bin" tokenize --tokenizer "$tiny" --no-special --text '<|im_end|>')"
case "$out" in "[60, "*) echo "ok   --no-special"; ;; *) echo "FAIL --no-special: $out"; fails=$((fails + 1)) ;; esac
check "--model FILE.json" "[398, 55]" "$("$bin" tokenize --model "$tiny" --bos --text '7')"

# llama2.c tokenizer.bin from the shared data
tok512="$shared/models/stories260K/tok512.bin"
if [ -f "$tok512" ]; then
  check "llama2.c tok512 with BOS" "[1, 403, 407, 261, 378]" "$("$bin" tokenize --tokenizer "$tok512" --bos --text 'Once upon a time')"
  # a llama2.c checkpoint as --model finds its tokenizer beside it, as `kvmesh generate` does
  check "llama2.c checkpoint as --model" "[1, 403, 407, 261, 378]" "$("$bin" tokenize --model "$shared/models/stories260K/stories260K.bin" --bos --text 'Once upon a time')"
else
  echo "SKIP llama2.c check: $tok512 absent"
fi

# real Qwen3 tokenizer, when scripts/fetch-tokenizers.sh fetched it
qwen="${KVM_TOKENIZER_CACHE:-$here/build-deps/tokenizers}/qwen3"
if [ -f "$qwen/tokenizer.json" ]; then
  check "qwen3 model dir" "[151644, 872, 15588]" "$("$bin" tokenize --model "$qwen" --text '<|im_start|>user hi')"
else
  echo "SKIP qwen3 check: $qwen/tokenizer.json absent (run scripts/fetch-tokenizers.sh)"
fi

# errors: usage -> 2, unreadable or malformed input -> 1 with the file named
"$bin" tokenize --tokenizer "$tiny" >/dev/null 2>&1
check "missing --text exits 2" "2" "$?"
err="$("$bin" tokenize --tokenizer /nonexistent/tokenizer.json --text x 2>&1 >/dev/null)"
rc=$?
check "missing file exits 1" "1" "$rc"
case "$err" in *"/nonexistent/tokenizer.json"*) echo "ok   error names the file" ;; *) echo "FAIL error message: $err"; fails=$((fails + 1)) ;; esac
bad="$(mktemp /tmp/kvm_tok_cli_XXXXXX.json)"
printf '{"model": {"type": "WordPiece", "vocab": {}}}' >"$bad"
err="$("$bin" tokenize --tokenizer "$bad" --text x 2>&1 >/dev/null)"
case "$err" in *WordPiece*) echo "ok   unsupported model type named" ;; *) echo "FAIL unsupported: $err"; fails=$((fails + 1)) ;; esac
rm -f "$bad"

[ "$fails" -eq 0 ]
