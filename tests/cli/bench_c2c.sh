#!/usr/bin/env bash
# bench_c2c.sh KVMESH SHARED - the C2C blinded-receiver documents and bench (docs/c2c.md "kvmesh bench c2c", spec §9).
# `kvmesh c2c docs`: deterministic for a seed; the sharer's ids are the minitasks recall item rendered as ChatML and
# tokenized by the model's tokenizer (checked against `kvmesh minitasks gen` and `kvmesh tokenize`); the receiver's
# ids have the same length and differ exactly at the value digits, each turned into '#'; bad options exit 2 naming
# the problem. `kvmesh bench c2c` with an untrained fuser on 20 documents: (a) and (c) >= 90% EM, (f) bit-identical to
# (b), every condition in the JSON (and (g) skipped without --identity-fuser); --docs-file reads the emitter's lines;
# --timing on the tiny synthetic pair and on the bundled one; bad inputs exit nonzero naming the problem.
set -euo pipefail
kvmesh=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
R=models/minillama-2m; S=models/miniqwen3-6m
[ -f $R/config.json ] && [ -f $S/config.json ] || { echo "SKIPPED: the bundled models are absent"; exit 77; }
export KVM_THREADS=${KVM_THREADS:-2}

# --- kvmesh c2c docs ------------------------------------------------------------------------------------------
"$kvmesh" c2c docs --model $S --n 40 --seed 7 -o "$tmp/a.jsonl"
"$kvmesh" c2c docs --model $R --n 40 --seed 7 > "$tmp/b.jsonl"   # the pair shares one tokenizer: the same documents
cmp "$tmp/a.jsonl" "$tmp/b.jsonl" || { echo "c2c docs is not deterministic (or the pair's tokenizers differ)"; exit 1; }
"$kvmesh" c2c docs --model $S --n 5 --seed 8 | cmp -s - <(head -5 "$tmp/a.jsonl") && { echo "seeds 7 and 8 gave the same documents"; exit 1; }
"$kvmesh" minitasks gen --task recall --role value --split train --seed 7 --facts 2-8 --n 40 > "$tmp/items.jsonl"
for t in '#' 0 1 2 3 4 5 6 7 8 9; do "$kvmesh" tokenize --model $S --text "$t"; done > "$tmp/singles"
# the sharer's ids of the first 3 items, from their ChatML rendering (as `kvmesh eval minitasks` renders them)
python3 - "$tmp/items.jsonl" > "$tmp/prompts" <<'PY'
import json, sys
for line in list(open(sys.argv[1]))[:3]:
    it = json.loads(line)
    print(f"<|im_start|>system\n{it['system']}<|im_end|>\n<|im_start|>user\n{it['user']}<|im_end|>\n<|im_start|>assistant\n"
          .replace("\n", "\\n"))
PY
while IFS= read -r p; do # (the x keeps the trailing newline through $(...))
  text="$(printf '%bx' "$p")"; "$kvmesh" tokenize --model $S --text "${text%x}"
done < "$tmp/prompts" > "$tmp/ref_ids"
python3 - "$tmp/a.jsonl" "$tmp/items.jsonl" "$tmp/singles" "$tmp/ref_ids" <<'PY'
import json, re, sys
docs = [json.loads(l) for l in open(sys.argv[1])]
items = [json.loads(l) for l in open(sys.argv[2])]
singles = [json.loads(l) for l in open(sys.argv[3])]
refs = [json.loads(l) for l in open(sys.argv[4])]
assert all(len(s) == 1 for s in singles), singles
hash_id, digit = singles[0][0], [s[0] for s in singles[1:]]
assert len(docs) == 40 and [d["i"] for d in docs] == list(range(40))
seen_facts = set()
for k, (d, it) in enumerate(zip(docs, items)):
    assert set(d) == {"i", "facts", "n", "n_fuse", "sharer", "receiver", "answer", "answer_text"}, d.keys()
    values = re.findall(r"^\w+: (\d{4})$", it["user"], re.M)
    assert d["facts"] == len(values) and 2 <= d["facts"] <= 8, (k, d["facts"], values)
    seen_facts.add(d["facts"])
    assert d["n"] == len(d["sharer"]) == len(d["receiver"]) and d["n_fuse"] == d["n"] - 1, k
    if k < len(refs):
        assert d["sharer"] == refs[k], (k, "the sharer's ids are not the ChatML rendering of the item")
    diff = [j for j in range(d["n"]) if d["sharer"][j] != d["receiver"][j]]
    assert len(diff) == 4 * d["facts"], (k, len(diff))
    assert all(d["receiver"][j] == hash_id for j in diff), k
    # the changed tokens, read in order, are exactly the digits of the values, in order
    assert "".join(str(digit.index(d["sharer"][j])) for j in diff) == "".join(values), k
    # nothing after the facts is blinded: the query name and the template stay visible
    assert diff[-1] < d["n"] - 8, k
    assert d["answer_text"] == it["answer"] and d["answer"] == [digit[int(c)] for c in it["answer"]], k
assert len(seen_facts) >= 4, seen_facts
print("docs ok:", len(docs), "documents, facts", sorted(seen_facts))
PY
"$kvmesh" c2c docs --model $S --n 3 --split eval > "$tmp/e1"
"$kvmesh" c2c docs --model $S --n 3 --split eval --seed 1000 --facts 2-8 | cmp - "$tmp/e1"
cmp -s "$tmp/e1" <(head -3 "$tmp/a.jsonl") && { echo "the eval split gave training documents"; exit 1; }
"$kvmesh" c2c docs --model $S --n 20 --facts 3-3 | python3 -c '
import json, sys
assert all(json.loads(l)["facts"] == 3 for l in sys.stdin)'

# the commands of docs/cli.md and docs/c2c.md
"$kvmesh" c2c docs --model models/miniqwen3-6m --n 2000 --seed 1 -o "$tmp/train.jsonl"
"$kvmesh" c2c docs --model models/miniqwen3-6m --n 2000 --split eval -o "$tmp/eval.jsonl"
[ "$(wc -l < "$tmp/train.jsonl")" -eq 2000 ] && [ "$(wc -l < "$tmp/eval.jsonl")" -eq 2000 ] || { echo "not 2000 documents"; exit 1; }
"$kvmesh" c2c --help | grep -q "c2c docs --model DIR --n N" || { echo "c2c --help lacks docs"; exit 1; }

usage() { # expected text, args...
  local want=$1; shift
  set +e; "$kvmesh" c2c docs "$@" > "$tmp/out" 2>&1; local rc=$?; set -e
  [ $rc -eq 2 ] || { echo "c2c docs $*: exit status $rc, expected 2"; cat "$tmp/out"; exit 1; }
  grep -q -- "$want" "$tmp/out" || { echo "c2c docs $*: message lacks '$want'"; cat "$tmp/out"; exit 1; }
}
usage "--model and --n are required" --n 3
usage "--model and --n are required" --model $S
usage "--n must be at least 1" --model $S --n 0
usage "'x' is not a non-negative integer" --model $S --n x
usage "--facts must be LO-HI" --model $S --n 1 --facts 1-4
usage "--facts must be LO-HI" --model $S --n 1 --facts 5-3
usage "--facts must be LO-HI" --model $S --n 1 --facts 2-49
usage "--facts must be LO-HI" --model $S --n 1 --facts 2-8x
usage "--split must be train or eval" --model $S --n 1 --split test
usage "is an evaluation seed" --model $S --n 1 --seed 1000
usage "is a training seed" --model $S --n 1 --split eval --seed 5
usage "unknown option '--bogus'" --model $S --n 1 --bogus 1
set +e; "$kvmesh" c2c docs --model "$tmp/none" --n 1 > "$tmp/out" 2>&1; rc=$?; set -e
[ $rc -eq 1 ] && grep -q "$tmp/none" "$tmp/out" || { echo "missing model: status $rc"; cat "$tmp/out"; exit 1; }
# --- kvmesh bench c2c ------------------------------------------------------------------------------------------
# 20 documents (3 s in the release build); 4 under the sanitizers (a Debug ASan build: 20 take 2 minutes)
ND=20; [ -n "${KVM_SANITIZED:-}" ] && ND=4
"$kvmesh" c2c init --receiver $R --sharer $S -o "$tmp/u.c2c.json" > /dev/null
"$kvmesh" c2c init --receiver $R --sharer $R -o "$tmp/id.c2c.json" > /dev/null
"$kvmesh" bench c2c --receiver $R --sharer $S --fuser "$tmp/u.c2c.json" --identity-fuser "$tmp/id.c2c.json" --docs $ND \
  --json "$tmp/bench.json" > "$tmp/out" 2> "$tmp/err" || { cat "$tmp/out" "$tmp/err"; exit 1; }
grep -q "$ND/$ND documents" "$tmp/err" || { echo "no progress on stderr"; cat "$tmp/err"; exit 1; }
grep -q "(f) = (b) bit for bit  *PASS" "$tmp/out" && grep -q "^gates K open at layers \[0 1 2 3 4 5\] (6 of 6)" "$tmp/out" &&
  grep -q "^recovery ratio" "$tmp/out" && grep -q "^  (d) >= 90% EM  *FAIL" "$tmp/out" ||
  { echo "bench c2c table:"; cat "$tmp/out"; exit 1; }
python3 - "$tmp/bench.json" $ND <<'PY'
import json, math, sys
r, nd = json.load(open(sys.argv[1])), int(sys.argv[2])
c = r["conditions"]
assert set(c) == set("abcdefg"), c.keys()
for k in "abcdefg":
    want = nd - r["e_left_out"] if k == "e" else nd  # (e) leaves out a document alone in its length
    assert c[k]["docs"] == want and set(c[k]) >= {"em", "nll_per_digit", "by_facts"}, (k, c[k])
    assert sum(v["docs"] for v in c[k]["by_facts"].values()) == want, k
assert c["a"]["em"] >= 0.9 and c["c"]["em"] >= 0.9, (c["a"]["em"], c["c"]["em"])
# blinded, no fusion: the values are gone (an untrained fuser brings none back)
assert c["b"]["em"] <= 0.1 and c["b"]["nll_per_digit"] > 1.0, c["b"]
assert c["f"]["em"] == c["b"]["em"] and c["f"]["nll_per_digit"] == c["b"]["nll_per_digit"]
assert r["f_identical_to_b"] is True and r["f_differing_docs"] == 0
assert c["d"]["nll_per_digit"] != c["b"]["nll_per_digit"]  # the open fuser does move the receiver
assert r["docs"] == nd and 0 <= r["e_left_out"] <= nd
assert len(r["gates_open"]["k"]) == len(r["gates_open"]["v"]) == 6
assert set(r["verdict"]) == {"b", "d", "e", "f", "g", "h"} and r["verdict"]["f"]["result"] == "pass", r["verdict"]
print("bench json ok: EM a %.2f c %.2f b %.2f d %.2f; NLL b %.3f" % (c["a"]["em"], c["c"]["em"], c["b"]["em"], c["d"]["em"],
      c["b"]["nll_per_digit"]))
PY
# the same documents from the emitter's file give the same figures; without --identity-fuser (g) is skipped
"$kvmesh" c2c docs --model $S --n $ND --split eval -o "$tmp/ev.jsonl"
"$kvmesh" bench c2c --receiver $R --sharer $S --fuser "$tmp/u.c2c.json" --docs-file "$tmp/ev.jsonl" --json "$tmp/b2.json" \
  > "$tmp/out2" 2>/dev/null || { cat "$tmp/out2"; exit 1; }
grep -q "^(g) .*skipped: no --identity-fuser" "$tmp/out2" || { cat "$tmp/out2"; exit 1; }
python3 - "$tmp/bench.json" "$tmp/b2.json" <<'PY'
import json, sys
a, b = (json.load(open(p))["conditions"] for p in sys.argv[1:])
for k in "abcdef":
    assert a[k]["em"] == b[k]["em"] and a[k]["nll_per_digit"] == b[k]["nll_per_digit"], k
assert "skipped" in b["g"]
PY

# --- --timing ---------------------------------------------------------------------------------------------------
"$kvmesh" bench c2c --timing --pair synthetic --tiny --prompt 16,48 --reps 1 --msg-tokens 4 --json "$tmp/t.json" \
  > "$tmp/out" 2>/dev/null || { cat "$tmp/out"; exit 1; }
grep -q "SYNTHETIC weights" "$tmp/out" && grep -q "^    48 | " "$tmp/out" || { cat "$tmp/out"; exit 1; }
"$kvmesh" bench c2c --timing --prompt 64,600 --reps 1 > "$tmp/out2" 2>/dev/null || { cat "$tmp/out2"; exit 1; }
grep -q "^   600 | skipped: prompt + message exceed the models' context (512)" "$tmp/out2" || { cat "$tmp/out2"; exit 1; }
python3 - "$tmp/t.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["synthetic_weights"] and r["msg_tokens"] == 4 and [p["prompt_tokens"] for p in r["prompts"]] == [16, 48]
for p in r["prompts"]:
    c, t = p["c2c"], p["text"]
    assert c["fused_tokens"] == p["prompt_tokens"] - 1 and c["tokens_generated_receiver"] == 1
    assert t["tokens_generated_sharer"] == 4 and t["receiver_prompt_tokens"] == p["prompt_tokens"] + 4
    assert c["wall_ms"] > 0 and c["fuse_ms"] > 0 and t["wall_ms"] > t["sharer_ms"] > 0
PY

# --- bad inputs -------------------------------------------------------------------------------------------------
fails() { # expected status, expected text, args...
  local want_rc=$1 want=$2; shift 2
  set +e; "$kvmesh" bench c2c "$@" > "$tmp/out" 2>&1; local rc=$?; set -e
  [ $rc -eq "$want_rc" ] || { echo "bench c2c $*: exit status $rc, expected $want_rc"; cat "$tmp/out"; exit 1; }
  grep -q -- "$want" "$tmp/out" || { echo "bench c2c $*: message lacks '$want'"; cat "$tmp/out"; exit 1; }
}
B=(--receiver $R --sharer $S)
fails 2 "--receiver, --sharer and --fuser are required" "${B[@]}" --docs 3
fails 1 "fuser: .*$tmp/none.c2c.json" "${B[@]}" --fuser "$tmp/none.c2c.json" --docs 3
"$kvmesh" c2c init --receiver $S --sharer $R -o "$tmp/swapped.c2c.json" > /dev/null
fails 1 "fuser: .*receiver.n_kv_heads\|fuser: .*receiver" "${B[@]}" --fuser "$tmp/swapped.c2c.json" --docs 3
fails 1 "identity fuser" "${B[@]}" --fuser "$tmp/u.c2c.json" --identity-fuser "$tmp/u.c2c.json" --docs 3
fails 2 "--docs must be in \[1, 1000000\], got 0" "${B[@]}" --fuser "$tmp/u.c2c.json" --docs 0
fails 2 "--docs-file excludes --docs, --seed and --facts" "${B[@]}" --fuser "$tmp/u.c2c.json" --docs 3 --docs-file "$tmp/ev.jsonl"
fails 2 "--docs-file excludes --docs, --seed and --facts" "${B[@]}" --fuser "$tmp/u.c2c.json" --seed 1001 --docs-file "$tmp/ev.jsonl"
fails 2 "is a training seed" "${B[@]}" --fuser "$tmp/u.c2c.json" --docs 3 --seed 4
fails 2 "unknown option '--nope'" "${B[@]}" --fuser "$tmp/u.c2c.json" --nope 1
{ head -2 "$tmp/ev.jsonl"; echo '{"i": 2, "facts": 2'; } > "$tmp/bad1.jsonl"
fails 1 "bad1.jsonl:3: not a JSON object" "${B[@]}" --fuser "$tmp/u.c2c.json" --docs-file "$tmp/bad1.jsonl"
badline() { # name, sed expression on the first document, expected message after "NAME.jsonl:1: "
  head -1 "$tmp/ev.jsonl" | sed "$2" > "$tmp/$1.jsonl"
  cmp -s "$tmp/$1.jsonl" <(head -1 "$tmp/ev.jsonl") && { echo "$1: the sed expression changed nothing"; exit 1; }
  fails 1 "$1.jsonl:1: $3" "${B[@]}" --fuser "$tmp/u.c2c.json" --docs-file "$tmp/$1.jsonl"
}
badline bad2 's/"n_fuse":[0-9]*/"n_fuse":3/' "fields 'n' .* and 'n_fuse' (3)"
badline bad3 's/"answer_text":"[0-9]*"/"answer_text":"12a4"/' "field 'answer_text'"
badline bad4 's/"receiver":\[1,/"receiver":[1,1,/' "field 'receiver' has"
badline bad5 's/"sharer":\[1,/"sharer":[99999,/' "field 'sharer': entry 0 is not a token id in \[0, 633)"
badline bad6 's/"sharer":\[1,/"sharer":[7,/' "fields 'sharer' and 'receiver' differ at token 0"
badline bad7 's/{"i"/{"x":1,"i"/' "unknown field 'x'"
badline bad8 's/"answer":\[[0-9]*,/"answer":[/' "field 'answer' has 3 ids, expected 4"
: > "$tmp/empty.jsonl"
fails 1 "holds no document" "${B[@]}" --fuser "$tmp/u.c2c.json" --docs-file "$tmp/empty.jsonl"
fails 1 "cannot read the documents file" "${B[@]}" --fuser "$tmp/u.c2c.json" --docs-file "$tmp/nofile.jsonl"
fails 2 "--pair must be bundled or synthetic" --timing --pair other
fails 2 "--prompt must be a comma list" --timing --prompt 12,x
fails 2 "--tiny is for --pair synthetic" --timing --tiny
fails 2 "--msg-tokens '0' is not an integer" --timing --msg-tokens 0
"$kvmesh" bench --help | grep -q "kvmesh bench c2c" || { echo "bench --help lacks c2c"; exit 1; }
"$kvmesh" bench c2c --help | grep -q "blinded-receiver" || { echo "bench c2c --help"; exit 1; }
echo "bench_c2c ok"
