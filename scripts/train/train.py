#!/usr/bin/env python3
"""train.py - trains kvmesh's bundled tiny model family on the minitasks suite.

One command does everything, deterministically (fixed seeds; see models/*/README.md):
  1. generates the corpus with the C generator (`minigen`, a static build of `kvmesh minitasks`),
  2. trains a byte-level BPE tokenizer (HF `tokenizers`; digits split one by one, ChatML specials),
  3. trains the receiver (LlamaForCausalLM) and the sharer (Qwen3ForCausalLM) at the same time on one
     GPU (two processes): random items packed into 512-token rows (~24K real tokens a step; v1's padded
     64-item batches with --pack off), per-item answer loss + 0.2 x LM loss on the other tokens, a
     curriculum pool (--easy-spec), optional auxiliary items (--aux-kinds; 'bind' is what made recall
     learnable in v2), quick evals every 1,000 steps, a schedule that anneals by the step count or the
     wall-clock deadline; --init-dir continues from exported models (see train_one),
  4. evaluates each greedily with transformers on held-out items (split eval, seed 1000),
  5. exports each in the HF layout (bf16 safetensors) with a model card and a logits fixture
     (fp32 CPU logits of the exported weights, for kvmesh's parity test).

Usage (on the GPU machine; see docs/models.md for the exact command used):
  PYTHONUNBUFFERED=1 python3 scripts/train/train.py --minigen .gpu-train/minigen --work /tmp/kvtrain \
      --out $OUT --budget-s 405 [--smoke] [--init-dir DIR --aux-frac 0.5 ...]
(v2's runs: scripts/train/reproduce_v2.sh and docs/models.md, "Reproducing v2".)
Needs torch, transformers (v5) and tokenizers; no network.
"""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import time

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRAIN_SEED = 1          # corpus seed (split train)
TOK_SEED = 2            # tokenizer corpus seed (split train)
EASY_SEED = 3           # curriculum items (recall/team with 2-8 facts; --easy-frac)
EVAL_SEED = 1000        # held-out items (split eval)
SCORED_TASKS = ["recall", "arithmetic", "transform", "team"]

# Model shapes. The sharer differs from the receiver in family, width, depth, head_dim, KV heads
# and RoPE base.
MODELS = {
    "receiver": dict(family="llama", hidden=192, ffn=512, layers=6, heads=6, kv_heads=2, head_dim=32,
                     rope_theta=10000.0, rms_eps=1e-5, lr=1e-3, seed=1101),
    "sharer": dict(family="qwen3", hidden=256, ffn=768, layers=6, heads=8, kv_heads=4, head_dim=48,
                   rope_theta=1000000.0, rms_eps=1e-6, lr=1e-3, seed=2202),
}
MODEL_NAMES = {"receiver": "minillama-2m", "sharer": "miniqwen3-6m"}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def render(item, with_answer):
    s = ("<|im_start|>system\n" + item["system"] + "<|im_end|>\n<|im_start|>user\n" + item["user"] +
         "<|im_end|>\n<|im_start|>assistant\n")
    if with_answer:
        s += item["answer"] + "<|im_end|>\n"
    return s


def minigen(path, *args):
    out = subprocess.run([path, "gen", *map(str, args)], check=True, capture_output=True, text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l]


# ------------------------------------------------------------------------------------------------
# tokenizer

def train_tokenizer(args, tok_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    items = minigen(args.minigen, "--seed", TOK_SEED, "--n", 40000 if not args.smoke else 4000, "--split", "train")
    texts = []
    for it in items:  # specials are not BPE material: train on the plain pieces
        texts += ["system\n" + it["system"], "user\n" + it["user"], "assistant\n" + it["answer"]]
    tok = Tokenizer(models.BPE())
    # Spaces are isolated first, so a word is the same token wherever it stands: "Theo" in the fact line
    # "Theo: 8811" and in the question "Ask: Theo" (v0's ByteLevel regex made the latter " Theo", a
    # different token, and no model learned the lookup).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", "isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    os.makedirs(tok_dir, exist_ok=True)
    tok.save(os.path.join(tok_dir, "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    assert ids == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}, ids
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for s, i in ids.items()}
    cfg = {
        "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": added,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    log(f"tokenizer: {tok.get_vocab_size()} tokens; sample:",
        tok.encode(render(items[0], True)).tokens[:40])
    # The HF chat template must render exactly what the generator renders (kvmesh picks ChatML from it).
    try:
        from transformers import AutoTokenizer
        hft = AutoTokenizer.from_pretrained(tok_dir)
        it = items[0]
        msgs = [{"role": "system", "content": it["system"]}, {"role": "user", "content": it["user"]}]
        txt = hft.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert txt == render(it, False), (txt, render(it, False))
        assert hft.encode(txt, add_special_tokens=True) == tok.encode(txt).ids
        log("tokenizer: transformers chat template and encoding agree")
    except AssertionError:
        raise
    except Exception as e:  # an API difference must not cost the training run
        log("tokenizer: WARNING transformers check skipped:", repr(e))
    return tok


# ------------------------------------------------------------------------------------------------
# data

def encode_items(tok, items, check=0):
    """Returns (ids arrays, n_prompt list, n_end list). An item is encoded as
    ids = enc(prompt) + enc(answer) + [<|im_end|>] + enc("\\n"): the prompt exactly as kvmesh tokenizes
    it at inference, and the answer as the model must generate it. The loss covers ids[n_prompt:n_end+1]
    (the answer and its <|im_end|>). For the first `check` items, differences from the joint encoding of
    the whole text are reported (information only)."""
    import numpy as np
    nl = tok.encode("\n").ids
    ps = tok.encode_batch([render(it, False) for it in items])
    ans = tok.encode_batch([it["answer"] for it in items])
    out_ids, out_np, out_end = [], [], []
    shown = 0
    for k, (p, a) in enumerate(zip(ps, ans)):
        ids = p.ids + a.ids + [2] + nl
        if k < check:
            full = tok.encode(render(items[k], True)).ids
            if full != ids and shown < 3:
                shown += 1
                j = next((i for i in range(min(len(full), len(ids))) if full[i] != ids[i]), None)
                log(f"data: note: joint encoding differs at {j}: joint {tok.decode(full[:0]) if j is None else full[max(0,j-3):j+4]}"
                    f" vs split {ids[max(0,(j or 0)-3):(j or 0)+4]} pieces {tok.encode(render(items[k], True)).tokens[max(0,(j or 0)-3):(j or 0)+4]}")
        out_ids.append(np.array(ids, dtype=np.int16))
        out_np.append(len(p.ids))
        out_end.append(len(p.ids) + len(a.ids))  # index of <|im_end|>
    return out_ids, out_np, out_end


def prepare_data(args, tok, work):
    import numpy as np
    from collections import Counter
    n = args.n_train
    log(f"data: generating {n} training items (seed {TRAIN_SEED}, split train)")
    t0 = time.time()
    arrs, n_p, n_end, tasks = [], [], [], Counter()
    n_mix_items = 0
    chunk = 100000
    # Curriculum pool (seed EASY_SEED), a fraction easy_frac of the corpus on top of the n mixture items:
    # recall and team with 2-8 facts (content lookup is found on short contexts first) and arithmetic,
    # a third each.
    n_easy = int(n * args.easy_frac)
    plan = [("mix", s, min(chunk, n - s)) for s in range(0, n, chunk)]
    plan += [("easy", s, min(chunk, n_easy - s)) for s in range(0, n_easy, chunk)]
    spec = parse_easy_spec(args.easy_spec)
    wsum = sum(w for _, _, w in spec)
    task_codes = []
    for kind, start, cnt in plan:
        if kind == "mix":
            items = minigen(args.minigen, "--seed", TRAIN_SEED, "--n", cnt, "--start", start, "--split", "train")
        else:
            # the curriculum pool: --easy-spec parts (task, facts range, weight), e.g. recall and team with
            # 2-8 facts (content lookup is found on short contexts first) and extra arithmetic
            items = []
            for k, (t, facts, w) in enumerate(spec):
                m = int(cnt * w / wsum)
                st = int(start * w / wsum)
                extra = ["--facts", facts] if facts else []
                # each part draws from its own seed offset, so two parts of one task differ
                items += minigen(args.minigen, "--seed", EASY_SEED + 10 * k, "--n", m, "--start", st,
                                 "--split", "train", "--task", t, *extra)
            if args.aux_frac > 0:
                items += aux_items(args, start, int(cnt * args.aux_frac))
        tasks.update(it["task"] for it in items)
        task_codes += [TASK_CODES.get(it["task"], len(TASK_CODES)) for it in items]
        if kind == "mix":
            n_mix_items += len(items)
        a, b, c = encode_items(tok, items, check=1000 if start == 0 else 0)
        arrs += a
        n_p += b
        n_end += c
    lens = np.array([len(x) for x in arrs], dtype=np.int64)
    offs = np.zeros(len(arrs) + 1, dtype=np.int64)
    offs[1:] = np.cumsum(lens)
    flat = np.concatenate(arrs)
    np.savez(os.path.join(work, "train.npz"), flat=flat, offs=offs, n_prompt=np.array(n_p, np.int32),
             n_end=np.array(n_end, np.int32), n_mix=np.array(n_mix_items),
             task=np.array(task_codes, np.int8))
    log(f"data: {len(arrs)} items, {int(offs[-1])} tokens, max len {lens.max()}, mean {lens.mean():.1f}, "
        f"tasks {dict(tasks)}, {time.time() - t0:.1f}s")
    if lens.max() > 512:
        raise SystemExit("an item is longer than the 512-token context")


AUX_SEED = 5            # auxiliary training-only items (--aux-frac)
TASK_CODES = {"recall": 0, "arithmetic": 1, "transform": 2, "team": 3, "story": 4, "aux-line": 5, "aux-copy": 6,
              "aux-bind": 7}
TASK_NAMES = {v: k for k, v in TASK_CODES.items()}


def parse_easy_spec(spec):
    """'recall:2-8:1,team:2-8:1,arithmetic::1' -> [(task, facts or '', weight)]"""
    out = []
    for part in spec.split(","):
        f = part.strip().split(":")
        if len(f) != 3 or f[0] not in TASK_CODES:
            raise SystemExit(f"--easy-spec: bad part {part!r} (want TASK:FACTS:WEIGHT, FACTS may be empty)")
        out.append((f[0], f[1], float(f[2])))
    return out


def parse_shape(spec):
    """'layers=8,ffn=448' -> {'layers': 8, 'ffn': 448} (model shape overrides, --shape)."""
    out = {}
    for part in spec.split(","):
        k, v = part.split("=")
        out[k.strip()] = float(v) if k.strip() in ("rope_theta", "rms_eps", "lr") else int(v)
    return out


def pack_rows(item_lens, row_len):
    """First-fit decreasing: packs items (given by length) into rows of at most row_len tokens.
    Returns a list of rows, each a list of indices into item_lens."""
    order = sorted(range(len(item_lens)), key=lambda k: -item_lens[k])
    rows, used = [], []
    for k in order:
        n = item_lens[k]
        for r in range(len(rows)):
            if used[r] + n <= row_len:
                rows[r].append(k)
                used[r] += n
                break
        else:
            rows.append([k])
            used.append(n)
    return rows


def aux_items(args, start, cnt):
    """Training-only auxiliary items built from recall contents (seed AUX_SEED, --aux-facts facts), never
    scored, of the kinds in --aux-kinds, in turn:
    'line' (answer the asked fact's whole line, "Theo: 8811"), 'copy' (repeat the facts): plain induction;
    'bind': recall items (same role prompts) whose fact lines put the number closer to its name --
    "Theo8811" (the number right after the name) or "Theo:8811" -- instead of "Theo: 8811". Recall needs
    the name bound to the digits three tokens after it (a previous-token head) and a head that matches the
    asked name against those bound names; neither gets a gradient until the other exists. With the number
    adjacent to the name the binding is one token away, where it forms first; the gap then widens to the
    real format's three tokens (a curriculum over the binding distance)."""
    kinds = [k for k in args.aux_kinds.split(",") if k]
    base = minigen(args.minigen, "--seed", AUX_SEED, "--n", cnt, "--start", start, "--split", "train",
                   "--task", "recall", "--facts", args.aux_facts)
    out = []
    for k, it in enumerate(base):
        lines = it["user"].split("\n")
        facts, ask = lines[:-1], lines[-1][len("Ask: "):]
        kind = kinds[k % len(kinds)]
        if kind == "line":
            ans = next(l for l in facts if l.split(":")[0] == ask)
            out.append({"task": "aux-line", "system": "Answer with the line of the asked name.",
                        "user": it["user"], "answer": ans})
        elif kind == "copy":
            out.append({"task": "aux-copy", "system": "Copy the facts.", "user": "\n".join(facts),
                        "answer": "\n".join(facts)})
        else:
            sep = ("", ":")[(k // len(kinds)) % 2]
            user = "\n".join(l.replace(": ", sep) for l in facts) + "\n" + lines[-1]
            out.append({"task": "aux-bind", "system": it["system"], "user": user, "answer": it["answer"]})
    return out


def make_batches(rng, lens, budget, chunk=16384):
    """Length-bucketed batches: shuffle, sort each chunk by length, cut by padded-token budget."""
    idx = list(range(len(lens)))
    rng.shuffle(idx)
    batches = []
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s:s + chunk], key=lambda i: lens[i])
        cur, cur_max = [], 0
        for i in part:
            m = max(cur_max, lens[i])
            if cur and m * (len(cur) + 1) > budget:
                batches.append(cur)
                cur, m = [], lens[i]
            cur.append(i)
            cur_max = m
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


# ------------------------------------------------------------------------------------------------
# models

def build_model(kind, vocab):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    h = MODELS[kind]
    common = dict(vocab_size=vocab, hidden_size=h["hidden"], intermediate_size=h["ffn"],
                  num_hidden_layers=h["layers"], num_attention_heads=h["heads"],
                  num_key_value_heads=h["kv_heads"], head_dim=h["head_dim"], max_position_embeddings=512,
                  rms_norm_eps=h["rms_eps"], rope_theta=h["rope_theta"], tie_word_embeddings=bool(h.get("tie", 1)),
                  bos_token_id=None, eos_token_id=2, pad_token_id=0, attention_bias=False,
                  hidden_act="silu", initializer_range=0.02, use_cache=False)
    if h["family"] == "llama":
        cfg, cls = LlamaConfig(mlp_bias=False, **common), LlamaForCausalLM
    else:
        cfg, cls = Qwen3Config(use_sliding_window=False, **common), Qwen3ForCausalLM
    # transformers v5 keeps the RoPE base in rope_parameters: make sure ours is the one used.
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = h["rope_theta"]
        rp.setdefault("rope_type", "default")
    torch.manual_seed(h["seed"])
    model = cls(cfg)
    inv = model.model.rotary_emb.inv_freq.float()
    want = h["rope_theta"] ** (-2.0 / h["head_dim"])
    assert abs(inv[1].item() - want) < 1e-6 * max(1.0, want) + 1e-9, (inv[:3], want)
    return model


def hidden_at(model, x):
    return model.model(input_ids=x, use_cache=False).last_hidden_state


def greedy(model, tok, prompts, max_new=40, batch=256, autocast=True):
    """Batched greedy decoding without a cache: right-padded rows, logits read at each row's last token."""
    import torch
    dev = next(model.parameters()).device
    outs = [[] for _ in prompts]
    for b0 in range(0, len(prompts), batch):
        seqs = [list(p) for p in prompts[b0:b0 + batch]]
        done = [False] * len(seqs)
        for _ in range(max_new):
            act = [i for i in range(len(seqs)) if not done[i]]
            if not act:
                break
            L = max(len(seqs[i]) for i in act)
            x = torch.zeros((len(act), L), dtype=torch.long)
            for r, i in enumerate(act):
                x[r, :len(seqs[i])] = torch.tensor(seqs[i])
            x = x.to(dev)
            last = torch.tensor([len(seqs[i]) - 1 for i in act], device=dev)
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                h = hidden_at(model, x)
                logits = model.lm_head(h[torch.arange(len(act), device=dev), last]).float()
            nxt = logits.argmax(-1).tolist()
            for r, i in enumerate(act):
                t = nxt[r]
                if t == 2 or len(seqs[i]) >= 512:
                    done[i] = True
                else:
                    seqs[i].append(t)
                    outs[b0 + i].append(t)
    return [tok.decode(o, skip_special_tokens=True) for o in outs]


def evaluate(model, tok, eval_items, autocast=True):
    """eval_items: task -> list of items (every role of each content, in order). Returns the report."""
    model.eval()
    rep = {}
    for task, items in eval_items.items():
        prompts = [tok.encode(render(it, False)).ids for it in items]
        outs = greedy(model, tok, prompts, max_new=40 if task != "story" else 120, autocast=autocast)
        per_role, by_content = {}, {}
        for it, o in zip(items, outs):
            ok = o.strip() == it["answer"]
            r = per_role.setdefault(it["role"], [0, 0])
            r[0] += ok
            r[1] += 1
            cid = it["id"].rsplit("/", 1)[0]
            by_content[cid] = by_content.get(cid, True) and ok
        n_ok = sum(v[0] for v in per_role.values())
        rep[task] = {"acc": n_ok / len(items), "n": len(items),
                     "roles": {k: v[0] / v[1] for k, v in per_role.items()},
                     "all_roles_right": sum(by_content.values()) / len(by_content)}
        bad = [(it["id"], it["answer"], o) for it, o in zip(items, outs) if o.strip() != it["answer"]][:3]
        log(f"  eval {task}: acc {rep[task]['acc']:.4f} roles " +
            " ".join(f"{k}={v:.3f}" for k, v in rep[task]["roles"].items()) +
            f" all-roles {rep[task]['all_roles_right']:.3f}  e.g. wrong: {bad}")
    model.train()
    return rep


def train_one(args, kind):
    """Trains one model. Batches are --batch-items items drawn at random (tasks mixed in every step,
    padded to the longest), a fraction of them from the short-context curriculum pool (recall/team
    with 2-8 facts) that falls linearly from --easy-start to --easy-end over training. The loss is the
    mean cross-entropy on the answer tokens (and <|im_end|>) plus --lm-weight times the mean
    cross-entropy on every other token of the rendered item (next-token LM loss on system, user and
    markers). The LR schedule (warm-up, cosine to 10%) runs on max(step progress, wall-clock progress
    towards the deadline), so a run cut by the deadline still ends annealed. A quick greedy eval runs
    every --eval-every steps; the best checkpoint by mean accuracy over the scored tasks is exported."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer
    torch.backends.cuda.matmul.allow_tf32 = True
    work = args.work
    tok = Tokenizer.from_file(os.path.join(work, "tok", "tokenizer.json"))
    d = np.load(os.path.join(work, "train.npz"))
    flat, offs, n_prompt, n_end = d["flat"].astype(np.int64), d["offs"], d["n_prompt"], d["n_end"]
    n_mix = int(d["n_mix"])
    lens = (offs[1:] - offs[:-1]).tolist()
    n_all = len(lens)
    h = dict(MODELS[kind])
    if args.shape:
        MODELS[kind].update(parse_shape(args.shape))
        h = dict(MODELS[kind])
    lr_arg = args.receiver_lr if kind == "receiver" else args.sharer_lr
    if lr_arg:
        h["lr"] = lr_arg
    steps = args.receiver_steps if kind == "receiver" else args.sharer_steps
    dev = torch.device("cuda")
    if args.init_dir:  # continue training an exported model (bf16 weights upcast to fp32)
        from transformers import AutoModelForCausalLM
        src = os.path.join(args.init_dir, MODEL_NAMES[kind])
        torch.manual_seed(h["seed"])
        try:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        except TypeError:
            model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
        model.config.use_cache = False
        model = model.to(dev)
        log(f"[{kind}] continuing from {src}")
    else:
        model = build_model(kind, tok.get_vocab_size()).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[{kind}] {type(model).__name__} {n_params/1e6:.2f}M params, {steps} steps, lr {h['lr']}, "
        f"{args.batch_items} items/batch, lm-weight {args.lm_weight}, easy {args.easy_start}->{args.easy_end} "
        f"(pool {n_all - n_mix} easy / {n_mix} mix)")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=h["lr"], betas=(0.9, 0.95), eps=1e-8, fused=True)
    warm = args.warmup if args.warmup else min(500, steps // 10 + 1)
    t0 = time.time()
    span = (args.deadline - t0) if args.deadline else 0.0

    def progress(s):
        p = s / steps
        if span > 0:
            p = max(p, (time.time() - t0) / span)
        return min(1.0, p)

    def lr_at(s, p):
        if s < warm:
            return h["lr"] * (s + 1) / warm
        return h["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    rng = np.random.default_rng(h["seed"])
    ef = ["--facts", args.eval_facts] if args.eval_facts else []
    eval_items = {t: minigen(args.minigen, "--seed", EVAL_SEED, "--n", args.n_eval_quick, "--task", t,
                             "--split", "eval", "--role", "all", *(ef if t in ("recall", "team") else []))
                  for t in SCORED_TASKS}
    lens_np = np.array(lens)
    task_np = d["task"] if "task" in d.files else np.full(n_all, -1, np.int8)
    row_len = 512

    def draw_items(rng_, pe, budget):
        """Random items (a share pe from the curriculum pool) until `budget` real tokens."""
        est = max(8, int(budget / max(1.0, float(lens_np.mean()))) * 2)
        k_easy = int(rng_.binomial(est, pe)) if pe > 0 and n_all > n_mix else 0
        cand = np.concatenate([rng_.integers(0, n_mix, est - k_easy),
                               rng_.integers(n_mix, n_all, k_easy) if k_easy else np.zeros(0, np.int64)])
        rng_.shuffle(cand)
        cum = np.cumsum(lens_np[cand])
        n = int(np.searchsorted(cum, budget)) + 1
        return cand[:min(n, len(cand))]

    def build_packed(b, mode):
        """Packs items b into rows: ids, position ids restarting at 0 per item (the tail of a row is a
        padding pseudo-item), labels (-100 where nothing is predicted), per-position answer weight
        1/len(answer) of its item (per-item averaging: a 4-token recall answer weighs as much as a
        100-token story), task code per position, and, for mode "mask4", an explicit block-diagonal
        causal mask (True = may attend)."""
        rows = pack_rows([int(lens_np[i]) for i in b], row_len)
        L = max(sum(int(lens_np[b[k]]) for k in r) for r in rows)
        R = len(rows)
        x = np.zeros((R, L), np.int64)
        pos = np.zeros((R, L), np.int64)
        lab = np.full((R, L), -100, np.int64)
        aw = np.zeros((R, L), np.float32)
        tc = np.full((R, L), -1, np.int64)
        seg = np.zeros((R, L), np.int64)
        for r, row in enumerate(rows):
            o = 0
            for j, k in enumerate(row):
                i = b[k]
                seq = flat[offs[i]:offs[i + 1]]
                n = len(seq)
                x[r, o:o + n] = seq
                pos[r, o:o + n] = np.arange(n)
                lab[r, o:o + n - 1] = seq[1:]
                s0, s1 = o + n_prompt[i] - 1, o + n_end[i]
                aw[r, s0:s1] = 1.0 / max(1, s1 - s0)
                tc[r, s0:s1] = task_np[i]
                seg[r, o:o + n] = j + 1
                o += n
            pos[r, o:] = np.arange(L - o)
        mask4 = None
        t = lambda a_: torch.from_numpy(a_).to(dev, non_blocking=True)
        if mode == "mask4":
            sg = t(seg)
            same = sg[:, :, None] == sg[:, None, :]
            causal = torch.ones((L, L), dtype=torch.bool, device=dev).tril()
            mask4 = (same & causal[None]).unsqueeze(1)
        return t(x), t(pos), t(lab), t(aw), t(tc), mask4

    def packed_loss(hs, lab, aw, tc, n_items):
        m = lab != -100
        logits = model.lm_head(hs[m]).float()
        ce = torch.nn.functional.cross_entropy(logits, lab[m], reduction="none")
        w = aw[m]
        isa = w > 0
        ans_loss = (ce * w).sum() / n_items
        lm_loss = ce[~isa].mean()
        loss = ans_loss + args.lm_weight * lm_loss if args.lm_weight > 0 else ans_loss
        tcm = tc[m]

        def per_task():  # mean per-item answer loss by task (logging only)
            out = {}
            for code in torch.unique(tcm[isa]).tolist():
                sel = isa & (tcm == code)
                out[code] = ((ce[sel] * w[sel]).sum() / w[sel].sum()).item()
            return out
        return loss, ans_loss, lm_loss, per_task

    def check_packing():
        """Packed rows must give each item the logits it gets alone; tries position-id packing (the
        model builds the block-diagonal mask from restarting position ids), then an explicit 4-D mask,
        else falls back to padded batches."""
        if args.pack == "off":
            return "pad"
        b = np.array([0, 1, 2, n_all - 1, n_all // 2])
        model.eval()
        torch.backends.cuda.matmul.allow_tf32 = False
        ok_mode = "pad"
        for mode in ("posids", "mask4"):
            x, pos, lab, aw, tc, mask4 = build_packed(b, mode)
            with torch.no_grad():
                hp = model.model(input_ids=x, position_ids=pos, attention_mask=mask4, use_cache=False).last_hidden_state
                worst = 0.0
                rows = pack_rows([int(lens_np[i]) for i in b], row_len)
                for r, row in enumerate(rows):
                    o = 0
                    for k in row:
                        i = b[k]
                        seq = torch.from_numpy(flat[offs[i]:offs[i + 1]].copy()).to(dev)[None]
                        ha = model.model(input_ids=seq, use_cache=False).last_hidden_state[0]
                        n = seq.shape[1]
                        worst = max(worst, (hp[r, o:o + n] - ha).abs().max().item() / (ha.abs().max().item() + 1e-9))
                        o += n
            log(f"[{kind}] packing check ({mode}): max rel diff to unpacked {worst:.2e}")
            if worst < 1e-3:
                ok_mode = mode
                break
        model.train()
        torch.backends.cuda.matmul.allow_tf32 = True
        if ok_mode == "pad":
            log(f"[{kind}] WARNING packing does not reproduce unpacked logits: padded batches")
        return ok_mode

    pack_mode = check_packing()
    curve = []
    evals = []
    best = (-1.0, None, 0)
    model.train()
    done_steps = steps
    for step in range(steps):
        p = progress(step)
        if p >= 1.0 and step < steps:
            done_steps = step
            log(f"[{kind}] deadline reached: stopping at step {step} of {steps}")
            break
        pe = args.easy_start + (args.easy_end - args.easy_start) * p if n_all > n_mix else 0.0
        lr = lr_at(step, p)
        for g in opt.param_groups:
            g["lr"] = lr
        if pack_mode != "pad":
            # draw items until --step-tokens real tokens, pack them into rows of <= 512 tokens
            b = draw_items(rng, pe, args.step_tokens)
            x, pos, lab, aw, tcode, mask4 = build_packed(b, pack_mode)
            k_easy = int((b >= n_mix).sum())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                hs = model.model(input_ids=x, position_ids=pos, attention_mask=mask4, use_cache=False).last_hidden_state
                loss, ans_loss, lm_loss, per_task = packed_loss(hs, lab, aw, tcode, len(b))
        else:
            k_easy = int(rng.binomial(args.batch_items, pe)) if pe > 0 else 0
            b = np.concatenate([rng.integers(0, n_mix, args.batch_items - k_easy),
                                rng.integers(n_mix, n_all, k_easy) if k_easy else np.zeros(0, np.int64)])
            L = int(lens_np[b].max())
            x = np.zeros((len(b), L), dtype=np.int64)
            lab = np.full((len(b), L), -100, dtype=np.int64)
            isans = np.zeros((len(b), L), dtype=bool)
            for r, i in enumerate(b):
                seq = flat[offs[i]:offs[i + 1]]
                n = len(seq)
                x[r, :n] = seq
                lab[r, :n - 1] = seq[1:]
                # position t predicts token t+1: the answer part is t+1 in [n_prompt, n_end]
                isans[r, n_prompt[i] - 1:n_end[i]] = True
            x = torch.from_numpy(x).to(dev, non_blocking=True)
            lab = torch.from_numpy(lab).to(dev, non_blocking=True)
            isans = torch.from_numpy(isans).to(dev, non_blocking=True)
            per_task = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                hs = hidden_at(model, x)
                m = lab != -100
                logits = model.lm_head(hs[m]).float()
                ce = torch.nn.functional.cross_entropy(logits, lab[m], reduction="none")
                a = isans[m]
                ans_loss = ce[a].mean()
                lm_loss = ce[~a].mean()
                loss = ans_loss + args.lm_weight * lm_loss if args.lm_weight > 0 else ans_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            lv, lm = ans_loss.item(), lm_loss.item()
            curve.append((step, round(lv, 5)))
            if step % 250 == 0 or step == steps - 1:
                el = time.time() - t0
                log(f"[{kind}] step {step}/{steps} answer loss {lv:.4f} lm loss {lm:.4f} lr {lr:.2e} p {p:.3f} "
                    f"{el:.0f}s ({1000*el/(step+1):.0f} ms/step) items {len(b)} rows {tuple(x.shape)} easy {k_easy}" +
                    ("" if per_task is None else " | per-task answer loss " +
                     " ".join(f"{TASK_NAMES.get(t, t)}={v:.3f}" for t, v in per_task().items())))
        if args.eval_every and step and step % args.eval_every == 0:
            rep = evaluate(model, tok, eval_items)
            sc = sum(r["acc"] for r in rep.values()) / len(rep)
            evals.append((step, {t: round(r["acc"], 4) for t, r in rep.items()}))
            log(f"[{kind}] QUICK EVAL step {step}: mean {sc:.4f} " +
                " ".join(f"{t}={r['acc']:.3f}" for t, r in rep.items()))
            if sc >= best[0]:
                best = (sc, {k: v.detach().clone() for k, v in model.state_dict().items()}, step)
    rep = evaluate(model, tok, eval_items)
    sc = sum(r["acc"] for r in rep.values()) / len(rep)
    evals.append((done_steps, {t: round(r["acc"], 4) for t, r in rep.items()}))
    log(f"[{kind}] QUICK EVAL final (step {done_steps}): mean {sc:.4f} " +
        " ".join(f"{t}={r['acc']:.3f}" for t, r in rep.items()))
    chosen = done_steps
    if best[1] is not None and best[0] > sc + 0.005:
        model.load_state_dict(best[1])
        chosen = best[2]
        log(f"[{kind}] exporting the step-{chosen} checkpoint (quick-eval mean {best[0]:.4f} > final {sc:.4f})")
    train_s = time.time() - t0
    log(f"[{kind}] trained in {train_s:.0f}s")
    args._evals, args._chosen = evals, chosen
    export(args, kind, model, tok, train_s, curve, n_params, done_steps)


def export(args, kind, model, tok, train_s, curve, n_params, done_steps):
    import shutil
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    name = args.name or MODEL_NAMES[kind]
    out = os.path.join(args.work, "export", "models", name)
    os.makedirs(out, exist_ok=True)
    model.eval()
    m16 = model.to(torch.bfloat16)
    m16.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, do_sample=False, max_new_tokens=64)
    m16.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(args.work, "tok", f), os.path.join(out, f))
    # kvmesh reads a top-level rope_theta; transformers v5 writes rope_parameters: keep both.
    cp = os.path.join(out, "config.json")
    cfg = json.load(open(cp))
    rt = MODELS[kind]["rope_theta"]
    if "rope_theta" not in cfg:
        cfg["rope_theta"] = rt
    json.dump(cfg, open(cp, "w"), indent=2, sort_keys=True)
    # Reload the exported bf16 weights upcast to fp32 (what kvmesh computes with) and evaluate those.
    del model, m16
    torch.cuda.empty_cache()
    try:
        mr = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    except TypeError:
        mr = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    mr = mr.cuda()
    eval_items = {t: minigen(args.minigen, "--seed", EVAL_SEED, "--n", args.n_eval, "--task", t, "--split", "eval",
                             "--role", "all") for t in SCORED_TASKS}
    log(f"[{kind}] final HF eval of the exported weights (fp32, {args.n_eval} contents per task, all roles)")
    torch.backends.cuda.matmul.allow_tf32 = False
    rep = evaluate(mr, tok, eval_items, autocast=False)
    story = minigen(args.minigen, "--seed", EVAL_SEED, "--n", 2, "--task", "story", "--split", "eval")
    samples = greedy(mr, tok, [tok.encode(render(s, False)).ids for s in story], max_new=120, autocast=False)
    log(f"[{kind}] story sample: {samples[0]!r}")
    fixture(args, kind, name, out)
    info = {
        "name": name, "kind": kind, "arch": type(mr).__name__, "params": n_params, "shape": MODELS[kind],
        "vocab": tok.get_vocab_size(), "steps": done_steps,
        "planned_steps": args.receiver_steps if kind == "receiver" else args.sharer_steps,
        "batch_tokens": args.batch_tokens, "n_train_items": args.n_train, "easy_frac": args.easy_frac,
        "peak_lr": (args.receiver_lr if kind == "receiver" else args.sharer_lr) or MODELS[kind]["lr"], "train_seconds": round(train_s, 1),
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "tokenizers": __import__("tokenizers").__version__, "loss_curve": curve,
        "final_loss": curve[-1][1], "hf_eval": rep, "quick_evals": getattr(args, "_evals", []),
        "exported_step": getattr(args, "_chosen", done_steps), "batch_items": args.batch_items,
        "lm_weight": args.lm_weight, "init_dir": args.init_dir, "aux_frac": args.aux_frac, "easy_start": args.easy_start, "easy_end": args.easy_end,
        "warmup": args.warmup, "story_sample": samples[0], "smoke": args.smoke,
        "easy_spec": args.easy_spec, "pack": args.pack, "step_tokens": args.step_tokens, "tag": args.tag,
    }
    json.dump(info, open(os.path.join(args.work, "export", f"train-{name}.json"), "w"), indent=1)
    if args.out:  # each model comes back on its own, whatever happens to the other
        os.makedirs(args.out, exist_ok=True)
        subprocess.run(["tar", "czf", os.path.join(args.out, f"{name}{args.tag}.tgz"), "-C", os.path.join(args.work, "export"),
                        f"models/{name}", f"fixtures/{name}.json", f"train-{name}.json"], check=True)
        log(f"[{kind}] packed {name}{args.tag}.tgz")


def fixture(args, kind, name, model_dir):
    """fp32 CPU logits of the exported weights for a fixed prompt: the last 8 rows + argmax of all rows."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    it = minigen(args.minigen, "--seed", 4242, "--n", 1, "--task", "team", "--split", "eval", "--role", "checker")[0]
    ids = tok.encode(render(it, True)).ids
    try:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    except TypeError:
        m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    m.eval()
    with torch.no_grad():
        lg = m(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    rows = 8
    fx = {
        "model": f"models/{name}", "prompt_id": it["id"], "text": render(it, True), "ids": ids,
        "n_tokens": len(ids), "vocab": lg.shape[1], "rows_from": len(ids) - rows,
        "argmax_all": lg.argmax(-1).tolist(),
        "logits": [[float(f"{v:.9g}") for v in lg[len(ids) - rows + r].tolist()] for r in range(rows)],
        "note": "transformers fp32 on CPU, eager attention, bf16 weights upcast to fp32",
    }
    d = os.path.join(args.work, "export", "fixtures")
    os.makedirs(d, exist_ok=True)
    json.dump(fx, open(os.path.join(d, f"{name}.json"), "w"))
    log(f"[{kind}] fixture: {len(ids)} tokens, max|logit| {lg.abs().max().item():.3f}")


# ------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minigen", required=True)
    ap.add_argument("--work", default="/tmp/kvtrain")
    ap.add_argument("--out", default=None, help="folder for the result tar (models.tgz)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--phase", default="all", choices=["all", "receiver", "sharer"])
    ap.add_argument("--receiver-steps", type=int, default=14000)
    ap.add_argument("--sharer-steps", type=int, default=14000)
    ap.add_argument("--batch-tokens", type=int, default=65536)
    ap.add_argument("--receiver-lr", type=float, default=0.0, help="peak lr (default: MODELS table, 1e-3)")
    ap.add_argument("--sharer-lr", type=float, default=0.0, help="peak lr (default: MODELS table, 1e-3)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps (default min(500, steps/10+1))")
    ap.add_argument("--easy-frac", type=float, default=0.3,
                    help="extra recall/team items with 2-8 facts, as a fraction of --n-train (curriculum)")
    ap.add_argument("--only", default="both", choices=["both", "receiver", "sharer"],
                    help="train one model only (e.g. one per GPU call)")
    ap.add_argument("--batch-items", type=int, default=64, help="items per batch (random, tasks mixed)")
    ap.add_argument("--lm-weight", type=float, default=0.2,
                    help="weight of the mean LM loss on non-answer tokens (0 = answer loss only)")
    ap.add_argument("--easy-start", type=float, default=0.5, help="share of curriculum items at the start")
    ap.add_argument("--easy-end", type=float, default=0.15, help="share of curriculum items at the end")
    ap.add_argument("--init-dir", default="",
                    help="continue from exported models in DIR/<name> (their tokenizer is reused, not retrained)")
    ap.add_argument("--aux-frac", type=float, default=0.0,
                    help="auxiliary induction items (aux_items) added to the curriculum pool, per pool item")
    ap.add_argument("--easy-spec", default="recall:2-8:1,team:2-8:1,arithmetic::1",
                    help="curriculum pool parts TASK:FACTS:WEIGHT (v1: recall:2-8:1,team:2-8:1,arithmetic::1)")
    ap.add_argument("--pack", default="on", choices=["on", "off"],
                    help="pack items into 512-token rows (checked against unpacked logits at start; "
                         "off = v1's padded --batch-items batches)")
    ap.add_argument("--step-tokens", type=int, default=24576, help="real tokens per step when packing")
    ap.add_argument("--shape", default="", help="model shape overrides, e.g. layers=8,ffn=448")
    ap.add_argument("--tokenizer-dir", default="",
                    help="reuse this model folder's tokenizer (a new member of the family: fresh weights)")
    ap.add_argument("--name", default="", help="name of the exported model (default minillama-2m / miniqwen3-6m)")
    ap.add_argument("--eval-facts", default="", help="facts range of the quick evals' recall/team items (experiments)")
    ap.add_argument("--tag", default="", help="suffix of the result tar's name (experiments side by side)")
    ap.add_argument("--aux-kinds", default="line,copy", help="auxiliary item kinds: line, copy, bind (aux_items)")
    ap.add_argument("--aux-facts", default="2-16", help="facts range of the auxiliary items")
    ap.add_argument("--n-train", type=int, default=500000)
    ap.add_argument("--n-eval", type=int, default=250)
    ap.add_argument("--n-eval-quick", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="safety net: stop training at this Unix time (0 = none); set from --budget-s")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="wall seconds from start after which training stops (export needs ~60 s more)")
    args = ap.parse_args()
    if args.smoke:
        args.receiver_steps = min(args.receiver_steps, 60)
        args.sharer_steps = min(args.sharer_steps, 60)
        args.n_train = min(args.n_train, 20000)
        args.n_eval = min(args.n_eval, 16)
        args.n_eval_quick = min(args.n_eval_quick, 16)
        args.eval_every = 0
    if args.phase != "all":
        train_one(args, args.phase)
        return
    t0 = time.time()
    deadline = ["--deadline", str(t0 + args.budget_s)] if args.budget_s else []
    os.makedirs(args.work, exist_ok=True)
    if args.init_dir or args.tokenizer_dir:
        import shutil
        from tokenizers import Tokenizer
        tok_dir = os.path.join(args.work, "tok")
        src = args.tokenizer_dir or os.path.join(args.init_dir, MODEL_NAMES["receiver"])
        os.makedirs(tok_dir, exist_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(src, f), os.path.join(tok_dir, f))
        tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
        log(f"tokenizer: reused from {src} ({tok.get_vocab_size()} tokens)")
    else:
        tok = train_tokenizer(args, os.path.join(args.work, "tok"))
    prepare_data(args, tok, args.work)
    log(f"prep done in {time.time() - t0:.0f}s; training both models in parallel")
    procs = {}
    for kind in (("receiver", "sharer") if args.only == "both" else (args.only,)):
        cmd = [sys.executable, __file__, "--phase", kind] + sys.argv[1:] + deadline
        procs[kind] = subprocess.Popen(cmd)
    rc = {k: p.wait() for k, p in procs.items()}
    log("children:", rc)
    if any(rc.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
