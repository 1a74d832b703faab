#!/usr/bin/env python3
"""c2c_convert.py - a released C2C checkpoint (thu-nics/C2C, e.g. HF nics-efc/C2C_Fuser <pair>/final) into
kvmesh's fuser layout (../shared/spec/c2c.md §7): <name>.c2c.safetensors + <name>.c2c.json.

The released format: projector_{i}.pt (a torch.save'd state dict, or a module with state_dict(), of one
C2CProjector), projector_{i}.json (init args, not read here) and projector_config.json of the shape
{target_idx: {source_idx: {target_layer: [[source_layer, projector_idx], ...]}}} (string keys). For receiver
layer l we take [source_layer, projector_idx] = projector_config["0"]["1"][str(l)][0], layer_map[l] =
source_layer, and the weights of projector_{projector_idx}.pt; a receiver layer missing there is an error.

The models' shapes, RoPE settings and tokenizer hashes are not in the checkpoint: pass them (--receiver /
--sharer JSON files with n_layers, n_kv_heads, head_dim, rope {layout, theta}, and tokenizer_file, whose
SHA-256 is taken) or, for tests, --pair-json with the two objects of spec §7.3 ready-made.

    python3 scripts/train/c2c_convert.py --in CKPT_DIR --pair-json pair.json --out DIR --name qwen3-0.6b+qwen2.5-0.5b

Every reference tensor must be used (gate_temperature excepted) and every spec §7.2 tensor found: the reference
loader's strict=False silently ignores missing keys, this converter does not.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from c2c_reference import sha256_file, write_fuser  # noqa: E402

REF_STACK = {"mlp1": "trunk", "proj_mlp2": "proj", "scalar_mlp2": "wgt"}
REF_PART = {"norm.weight": "norm", "w1.weight": "up", "w2.weight": "down"}


def our_name(l, ref):
    """The spec §7.2 name of reference tensor `ref` of receiver layer l, or None for gate_temperature."""
    if ref == "gate_temperature":
        return None
    p, _, rest = ref.partition("_")
    b = {"key": "k", "value": "v"}.get(p)
    if b is None:
        raise ValueError(f"unknown reference tensor {ref}")
    pre = f"layers.{l}.{b}"
    if rest in ("in.weight", "in.bias"):
        return f"{pre}.{rest}"
    if rest == "gate_logit":
        return f"{pre}.gate"
    if rest.startswith("proj_out."):
        return f"{pre}.out.{rest.split('.', 1)[1]}"
    if rest.startswith("scalar_head."):
        return f"{pre}.wgt_head.{rest.split('.', 1)[1]}"
    for rs, ours in REF_STACK.items():
        if rest.startswith(rs + ".blocks."):
            j, part = rest[len(rs) + len(".blocks."):].split(".", 1)
            if part not in REF_PART:
                break
            return f"{pre}.{ours}.{int(j)}.{REF_PART[part]}"
    raise ValueError(f"unknown reference tensor {ref}")


def load_state(path):
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def convert(in_dir, pair, dtype_name, lr):
    with open(os.path.join(in_dir, "projector_config.json")) as f:
        pcfg = json.load(f)
    table = pcfg["0"]["1"]
    dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype_name]
    tensors, layer_map = {}, []
    for l in range(lr):
        if str(l) not in table or not table[str(l)]:
            raise SystemExit(f"projector_config.json: receiver layer {l} has no entry (conversion error, spec §7)")
        src, idx = table[str(l)][0]
        layer_map.append(int(src))
        sd = load_state(os.path.join(in_dir, f"projector_{idx}.pt"))
        for ref, t in sd.items():
            name = our_name(l, ref)
            if name is None:
                continue
            if name.endswith(".gate"):
                tensors[name] = t.detach().float().reshape(1).contiguous()  # bf16 -> f32 is exact
            else:
                tensors[name] = t.detach().to(dt).contiguous()
    return tensors, layer_map


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--in", dest="inp", required=True, help="checkpoint directory (projector_*.pt, projector_config.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--pair-json", required=True, help='{"receiver": {...spec §7.3...}, "sharer": {...}}')
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--hidden", type=int, default=None, help="default: read from the in.weight shape")
    a = ap.parse_args()
    with open(a.pair_json) as f:
        pair = json.load(f)
    for role in ("receiver", "sharer"):
        tf = pair[role].pop("tokenizer_file", None)
        if tf:
            pair[role]["tokenizer_sha256"] = sha256_file(tf)
    lr = pair["receiver"]["n_layers"]
    tensors, layer_map = convert(a.inp, pair, a.dtype, lr)
    w0 = tensors["layers.0.k.in.weight"]
    H = w0.shape[0]
    count = lambda st: len({n.split(".")[4] for n in tensors if n.startswith(f"layers.0.k.{st}.")})  # noqa: E731
    cfg = {"format": "kvmesh.c2c", "version": 1, "receiver": pair["receiver"], "sharer": pair["sharer"],
           "hidden": H, "inner": tensors["layers.0.k.trunk.0.up"].shape[0],
           "trunk_blocks": count("trunk"), "proj_blocks": count("proj"), "wgt_blocks": count("wgt"),
           "wgt_inner": tensors["layers.0.k.wgt.0.up"].shape[0], "norm_eps": 1e-6, "activation": "gelu_erf",
           "dtype": a.dtype, "layer_map": layer_map, "token_alignment": pair.get("token_alignment", "identity"),
           "fuse_tokens": pair.get("fuse_tokens", "prompt_except_last"), "chat_template": pair.get("chat_template", "qwen3_no_think")}
    os.makedirs(a.out, exist_ok=True)
    jpath, wpath = write_fuser(a.out, a.name, cfg, tensors,
                               {"source": os.path.abspath(a.inp), "converted_by": "scripts/train/c2c_convert.py"})
    print(f"wrote {jpath} and {wpath}: {len(tensors)} tensors, layer_map {layer_map}")


if __name__ == "__main__":
    main()
