"""The main job: compile a real transformers model with the backend and show what happened.

    python -m fusion_pass demo                      # Mistral, default attention, 4096 tokens
    python -m fusion_pass demo --pad 0.125          # the same with left padding
    python -m fusion_pass demo --model bert         # BERT, eager attention, 1024 tokens

Builds the model from a config (no weights are downloaded). The default, ``mistral``, is built the
way a user builds it: no ``attn_implementation`` argument, so transformers gives it its default
implementation, ``scaled_dot_product_attention`` calls (SDPA) with a sliding-window and padding
mask built in the graph; ``bert`` and ``vit`` use eager attention (``--attn`` changes either).
Compiles it with stock ``torch.compile`` and with ``backend="fusion_pass"``; prints the attention
sites fused, the kernel each fused call ran on, the max difference to the uncompiled model, and
forward / forward+backward time and peak memory of the uncompiled model, stock compile and ours,
all measured in this run.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import fusion_pass
from fusion_pass.measure import load_average, profile_call, progress, round_robin, site_lines

# per model: sequence, layers, hidden, heads, attention implementation
DEFAULTS = {"mistral": (4096, 2, 256, 4, "default"), "bert": (1024, 2, 384, 6, "eager"),
            "vit": (1024, 2, 384, 6, "eager")}


def build(name: str, seq: int, layers: int, hidden: int, heads: int, attn: str = "eager",
          pad: float = 0.0):
    """(model, inputs). ``attn``: "default" gives no ``attn_implementation`` argument (transformers
    picks SDPA), anything else is passed as it is. ``pad``: fraction of left-padded tokens."""
    import transformers

    how = {} if attn == "default" else dict(attn_implementation=attn)
    if name == "mistral":
        cfg = transformers.MistralConfig(hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads,
                                         num_key_value_heads=max(1, heads // 2),
                                         intermediate_size=4 * hidden, vocab_size=1000,
                                         sliding_window=256, max_position_embeddings=max(4096, seq),
                                         **how)
        model = transformers.MistralModel(cfg)
        return model, _text_inputs(1000, seq, pad)
    if name == "bert":
        cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=4 * hidden,
                                      max_position_embeddings=max(512, seq), vocab_size=30522,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      **how)
        return transformers.BertModel(cfg), _text_inputs(cfg.vocab_size, seq, pad)
    if name == "vit":
        side = int(round((seq ** 0.5))) * 16
        cfg = transformers.ViTConfig(hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden,
                                     image_size=side, patch_size=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, **how)
        return transformers.ViTModel(cfg), dict(pixel_values=torch.randn(1, 3, side, side))
    raise SystemExit(f"unknown model {name!r}: choose mistral, bert or vit")


def _text_inputs(vocab: int, seq: int, pad: float):
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[:, :int(seq * pad)] = 0
    return dict(input_ids=torch.randint(0, vocab, (1, seq)), attention_mask=mask)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion_pass demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mistral", choices=list(DEFAULTS))
    ap.add_argument("--seq", type=int, default=None, help="tokens (default: 4096 mistral, 1024 others)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None, help="(mistral: half as many K/V heads)")
    ap.add_argument("--attn", default=None, help="attention implementation: 'default' (no "
                    "attn_implementation argument: SDPA), 'eager' or 'sdpa' (default: 'default' for "
                    "mistral, 'eager' for bert and vit)")
    ap.add_argument("--pad", type=float, default=0.0, help="fraction of left-padded tokens (text models)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    for key, value in zip(("seq", "layers", "hidden", "heads", "attn"), DEFAULTS[args.model]):
        if getattr(args, key) is None:
            setattr(args, key, value)

    torch.manual_seed(0)
    progress(f"building {args.model} from a config (no download)")
    model, inputs = build(args.model, args.seq, args.layers, args.hidden, args.heads, args.attn,
                          args.pad)
    impl = model.config._attn_implementation
    said = ("the default: no attn_implementation argument" if args.attn == "default"
            else f"attn_implementation={args.attn!r}")
    print(f"model: {type(model).__name__}, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads, sequence {args.seq}"
          + (f" ({int(args.seq * args.pad)} left-padded)" if args.pad else "")
          + f", attention {impl!r} ({said}), fp32, CPU threads {torch.get_num_threads()}")

    model.eval()
    progress("tracing the model with Dynamo and running the pass (fusion_pass.explain)")
    with torch.no_grad():
        expl = fusion_pass.explain(model, **inputs)
    print("\n" + site_lines(expl))
    for text in dict.fromkeys(line for s in expl.fused for line in s.masks):
        print(f"    mask: {text}")

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
        progress("running the model uncompiled for the reference output")
        ref = model(**inputs).last_hidden_state
        progress("compiling with backend=\"fusion_pass\" (forward; Inductor compiles the rest)")
        diff = (fwd(ours)() - ref).abs().max().item()
    print(f"\nmax |ours - uncompiled| on the output: {diff:.2e}\n")

    def clear():
        model.zero_grad(set_to_none=True)

    rows, kernels = [], {}
    impls = (("uncompiled", model), ("stock torch.compile", stock), ("fusion_pass", ours))
    load = load_average()
    for label, make in (("forward", fwd), ("forward+backward", train_step)):
        model.train(label != "forward")
        fns = {name: make(m) for name, m in impls}
        for name, fn in fns.items():  # compile / warm up
            progress(f"{label}: {'compiling' if name != 'uncompiled' else 'warming up'} {name}")
            fn()
            clear()
        # round-robin: a slow phase of a shared machine hits every implementation alike
        times = round_robin(fns, args.repeats, before=clear, say=lambda r: progress(
            f"{label}: timing round {r + 1} of {args.repeats} (each implementation once)"))
        for name, fn in fns.items():
            progress(f"{label}: peak memory of {name} (one call under torch.profiler)")
            clear()
            peak, _, used = profile_call(fn, kernels=True)
            if used:
                kernels[label] = used
            clear()
            rows.append((label, name, statistics.median(times[name]), min(times[name]), peak / 2 ** 20))
    progress("done")
    print("| pass | implementation | median ms | min ms | vs stock compile | peak MiB | vs stock compile |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, name, ms, fastest, mib in rows:
        base = next(r for r in rows if r[0] == label and r[1] == "stock torch.compile")
        print(f"| {label} | {name} | {ms:.1f} | {fastest:.1f} | {base[2] / ms:.2f}x | {mib:.1f} | "
              f"{mib / base[4]:.2f}x |")
    print("\n(time ratio > 1: faster than stock torch.compile; memory ratio < 1: less memory)")
    for label, used in kernels.items():
        print(f"(fusion_pass kernels, {label}: {used})")
    print(f"(how: after one compiling call each, {args.repeats} rounds that call the uncompiled "
          "model, stock and ours once each in turn, median and fastest per implementation; peak "
          "memory: one more call under torch.profiler, the most bytes it held above what was live "
          f"before it, output included; load average before timing {load}, after "
          f"{load_average()}: other jobs on the machine slow every implementation, ours' tiled "
          "kernels more than fused ones)")
    return 0
