#!/usr/bin/env python3
"""c2c_train.py - trains, exports and evaluates the C2C fuser of the bundled pair (sharer models/miniqwen3-6m ->
receiver models/minillama-2m) on the blinded-receiver task (../shared/spec/c2c.md §8 scaled recipe, §9 demo).

Documents are the JSONL lines of `kvmesh c2c docs` (one source of documents; the bench reads the same):
{"i","facts","n","n_fuse","sharer":[ids],"receiver":[ids, value digits blinded to '#'],"answer":[4 digit ids],...}.
The sharer S reads the real prompt, the receiver R the blinded one; the fuser (c2c_reference.C2CFuser, one per
receiver layer, K and V branches, terminal layer map) projects S's K/V of prompt rows 0..n-2 into R's cache, and R
runs [last prompt token, digits 0..2] over the fused cache (spec §5); the loss is the CE of the 4 answer digits.

Recipe (spec §8): R and S frozen (c2c_models.TinyLM, fp32 upcast of the bf16 weights); fuser fp32 master weights
(bf16 autocast on CUDA), `out` zero-initialised (so step 0 is the blinded receiver), gate logits 0 with a
Gumbel-sigmoid training gate, tau 1 -> 0.001 exponentially over the run (hard gate logit > 0 at evaluation); AdamW
lr 1e-3 wd 0.01, 10% warm-up then linear decay, grad clip 1.0; batches of --batch documents of one prompt length
(no padding). The run's progress p = max(step / steps, elapsed / budget) drives lr and tau, so a --budget-s stop
still ends annealed. No dropout (the tiny fuser is data-rich here). The control (g) "identical" fuser R -> R (the
sharer is R on the blinded input) is trained the same way, shorter.

Then: bf16 export (c2c_reference.write_fuser) with a model card, the round-trip check of spec §8 (the reloaded
tensors' forward equals the in-memory fuser cast to bf16, bit for bit), the evaluation of spec §9 (a)-(g) on the
eval documents (EM, NLL/digit, by facts, recovery ratio, gates, pass/fail) into results.json, and a small fixture for
the C test (tests/test_c2c_trained.c: captured unfused R and S rows and the rows PyTorch fused).

Usage (scripts/gpu/c2c_train.sh runs it; CPU smoke: SMOKE=1 scripts/gpu/c2c_train.sh run OUT):
  python3 scripts/train/c2c_train.py --train-docs T.jsonl --eval-docs E.jsonl --out OUT \
      [--export-dir models/c2c-miniqwen3-to-minillama] [--control-dir OUT/control] [--fixture-dir DIR] \
      [--steps 2500] [--control-steps 800] [--budget-s 330] [--batch 256] [--hidden 128] [--device cuda]
  python3 scripts/train/c2c_train.py compare OUT/results.json OUT/bench.json OUT/h.json   (spec §9 (h): EM of
      `kvmesh bench c2c --json` on the first lines of the eval file against PyTorch's on the same lines)
Needs torch (1.13 CPU or 2.x CUDA); no transformers, no safetensors package.
"""
import argparse
import copy
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from c2c_models import TinyLM  # noqa: E402
from c2c_reference import (C2CFuser, param_count, read_safetensors, terminal_layer_map,  # noqa: E402
                           write_fuser, write_safetensors)

T0 = time.time()


def log(*a):
    print(time.strftime("%H:%M:%S", time.gmtime()), f"+{time.time() - T0:6.1f}s", *a, flush=True)


# ---- documents ---------------------------------------------------------------------------------------------

def load_docs(path, limit=0):
    docs = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
                n = int(d["n"])
                if len(d["sharer"]) != n or len(d["receiver"]) != n or len(d["answer"]) != 4 or d["n_fuse"] != n - 1:
                    raise ValueError("lengths disagree (sharer, receiver == n; 4 answer ids; n_fuse == n - 1)")
                if d["sharer"][-1] != d["receiver"][-1]:
                    raise ValueError("the last prompt token differs between sharer and receiver")
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{ln}: bad document: {e}")
            docs.append(d)
            if limit and len(docs) >= limit:
                break
    if not docs:
        raise SystemExit(f"{path}: no documents")
    return docs


def buckets(docs, device):
    """{n: dict(s=[k][n], r=[k][n], a=[k][4], facts=[k], idx=[k])} on device, documents of one prompt length."""
    by = {}
    for j, d in enumerate(docs):
        by.setdefault(d["n"], []).append(j)
    out = {}
    for n, js in sorted(by.items()):
        out[n] = dict(s=torch.tensor([docs[j]["sharer"] for j in js], dtype=torch.long, device=device),
                      r=torch.tensor([docs[j]["receiver"] for j in js], dtype=torch.long, device=device),
                      a=torch.tensor([docs[j]["answer"] for j in js], dtype=torch.long, device=device),
                      facts=torch.tensor([int(docs[j].get("facts", 0)) for j in js], dtype=torch.long),
                      idx=js)
    return out


def batch_plan(bk, batch, rng):
    """One epoch: (n, row indices) batches of <= batch documents of one length, shuffled."""
    plan = []
    for n, b in bk.items():
        k = b["s"].shape[0]
        perm = list(range(k))
        rng.shuffle(perm)
        for i in range(0, k, batch):
            plan.append((n, perm[i:i + batch]))
    rng.shuffle(plan)
    return plan


# ---- fusion ------------------------------------------------------------------------------------------------

def fuser_config(R, S, hidden, inner):
    return {"format": "kvmesh.c2c", "version": 1, "receiver": R.desc(), "sharer": S.desc(),
            "hidden": hidden, "inner": inner, "trunk_blocks": 1, "proj_blocks": 1, "wgt_blocks": 1,
            "wgt_inner": hidden, "norm_eps": 1e-6, "activation": "gelu_erf", "dtype": "bf16",
            "layer_map": terminal_layer_map(R.n_layers, S.n_layers), "token_alignment": "identity",
            "fuse_tokens": "prompt_except_last", "chat_template": "receiver"}


def branch_residual(br, xs, xr):
    """Batched c2c_reference residual: xs [B][Hs][N][Ds], xr [B][Ht][N][Dt] -> w*y [B][Ht][N][Dt]."""
    B, hs, N, ds = xs.shape
    ht, dt = xr.shape[1], xr.shape[3]
    res = br.residual(xs.permute(1, 0, 2, 3).reshape(hs, B * N, ds), xr.permute(1, 0, 2, 3).reshape(ht, B * N, dt))
    return res.reshape(ht, B, N, dt).permute(1, 0, 2, 3)


def fuse_cache(fuser, kv_r, kv_s, tau=None, gate_stats=None, closed=False, autocast=False, all_open=False):
    """The fused receiver cache. tau None: inference (hard gate logit > 0, closed branches return the receiver's
    tensors unchanged; closed=True forces every gate closed, control (f)); else the Gumbel-sigmoid training gate."""
    out = []
    for l in range(len(kv_r)):
        pair = []
        for bi, b in enumerate(("k", "v")):
            br = fuser.branch(l, b)
            xr, xs = kv_r[l][bi], kv_s[fuser.layer_map[l]][bi]
            if tau is None:
                if closed or not (all_open or br.is_open()):
                    pair.append(xr)
                    continue
                with torch.no_grad():
                    pair.append(xr + branch_residual(br, xs, xr).float())
                continue
            if autocast:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    res = branch_residual(br, xs, xr)
            else:
                res = branch_residual(br, xs, xr)
            u = torch.rand(xr.shape[0], xr.shape[1], xr.shape[2], 1, device=xr.device).clamp_(1e-9, 1 - 1e-9)
            g = torch.sigmoid((br.gate + (-torch.log(-torch.log(u)))) / tau)
            if gate_stats is not None:
                gate_stats[(l, b)] = gate_stats.get((l, b), 0.0) + g.detach().mean()  # no sync per step
            pair.append(xr + g * res.float())
        out.append(tuple(pair))
    return out


def tail_logits(R, kv, r_ids, ans):
    """R runs [last prompt token, digits 0..2] at positions n-1.. over the (fused) cache of rows 0..n-2: the logits
    that predict the 4 answer digits [B][4][V]."""
    nf = r_ids.shape[1] - 1
    tail = torch.cat([r_ids[:, nf:], ans[:, :3]], dim=1)
    logits, _ = R.forward(tail, past=kv, pos0=nf, want_kv=False)
    return logits


# ---- training ----------------------------------------------------------------------------------------------

def train(name, R, S_model, fuser, bk, args, steps, budget_s, sharer_blinded, device):
    """Trains fuser in place; returns a summary dict. S_model None: the sharer is R on the blinded input."""
    fuser.train()
    for p in fuser.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        for l in range(len(fuser.k)):
            for b in ("k", "v"):
                br = fuser.branch(l, b)
                br.out.weight.zero_()
                br.out.bias.zero_()
                br.gate.fill_(args.gate_init)
    opt = torch.optim.AdamW(fuser.parameters(), lr=args.lr, weight_decay=0.01)
    rng = random.Random(args.seed)
    autocast = device.type == "cuda"
    plan, curve = [], []
    t0 = time.time()
    step, win_loss, win_n, win_tok, t_win = 0, 0.0, 0, 0, time.time()
    gstats, gstat_n = {}, 0
    lr_peak = args.lr
    while step < steps:
        el = time.time() - t0
        p = max(step / steps, el / budget_s if budget_s > 0 else 0.0)
        if p >= 1.0:
            log(f"{name}: wall-clock budget {budget_s:.0f}s reached at step {step}")
            break
        lr = lr_peak * (p / 0.1 if p < 0.1 else max(0.0, (1 - p) / 0.9))
        tau = 1.0 * (0.001 / 1.0) ** min(p, 1.0)
        for gr in opt.param_groups:
            gr["lr"] = lr
        if not plan:
            plan = batch_plan(bk, args.batch, rng)
        n, rows = plan.pop()
        b = bk[n]
        ridx = torch.tensor(rows, device=device)
        s_ids, r_ids, ans = b["s"][ridx], b["r"][ridx], b["a"][ridx]
        nf = n - 1
        with torch.no_grad():
            _, kv_r = R.forward(r_ids[:, :nf])
            if sharer_blinded:
                kv_s = kv_r
            else:
                _, kv_s = S_model.forward(s_ids[:, :nf])
        fused = fuse_cache(fuser, kv_r, kv_s, tau=tau, gate_stats=gstats, autocast=autocast)
        gstat_n += 1
        logits = tail_logits(R, fused, r_ids, ans)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ans.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(fuser.parameters(), 1.0)
        opt.step()
        step += 1
        win_loss = win_loss + loss.detach()  # a tensor: synchronised only when logged
        win_n += 1
        win_tok += len(rows) * n
        if step % args.log_every == 0 or step == steps or step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t_win
            gl = {f"{b}{l}": round(float(v) / max(1, gstat_n), 3) for (l, b), v in sorted(gstats.items())}
            logits_pos = sum(1 for l in range(len(fuser.k)) for bb in ("k", "v") if fuser.branch(l, bb).is_open())
            rec = dict(step=step, loss=round(float(win_loss) / max(1, win_n), 4), lr=lr, tau=tau, p=round(p, 4),
                       gate_open_prob=gl, gates_logit_pos=f"{logits_pos}/{2 * len(fuser.k)}",
                       tok_s=round(win_tok / max(dt, 1e-9)), elapsed_s=round(time.time() - t0, 1))
            curve.append(rec)
            log(f"{name} step {step} loss {rec['loss']:.4f} lr {lr:.2e} tau {tau:.4f} gates>0 {rec['gates_logit_pos']} "
                f"tok/s {rec['tok_s']} open-prob " + " ".join(f"{k}:{v:.2f}" for k, v in gl.items()))
            win_loss, win_n, win_tok, t_win, gstats, gstat_n = 0.0, 0, 0, time.time(), {}, 0
    fuser.eval()
    secs = time.time() - t0
    gates = {b: [round(float(fuser.branch(l, b).gate.detach()), 4) for l in range(len(fuser.k))] for b in ("k", "v")}
    log(f"{name}: {step} steps in {secs:.1f}s; gate logits {gates}")
    return dict(steps=step, seconds=round(secs, 1), curve=curve, gate_logits=gates, batch=args.batch, lr=args.lr)


# ---- export and round trip ---------------------------------------------------------------------------------

def export(fuser, cfg, out_dir, name, provenance):
    os.makedirs(out_dir, exist_ok=True)
    tensors = fuser.to_tensors(torch.bfloat16)
    jpath, wpath = write_fuser(out_dir, name, cfg, {k: v.cpu() for k, v in tensors.items()}, provenance=provenance)
    return jpath, wpath


def reload(cfg, wpath, dtype, device):
    f = C2CFuser(cfg).to(dtype)
    f.load_tensors(read_safetensors(wpath))
    return f.to(device).eval()


def roundtrip_check(fuser, cfg, wpath, kv_r, kv_s, device):
    """Spec §8: the reloaded bf16 tensors' forward equals the in-memory fuser cast to bf16, bit for bit."""
    a = copy.deepcopy(fuser).to(torch.bfloat16).eval()
    b = reload(cfg, wpath, torch.bfloat16, device)
    worst = 0
    with torch.no_grad():
        for l in range(len(kv_r)):
            for bi, bn in enumerate(("k", "v")):
                xr, xs = kv_r[l][bi][:4].to(torch.bfloat16), kv_s[cfg["layer_map"][l]][bi][:4].to(torch.bfloat16)
                ya = branch_residual(a.branch(l, bn), xs, xr)
                yb = branch_residual(b.branch(l, bn), xs, xr)
                if a.branch(l, bn).is_open() != b.branch(l, bn).is_open() or not torch.equal(ya, yb):
                    worst += 1
    return worst == 0


# ---- evaluation (spec §9) ----------------------------------------------------------------------------------

def derangement(bk):
    """(e): for each length group the sharer document of row j is row (j + 1) % k (k >= 2); groups of one are
    left out. Returns {n: index tensor or None}, and the number left out."""
    out, left = {}, 0
    for n, b in bk.items():
        k = b["s"].shape[0]
        if k < 2:
            out[n], left = None, left + k
        else:
            out[n] = torch.tensor([(j + 1) % k for j in range(k)])
    return out, left


def evaluate(R, S, fuser, ctrl, bk, args, device):
    n_docs = sum(len(b["idx"]) for b in bk.values())
    ln10 = math.log(10.0)
    conds = ["a", "b", "c", "d", "e", "f"] + (["g"] if ctrl is not None else []) + ["d_open"]
    acc = {c: dict(em=0, nll=0.0, n=0, by_facts={}) for c in conds}
    per_doc = {c: {} for c in conds}  # file line -> (em, nll/digit): to compare any subset with the C runtime
    f_bit_equal, f_checked = True, 0
    der, left_out = derangement(bk)
    eb = args.eval_batch
    for n, b in bk.items():
        k = b["s"].shape[0]
        for i0 in range(0, k, eb):
            sl = slice(i0, min(k, i0 + eb))
            s_ids, r_ids, ans = b["s"][sl], b["r"][sl], b["a"][sl]
            facts = b["facts"][sl]
            lines = b["idx"][sl]
            nf = n - 1
            with torch.no_grad():
                _, kv_rb = R.forward(r_ids[:, :nf])
                _, kv_rr = R.forward(s_ids[:, :nf])
                _, kv_s = S.forward(s_ids[:, :nf])
                lg = {"a": tail_logits(R, kv_rr, s_ids, ans), "b": tail_logits(R, kv_rb, r_ids, ans),
                      "c": tail_logits(S, kv_s, s_ids, ans),
                      "d": tail_logits(R, fuse_cache(fuser, kv_rb, kv_s), r_ids, ans),
                      "f": tail_logits(R, fuse_cache(fuser, kv_rb, kv_s, closed=True), r_ids, ans)}
                # diagnostic, not a condition of spec §9: (d) with every gate open (what the closed gates cost)
                lg["d_open"] = tail_logits(R, fuse_cache(fuser, kv_rb, kv_s, all_open=True), r_ids, ans)
                if ctrl is not None:
                    lg["g"] = tail_logits(R, fuse_cache(ctrl, kv_rb, kv_rb), r_ids, ans)
                mask_e = None
                if der[n] is not None:
                    dj = der[n][sl.start:sl.stop]
                    # the other documents' sharer rows (whole group: the partner may sit in another eval batch)
                    _, kv_se = S.forward(b["s"][dj.to(device)][:, :nf])
                    lg["e"] = tail_logits(R, fuse_cache(fuser, kv_rb, kv_se), r_ids, ans)
                    mask_e = True
                f_checked += 1
                if not torch.equal(lg["f"], lg["b"]):
                    f_bit_equal = False
            for c in conds:
                if c == "e" and mask_e is None:
                    continue
                L = lg[c]
                nll = F.cross_entropy(L.reshape(-1, L.shape[-1]), ans.reshape(-1), reduction="none").view(-1, 4)
                em = (L.argmax(-1) == ans).all(dim=1)
                A = acc[c]
                A["em"] += int(em.sum())
                A["nll"] += float(nll.mean(dim=1).sum())
                A["n"] += em.shape[0]
                for j, e, v in zip(lines, em.tolist(), nll.mean(dim=1).tolist()):
                    per_doc[c][j] = (int(e), v)
                for fc, e in zip(facts.tolist(), em.tolist()):
                    bf = A["by_facts"].setdefault(str(fc), [0, 0])
                    bf[0] += int(e)
                    bf[1] += 1
    res = {}
    for c in conds:
        A = acc[c]
        res[c] = dict(em=A["em"] / max(1, A["n"]), nll_per_digit=A["nll"] / max(1, A["n"]), docs=A["n"],
                      by_facts={k: dict(em=v[0] / v[1], docs=v[1]) for k, v in sorted(A["by_facts"].items(), key=lambda t: int(t[0]))})
    ema, emb, emd = res["a"]["em"], res["b"]["em"], res["d"]["em"]
    rec = (emd - emb) / (ema - emb) if ema != emb else None
    crit = {"d_em_ge_0.90": emd >= 0.90, "f_bit_identical_to_b": f_bit_equal}
    for c in ("b", "e", "g"):
        if c in res:
            crit[f"{c}_em_le_0.01"] = res[c]["em"] <= 0.01
            crit[f"{c}_nll_ge_{ln10 - 0.1:.2f}"] = res[c]["nll_per_digit"] >= ln10 - 0.1
    per = {c: dict(em="".join(str(per_doc[c][j][0]) if j in per_doc[c] else "-" for j in range(n_docs)),
                   nll=[round(per_doc[c][j][1], 6) if j in per_doc[c] else None for j in range(n_docs)]) for c in conds}
    return dict(conditions=res, per_doc=per, recovery_ratio=rec, f_bit_identical=f_bit_equal, f_batches_compared=f_checked,
                e_left_out=left_out, criteria=crit, passed=all(crit.values()),
                gates_open={b: [fuser.branch(l, b).is_open() for l in range(len(fuser.k))] for b in ("k", "v")})


NAMES = {"a": "R real document", "b": "R blinded, no fusion", "c": "S alone", "d": "R blinded + C2C",
         "e": "C2C, sharer of another doc", "f": "C2C, all gates closed", "g": "identical fuser R->R",
         "d_open": "(d) all gates open [diagnostic]"}


def print_table(ev):
    print("\ncondition                                   EM       NLL/digit  docs")
    for c, r in ev["conditions"].items():
        print(f"{'(' + c + ')':<8} {NAMES[c]:<34} {100 * r['em']:6.2f}%  {r['nll_per_digit']:8.4f}  {r['docs']}")
    facts = sorted({int(k) for r in ev["conditions"].values() for k in r["by_facts"]})
    print("\nEM by facts   " + " ".join(f"{f:>7}" for f in facts))
    for c, r in ev["conditions"].items():
        print(f"{'(' + c + ')':<14}" + " ".join(f"{100 * r['by_facts'][str(f)]['em']:6.1f}%" if str(f) in r["by_facts"]
                                         else "      -" for f in facts))
    rr = ev["recovery_ratio"]
    print(f"\nrecovery ratio (EM): {rr:.4f}" if rr is not None else "\nrecovery ratio: undefined (EM_a == EM_b)")
    print(f"(f) == (b) bit for bit over {ev['f_batches_compared']} batches: {ev['f_bit_identical']}; "
          f"(e) left out (groups of one): {ev['e_left_out']}")
    print("gates open: K " + "".join("1" if g else "0" for g in ev["gates_open"]["k"]) +
          "  V " + "".join("1" if g else "0" for g in ev["gates_open"]["v"]))
    for k, v in ev["criteria"].items():
        print(f"  {'PASS' if v else 'FAIL'}  {k}")
    print("spec §9 verdict:", "PASS" if ev["passed"] else "FAIL", flush=True)


# ---- fixture for the C test (spec §9 (h), second half) -----------------------------------------------------

def write_fixture(out_dir, R, S, fuser_bf16_f32, cfg_json_rel, docs, rows_per_doc, device):
    """For each doc: the unfused R and S rows of every layer at rows_per_doc chosen positions (the value digits
    first), and the rows PyTorch fused with the exported (bf16 values, fp32 math) fuser; fp32 safetensors."""
    os.makedirs(out_dir, exist_ok=True)
    t = {}
    meta = {"fuser": cfg_json_rel, "docs": str(len(docs)), "layers": str(R.n_layers)}
    for di, d in enumerate(docs):
        s_ids = torch.tensor([d["sharer"]], dtype=torch.long, device=device)
        r_ids = torch.tensor([d["receiver"]], dtype=torch.long, device=device)
        nf = d["n"] - 1
        pos = [j for j in range(nf) if d["sharer"][j] != d["receiver"][j]]
        rest = [j for j in range(nf) if j not in pos]
        step = max(1, len(rest) // max(1, rows_per_doc))
        pos = sorted((pos + rest[::step])[:rows_per_doc])
        pidx = torch.tensor(pos, device=device)
        with torch.no_grad():
            _, kv_r = R.forward(r_ids[:, :nf])
            _, kv_s = S.forward(s_ids[:, :nf])
            fused = fuse_cache(fuser_bf16_f32, kv_r, kv_s)
        t[f"doc{di}.positions"] = torch.tensor(pos, dtype=torch.float32)  # small integers: exact in F32
        t[f"doc{di}.sharer_ids"] = torch.tensor(d["sharer"][:nf], dtype=torch.float32)
        t[f"doc{di}.receiver_ids"] = torch.tensor(d["receiver"][:nf], dtype=torch.float32)
        for l in range(R.n_layers):
            for bi, b in enumerate(("k", "v")):
                t[f"doc{di}.r.{l}.{b}"] = kv_r[l][bi][0][:, pidx].float().cpu().contiguous()
                t[f"doc{di}.s.{l}.{b}"] = kv_s[l][bi][0][:, pidx].float().cpu().contiguous()
                t[f"doc{di}.fused.{l}.{b}"] = fused[l][bi][0][:, pidx].float().cpu().contiguous()
    path = os.path.join(out_dir, "rows.safetensors")
    write_safetensors(path, t, metadata=meta)
    return path


# ---- model card --------------------------------------------------------------------------------------------

def model_card(path, cfg, n_params, size, tr, ctrl_tr, ev, args, card, rt_ok):
    c = ev["conditions"]
    lines = [
        "# c2c-miniqwen3-to-minillama: the trained C2C fuser of the bundled pair",
        "",
        "Receiver **models/minillama-2m** (Llama, 6 layers, 2 KV heads x 32) reads sharer **models/miniqwen3-6m**'s",
        "cache (Qwen3, 6 layers, 4 KV heads x 48) through this fuser (../../docs/c2c.md; spec c2c.md §2, §7, §8, §9).",
        "Trained on the blinded-receiver task (spec §9 on minitasks `recall`, role value, documents of",
        "`kvmesh c2c docs`): the sharer reads the facts, the receiver the same ids with the value digits blinded to",
        "`#`; every prompt row but the last is fused, and the receiver must answer the 4 digits.",
        "",
        "## Shape",
        "",
        f"- hidden = inner = wgt_inner = {cfg['hidden']}, one trunk, one proj and one wgt block per branch; "
        f"layer map {cfg['layer_map']} (terminal, spec §3)",
        f"- {n_params:,} parameters, bf16 weights ({size / 1e6:.2f} MB file); gates open: K "
        + "".join("1" if g else "0" for g in ev["gates_open"]["k"]) + ", V "
        + "".join("1" if g else "0" for g in ev["gates_open"]["v"]),
        "",
        "## Recipe (scripts/train/c2c_train.py, run by scripts/gpu/c2c_train.sh)",
        "",
        f"- {args.n_train_docs} training documents (`kvmesh c2c docs --split train --seed {args.train_seed} "
        f"--facts {args.facts}`), batches of {args.batch} documents of one prompt length",
        f"- R and S frozen (fp32 upcast of their bf16 weights); fuser fp32 master weights, bf16 autocast on CUDA;",
        "  `out` zero-initialised, gate logits 0, Gumbel-sigmoid gate with tau 1 -> 0.001 (exponential)",
        f"- AdamW lr {args.lr} wd 0.01, 10% warm-up then linear decay, grad clip 1.0; loss = CE of the 4 answer digits",
        f"- {tr['steps']} steps in {tr['seconds']} s on {card}; control (g) R->R fuser: {ctrl_tr['steps'] if ctrl_tr else 0} "
        f"steps in {ctrl_tr['seconds'] if ctrl_tr else 0} s",
        f"- final training loss {tr['curve'][-1]['loss'] if tr['curve'] else float('nan')}; "
        f"export round trip (spec §8, bit for bit): {'ok' if rt_ok else 'FAILED'}",
        "",
        f"## Evaluation (PyTorch, {c['d']['docs']} eval-split documents, `--seed {args.eval_seed}`; spec §9)",
        "",
        "| condition | EM | NLL/digit |",
        "|---|---|---|",
    ]
    for k, r in c.items():
        lines.append(f"| ({k}) {NAMES[k]} | {100 * r['em']:.2f}% | {r['nll_per_digit']:.4f} |")
    rr = ev["recovery_ratio"]
    lines += ["", f"Recovery ratio {rr:.4f}." if rr is not None else "",
              f"(f) equals (b) bit for bit: {ev['f_bit_identical']}. Verdict of spec §9 (PyTorch side): "
              f"{'PASS' if ev['passed'] else 'FAIL'} ({', '.join(k for k, v in ev['criteria'].items() if not v) or 'all criteria met'}).",
              "", "Every figure, the training curve and the per-facts breakdown: `results.json` of the run "
              "(copied next to this card as `train_results.json`).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# ---- main --------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-docs", required=True)
    ap.add_argument("--eval-docs", required=True)
    ap.add_argument("--receiver", default="models/minillama-2m")
    ap.add_argument("--sharer", default="models/miniqwen3-6m")
    ap.add_argument("--out", required=True, help="folder for results.json, logs and the fixture")
    ap.add_argument("--export-dir", default="", help="folder of the trained fuser (default OUT/c2c-miniqwen3-to-minillama)")
    ap.add_argument("--control-dir", default="", help="folder of the control fuser (default OUT/control)")
    ap.add_argument("--fixture-dir", default="", help="folder of the C test's fixture (default OUT/fixture)")
    ap.add_argument("--name", default="c2c-miniqwen3-to-minillama")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--control-steps", type=int, default=800)
    ap.add_argument("--budget-s", type=float, default=0.0, help="wall clock for the main fuser's training (0: none)")
    ap.add_argument("--control-budget-s", type=float, default=0.0, help="wall clock for the control's training")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--eval-batch", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--gate-init", type=float, default=0.0,
                    help="initial gate logits (spec §8: 0; a positive value starts the gates open at evaluation)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-eval", type=int, default=0, help="use the first N eval documents (0: all)")
    ap.add_argument("--fixture-docs", type=int, default=2)
    ap.add_argument("--fixture-rows", type=int, default=8)
    ap.add_argument("--card", default="", help="the device, for the model card")
    ap.add_argument("--train-seed", default="?", help="for the model card")
    ap.add_argument("--eval-seed", default="?", help="for the model card")
    ap.add_argument("--facts", default="2-8", help="for the model card")
    args = ap.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    card = args.card or (torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU")
    log(f"torch {torch.__version__} on {device} ({card})")
    os.makedirs(args.out, exist_ok=True)
    export_dir = args.export_dir or os.path.join(args.out, args.name)
    control_dir = args.control_dir or os.path.join(args.out, "control")
    fixture_dir = args.fixture_dir or os.path.join(args.out, "fixture")

    R = TinyLM(args.receiver, device=device)
    S = TinyLM(args.sharer, device=device)
    log(f"receiver {R.name}: {R.n_layers} layers, {R.n_kv}x{R.head_dim} KV; sharer {S.name}: {S.n_layers} layers, "
        f"{S.n_kv}x{S.head_dim} KV")
    tdocs = load_docs(args.train_docs)
    edocs = load_docs(args.eval_docs, args.n_eval)
    args.n_train_docs = len(tdocs)
    tb, eb = buckets(tdocs, device), buckets(edocs, device)
    log(f"{len(tdocs)} training documents in {len(tb)} length groups, {len(edocs)} eval documents in {len(eb)}")
    del tdocs

    cfg = fuser_config(R, S, args.hidden, args.hidden)
    n_params = param_count(cfg)
    log(f"fuser: hidden {args.hidden}, {n_params:,} parameters ({2 * n_params / 1e6:.2f} MB bf16)")
    fuser = C2CFuser(cfg).to(device)
    tr = train("main", R, S, fuser, tb, args, args.steps, args.budget_s, False, device)
    prov = {"source": "scripts/train/c2c_train.py (blinded-receiver recall task, spec §9)",
            "steps": str(tr["steps"]), "seconds": str(tr["seconds"]), "device": card, "torch": torch.__version__}
    jpath, wpath = export(fuser, cfg, export_dir, args.name, prov)
    log(f"exported {jpath} ({os.path.getsize(wpath):,} bytes of weights)")

    cfg_c = fuser_config(R, R, args.hidden, args.hidden)
    ctrl = C2CFuser(cfg_c).to(device)
    args_c = copy.copy(args)
    tr_c = train("control", R, None, ctrl, tb, args_c, args.control_steps, args.control_budget_s, True, device)
    prov_c = dict(prov, source="scripts/train/c2c_train.py: control (g), identical R->R fuser, sharer input blinded",
                  steps=str(tr_c["steps"]), seconds=str(tr_c["seconds"]))
    jc, wc = export(ctrl, cfg_c, control_dir, "identical", prov_c)
    log(f"exported the control {jc}")

    # round trip of spec §8 on real rows of one eval batch
    n0 = next(iter(eb))
    with torch.no_grad():
        _, kv_r = R.forward(eb[n0]["r"][:4, :n0 - 1])
        _, kv_s = S.forward(eb[n0]["s"][:4, :n0 - 1])
    rt_ok = roundtrip_check(fuser, cfg, wpath, kv_r, kv_s, device)
    rt_c = roundtrip_check(ctrl, cfg_c, wc, kv_r, kv_r, device)
    log(f"round trip (reloaded bf16 == in-memory cast to bf16, bit for bit): main {rt_ok}, control {rt_c}")

    # evaluate what was exported: bf16 values, fp32 math (as kvmesh: bf16 weights, fp32 accumulation)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    fz = reload(cfg, wpath, torch.float32, device)
    cz = reload(cfg_c, wc, torch.float32, device)
    t_ev = time.time()
    ev = evaluate(R, S, fz, cz, eb, args, device)
    log(f"evaluated {len(edocs)} documents in {time.time() - t_ev:.1f}s")
    print_table(ev)

    fx_docs = [edocs[j] for j in range(min(args.fixture_docs, len(edocs)))]
    rel = os.path.relpath(jpath, fixture_dir)
    fx = write_fixture(fixture_dir, R, S, fz, rel, fx_docs, args.fixture_rows, device)
    log(f"fixture {fx} ({os.path.getsize(fx):,} bytes)")

    res = dict(fuser=dict(config=os.path.basename(jpath), params=n_params, bytes=os.path.getsize(wpath), hidden=args.hidden),
               control=dict(config=os.path.basename(jc), params=param_count(cfg_c), bytes=os.path.getsize(wc)), train=tr, control_train=tr_c, roundtrip_ok=rt_ok,
               control_roundtrip_ok=rt_c, eval=ev, device=card, torch=torch.__version__,
               train_docs=args.n_train_docs, eval_docs=len(edocs), total_s=round(time.time() - T0, 1))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    model_card(os.path.join(export_dir, "README.md"), cfg, n_params, os.path.getsize(wpath), tr, tr_c, ev, args, card, rt_ok)
    card_res = dict(res, eval={k: v for k, v in ev.items() if k != "per_doc"})  # per-document bits: results.json only
    with open(os.path.join(export_dir, "train_results.json"), "w") as f:
        json.dump(card_res, f, indent=1)
    log(f"done: {os.path.join(args.out, 'results.json')}; verdict {'PASS' if ev['passed'] else 'FAIL'}")
    return 0 if (rt_ok and rt_c) else 1


def compare_bench(results_path, bench_path, out_path):
    """Spec §9 (h), first half: EM of each condition from `kvmesh bench c2c --json` (the C runtime, on the first
    `docs` lines of the eval file) against PyTorch's on the same lines; within +-0.5 pt passes."""
    with open(results_path) as f:
        per = json.load(f)["eval"]["per_doc"]
    with open(bench_path) as f:
        bench = json.load(f)
    n = int(bench["docs"])
    rows, ok = {}, True
    print(f"spec §9 (h): EM of the C runtime (kvmesh bench c2c, {bench.get('backend')}) vs PyTorch on the same {n} documents")
    for c, bc in sorted(bench["conditions"].items()):
        if c not in per or not isinstance(bc, dict) or "em" not in bc:
            continue
        em = [int(x) for x in per[c]["em"][:n] if x != "-"]
        nll = [v for v in per[c]["nll"][:n] if v is not None]
        if not em:
            continue
        pt_em, c_em = sum(em) / len(em), float(bc["em"])
        d = 100 * (c_em - pt_em)
        rows[c] = dict(torch_em=pt_em, c_em=c_em, diff_pt=d, torch_nll=sum(nll) / len(nll),
                       c_nll=bc.get("nll_per_digit"), torch_docs=len(em), c_docs=bc.get("docs"))
        ok = ok and abs(d) <= 0.5
        print(f"  ({c}) EM C {100 * c_em:6.2f}%  PyTorch {100 * pt_em:6.2f}%  diff {d:+.2f} pt   NLL C "
              f"{bc.get('nll_per_digit', float('nan')):.4f}  PyTorch {rows[c]['torch_nll']:.4f}")
    print("  (e): the bench pairs within the documents it reads, PyTorch within all: the last document of each length\n"
          "       group has another partner (the same rule, next in the group, cyclically)")
    print(f"  (h) EM within +-0.5 pt: {'PASS' if ok else 'FAIL'}")
    with open(out_path, "w") as f:
        json.dump(dict(conditions=rows, em_within_0_5pt=ok, docs=n), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "compare":
        sys.exit(compare_bench(sys.argv[2], sys.argv[3], sys.argv[4]))
    sys.exit(main())
