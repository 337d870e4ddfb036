"""What the kernel choice's measuring adds to a real model's first compiled call (issue 11: "the
first call's measuring costs less than 2x the compile time it sits in").

    python benchmarks/first_call.py [--models mistral gemma2 gpt2] [--seq 1024] [--rounds 2]

Each measurement is a fresh Python process (so nothing compiled or chosen in-process is reused)
with ``TORCHINDUCTOR_CACHE_DIR`` and ``FUSION_PASS_CACHE_DIR`` set to new empty directories: a
cold cache, what a user's first run on a fresh machine sees. In that process a throw-away compile
of an unrelated tiny function pays the one-time start-up costs (imports, compiler probing), then
the model is built (transformers class from a small config, ``attn_implementation="eager"``, no
weights downloaded, fp32, batch 1) and its first compiled call is timed: a forward under
``no_grad`` (``infer``) or a forward, a loss and its backward (``train``). Three ways:

* ``stock``: ``torch.compile(model)``;
* ``ours, no measuring``: ``backend="fusion_pass"`` with ``FUSION_PASS_MEASURE=0`` (the static
  preference order picks each site's kernel);
* ``ours``: ``backend="fusion_pass"`` as shipped: each site's candidate kernels are run and timed
  once on the first call (FlexAttention's is compiled first), the choice cached on disk.

Reported: the medians over ``--rounds`` processes, the measuring's cost (ours minus ours without
measuring) as a multiple of the compile it sits in (ours without measuring), and the kernels the
measured run chose (``measure.attention_kernels``). A fourth process per model repeats ``ours``
on the now-warm caches (a second run of the same program).

Models: ``mistral`` (2 layers, sliding window 256 shorter than ``--seq``: window sites, where
FlexAttention's kernel is a candidate in training too), ``gemma2`` (soft-cap and alternating
sliding-window layers), ``gpt2`` (causal: ATen's flash kernel against the tiled one, no Flex).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(name: str, seq: int):
    import torch
    import transformers

    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, vocab_size=1000, max_position_embeddings=max(2048, seq),
                  attn_implementation="eager")
    if name == "mistral":
        cfg = transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=256)
        cls = transformers.MistralModel
    elif name == "gemma2":
        cfg = transformers.Gemma2Config(**common, num_key_value_heads=2, head_dim=64,
                                        sliding_window=256, attn_logit_softcapping=50.0,
                                        final_logit_softcapping=None)
        cls = transformers.Gemma2Model
    elif name == "gpt2":
        cfg = transformers.GPT2Config(n_embd=256, n_layer=2, n_head=4, n_positions=max(2048, seq),
                                      vocab_size=1000, attn_pdrop=0.0, embd_pdrop=0.0,
                                      resid_pdrop=0.0, attn_implementation="eager")
        cls = transformers.GPT2Model
    else:
        raise SystemExit(f"unknown model {name}")
    torch.manual_seed(0)
    model = cls(cfg)
    ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(1))
    return model, ids


def child(args) -> None:
    """One measurement, in this (fresh) process; prints one JSON line."""
    import torch

    import fusion_pass  # noqa: F401  (registers the backend)
    from fusion_pass import measure

    for backend in ("inductor", "fusion_pass"):  # start-up costs, charged to no one
        torch._dynamo.reset()
        x = torch.randn(4, 4, requires_grad=True)
        torch.compile(lambda x: (x * 2).softmax(-1) @ x, backend=backend)(x).sum().backward()
    torch._dynamo.reset()
    model, ids = build(args.model, args.seq)
    model.train(args.mode == "train")
    compiled = torch.compile(model, backend="inductor" if args.impl == "stock" else "fusion_pass")

    def call():
        if args.mode == "train":
            compiled(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        else:
            with torch.no_grad():
                compiled(input_ids=ids)

    t = time.perf_counter()
    call()
    first = time.perf_counter() - t
    kernels = ""
    if args.impl != "stock":
        kernels = measure.profile_call(call, kernels=True)[2]
    print("RESULT " + json.dumps(dict(first_s=first, kernels=str(kernels))), flush=True)


def run_child(model, mode, impl, seq, caches=None):
    caches = caches or (tempfile.mkdtemp(prefix="fp_fc_ind_"), tempfile.mkdtemp(prefix="fp_fc_fp_"))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=caches[0], FUSION_PASS_CACHE_DIR=caches[1])
    env.pop("FUSION_PASS_MEASURE", None)
    if impl == "ours_static":
        env["FUSION_PASS_MEASURE"] = "0"
    cmd = [sys.executable, __file__, "--child", "--model", model, "--mode", mode, "--impl", impl,
           "--seq", str(seq)]
    got = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((ln for ln in got.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if got.returncode or line is None:
        raise SystemExit(f"{cmd} failed ({got.returncode}):\n{got.stdout[-3000:]}\n{got.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):]), caches


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["mistral", "gemma2", "gpt2"])
    ap.add_argument("--modes", nargs="*", default=["infer", "train"], choices=["infer", "train"])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "first_call.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    import torch
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"first_call: seq {args.seq}, {args.rounds} round(s), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, {started}", flush=True)
    rows = []
    impls = ("stock", "ours_static", "ours")
    for model in args.models:
        for mode in args.modes:
            res = {i: [] for i in impls}
            chosen, caches = "", None
            for rnd in range(args.rounds):
                for impl in (impls if rnd % 2 == 0 else impls[::-1]):
                    got, c = run_child(model, mode, impl, args.seq)
                    res[impl].append(got["first_s"])
                    if impl == "ours":
                        chosen, caches = got["kernels"], c
                    print(f"  {model} {mode} {impl} round {rnd + 1}: {got['first_s']:.1f} s", flush=True)
            warm, _ = run_child(model, mode, "ours", args.seq, caches)
            med = {i: statistics.median(v) for i, v in res.items()}
            row = dict(model=model, mode=mode, seq=args.seq, **{f"{i}_s": med[i] for i in impls},
                       all=res, ours_warm_s=warm["first_s"], kernels=chosen,
                       measuring_s=med["ours"] - med["ours_static"],
                       measuring_x=(med["ours"] - med["ours_static"]) / med["ours_static"])
            rows.append(row)
            print(f"  {model} {mode}: measuring {row['measuring_s']:.1f} s = "
                  f"{row['measuring_x']:.2f}x the compile it sits in; kernels: {chosen}", flush=True)
    print("\n| model | pass | stock first call (s) | ours, no measuring (s) | ours (s) | "
          "measuring (s) | measuring / compile | ours, warm cache (s) | kernels chosen |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['stock_s']:.1f} | {r['ours_static_s']:.1f} | "
              f"{r['ours_s']:.1f} | {r['measuring_s']:.1f} | {r['measuring_x']:.2f} | "
              f"{r['ours_warm_s']:.1f} | {r['kernels']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(started=started, torch=torch.__version__, rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
