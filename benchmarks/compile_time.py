"""Compile time of a real transformers model: backend="fusion_pass" vs stock torch.compile.

    python benchmarks/compile_time.py [--seq 512] [--layers 4] [--hidden 256] [--heads 4] [--train]

BertModel from a BertConfig (no weights downloaded), attn_implementation="eager", fp32, batch 1,
eval mode under ``torch.no_grad()`` (``--train``: also one training step, forward+backward).

Measured, all in one process:
* ``first call (cold)``: wall time of the first call of ``torch.compile(model, backend=...)``,
  i.e. Dynamo tracing + (our pass) + AOT autograd + Inductor codegen and C++ compilation + one run.
  Every cold compile gets a fresh, empty Inductor cache folder (TORCHINDUCTOR_CACHE_DIR), so
  nothing compiled before is reused; a throw-away compile (forward and backward) of an unrelated
  tiny function with each backend first pays the one-time start-up costs (imports, compiler
  probing), so neither backend is charged for them. ``--rounds`` rounds, alternating which
  backend compiles first; the median over rounds is reported.
* ``first call (warm cache)``: the same right after, after ``torch._dynamo.reset()``, with the
  cache filled by that cold compile (what a second process would see).
* ``steady ms``: median (and min) wall time of ``--repeats`` calls after compilation, eager for
  reference, timed round-robin (eager, stock, ours, eager, ...) so that load from other processes
  on this shared machine hits all three alike.
``torch._dynamo.reset()`` is called before every compile.
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fp_compile_time_"))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent


def build(seq, layers, hidden, heads):
    import transformers

    cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=4 * hidden,
                                  max_position_embeddings=max(512, seq),
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    return model, dict(input_ids=ids, attention_mask=torch.ones(1, seq, dtype=torch.long))


def median_ms(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def fused_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "fusion_pass::attention")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2, help="cold compiles per backend")
    ap.add_argument("--train", action="store_true", help="also a training step (fwd+bwd)")
    ap.add_argument("--out", default=str(HERE / "results" / "compile_time.json"))
    args = ap.parse_args(argv)

    torch._dynamo.config.recompile_limit = 64
    model, inputs = build(args.seq, args.layers, args.hidden, args.heads)
    print(f"BertModel: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq "
          f"{args.seq}, eager attention, fp32, batch 1, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}")

    # one-time start-up costs (imports, compiler probing), charged to neither backend
    for backend in ("inductor", "fusion_pass"):
        torch._dynamo.reset()
        x = torch.randn(4, 4, requires_grad=True)
        torch.compile(lambda x: (x * 2).softmax(-1) @ x, backend=backend)(x).sum().backward()

    def fwd(m):
        def run():
            with torch.no_grad():
                return m(**inputs).last_hidden_state
        return run

    def step(m):
        def run():
            out = m(**inputs).last_hidden_state
            out.pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
            return out
        return run

    backends = (("stock torch.compile", "inductor"), ("fusion_pass", "fusion_pass"))
    passes = [("forward", fwd, False)] + ([("forward+backward", step, True)] if args.train else [])
    rows = []
    for label, make, train in passes:
        model.train(train)
        with torch.no_grad():
            ref = model(**inputs).last_hidden_state
        res = {name: dict(pass_=label, impl=name, first_cold_all_s=[], first_warm_all_s=[])
               for name, _ in backends}
        fns = {}
        for rnd in range(args.rounds):
            order = backends if rnd % 2 == 0 else backends[::-1]
            for name, backend in order:
                row = res[name]
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fp_ct_")
                for kind in ("cold", "warm"):
                    from fusion_pass.measure import progress
                    progress(f"{label} {name} round {rnd + 1} of {args.rounds}: first call, {kind} "
                             "cache (compiles)", "compile_time")
                    torch._dynamo.reset()
                    fn = make(torch.compile(model, backend=backend))
                    t = time.perf_counter()
                    out = fn()
                    row[f"first_{kind}_all_s"].append(time.perf_counter() - t)
                print(f"  {label} {name} round {rnd}: first call "
                      f"{row['first_cold_all_s'][-1]:.1f} s cold, "
                      f"{row['first_warm_all_s'][-1]:.1f} s warm cache", flush=True)
                row["max_abs_diff"] = (out.detach() - ref).abs().max().item()
                fns[name] = fn
        # steady state: the last compiled function of each backend, round-robin with eager
        # (all three stay valid: Dynamo's cache entries are kept per backend until reset)
        fns = {"eager": make(model), **fns}
        from fusion_pass.measure import progress
        progress(f"{label}: steady state, {args.repeats} round(s) of eager, stock and ours", "compile_time")
        for f in fns.values():
            f()
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t) * 1e3)
        rows.append(dict(pass_=label, impl="eager"))
        rows.extend(res.values())
        for r in rows[-3:]:
            r["steady_all_ms"] = times[r["impl"]]
            r["steady_ms"] = statistics.median(times[r["impl"]])
            r["steady_min_ms"] = min(times[r["impl"]])
            if "first_cold_all_s" in r:
                r["first_cold_s"] = statistics.median(r["first_cold_all_s"])
                r["first_warm_s"] = statistics.median(r["first_warm_all_s"])
            if r["impl"] == "fusion_pass":
                r["fused_calls"] = fused_calls(fns["fusion_pass"])
        torch._dynamo.reset()

    print("\n| pass | implementation | first call, cold (s) | first call, warm cache (s) | "
          "steady ms (median) | steady ms (min) | median vs stock | max abs diff vs eager | "
          "fusion_pass::attention calls |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        stock = next(x for x in rows if x["pass_"] == r["pass_"] and x["impl"].startswith("stock"))
        cold = f"{r['first_cold_s']:.1f}" if "first_cold_s" in r else "-"
        warm = f"{r['first_warm_s']:.1f}" if "first_warm_s" in r else "-"
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        print(f"| {r['pass_']} | {r['impl']} | {cold} | {warm} | {r['steady_ms']:.1f} | "
              f"{r['steady_min_ms']:.1f} | {r['steady_ms'] / stock['steady_ms']:.2f} | {diff} | "
              f"{r.get('fused_calls', '-')} |")
    for label, *_ in passes:
        s = next(x for x in rows if x["pass_"] == label and x["impl"].startswith("stock"))
        o = next(x for x in rows if x["pass_"] == label and x["impl"] == "fusion_pass")
        print(f"{label}: compile-time ratio ours/stock = {o['first_cold_s'] / s['first_cold_s']:.2f} "
              f"cold, {o['first_warm_s'] / s['first_warm_s']:.2f} warm cache")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(argv=sys.argv[1:], torch=torch.__version__,
                                              threads=torch.get_num_threads(), rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
