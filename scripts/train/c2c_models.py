"""c2c_models.py - a small pure-torch forward of kvmesh's two bundled architectures (Llama; Qwen3 with per-head
q_norm/k_norm), for training a C2C fuser (../shared/spec/c2c.md §8) without transformers.

    m = TinyLM("models/minillama-2m", device="cuda")        # bf16 weights of model.safetensors, upcast to fp32
    logits, kv = m.forward(ids)                              # ids [B][N]; kv[l] = (K, V), each [B][Hkv][N][D]
    logits, kv2 = m.forward(ids2, past=kv_fused, pos0=N)     # more tokens attending to a given (modified) cache

The K/V rows are exactly what kvmesh's cache holds (spec §2.2): K after k_norm (Qwen3) and after RoPE, V raw; the
positions of the rows are 0..N-1 (pos0.. for a continuation). Gradients flow into `past` when it requires them.
Grouped-query attention (query head h reads KV head h // (heads / kv_heads)), rotate-half RoPE with the model's
theta, RMSNorm with the config's eps, SwiGLU, tied embeddings. Weights are read with c2c_reference.read_safetensors
(no safetensors package). Runs on torch 1.13 (CPU) and 2.x (CUDA).
"""
import json
import os

import torch
import torch.nn.functional as F

from c2c_reference import read_safetensors


def _rmsnorm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class TinyLM:
    """A frozen bundled model (LlamaForCausalLM or Qwen3ForCausalLM of models/*/config.json)."""

    def __init__(self, model_dir, device="cpu", dtype=torch.float32):
        with open(os.path.join(model_dir, "config.json")) as f:
            c = json.load(f)
        arch = (c.get("architectures") or ["?"])[0]
        if arch not in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
            raise ValueError(f"{model_dir}/config.json: architecture {arch!r} is neither Llama nor Qwen3")
        if c.get("attention_bias"):
            raise ValueError(f"{model_dir}/config.json: attention_bias is not supported")
        self.name = os.path.basename(os.path.normpath(model_dir))
        self.dir = model_dir
        self.qk_norm = arch == "Qwen3ForCausalLM"
        self.n_layers = c["num_hidden_layers"]
        self.n_heads = c["num_attention_heads"]
        self.n_kv = c["num_key_value_heads"]
        self.hidden = c["hidden_size"]
        self.head_dim = c.get("head_dim") or self.hidden // self.n_heads
        self.eps = float(c["rms_norm_eps"])
        rp = c.get("rope_parameters") or {}
        self.theta = float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))
        if rp.get("rope_type", "default") != "default" or c.get("rope_scaling"):
            raise ValueError(f"{model_dir}/config.json: only unscaled RoPE is supported")
        self.vocab = c["vocab_size"]
        self.device = torch.device(device)
        self.dtype = dtype
        t = read_safetensors(os.path.join(model_dir, "model.safetensors"))

        def w(name):
            if name not in t:
                raise ValueError(f"{model_dir}/model.safetensors: tensor {name} is missing")
            return t[name].to(dtype).to(self.device)

        self.embed = w("model.embed_tokens.weight")
        self.lm_head = w("lm_head.weight") if "lm_head.weight" in t and not c.get("tie_word_embeddings") else self.embed
        self.norm = w("model.norm.weight")
        self.layers = []
        for l in range(self.n_layers):
            p = f"model.layers.{l}."
            L = {k: w(p + n) for k, n in (("ln1", "input_layernorm.weight"), ("ln2", "post_attention_layernorm.weight"),
                                          ("wq", "self_attn.q_proj.weight"), ("wk", "self_attn.k_proj.weight"),
                                          ("wv", "self_attn.v_proj.weight"), ("wo", "self_attn.o_proj.weight"),
                                          ("gate", "mlp.gate_proj.weight"), ("up", "mlp.up_proj.weight"),
                                          ("down", "mlp.down_proj.weight"))}
            if self.qk_norm:
                L["qn"] = w(p + "self_attn.q_norm.weight")
                L["kn"] = w(p + "self_attn.k_norm.weight")
            self.layers.append(L)
        # inv_freq in fp32 as Hugging Face computes it
        self.inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float().to(self.device)
                                              / self.head_dim))

    def desc(self):
        """The receiver / sharer object of the fuser config (spec §7.3) for this model."""
        from c2c_reference import sha256_file
        th = self.theta
        return {"model": self.name, "n_layers": self.n_layers, "n_kv_heads": self.n_kv, "head_dim": self.head_dim,
                "rope": {"layout": "half", "theta": int(th) if th == int(th) else th},
                "tokenizer_sha256": sha256_file(os.path.join(self.dir, "tokenizer.json"))}

    def _rope(self, pos0, n):
        pos = torch.arange(pos0, pos0 + n, device=self.device, dtype=torch.float32)
        fr = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat([fr, fr], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(self, ids, past=None, pos0=0, want_kv=True):
        """ids [B][T] (int64) at positions pos0..pos0+T-1, attending to `past` (list per layer of (K, V) [B][Hkv][P][D],
        P == pos0) and causally to themselves. Returns (logits [B][T][V] fp32, kv list of this call's rows)."""
        B, T = ids.shape
        if past is not None and past[0][0].shape[2] != pos0:
            raise ValueError(f"past holds {past[0][0].shape[2]} rows but pos0 is {pos0}")
        cos, sin = self._rope(pos0, T)
        x = self.embed[ids]
        rep = self.n_heads // self.n_kv
        P = pos0 if past is not None else 0
        mask = None
        if T > 1:
            m = torch.ones(T, P + T, dtype=torch.bool, device=self.device).tril(P)
            mask = torch.zeros(T, P + T, dtype=self.dtype, device=self.device).masked_fill(~m, float("-inf"))
        kv = []
        scale = self.head_dim ** -0.5
        for l, L in enumerate(self.layers):
            h = _rmsnorm(x, L["ln1"], self.eps)
            q = (h @ L["wq"].t()).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = (h @ L["wk"].t()).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            v = (h @ L["wv"].t()).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            if self.qk_norm:
                q = _rmsnorm(q, L["qn"], self.eps)
                k = _rmsnorm(k, L["kn"], self.eps)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if want_kv:
                kv.append((k, v))
            if past is not None:
                k = torch.cat([past[l][0].to(self.dtype), k], dim=2)
                v = torch.cat([past[l][1].to(self.dtype), v], dim=2)
            if rep > 1:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            s = (q @ k.transpose(-1, -2)) * scale
            if mask is not None:
                s = s + mask
            a = torch.softmax(s.float(), dim=-1).to(self.dtype) @ v
            a = a.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
            x = x + a @ L["wo"].t()
            h = _rmsnorm(x, L["ln2"], self.eps)
            x = x + (F.silu(h @ L["gate"].t()) * (h @ L["up"].t())) @ L["down"].t()
        x = _rmsnorm(x, self.norm, self.eps)
        return (x @ self.lm_head.t()).float(), kv


def check_fixture(model_dir, fixture, device="cpu"):
    """Max abs / relative error of this forward's logits against a logits fixture of tests/fixtures/bundled
    (transformers' fp32 logits of rows rows_from.. of `ids`), also with the prompt run in two chunks through the
    cache (the second chunk attending to the first's K/V rows). Returns (max abs error, max error / max |logit|)."""
    with open(fixture) as f:
        fx = json.load(f)
    m = TinyLM(model_dir, device=device)
    ids = torch.tensor([fx["ids"]], dtype=torch.long, device=m.device)
    want = torch.tensor(fx["logits"], dtype=torch.float32)
    r0 = fx["rows_from"]
    with torch.no_grad():
        full, _ = m.forward(ids)
        half = ids.shape[1] // 2
        _, kv = m.forward(ids[:, :half])
        tail, _ = m.forward(ids[:, half:], past=kv, pos0=half)
    errs = []
    for got in (full[0, r0:].cpu(), tail[0, r0 - half:].cpu()):
        e = (got - want).abs().max().item()
        errs.append((e, e / want.abs().max().item()))
    argmax_ok = full[0].argmax(-1).tolist() == fx["argmax_all"]
    return errs, argmax_ok


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="checks this forward against the committed logits fixtures")
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    bad = 0
    for name in ("minillama-2m", "miniqwen3-6m"):
        (full, chunked), am = check_fixture(os.path.join(a.root, "models", name),
                                           os.path.join(a.root, "tests", "fixtures", "bundled", name + ".json"), a.device)
        print(f"{name}: max |logit error| {full[0]:.3g} (relative {full[1]:.3g}); two chunks through the cache "
              f"{chunked[0]:.3g} ({chunked[1]:.3g}); argmax of every row equal: {am}")
        bad += full[1] > 1e-4 or chunked[1] > 1e-4 or not am
    raise SystemExit(1 if bad else 0)
