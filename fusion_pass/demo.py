"""The main job: compile a real transformers model with the backend and show what happened.

    python -m fusion_pass demo [--model bert|vit] [--seq 1024] [--layers 2]

Builds the model from a config (no weights are downloaded), eager attention as users write it;
compiles it with stock ``torch.compile`` and with ``backend="fusion_pass"``; prints the attention
sites fused, the max difference to eager, and forward / forward+backward time and peak memory of
eager, stock compile and ours, all measured in this run.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import fusion_pass
from fusion_pass.measure import median_ms, peak_bytes, progress


def build(name: str, seq: int, layers: int, hidden: int, heads: int):
    import transformers

    if name == "bert":
        cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=4 * hidden,
                                      max_position_embeddings=max(512, seq), vocab_size=30522,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      attn_implementation="eager")
        model = transformers.BertModel(cfg)
        ids = torch.randint(0, cfg.vocab_size, (1, seq))
        mask = torch.ones(1, seq, dtype=torch.long)
        return model, dict(input_ids=ids, attention_mask=mask)
    if name == "vit":
        side = int(round((seq ** 0.5))) * 16
        cfg = transformers.ViTConfig(hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden,
                                     image_size=side, patch_size=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
        return transformers.ViTModel(cfg), dict(pixel_values=torch.randn(1, 3, side, side))
    raise SystemExit(f"unknown model {name!r}: choose bert or vit")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion_pass demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert", choices=["bert", "vit"])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    progress(f"building {args.model} from a config (no download)")
    model, inputs = build(args.model, args.seq, args.layers, args.hidden, args.heads)
    print(f"model: {type(model).__name__}, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads, sequence {args.seq}, eager attention, fp32, CPU threads "
          f"{torch.get_num_threads()}")

    model.eval()
    progress("tracing the model with Dynamo and running the pass (fusion_pass.explain)")
    with torch.no_grad():
        expl = fusion_pass.explain(model, **inputs)
    print("\n" + expl.summary())
    for s in expl.sites:
        line = f"  {s.label}: {s.status}"
        line += f"  [{s.spec.score_mod_str()}]" if s.fused else f"  ({s.reason})"
        print(line)

    stock = torch.compile(model)
    ours = torch.compile(model, backend="fusion_pass")

    def fwd(m):
        def run():
            with torch.no_grad():
                return m(**inputs).last_hidden_state
        return run

    def train_step(m):
        def run():
            out = m(**inputs).last_hidden_state
            out.float().pow(2).mean().backward()
            return out
        return run

    with torch.no_grad():
        progress("running eager for the reference output")
        ref = model(**inputs).last_hidden_state
        progress("compiling with backend=\"fusion_pass\" (forward; Inductor compiles the rest)")
        diff = (fwd(ours)() - ref).abs().max().item()
    print(f"\nmax |ours - eager| on the output: {diff:.2e}\n")

    rows = []
    impls = (("eager", model), ("stock torch.compile", stock), ("fusion_pass", ours))
    for label, make in (("forward", fwd), ("forward+backward", train_step)):
        model.train(label != "forward")
        fns = [(name, make(m)) for name, m in impls]
        for name, fn in fns:  # compile / warm up
            progress(f"{label}: {'compiling' if name != 'eager' else 'warming up'} {name}")
            fn()
            model.zero_grad(set_to_none=True)
        # round-robin: a slow phase of a shared machine hits every implementation alike
        times = {name: [] for name, _ in fns}
        for r in range(args.repeats):
            progress(f"{label}: timing round {r + 1} of {args.repeats} (each implementation once)")
            for name, fn in fns:
                times[name].append(median_ms(fn, repeats=1, warmup=0))
                model.zero_grad(set_to_none=True)
        for name, fn in fns:
            progress(f"{label}: peak memory of {name} (one call under torch.profiler)")
            mib = peak_bytes(fn) / 2 ** 20
            model.zero_grad(set_to_none=True)
            rows.append((label, name, statistics.median(times[name]), mib))
    progress("done")
    print("| pass | implementation | median ms | vs stock compile | peak MiB | vs stock compile |")
    print("|---|---|---:|---:|---:|---:|")
    for label, name, ms, mib in rows:
        base = next(r for r in rows if r[0] == label and r[1] == "stock torch.compile")
        print(f"| {label} | {name} | {ms:.1f} | {base[2] / ms:.2f}x | {mib:.1f} | "
              f"{mib / base[3]:.2f}x |")
    print("\n(time ratio > 1: faster than stock torch.compile; memory ratio < 1: less memory)")
    print(f"(how: after one compiling call each, {args.repeats} rounds that call eager, stock and "
          "ours once each in turn, median per implementation; peak memory: one more call under "
          "torch.profiler, the most bytes it held above what was live before it, output included)")
    return 0
