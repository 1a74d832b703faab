"""c2c_reference.py - the C2C fuser of ../shared/spec/c2c.md §2 in PyTorch, written from the spec (not from the
reference code), and the kvmesh weight layout of spec §7 (safetensors + JSON) without the safetensors package.

Shapes follow the spec: a branch maps sharer rows Xs [Hs][N][Ds] and receiver rows Xr [Ht][N][Dt] (one layer,
K or V) to the fused receiver rows; tokens are independent (no mixing across positions).

    fuser = C2CFuser(cfg)                    # cfg: the dict of spec §7.3 (the sizes and layer_map are read)
    fused = fuser.fuse_branch(l, "k", Xs, Xr)  # gate applied: a closed gate returns Xr unchanged
    tensors = fuser.to_tensors()             # {name of spec §7.2: tensor}
    write_safetensors(path, tensors)         # header padded to a multiple of 8, names in ascending order

Used by c2c_fixture.py (the C test's fixture) and c2c_convert.py (released checkpoints -> our layout).
"""
import hashlib
import json
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * g, the mean in fp32 (spec §2.1)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class FFNBlock(nn.Module):
    """x + W2 . GELU_erf(W1 . RMSNorm(x)), no biases (spec §2.1)."""

    def __init__(self, hidden, inner, eps):
        super().__init__()
        self.norm = RMSNorm(hidden, eps)
        self.up = nn.Linear(hidden, inner, bias=False)    # W1 [I, H]
        self.down = nn.Linear(inner, hidden, bias=False)  # W2 [H, I]

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x)), approximate="none"))


class C2CBranch(nn.Module):
    """One branch (K or V) of one receiver layer (spec §2.2)."""

    def __init__(self, cfg):
        super().__init__()
        r, s = cfg["receiver"], cfg["sharer"]
        self.ht, self.dt = r["n_kv_heads"], r["head_dim"]
        self.hs, self.ds = s["n_kv_heads"], s["head_dim"]
        H, I, Iw, eps = cfg["hidden"], cfg["inner"], cfg["wgt_inner"], cfg["norm_eps"]
        cin = self.hs * self.ds + self.ht * self.dt
        self.inp = nn.Linear(cin, H)
        self.trunk = nn.ModuleList(FFNBlock(H, I, eps) for _ in range(cfg["trunk_blocks"]))
        self.proj = nn.ModuleList(FFNBlock(H, I, eps) for _ in range(cfg["proj_blocks"]))
        self.out = nn.Linear(H, self.ht * self.dt)
        self.wgt = nn.ModuleList(FFNBlock(H, Iw, eps) for _ in range(cfg["wgt_blocks"]))
        self.wgt_head = nn.Linear(H, self.ht)
        self.gate = nn.Parameter(torch.zeros(1))  # logit; fresh = 0.0 = closed

    def residual(self, xs, xr):
        """xs [Hs][N][Ds], xr [Ht][N][Dt] -> (w * y) [Ht][N][Dt] (gate not applied)."""
        n = xr.shape[1]
        x = torch.cat([xs.permute(1, 0, 2).reshape(n, -1), xr.permute(1, 0, 2).reshape(n, -1)], dim=-1)  # sharer first
        h = self.inp(x)
        for b in self.trunk:
            h = b(h)
        a = h
        for b in self.proj:
            a = b(a)
        y = self.out(a)                                     # [N][Ht*Dt]
        g = h
        for b in self.wgt:
            g = b(g)
        w = torch.sigmoid(self.wgt_head(g))                 # [N][Ht]
        res = w.unsqueeze(-1) * y.view(n, self.ht, self.dt)  # [N][Ht][Dt]
        return res.permute(1, 0, 2)

    def is_open(self):
        return bool(self.gate.detach().float().item() > 0)  # inference gate: strict '>'

    def forward(self, xs, xr):
        if not self.is_open():
            return xr
        return xr + self.residual(xs, xr)


class C2CFuser(nn.Module):
    """Every receiver layer's K and V branch; layer_map[l] is the sharer layer branch l reads (spec §3)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.layer_map = list(cfg["layer_map"])
        self.k = nn.ModuleList(C2CBranch(cfg) for _ in range(cfg["receiver"]["n_layers"]))
        self.v = nn.ModuleList(C2CBranch(cfg) for _ in range(cfg["receiver"]["n_layers"]))

    def branch(self, l, b):
        return (self.k if b == "k" else self.v)[l]

    def fuse_branch(self, l, b, xs, xr):
        return self.branch(l, b)(xs, xr)

    # ---- our layout (spec §7.2) ----
    def to_tensors(self, dtype=torch.float32):
        """{name: tensor} of spec §7.2; every tensor in dtype except the gates (F32 [1])."""
        out = {}
        for l in range(len(self.k)):
            for b in ("k", "v"):
                br, pre = self.branch(l, b), f"layers.{l}.{b}"
                out[f"{pre}.in.weight"] = br.inp.weight
                out[f"{pre}.in.bias"] = br.inp.bias
                for stack in ("trunk", "proj", "wgt"):
                    for j, blk in enumerate(getattr(br, stack)):
                        out[f"{pre}.{stack}.{j}.norm"] = blk.norm.weight
                        out[f"{pre}.{stack}.{j}.up"] = blk.up.weight
                        out[f"{pre}.{stack}.{j}.down"] = blk.down.weight
                out[f"{pre}.out.weight"] = br.out.weight
                out[f"{pre}.out.bias"] = br.out.bias
                out[f"{pre}.wgt_head.weight"] = br.wgt_head.weight
                out[f"{pre}.wgt_head.bias"] = br.wgt_head.bias
                out[f"{pre}.gate"] = br.gate
        return {k: (v.detach().to(torch.float32) if k.endswith(".gate") else v.detach().to(dtype)).contiguous()
                for k, v in out.items()}

    def load_tensors(self, tensors):
        """The inverse of to_tensors (values cast to this module's dtype); every name must be present and used."""
        own = self.to_tensors()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise ValueError(f"tensor names differ from spec §7.2: missing {missing[:5]}, extra {extra[:5]}")
        params = {}
        for l in range(len(self.k)):
            for b in ("k", "v"):
                br, pre = self.branch(l, b), f"layers.{l}.{b}"
                params[f"{pre}.in.weight"] = br.inp.weight
                params[f"{pre}.in.bias"] = br.inp.bias
                for stack in ("trunk", "proj", "wgt"):
                    for j, blk in enumerate(getattr(br, stack)):
                        params[f"{pre}.{stack}.{j}.norm"] = blk.norm.weight
                        params[f"{pre}.{stack}.{j}.up"] = blk.up.weight
                        params[f"{pre}.{stack}.{j}.down"] = blk.down.weight
                params[f"{pre}.out.weight"] = br.out.weight
                params[f"{pre}.out.bias"] = br.out.bias
                params[f"{pre}.wgt_head.weight"] = br.wgt_head.weight
                params[f"{pre}.wgt_head.bias"] = br.wgt_head.bias
                params[f"{pre}.gate"] = br.gate
        with torch.no_grad():
            for name, p in params.items():
                t = tensors[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"tensor {name}: shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))


# ---- safetensors (spec §7.1) without the safetensors package ----------------------------------------------

_ST_DTYPE = {torch.float32: ("F32", 4), torch.bfloat16: ("BF16", 2), torch.float16: ("F16", 2)}
_ST_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _tensor_bytes(t):
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().tobytes() if _has_numpy() else bytes(t.view(torch.uint8).reshape(-1).tolist())
    return t.numpy().tobytes() if _has_numpy() else bytes(t.view(torch.uint8).reshape(-1).tolist())


def _has_numpy():
    try:
        import numpy  # noqa: F401
        return True
    except ImportError:
        return False


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: tensor} as safetensors: tensors contiguous in ascending order of their names, the header
    padded with spaces so that 8 + N is a multiple of 8 (spec §7.1's SHOULDs). Little-endian (x86/ARM hosts)."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        code, size = _ST_DTYPE[t.dtype]
        b = _tensor_bytes(t)
        assert len(b) == t.numel() * size
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    """{name: tensor} of a safetensors file (F32/BF16/F16)."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    buf = data[8 + n:]
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, en = e["data_offsets"]
        raw = torch.frombuffer(bytearray(buf[b:en]), dtype=torch.uint8) if en > b else torch.zeros(0, dtype=torch.uint8)
        out[name] = raw.view(_ST_TORCH[e["dtype"]]).reshape(e["shape"]).clone()
    return out


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def terminal_layer_map(n_receiver, n_sharer):
    """Spec §3: receiver layer t reads sharer layer clamp(t + Ls - Lr, 0, Ls - 1)."""
    off = n_sharer - n_receiver
    return [min(max(t + off, 0), n_sharer - 1) for t in range(n_receiver)]


def write_fuser(out_dir, name, cfg, tensors, provenance=None):
    """Writes <name>.c2c.safetensors and <name>.c2c.json (cfg completed with weights_file, weights_sha256 and
    gates_open from the gate tensors). Returns the two paths."""
    import os
    wpath = os.path.join(out_dir, f"{name}.c2c.safetensors")
    jpath = os.path.join(out_dir, f"{name}.c2c.json")
    write_safetensors(wpath, tensors)
    lr = cfg["receiver"]["n_layers"]
    cfg = dict(cfg)
    cfg["gates_open"] = {b: [bool(tensors[f"layers.{l}.{b}.gate"].item() > 0) for l in range(lr)] for b in ("k", "v")}
    cfg["weights_file"] = os.path.basename(wpath)
    cfg["weights_sha256"] = sha256_file(wpath)
    if provenance is not None:
        cfg["provenance"] = provenance
    with open(jpath, "w") as f:
        json.dump(cfg, f, indent=1)
        f.write("\n")
    return jpath, wpath


def param_count(cfg):
    """Spec §2.3: parameters per branch x 2 branches x layers (+ 2 gate scalars per layer)."""
    r, s = cfg["receiver"], cfg["sharer"]
    H, I, Iw = cfg["hidden"], cfg["inner"], cfg["wgt_inner"]
    ct, cs = r["n_kv_heads"] * r["head_dim"], s["n_kv_heads"] * s["head_dim"]
    per = (cs + ct) * H + H + (cfg["trunk_blocks"] + cfg["proj_blocks"]) * (H + 2 * H * I) + cfg["wgt_blocks"] * (H + 2 * H * Iw)
    per += H * ct + ct + H * r["n_kv_heads"] + r["n_kv_heads"]
    return r["n_layers"] * (2 * per + 2)

