"""Which attention sites of which model families the pass fuses today.

    python benchmarks/families.py [--out benchmarks/results/families.md] [--dump DIR]

Builds each family of ``tests/test_families.py`` (Hugging Face model classes from tiny configs:
hidden 64, 2 layers, 4 heads, eager attention, left padding where the model takes a mask; no
weights downloaded), runs ``fusion_pass.explain`` on one training-mode forward (every dropout
probability 0) and prints a markdown table: the attention sites the model has (known from its
architecture, not from the report), how many the pass fused, how many it did not and the first
reason. A softmax the report calls "not attention" although the family has more sites than were
fused is counted as not fused, with the report's reason. The table is also written to ``--out``.
Nothing is timed. ``--dump DIR`` writes each family's full report (``Explanation.write``).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import torch  # noqa: E402
import transformers  # noqa: E402

import fusion_pass  # noqa: E402
from test_families import FAMILIES  # noqa: E402


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def explain_family(name, dump=None):
    builder, sites, _ = FAMILIES[name]
    torch.manual_seed(0)
    model, inputs = builder()
    expl = fusion_pass.explain(model.train(), **inputs)
    if dump:
        expl.write(str(Path(dump) / name))
    fused = len(expl.fused)
    reason = ""
    if fused < sites:
        # a missed attention site first; else a softmax reported as "not attention"
        stopped = expl.missed or [s for s in expl.sites if not s.fused]
        if stopped:
            s = stopped[0]
            reason = f"{s.reason} (at node `{s.node}`)"
            if not s.attention_like:
                reason = "reported as not attention: " + reason
        else:
            reason = "no softmax site seen"
    mods = []  # distinct score_mods in site order (e.g. encoder, decoder self, cross-attention)
    for s in expl.fused:
        mod = str(s.spec).split(";")[0].replace("score_mod(s) = ", "")
        if mod not in mods:
            mods.append(mod)
    return dict(family=name, model=type(model).__name__, sites=sites, fused=fused,
                not_fused=sites - fused, reason=reason, score_mods=mods)


def stock_fused(name) -> int:
    """Attention sites stock ``torch.compile`` (Inductor's ``fuse_attention``) turns into SDPA:
    top-level SDPA calls in a profiled second forward (eval, no grad) of the compiled model."""
    builder, _, _ = FAMILIES[name]
    torch.manual_seed(0)
    model, inputs = builder()
    torch._dynamo.reset()
    compiled = torch.compile(model.eval())
    with torch.no_grad():
        compiled(**inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            compiled(**inputs)
    torch._dynamo.reset()
    return sum(1 for e in prof.events() if "scaled_dot_product" in e.name
               and (e.cpu_parent is None or "scaled_dot_product" not in e.cpu_parent.name))


def table(rows) -> str:
    lines = ["| family | model | attention sites | fused by fusion_pass | by stock torch.compile "
             "| not fused | first reason not fused | score_mod(s) of the fused sites (distinct) |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        mods = "<br>".join(f"`{_cell(m)}`" for m in r["score_mods"])
        lines.append(f"| {r['family']} | {r['model']} | {r['sites']} | {r['fused']} | "
                     f"{r.get('stock', '')} | {r['not_fused']} | {_cell(r['reason'])} | {mods} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "results" / "families.md"))
    ap.add_argument("--dump", default=None, help="folder for each family's full report")
    ap.add_argument("--no-stock", action="store_true",
                    help="skip compiling each family with stock torch.compile for comparison")
    ap.add_argument("families", nargs="*", default=list(FAMILIES))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()

    t0 = time.time()
    from fusion_pass.measure import progress
    rows = []
    for name in args.families:
        progress(f"{name}: explain (Dynamo and the pass)", "families")
        rows.append(explain_family(name, args.dump))
    if not args.no_stock:
        for r in rows:
            progress(f"{r['family']}: compiling with stock torch.compile, counting SDPA calls", "families")
            r["stock"] = stock_fused(r["family"])
    total_sites = sum(r["sites"] for r in rows)
    total_fused = sum(r["fused"] for r in rows)
    now = datetime.datetime.now(datetime.timezone.utc)
    text = "\n".join([
        "# Attention sites fused per model family",
        "",
        f"`python benchmarks/families.py`, {now:%Y-%m-%d %H:%M} "
        f"UTC; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{time.time() - t0:.0f} s.",
        "",
        "Tiny configs (hidden 64, 2 layers, 4 heads, eager attention; builders in "
        "`tests/test_families.py`), one training-mode forward (dropout 0) through "
        "`fusion_pass.explain`. *attention sites*: what the architecture has (encoder-decoders: "
        "encoder self, decoder self and cross-attention per layer), not what the report found.",
        "",
        table(rows),
        "",
        f"Total: {total_fused} of {total_sites} attention sites fused by fusion_pass"
        + (f"; {sum(r['stock'] for r in rows)} of {total_sites} by stock torch.compile (Inductor's "
           "fuse_attention rewrites into SDPA, counted as SDPA calls in a profiled run)."
           if not args.no_stock else "."),
        "",
    ])
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
