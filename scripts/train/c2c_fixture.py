#!/usr/bin/env python3
"""c2c_fixture.py - the PyTorch fixture of tests/test_c2c.c (../shared/spec/c2c.md §12 item 1, §9 (h)).

With a fixed seed it makes a small random fuser (receiver 2 layers, 2 KV heads x 8; sharer 3 layers, 1 KV head
x 16; hidden 24, inner 20, wgt_inner 24, one block per stack; terminal layer map [1, 2]; layer 1's V gate closed),
writes it in kvmesh's layout (spec §7) as f32.c2c.{json,safetensors} and bf16.c2c.{json,safetensors}, and for
each variant <variant>.io.safetensors holding random caches and what PyTorch computes from the STORED weights
(fp64 math on the stored values, as spec §12 item 1 asks of the reference):
    sharer.k, sharer.v      [Ls][Hs][N][Ds]  F32
    receiver.k, receiver.v  [Lr][Ht][N][Dt]  F32
    fused.k, fused.v        [Lr][Ht][N][Dt]  F32   (every row fused; a closed gate copies receiver.*)
tests/test_c2c.c compares kvmesh's fused cache with fused.* (relative Frobenius error <= 1e-5 for f32 and
<= 1e-2 for bf16). Runs on CPU torch:

    python3 scripts/train/c2c_fixture.py --out tests/fixtures/c2c
    python3 scripts/train/c2c_fixture.py --out /tmp/rel --released   # also the same bf16 fuser in the released
                                                                     # checkpoint format, for c2c_convert.py
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from c2c_reference import C2CFuser, read_safetensors, terminal_layer_map, write_fuser, write_safetensors  # noqa: E402

SEED = 1234
N_TOKENS = 21  # crosses a 16-token KV block


def fixture_config():
    lr, ls = 2, 3
    h = hashlib_hex
    return {
        "format": "kvmesh.c2c", "version": 1,
        "receiver": {"model": "fixture-receiver", "n_layers": lr, "n_kv_heads": 2, "head_dim": 8,
                     "rope": {"layout": "half", "theta": 10000}, "tokenizer_sha256": h(b"fixture receiver tokenizer")},
        "sharer": {"model": "fixture-sharer", "n_layers": ls, "n_kv_heads": 1, "head_dim": 16,
                   "rope": {"layout": "half", "theta": 500000}, "tokenizer_sha256": h(b"fixture sharer tokenizer")},
        "hidden": 24, "inner": 20, "trunk_blocks": 1, "proj_blocks": 1, "wgt_blocks": 1, "wgt_inner": 24,
        "norm_eps": 1e-6, "activation": "gelu_erf", "dtype": "f32",
        "layer_map": terminal_layer_map(lr, ls),
        "token_alignment": "identity", "fuse_tokens": "prompt_except_last", "chat_template": "qwen3_no_think",
    }


def hashlib_hex(b):
    import hashlib
    return hashlib.sha256(b).hexdigest()


def random_fuser(cfg, gen):
    """A fuser with every weight non-trivial (out is NOT zero-initialised, so the residual is visible)."""
    f = C2CFuser(cfg)
    with torch.no_grad():
        for name, p in f.named_parameters():
            if name.endswith("gate"):
                continue
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        # bf16-exact logits: the released format stores gates as bf16, so the converter round trip is exact
        gates = {(0, "k"): 0.75, (0, "v"): 1.25, (1, "k"): 0.375, (1, "v"): -0.5}
        for (l, b), g in gates.items():
            f.branch(l, b).gate.fill_(g)
    return f


def expected(cfg, tensors, caches):
    """fp64 forward on the stored values: fused.{k,v} [Lr][Ht][N][Dt] as F32."""
    ref = C2CFuser(cfg).double()
    ref.load_tensors(tensors)
    out = {}
    with torch.no_grad():
        for b in ("k", "v"):
            rows = []
            for l in range(cfg["receiver"]["n_layers"]):
                xs = caches[f"sharer.{b}"][cfg["layer_map"][l]].double()
                xr = caches[f"receiver.{b}"][l].double()
                rows.append(ref.fuse_branch(l, b, xs, xr).float())
            out[f"fused.{b}"] = torch.stack(rows).contiguous()
    return out


def write_released(out_dir, cfg, tensors):
    """The same fuser in the released checkpoint format (spec §7: projector_{l}.pt per receiver layer with the
    reference's parameter names, projector_{l}.json, projector_config.json). Synthetic: the names follow spec
    §7.2's 'reference name' column; the init-arg JSON's fields are illustrative, the converter does not read them."""
    os.makedirs(out_dir, exist_ok=True)
    lr = cfg["receiver"]["n_layers"]
    pcfg = {"0": {"1": {str(l): [[cfg["layer_map"][l], l]] for l in range(lr)}}}
    ref_of = {"trunk": "mlp1", "proj": "proj_mlp2", "wgt": "scalar_mlp2"}
    part_of = {"norm": "norm.weight", "up": "w1.weight", "down": "w2.weight"}
    for l in range(lr):
        sd = {}
        for b, p in (("k", "key"), ("v", "value")):
            pre = f"layers.{l}.{b}."
            for name, t in tensors.items():
                if not name.startswith(pre):
                    continue
                rest = name[len(pre):]
                parts = rest.split(".")
                if rest in ("in.weight", "in.bias"):
                    ref = f"{p}_{rest}"
                elif parts[0] in ref_of:
                    ref = f"{p}_{ref_of[parts[0]]}.blocks.{parts[1]}.{part_of[parts[2]]}"
                elif parts[0] == "out":
                    ref = f"{p}_proj_out.{parts[1]}"
                elif parts[0] == "wgt_head":
                    ref = f"{p}_scalar_head.{parts[1]}"
                elif rest == "gate":
                    ref = f"{p}_gate_logit"
                    t = t.reshape(()).to(torch.bfloat16)  # a 0-d bf16 scalar in the reference
                else:
                    raise ValueError(name)
                sd[ref] = t.clone()
        sd["gate_temperature"] = torch.tensor(0.001, dtype=torch.bfloat16)
        torch.save(sd, os.path.join(out_dir, f"projector_{l}.pt"))
        with open(os.path.join(out_dir, f"projector_{l}.json"), "w") as f:
            json.dump({"synthetic": True, "hidden_dim": cfg["hidden"], "intermediate_dim": cfg["inner"], "num_layers": 3}, f)
    with open(os.path.join(out_dir, "projector_config.json"), "w") as f:
        json.dump(pcfg, f)
    with open(os.path.join(out_dir, "pair.json"), "w") as f:  # what c2c_convert.py --pair-json takes
        json.dump({"receiver": cfg["receiver"], "sharer": cfg["sharer"]}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (tests/fixtures/c2c)")
    ap.add_argument("--released", action="store_true", help="also write the bf16 fuser in the released format under OUT/released")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    cfg = fixture_config()
    fuser = random_fuser(cfg, gen)
    lr, ls = cfg["receiver"]["n_layers"], cfg["sharer"]["n_layers"]
    r, s = cfg["receiver"], cfg["sharer"]
    caches = {}
    for b in ("k", "v"):
        caches[f"sharer.{b}"] = torch.randn(ls, s["n_kv_heads"], N_TOKENS, s["head_dim"], generator=gen)
        caches[f"receiver.{b}"] = torch.randn(lr, r["n_kv_heads"], N_TOKENS, r["head_dim"], generator=gen)
    written = []
    for variant, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        vcfg = dict(cfg, dtype=variant)
        tensors = fuser.to_tensors(dt)
        prov = {"source": "scripts/train/c2c_fixture.py (random, seed %d)" % SEED, "converted_by": "c2c_fixture.py"}
        jpath, wpath = write_fuser(a.out, variant, vcfg, tensors, prov)
        io = dict(caches)
        io.update(expected(vcfg, tensors, caches))
        iopath = os.path.join(a.out, f"{variant}.io.safetensors")
        write_safetensors(iopath, io)
        # the round trip of spec §8: the reloaded file gives back the stored tensors bit for bit
        back = read_safetensors(wpath)
        assert all(torch.equal(back[k], tensors[k]) for k in tensors), "safetensors round trip differs"
        for l in range(lr):
            for b in ("k", "v"):
                d = (io[f"fused.{b}"][l] - caches[f"receiver.{b}"][l]).norm() / caches[f"receiver.{b}"][l].norm()
                print(f"{variant} layer {l} {b}: gate {'open' if fuser.branch(l, b).is_open() else 'closed'}, "
                      f"|fused - receiver| / |receiver| = {d:.4f}")
        written += [jpath, wpath, iopath]
        if variant == "bf16" and a.released:
            rdir = os.path.join(a.out, "released")
            write_released(rdir, vcfg, tensors)
            written += [os.path.join(rdir, x) for x in sorted(os.listdir(rdir))]
    for p in written:
        print(f"wrote {p} ({os.path.getsize(p)} bytes)")


if __name__ == "__main__":
    main()
