#!/usr/bin/env bash
# bench_c2c.sh KVMESH SHARED - the C2C blinded-receiver documents and bench (docs/c2c.md "kvmesh bench c2c", spec §9).
# `kvmesh c2c docs`: deterministic for a seed; the sharer's ids are the minitasks recall item rendered as ChatML and
# tokenized by the model's tokenizer (checked against `kvmesh minitasks gen` and `kvmesh tokenize`); the receiver's
# ids have the same length and differ exactly at the value digits, each turned into '#'; bad options exit 2 naming
# the problem.
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
echo "bench_c2c ok"
