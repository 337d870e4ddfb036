"""CPU decoding steps: one query row against a KV cache, the call the pass keeps for Inductor by
default (``fusion_pass.backend._decode_kept``; option ``fuse_cpu_decode=True`` fuses it).

    python benchmarks/cpu_decode.py [--cache 512 2048] [--rows 1 4 16] [--repeats 300]

Two parts, fp32, 2 threads, under ``no_grad``, each implementation timed round-robin (one call of
each, then the next round), the fastest and the median of ``--repeats`` rounds reported:

* **attention alone** (B = 1, 12 query heads, d = 64): ``gpt2``, ``cpu_bench.Gpt2Causal`` (GPT-2's
  sliced ``tril`` buffer with a ``finfo.min`` fill), and ``gqa``, Llama's eager attention (``repeat_kv``
  of 2 K/V heads, the scale, an additive ``finfo.min`` causal mask, softmax in float32), with
  ``--rows`` query rows (1: a decoding step; 4 and 16: speculative or chunked decoding) against
  ``--cache`` keys. Implementations: ``eager``; ``stock`` (``torch.compile``); ``ours``
  (``backend="fusion_pass"``, which keeps one-row sites for Inductor); ``fused``
  (``fusion_pass.Backend(fuse_cpu_decode=True)``: the fused op on every call); ``sdpa`` (the same
  function as one SDPA call with the mask materialised before the timed calls);
* **a whole decoding step** of a Hugging Face model (``gpt2`` and ``llama`` from small configs,
  2 layers, hidden 768, 12 heads, Llama with 4 K/V heads, ``attn_implementation="eager"``): the
  forward of one new token with a cache of ``--cache`` tokens (each call on its own copy of the
  cache, made before the timed calls: the forward appends to it).

Results: a table on stdout and ``benchmarks/results/cpu_decode.json``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import fusion_pass
from fusion_pass.measure import cpu_model, load_average

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_bench import Gpt2Causal  # noqa: E402


class LlamaGqa(nn.Module):
    """Llama's eager attention after the projections: ``repeat_kv``, the scale, the additive mask,
    softmax in float32, P @ V."""

    def forward(self, q, k, v, mask):
        b, hk, n, d = k.shape
        g = q.shape[1] // hk
        k = k[:, :, None].expand(b, hk, g, n, d).reshape(b, hk * g, n, d)
        v = v[:, :, None].expand(b, hk, g, n, d).reshape(b, hk * g, n, d)
        s = torch.matmul(q, k.transpose(2, 3)) * d ** -0.5 + mask
        p = nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)


def _round_robin(fns, repeats):
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(ts) * 1e6, statistics.median(ts) * 1e6) for name, ts in times.items()}


def attention_rows(caches, rows, repeats):
    out = []
    g = torch.Generator().manual_seed(0)
    for pattern in ("gpt2", "gqa"):
        for nk in caches:
            for nq in rows:
                torch._dynamo.reset()
                q = torch.randn(1, 12, nq, 64, generator=g)
                hk = 12 if pattern == "gpt2" else 2
                k, v = (torch.randn(1, hk, nk, 64, generator=g) for _ in range(2))
                if pattern == "gpt2":
                    mod, args = Gpt2Causal(max(4096, nk)), (q, k, v)
                    causal = torch.ones(nq, nk, dtype=torch.bool).tril_(nk - nq)
                    sdpa_args = (q, k, v)
                    sdpa_kw = dict(attn_mask=causal)
                else:
                    keep = torch.arange(nk)[None] <= torch.arange(nk - nq, nk)[:, None]
                    mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[None, None]
                    mod, args = LlamaGqa(), (q, k, v, mask)
                    sdpa_args, sdpa_kw = (q, k, v), dict(attn_mask=mask, enable_gqa=True)
                fns = {
                    "eager": lambda: mod(*args),
                    "stock": torch.compile(mod),
                    "ours": torch.compile(mod, backend="fusion_pass"),
                    "fused": torch.compile(mod, backend=fusion_pass.Backend(fuse_cpu_decode=True)),
                    "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(*sdpa_args, **sdpa_kw),
                }
                calls = {n: (f if n in ("eager", "sdpa") else (lambda f=f: f(*args))) for n, f in fns.items()}
                with torch.no_grad():
                    want = mod(*args)
                    for n, f in calls.items():
                        for _ in range(3):
                            got = f()
                        err = (got - want).abs().max().item()
                        assert err < 1e-4, f"{pattern} {nq}x{nk} {n}: max error {err}"
                    timed = _round_robin(calls, repeats)
                out.append(dict(part="attention", pattern=pattern, rows=nq, cache=nk,
                                **{n: {"min_us": round(a, 1), "median_us": round(b, 1)} for n, (a, b) in timed.items()}))
                print(_line(out[-1]), flush=True)
    return out


def _models():
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel
    gpt2 = GPT2Model(GPT2Config(n_layer=2, n_embd=768, n_head=12, n_positions=4096, vocab_size=1000,
                                attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                attn_implementation="eager"))
    llama = LlamaModel(LlamaConfig(num_hidden_layers=2, hidden_size=768, num_attention_heads=12,
                                   num_key_value_heads=4, intermediate_size=1536, vocab_size=1000,
                                   max_position_embeddings=4096, attn_implementation="eager"))
    return {"gpt2": gpt2, "llama": llama}


def model_rows(caches, repeats):
    out = []
    for name, model in _models().items():
        model.eval()
        for nk in caches:
            torch._dynamo.reset()
            g = torch.Generator().manual_seed(1)
            prompt = torch.randint(0, 1000, (1, nk), generator=g)
            new = torch.randint(0, 1000, (1, 1), generator=g)
            with torch.no_grad():
                cache = model(input_ids=prompt, use_cache=True).past_key_values
                want = model(input_ids=new, past_key_values=copy.deepcopy(cache)).last_hidden_state
            impls = {"eager": model, "stock": torch.compile(model),
                     "ours": torch.compile(model, backend="fusion_pass"),
                     "fused": torch.compile(model, backend=fusion_pass.Backend(fuse_cpu_decode=True))}
            copies = {n: [copy.deepcopy(cache) for _ in range(repeats + 3)] for n in impls}
            calls = {n: (lambda n=n, m=m: m(input_ids=new, past_key_values=copies[n].pop()).last_hidden_state)
                     for n, m in impls.items()}
            with torch.no_grad():
                for n, f in calls.items():
                    for _ in range(3):
                        got = f()
                    err = (got - want).abs().max().item() / want.abs().max().item()
                    assert err < 1e-4, f"{name} {nk} {n}: relative error {err}"
                timed = _round_robin(calls, repeats)
            out.append(dict(part="model", pattern=name, rows=1, cache=nk,
                            **{n: {"min_us": round(a, 1), "median_us": round(b, 1)} for n, (a, b) in timed.items()}))
            print(_line(out[-1]), flush=True)
    return out


def _line(r):
    impls = [n for n in ("eager", "stock", "ours", "fused", "sdpa") if n in r]
    cells = " | ".join(f"{r[n]['min_us']:.0f} / {r[n]['median_us']:.0f}" for n in impls)
    ratio = r["ours"]["min_us"] / r["stock"]["min_us"]
    fused = r["fused"]["min_us"] / r["stock"]["min_us"]
    return f"| {r['part']} | {r['pattern']} | {r['rows']} | {r['cache']} | {cells} | {ratio:.2f} | {fused:.2f} |"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--no-models", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_decode.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    start = load_average()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, "
          f"torch {torch.__version__}, load average {start}")
    print("| part | pattern | rows | cache | eager us (min / median) | stock | ours | fused | sdpa "
          "| ours / stock | fused / stock |")
    print("|---|---|---:|---:|---|---|---|---|---|---:|---:|")
    rows = attention_rows(a.cache, a.rows, a.repeats)
    if not a.no_models:
        rows += model_rows(a.cache, max(20, a.repeats // 10))
    print(f"# load average at the end {load_average()}")
    Path(a.out).write_text(json.dumps({"load_start": start, "load_end": load_average(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
