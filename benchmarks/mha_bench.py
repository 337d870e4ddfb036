"""``nn.MultiheadAttention`` as people call it, on CPU: eager, stock ``torch.compile`` and
``backend="fusion_pass"``, with eager ``need_weights=False`` (the module's own SDPA route, what a
user who knows the flag writes) as the anchor.

    python benchmarks/mha_bench.py [--n 1024 2048] [--repeats 5]

B = 1, embed 768, 12 heads (d = 64), batch-first, fp32, the module's default ``need_weights=True``
with the weights dropped (``attn(x, x, x)[0]``). Patterns: ``plain`` (self-attention),
``causal`` (a boolean ``attn_mask`` from ``triu``), ``padding`` (a boolean ``key_padding_mask``,
the last quarter of the keys padded). Forward under ``no_grad`` and forward+backward (gradients of
the input and every parameter); each implementation timed round-robin, median of ``--repeats``
rounds; peak memory of one more call (``fusion_pass.measure``: what the call allocates on top of
what was live). Results: a table on stdout and ``benchmarks/results/mha_bench.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn as nn

from fusion_pass.measure import cpu_model, load_average, time_passes

HERE = Path(__file__).resolve().parent
E, H = 768, 12


class Attn(nn.Module):
    def __init__(self, need_weights=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x, **kw):
        return self.attn(x, x, x, need_weights=self.need_weights, **kw)[0]


def masks(pattern, n):
    if pattern == "causal":
        return {"attn_mask": torch.ones(n, n, dtype=torch.bool).triu(1)}
    if pattern == "padding":
        return {"key_padding_mask": torch.arange(n)[None] >= n - n // 4}
    return {}


def run(n, pattern, repeats):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Attn()
    anchor = Attn(need_weights=False)
    anchor.load_state_dict(eager.state_dict())
    impls = {"eager": eager, "stock": torch.compile(eager, dynamic=False),
             "ours": torch.compile(eager, backend="fusion_pass", dynamic=False), "anchor": anchor}
    params = list(eager.parameters()) + list(anchor.parameters())
    rows = time_passes(impls, [torch.randn(1, n, E)], params, repeats, f"{pattern:8s} N={n:5d}",
                       "mha_bench", **masks(pattern, n))
    return [dict(r, pattern=pattern, N=n) for r in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--patterns", nargs="+", default=["plain", "causal", "padding"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load {load_average()}")
    rows = [r for n in args.n for p in args.patterns for r in run(n, p, args.repeats)]
    print("\npattern   N     pass      eager/ours  stock/ours  ours/anchor  peak ours/anchor")
    for n in args.n:
        for p in args.patterns:
            for pass_ in ("fwd", "fwd+bwd"):
                get = {r["impl"]: r for r in rows if (r["N"], r["pattern"], r["pass_"]) == (n, p, pass_)}
                o = get["ours"]
                print(f"{p:9s} {n:5d} {pass_:8s} {get['eager']['ms'] / o['ms']:10.2f}x "
                      f"{get['stock']['ms'] / o['ms']:10.2f}x {o['ms'] / get['anchor']['ms']:11.2f}x "
                      f"{o['peak_mib'] / max(get['anchor']['peak_mib'], 1e-9):12.2f}x")
    out = HERE / "results" / "mha_bench.json"
    out.write_text(json.dumps({"when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                               "cpu": cpu_model(), "load": load_average(), "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
