"""Attention sinks as GPT-OSS writes them, on CPU: eager, stock ``torch.compile`` and
``backend="fusion_pass"``. Stock is the anchor: torch 2.13 has no hand-written sink attention on
CPU (SDPA takes no sinks and returns no lse; FlexAttention's compiled CPU kernel refuses
``return_lse``, with which the rows could be rescaled by hand, and has no backward).

    python benchmarks/sinks_bench.py [--n 1024 2048] [--repeats 5]

B = 1, 8 query heads sharing 2 key/value heads (``repeat_kv``), d = 64, fp32. The module builds
its mask from indices inside the graph as Hugging Face's mask functions do (``causal``, or
``window`` 128 keys), adds it to the scaled scores, appends the sink logit per head, subtracts
the row max, takes the softmax, drops the sink column and multiplies by V (GPT-OSS's
``eager_attention_forward``). Forward under ``no_grad`` and forward+backward (gradients of q, k, v
and the sinks); implementations timed round-robin, median of ``--repeats`` rounds; peak memory of
one more call. Results: a table on stdout and ``benchmarks/results/sinks_bench.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusion_pass.measure import cpu_model, load_average, time_passes

HERE = Path(__file__).resolve().parent
H, HKV, D, WINDOW = 8, 2, 64, 128


def keep_of(pattern, n, device="cpu"):
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    keep = j <= i
    return keep & (i - j < WINDOW) if pattern == "window" else keep


class GptOssAttention(nn.Module):
    def __init__(self, pattern):
        super().__init__()
        self.pattern = pattern
        self.sinks = nn.Parameter(torch.randn(H))

    def forward(self, q, k, v):
        n = q.shape[-2]
        k = k.repeat_interleave(H // HKV, dim=1)
        v = v.repeat_interleave(H // HKV, dim=1)
        mask = torch.zeros(n, n, dtype=q.dtype).masked_fill(~keep_of(self.pattern, n), float("-inf"))
        w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, n, -1)
        c = torch.cat([w, sinks], dim=-1)
        c = c - c.max(dim=-1, keepdim=True).values
        p = F.softmax(c, dim=-1, dtype=c.dtype)[..., :-1]
        return torch.matmul(p, v)


def run(n, pattern, repeats):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = GptOssAttention(pattern)
    impls = {"eager": eager, "stock": torch.compile(eager, dynamic=False),
             "ours": torch.compile(eager, backend="fusion_pass", dynamic=False)}
    inputs = [torch.randn(1, H, n, D), torch.randn(1, HKV, n, D), torch.randn(1, HKV, n, D)]
    rows = time_passes(impls, inputs, [eager.sinks], repeats, f"{pattern:7s} N={n:5d}", "sinks_bench")
    return [dict(r, pattern=pattern, N=n) for r in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--patterns", nargs="+", default=["causal", "window"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load {load_average()}")
    rows = [r for n in args.n for p in args.patterns for r in run(n, p, args.repeats)]
    print("\npattern  N     pass      eager/ours  stock/ours  peak ours/stock  peak ours/eager")
    for n in args.n:
        for p in args.patterns:
            for pass_ in ("fwd", "fwd+bwd"):
                get = {r["impl"]: r for r in rows if (r["N"], r["pattern"], r["pass_"]) == (n, p, pass_)}
                o = get["ours"]
                print(f"{p:8s} {n:5d} {pass_:8s} {get['eager']['ms'] / o['ms']:10.2f}x "
                      f"{get['stock']['ms'] / o['ms']:10.2f}x "
                      f"{o['peak_mib'] / max(get['stock']['peak_mib'], 1e-9):15.2f}x "
                      f"{o['peak_mib'] / max(get['eager']['peak_mib'], 1e-9):15.2f}x")
    out = HERE / "results" / "sinks_bench.json"
    out.write_text(json.dumps({"when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                               "cpu": cpu_model(), "load": load_average(), "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
