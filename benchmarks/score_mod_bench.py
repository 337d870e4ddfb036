"""CPU benchmark of score modifications as models spell them (issue #3's targets):

* ``softcap``: Gemma-2's soft-capping, ``tanh(s * scale / cap) * cap``;
* ``alibi``: BLOOM's ALiBi through ``baddbmm(alibi, q, k^T, beta=1, alpha=scale)`` on
  (B*H, N, D) tensors, ``alibi = slope[h] * j`` (broadcast over queries), as BLOOM builds it;
* ``softcap_causal``, ``alibi_causal``: the same followed by the causal mask the models add
  (built in the model from aranges); FlexAttention gets a causal BlockMask;
* ``alibirel_causal``: ALiBi written by hand on (B, H, N, D), ``slopes[:, None, None] * (j - i)``
  from aranges (a (1, H, N, N) tensor in eager), plus the causal mask; Flex's score_mod is
  ``score + slope[h] * (j - i)`` with a causal BlockMask.

B=1, H=12, d=64, fp32, N from --sizes (default 2048). Forward (no grad) and forward+backward, in one
run, round-robin: eager, stock ``torch.compile``, ours, and compiled FlexAttention with the
equivalent hand-written ``score_mod`` (forward only: FlexAttention has no CPU backward). Median ms.

    python benchmarks/score_mod_bench.py [--sizes 1024 2048] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from fusion_pass.measure import progress

SCALE = 0.125
CAP = 50.0


def _causal(n, device):
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return torch.where(j <= i, 0.0, torch.finfo(torch.float32).min)


class SoftCap(nn.Module):
    """Gemma-2: scale, soft-cap, then (``causal=True``) the causal mask, built in the model."""

    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) * SCALE
        s = torch.tanh(s / CAP) * CAP
        if self.causal:
            s = s + _causal(q.shape[-2], q.device)
        return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


class Alibi(nn.Module):
    """BLOOM: baddbmm with the ALiBi tensor on (B*H) views, then (``causal=True``) the mask."""

    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v, alibi):
        bh, n, d = q.shape
        s = alibi.baddbmm(batch1=q, batch2=k.transpose(-1, -2), beta=1.0, alpha=SCALE)
        if self.causal:
            s = s + _causal(n, q.device)
        return torch.bmm(torch.softmax(s, dim=-1), v)


class AlibiRel(nn.Module):
    """ALiBi written by hand on (B, H, N, D): per-head slopes times (j - i), built from aranges in
    the model, plus (``causal=True``) the causal mask; the pass computes slope[h] * (j - i) in the
    kernel instead of reading the (1, H, N, N) tensor."""

    def __init__(self, h, causal=False):
        super().__init__()
        self.register_buffer("slopes", slopes(h))
        self.causal = causal

    def forward(self, q, k, v):
        n = q.shape[-2]
        pos = torch.arange(n, device=q.device)
        rel = pos[None, :] - pos[:, None]
        s = torch.matmul(q, k.transpose(-1, -2)) * SCALE + (self.slopes[:, None, None] * rel).unsqueeze(0)
        if self.causal:
            s = s + _causal(n, q.device)
        return torch.matmul(torch.softmax(s, dim=-1), v)


def slopes(h):
    return torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)])


def flex(variant, h, n):
    """Compiled FlexAttention with the equivalent hand-written score_mod; causal variants use a
    causal BlockMask (Flex skips the empty tiles, as its users are told to)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    fa = torch.compile(flex_attention)
    sl = slopes(h)

    if variant.startswith("softcap"):
        def score_mod(score, b, hh, i, j):
            return torch.tanh(score / CAP) * CAP
    elif variant.startswith("alibirel"):
        def score_mod(score, b, hh, i, j):
            return score + sl[hh] * (j - i)
    else:
        def score_mod(score, b, hh, i, j):
            return score + sl[hh] * j
    block_mask = None
    if variant.endswith("causal"):
        block_mask = create_block_mask(lambda b, hh, i, j: j <= i, None, None, n, n, device="cpu")
    return lambda q, k, v: fa(q, k, v, score_mod=score_mod, scale=SCALE, block_mask=block_mask)


def timed(fn):
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048])
    ap.add_argument("--variants", nargs="+",
                    default=["softcap", "alibi", "softcap_causal", "alibi_causal", "alibirel_causal"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    B, H, D = 1, 12, 64
    print("| variant | N | pass | implementation | median ms | vs stock | vs Flex |")
    print("|---|---:|---|---|---:|---:|---:|")
    for variant in args.variants:
        for n in args.sizes:
            torch._dynamo.reset()
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
            causal = variant.endswith("causal")
            model = SoftCap(causal) if variant.startswith("softcap") else \
                AlibiRel(H, causal) if variant.startswith("alibirel") else Alibi(causal)
            if variant.startswith("alibi") and not variant.startswith("alibirel"):
                alibi = (slopes(H)[:, None, None] * torch.arange(n)[None, None, :]).repeat(B, 1, 1)
                inputs = (q.reshape(B * H, n, D), k.reshape(B * H, n, D), v.reshape(B * H, n, D), alibi)
            else:
                inputs = (q, k, v)
            impls = {"eager": model, "stock": torch.compile(model),
                     "ours": torch.compile(model, backend="fusion_pass")}
            for pass_ in ("fwd", "fwdbwd"):
                calls = {}
                for name, f in impls.items():
                    if pass_ == "fwd":
                        calls[name] = lambda f=f: _nograd(f, inputs)
                    else:
                        leaves = [t.clone().requires_grad_(True) for t in inputs[:3]]
                        args_ = leaves + list(inputs[3:])
                        calls[name] = lambda f=f, a=args_: f(*a).sum().backward()
                if pass_ == "fwd":
                    ff = flex(variant, H, n)
                    calls["flex (compiled)"] = lambda: _nograd(ff, (q, k, v))
                for name, c in calls.items():  # compile / warm up
                    progress(f"{variant} N={n} {pass_}: compiling / warming up {name}", "score_mod_bench")
                    c()
                times = {name: [] for name in calls}
                progress(f"{variant} N={n} {pass_}: timing {args.repeats} round(s)", "score_mod_bench")
                for _ in range(args.repeats):
                    for name, c in calls.items():
                        times[name].append(timed(c))
                med = {name: statistics.median(t) for name, t in times.items()}
                for name, ms in med.items():
                    fl = med.get("flex (compiled)")
                    print(f"| {variant} | {n} | {pass_} | {name} | {ms:.1f} | "
                          f"{med['stock'] / ms:.2f}x | {(fl / ms) if fl else float('nan'):.2f}x |",
                          flush=True)


def _nograd(f, inputs):
    with torch.no_grad():
        return f(*inputs)


if __name__ == "__main__":
    main()
