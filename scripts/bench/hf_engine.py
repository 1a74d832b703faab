#!/usr/bin/env python3
"""hf_engine.py - the HF transformers baseline of `kvmesh bench engine`, same workload, same card.

Random bf16 weights at the real shapes of the model (config values from perf.md §2; no download), sdpa
attention, eager PyTorch (no torch.compile), as the KVCOMM paper's dense baseline runs, or (--compile) with a
static KV cache and torch.compile(mode="reduce-overhead"), the fastest setting transformers documents:
  - TTFT: one forward of a P-token prompt with logits_to_keep=1 (batch 1);
  - decode at batch 1 and batch B: one forward of one new token per sequence over a P-token KV cache
    (DynamicCache, cropped back to P after each step so the context stays constant), greedy argmax on the GPU.
Timed with CUDA events after warm-up; medians and p10-p90 of many reps (perf.md §6). Writes JSON that
`kvmesh bench engine --hf-json FILE` prints beside its own numbers. The weights are SYNTHETIC (random).
"""
import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

SHAPES = {
    "llama-3.1-8b": dict(kind="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "qwen2.5-7b": dict(kind="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       rope=dict(rope_type="default", rope_theta=1e6)),
}


def make_config(name):
    s = dict(SHAPES[name])
    kind, rope = s.pop("kind"), s.pop("rope")
    cls = LlamaConfig if kind == "llama" else Qwen2Config
    try:  # transformers 5: rope_parameters
        cfg = cls(**s, rope_parameters=dict(rope))
    except TypeError:
        r = dict(rope)
        theta = r.pop("rope_theta")
        cfg = cls(**s, rope_theta=theta, rope_scaling=r if r.get("rope_type") != "default" else None)
    cfg._attn_implementation = "sdpa"
    return cfg


def stats(v):
    v = sorted(v)
    n = len(v)
    q = lambda p: v[min(n - 1, max(0, round(p * (n - 1))))]
    return dict(median=statistics.median(v), p10=q(0.1), p90=q(0.9), mean=sum(v) / n, n=n, reps=v)


def timed(fn, warmup, reps, pre=None):
    """Device (events) and host times of reps calls of fn after warmup calls; pre(), when given, runs before each
    call, outside the timed span."""
    for _ in range(warmup):
        if pre:
            pre()
        fn()
    torch.cuda.synchronize()
    dev, host = [], []
    for _ in range(reps):
        if pre:
            pre()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        fn()
        b.record()
        b.synchronize()
        host.append((time.perf_counter() - t0) * 1e3)
        dev.append(a.elapsed_time(b))
    return dev, host


def record(out, key, dev, host, label, unit):
    """Stores a figure's device and host statistics under key / key_host and prints its median."""
    hkey = key.replace("_ms", "_host_ms")
    out[key], out[hkey] = stats(dev), stats(host)
    print(f"{label}: {out[key]['median']:.2f} {unit} (host {out[hkey]['median']:.2f})", flush=True)


def write_json(a, out):
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def static_cache(cfg, bs, n):
    """A StaticCache of bs sequences of n positions (the constructor's arguments changed across versions)."""
    from transformers import StaticCache
    for kw in (dict(config=cfg, max_cache_len=n, max_batch_size=bs, device="cuda", dtype=torch.bfloat16),
               dict(config=cfg, max_cache_len=n),
               dict(config=cfg, batch_size=bs, max_cache_len=n, device="cuda", dtype=torch.bfloat16)):
        try:
            return StaticCache(**kw)
        except TypeError:
            continue
    raise RuntimeError("StaticCache: no known constructor signature")


def compiled(a, model, cfg, prompts, out):
    """--compile: the same measurements with a static cache and the forward compiled: the prefill in the default
    mode, the decode steps in --compile-mode (reduce-overhead = CUDA graphs). The caches are filled by an eager
    forward before anything is compiled, and the prefill's is reset before each timed prefill (outside the timed
    span): transformers 5.17's static cache failed a device-side bounds check (index < P + 8) in the second
    compiled prefill and in the ninth decode step of a cache refilled at one position (H100 call of 2026-12-07).
    Decode steps write at increasing positions P, P + 1, ... in a cache with room for all of them; the static
    cache's attention spans its whole length whatever the position, so the cost per step does not grow."""
    P, B = a.prompt, a.batch
    dmode = None if a.compile_mode == "default" else a.compile_mode
    pfwd = torch.compile(model.forward, fullgraph=True)
    dfwd = torch.compile(model.forward, mode=dmode, fullgraph=True)
    out["mode"] = f"static cache + torch.compile (prefill: default mode; decode: {a.compile_mode}), fullgraph"
    out["phase"] = a.phase
    pos = torch.arange(P, device="cuda")
    steps = (a.warmup + 2 + a.reps * 5) + 8
    with torch.inference_mode():
        if a.phase in ("all", "prefill"):
            cache = static_cache(cfg, 1, P + 8)
            model(input_ids=prompts[0], past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1)
            cache.reset()
            t0 = time.time()
            k = [0]

            def prefill():
                pfwd(input_ids=prompts[k[0] % 3], past_key_values=cache, cache_position=pos, use_cache=True,
                     logits_to_keep=1)
                k[0] += 1

            prefill()
            torch.cuda.synchronize()
            out["compile_prefill_s"] = time.time() - t0
            dev, host = timed(prefill, a.warmup + 2, a.reps, pre=cache.reset)
            out["ttft_ms"], out["ttft_host_ms"] = stats(dev), stats(host)
            print(f"HF compiled TTFT {P} tokens: {out['ttft_ms']['median']:.2f} ms (host "
                  f"{out['ttft_host_ms']['median']:.2f}; compile {out['compile_prefill_s']:.0f} s)", flush=True)
            del cache
        for bs, key in ((1, "decode_b1_ms"), (B, "decode_bB_ms")):
            if a.phase not in ("all", "decode1" if bs == 1 else "decodeB"):
                continue
            cache = static_cache(cfg, bs, P + steps)
            ids = torch.cat([prompts[i % 3] for i in range(bs)], 0)
            r = model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1)
            state = [r.logits[:, -1].argmax(-1, keepdim=True).clone()]
            cpos = torch.tensor([P], device="cuda")

            def step():
                r2 = dfwd(input_ids=state[0], past_key_values=cache, cache_position=cpos, use_cache=True,
                          logits_to_keep=1)
                state[0] = r2.logits[:, -1].argmax(-1, keepdim=True).clone()
                cpos.add_(1)

            t1 = time.time()
            step()
            torch.cuda.synchronize()
            out[key.replace("_ms", "_compile_s")] = time.time() - t1
            dev, host = timed(step, a.warmup + 2, a.reps * 5)
            record(out, key, dev, host, f"HF compiled decode batch {bs} at {P} context", "ms/step")
            del cache, r
            torch.cuda.empty_cache()
    return write_json(a, out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile", action="store_true",
                    help="static cache + torch.compile instead of eager + DynamicCache")
    ap.add_argument("--compile-mode", default="reduce-overhead",
                    help="torch.compile mode for the decode steps (the prefill uses the default mode): "
                         "reduce-overhead (CUDA graphs) or default")
    ap.add_argument("--phase", default="all", choices=["all", "prefill", "decode1", "decodeB"],
                    help="with --compile: only this measurement (one process each, so that one crash of the "
                         "compiler loses one figure)")
    ap.add_argument("--ttft-prompts", default=None,
                    help="comma-separated prompt lengths: time only the TTFT at each (one model load), e.g. the "
                         "agents' prompts of `kvmesh bench kvcomm`: 1520,2040,2560,3080,3600")
    a = ap.parse_args()
    P, B = a.prompt, a.batch
    torch.manual_seed(0)
    cfg = make_config(a.model)
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():  # never time zeros: every parameter random and non-zero
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    torch.cuda.synchronize()
    load_s = time.time() - t0
    V = cfg.vocab_size
    g = torch.Generator(device="cuda").manual_seed(1)
    prompts = [torch.randint(1, V, (1, P), device="cuda", generator=g) for _ in range(3)]
    out = dict(bench="hf_engine", model=a.model, synthetic_weights=True, prompt_tokens=P, batch=B,
               torch=torch.__version__, transformers=transformers.__version__,
               card=torch.cuda.get_device_name(0), attn="sdpa", dtype="bfloat16", load_s=load_s)
    if a.compile:
        return compiled(a, model, cfg, prompts, out)
    if a.ttft_prompts:
        out["ttft_by_prompt"] = {}
        with torch.inference_mode():
            for n in (int(x) for x in a.ttft_prompts.split(",")):
                ps = [torch.randint(1, V, (1, n), device="cuda", generator=g) for _ in range(3)]
                k = [0]

                def prefill_n():
                    model(input_ids=ps[k[0] % 3], use_cache=True, logits_to_keep=1)
                    k[0] += 1

                dev, host = timed(prefill_n, a.warmup, a.reps)
                out["ttft_by_prompt"][str(n)] = dict(dev=stats(dev), host=stats(host))
                print(f"HF TTFT {n} tokens: {statistics.median(dev):.2f} ms (host {statistics.median(host):.2f})", flush=True)
        return write_json(a, out)
    with torch.inference_mode():
        k = [0]

        def prefill():
            model(input_ids=prompts[k[0] % 3], use_cache=True, logits_to_keep=1)
            k[0] += 1

        dev, host = timed(prefill, a.warmup, a.reps)
        out["ttft_ms"], out["ttft_host_ms"] = stats(dev), stats(host)
        print(f"HF TTFT {P} tokens: {out['ttft_ms']['median']:.2f} ms (host {out['ttft_host_ms']['median']:.2f})", flush=True)

        for bs, key in ((1, "decode_b1_ms"), (B, "decode_bB_ms")):
            ids = torch.cat([prompts[i % 3] for i in range(bs)], 0)
            r = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache = r.past_key_values
            nxt = r.logits[:, -1].argmax(-1, keepdim=True)
            state = [nxt]

            def step():
                r2 = model(input_ids=state[0], past_key_values=cache, use_cache=True, logits_to_keep=1)
                state[0] = r2.logits[:, -1].argmax(-1, keepdim=True)
                cache.crop(P)

            dev, host = timed(step, a.warmup, a.reps * 5)
            record(out, key, dev, host, f"HF decode batch {bs} at {P} context", "ms/step")
            del cache, r
            torch.cuda.empty_cache()
    return write_json(a, out)


if __name__ == "__main__":
    sys.exit(main())
