#!/usr/bin/env python3
"""seeds.py - writes the generated part of the seed corpora of fuzz/ (fuzz/corpus/<target>/, committed).

Run from the repository root: python3 fuzz/seeds.py. Deterministic; needs only the standard library and the
repository's own fixtures. Multi-file inputs are cut at SEP (fuzz_util.h: FZ_SEP)."""
import json
import os
import struct

SEP = b"\n@@\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(rel):
    with open(os.path.join(ROOT, rel), "rb") as f:
        return f.read()


def st_image(tensors, meta=None, pad=0):
    """A safetensors image of {name: (dtype, shape)} holding zeros, tensors laid out in name order."""
    es = {"F32": 4, "F16": 2, "BF16": 2}
    hdr, off = {}, 0
    if meta is not None:
        hdr["__metadata__"] = meta
    for name in sorted(tensors):
        dt, shape = tensors[name]
        n = es[dt]
        for s in shape:
            n *= s
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(hdr, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8 + pad)  # the data area aligned, as the official writer does
    return struct.pack("<Q", len(hb)) + hb + bytes(off)


def hf_tiny(arch, D=4, F=8, V=8, H=2, KV=1, L=1, tied=True, dt="F32"):
    hd = D // H
    cfg = {"architectures": [arch], "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
           "num_attention_heads": H, "num_key_value_heads": KV, "vocab_size": V, "max_position_embeddings": 64,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tied, "bos_token_id": 1,
           "eos_token_id": [2, 3]}
    t = {"model.embed_tokens.weight": (dt, [V, D]), "model.norm.weight": (dt, [D])}
    if not tied:
        t["lm_head.weight"] = (dt, [V, D])
    for l in range(L):
        p = "model.layers.%d." % l
        t[p + "input_layernorm.weight"] = (dt, [D])
        t[p + "post_attention_layernorm.weight"] = (dt, [D])
        t[p + "self_attn.q_proj.weight"] = (dt, [H * hd, D])
        t[p + "self_attn.k_proj.weight"] = (dt, [KV * hd, D])
        t[p + "self_attn.v_proj.weight"] = (dt, [KV * hd, D])
        t[p + "self_attn.o_proj.weight"] = (dt, [D, H * hd])
        t[p + "mlp.gate_proj.weight"] = (dt, [F, D])
        t[p + "mlp.up_proj.weight"] = (dt, [F, D])
        t[p + "mlp.down_proj.weight"] = (dt, [D, F])
        if arch == "Qwen2ForCausalLM":
            t[p + "self_attn.q_proj.bias"] = (dt, [H * hd])
            t[p + "self_attn.k_proj.bias"] = (dt, [KV * hd])
            t[p + "self_attn.v_proj.bias"] = (dt, [KV * hd])
        if arch == "Qwen3ForCausalLM":
            cfg["head_dim"] = hd
            t[p + "self_attn.q_norm.weight"] = (dt, [hd])
            t[p + "self_attn.k_norm.weight"] = (dt, [hd])
    return json.dumps(cfg, indent=1).encode(), st_image(t, {"format": "pt"})


def safetensors_seeds():
    write("safetensors", "f32_two.safetensors", st_image({"a": ("F32", [2, 2]), "b": ("F32", [3])}))
    write("safetensors", "mixed_meta.safetensors",
          st_image({"w.bf": ("BF16", [2, 3]), "w.f16": ("F16", [2]), "s": ("F32", [])}, {"format": "pt"}, pad=6))
    write("safetensors", "empty_tensor.safetensors", st_image({"z": ("F32", [0, 4]), "y": ("F32", [1, 1, 1, 1, 1])}))
    _, img = hf_tiny("Qwen3ForCausalLM")
    write("safetensors", "qwen3_tiny.safetensors", img)


def config_seeds():
    gen = b'{"do_sample": true, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, ' \
          b'"eos_token_id": [2, 5], "bos_token_id": 1, "pad_token_id": 0}'
    tcfg = b'{"add_bos_token": true, "bos_token": "<s>", "eos_token": {"content": "</s>"}, ' \
           b'"chat_template": "<|im_start|>{{ m }}<|im_end|>"}'
    for arch, tied in (("LlamaForCausalLM", False), ("Qwen2ForCausalLM", True), ("Qwen3ForCausalLM", True),
                       ("MistralForCausalLM", False)):
        cfg, img = hf_tiny(arch, tied=tied)
        write("config", "tiny_%s" % arch, SEP.join([cfg, gen, tcfg, img]))
    cfg, img = hf_tiny("LlamaForCausalLM", L=2, dt="BF16")
    write("config", "tiny_llama_bf16_2layers", SEP.join([cfg, b"", b"", img]))
    for d in ("tests/fixtures/hf/llama3.1-8b-tiny", "tests/fixtures/hf/qwen2.5-7b-tiny",
              "tests/fixtures/hf/qwen3-0.6b-tiny", "models/minillama-2m", "models/miniqwen3-6m"):
        parts = [read(os.path.join(d, "config.json")), read(os.path.join(d, "generation_config.json"))]
        if os.path.exists(os.path.join(ROOT, d, "tokenizer_config.json")):
            parts.append(read(os.path.join(d, "tokenizer_config.json")))
        write("config", os.path.basename(d) + "_json", SEP.join(parts))


def small_tokenizer(path, keep):
    """A copy of a test tokenizer cut to a few tokens (ids renumbered, merges of kept tokens only): small
    seeds keep the fuzzer fast (fuzz.sh runs the tokenizer with -max_len=4096)."""
    d = json.loads(read(path))
    vocab = d["model"]["vocab"]
    kept = [t for t in vocab if keep(t)]
    d["model"]["vocab"] = {t: i for i, t in enumerate(kept)}
    ids = {t: i for i, t in enumerate(kept)}
    merges = []
    for m in d["model"]["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in ids and b in ids and a + b in ids:
            merges.append(m)
    d["model"]["merges"] = merges
    n = len(kept)
    for j, at in enumerate(d.get("added_tokens", [])):
        at["id"] = n + j
    specials = (d.get("post_processor") or {}).get("special_tokens", {})
    by_content = {at["content"]: at["id"] for at in d.get("added_tokens", [])}
    for name, sp in specials.items():
        sp["ids"] = [by_content.get(name, 0)]
    return json.dumps(d, separators=(",", ":")).encode()


def tokenizer_seeds():
    texts = [b"Hello, world! 12345 <|im_start|>user\nhi<|im_end|>", "caf\u00e9 \u2581na\u00efve \U0001F600 \t\n  x".encode(),
             b"\xff\xfe invalid \xc3 utf-8 \x00 nul", b"<think>  digits 0123456789</think><|bos|>"]
    tcfg = b'{"add_bos_token": true, "bos_token": "<|bos|>", "eos_token": {"content": "<|eos|>"}}'
    for name in ("tests/data/tokenizer/tiny-digits.json", "tests/data/tokenizer/tiny-metaspace.json"):
        tj = read(name)
        base = os.path.basename(name)[:-5]
        for i, t in enumerate(texts):
            write("tokenizer", "%s_%d" % (base, i), SEP.join([tj, t] + ([tcfg] if i % 2 else [])))
    short = lambda t: len(t) <= 3 and (t.isascii() or t in ("\u0120", "\u2581", "\u010a"))
    small_bl = small_tokenizer("tests/data/tokenizer/tiny-digits.json", lambda t: short(t) and not t.isupper())
    small_ms = small_tokenizer("tests/data/tokenizer/tiny-metaspace.json",
                               lambda t: t in ("<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "<0xA9>") or (short(t) and t.islower()) or t == "\u2581")
    for i, t in enumerate(texts):
        write("tokenizer", "small-bytelevel_%d" % i, SEP.join([small_bl, t] + ([tcfg] if i % 2 else [])))
        write("tokenizer", "small-metaspace_%d" % i, SEP.join([small_ms, t]))
    write("tokenizer", "minillama_qwen_bpe", SEP.join([read("models/minillama-2m/tokenizer.json"), texts[0],
                                                      read("models/minillama-2m/tokenizer_config.json")]))


def l2c_model(dim=8, hidden=16, layers=1, heads=2, kv=1, vocab=16, seq=4, tied=True):
    hs = dim // heads
    kvd = kv * hs
    n = vocab * dim + layers * dim * (2 + 2 * dim + 2 * kvd + 3 * hidden) + dim + seq * hs
    if not tied:
        n += vocab * dim
    hdr = struct.pack("<7i", dim, hidden, layers, heads, kv, vocab if tied else -vocab, seq)
    return hdr + struct.pack("<%df" % n, *[((i * 37) % 101 - 50) / 100.0 for i in range(n)])


def l2c_tokenizer(pieces):
    out = struct.pack("<i", max(len(p) for p in pieces))
    for i, p in enumerate(pieces):
        out += struct.pack("<fi", -float(i), len(p)) + p
    return out


def llama2c_seeds():
    small = [b"<unk>", b"<s>", b"</s>"] + [bytes([c]) for c in b" Onceuptimah"] + [b" O", b"nce"]
    tok = l2c_tokenizer(small[:16])
    write("llama2c", "tiny_tied", SEP.join([l2c_model(), tok, b"Once upon a time"]))
    write("llama2c", "tiny_untied_2layers", SEP.join([l2c_model(layers=2, tied=False), tok]))
    write("llama2c", "tiny_gqa", l2c_model(dim=8, heads=4, kv=2, hidden=8, seq=2))
    tok512 = "/work/shared/models/stories260K/tok512.bin"
    if os.path.exists(tok512):
        with open(tok512, "rb") as f:
            write("llama2c", "vocab512_tok512", SEP.join([l2c_model(vocab=512), f.read(), "caf\u00e9 \U0001F600".encode()]))
    write("llama2c", "header_only", struct.pack("<7i", 64, 172, 5, 8, 4, 512, 512))


def trace_seeds():
    ev = read("tests/fixtures/trace_v1/events.jsonl")
    idx = read("tests/fixtures/trace_v1/index.json")
    lines = ev.splitlines(keepends=True)
    write("trace", "fixture_v1", SEP.join([ev, idx]))
    write("trace", "fixture_v1_no_index", ev)
    write("trace", "fixture_v1_torn", ev[: len(ev) - 40])
    seen = set()
    for ln in lines:  # one record of each type after the run.start
        t = json.loads(ln)["t"]
        if t not in seen:
            seen.add(t)
            write("trace", "start_and_%s" % t.replace(".", "_"), lines[0] + ln)
    write("trace", "unknown_type_and_newer_version",
          b'{"t":"run.start","v":2,"run_id":"00","run":0}\n{"t":"future.thing","x":[1,{"y":null}]}\n')
    write("trace", "step_without_start", b'{"t":"step","idx":0,"superstep":1,"node":"a\\u0000b","op":"agent"}\n')


def lua_seeds():
    """Raw scripts (first byte 0xFF, see fuzz_lua.c): the docs' runnable snippets and the examples."""
    import re
    doc = read("docs/lua-api.md").decode()
    for m in re.finditer(r"```lua\n-- runnable: (\S+)\.lua\n(.*?)```", doc, re.S):
        write("lua", "doc_" + m.group(1), b"\xff" + m.group(2).encode())
    for f in sorted(os.listdir(os.path.join(ROOT, "examples"))):
        if f.endswith(".lua"):
            write("lua", "example_" + f[:-4], b"\xff" + read(os.path.join("examples", f)))


if __name__ == "__main__":
    safetensors_seeds()
    config_seeds()
    tokenizer_seeds()
    llama2c_seeds()
    trace_seeds()
    lua_seeds()
