"""Helpers shared by the tests: counting fused ops as tools see them, comparing gradients."""
from __future__ import annotations

import torch

import fusion_pass

FWD = "fusion_pass::attention"
BWD = "fusion_pass::attention_backward"


def profiled_op_counts(fn):
    """Run fn() under torch.profiler; count top-level calls of our forward and backward ops
    (an op appears nested under its own dispatcher frames; count only the outermost)."""
    from fusion_pass.measure import quiet_profile  # no Kineto USDT lines in the test output
    with quiet_profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    counts = {FWD: 0, BWD: 0}
    for e in prof.events():
        if e.name in counts and (e.cpu_parent is None or e.cpu_parent.name != e.name):
            counts[e.name] += 1
    return result, counts[FWD], counts[BWD]


def graph_op_count(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_function" and "fusion_pass.attention" in str(n.target))


def max_rel_error(got, want) -> float:
    """Largest |got - want| relative to |want|'s max; tensors whose reference is (numerically)
    zero, like a key bias's gradient through a softmax, are measured against the overall scale.
    Non-finite values must be eager's exactly: a NaN or an infinity where the reference has
    another value (or the reference's NaN / inf missing) is an infinite error. (A plain maximum
    over the differences let a NaN through: ``max(0.0, nan)`` is 0.0.)"""
    got, want = list(got), list(want)
    scale = max((w[w.isfinite()].abs().max().item() for w in want
                 if w is not None and w.isfinite().any()), default=1.0)
    worst = 0.0
    for g, w in zip(got, want):
        if g is None or w is None:  # an unused parameter: None on one side, zeros on the other
            other = w if g is None else g
            assert other is None or not other.any(), "one side has a gradient the other lacks"
            continue
        g, w = g.double(), w.double()
        fin, nan = w.isfinite(), w.isnan()
        inf = ~fin & ~nan
        if not (torch.equal(fin, g.isfinite()) and torch.equal(nan, g.isnan())
                and torch.equal(g[inf], w[inf])):
            return float("inf")
        if not fin.any():
            continue
        g, w = g[fin], w[fin]
        denom = max(w.abs().max().item(), 1e-3 * scale, 1e-30)
        worst = max(worst, (g - w).abs().max().item() / denom)
    return worst


def check_fused(fn, *inputs, sites=1, dynamic=None, rtol=1e-5):
    """Compile fn with the backend; assert `sites` fused calls, equal outputs and gradients."""
    expl = fusion_pass.explain(fn, *inputs, dynamic=dynamic)
    assert len(expl.fused) == sites, str(expl)
    ref = fn(*inputs)
    compiled = torch.compile(fn, backend="fusion_pass", dynamic=dynamic)
    diff = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    g = torch.randn_like(ref)
    torch.autograd.grad(compiled(*inputs), diff, g)  # compile forward and backward first
    out, nf, _ = profiled_op_counts(lambda: compiled(*inputs))
    assert nf == sites
    assert max_rel_error([out], [ref]) < rtol
    got, nf, nb = profiled_op_counts(lambda: torch.autograd.grad(out, diff, g))
    assert nb == sites
    assert max_rel_error(got, torch.autograd.grad(ref, diff, g)) < rtol * 10
    return expl


def record_dropout_seeds(monkeypatch):
    """The seeds the tiled forward (the only CPU kernel that takes dropout) is called with, in call
    order: a compiled graph draws them itself, and a test rebuilds the same masks from them."""
    from fusion_pass.kernels import cpu
    seeds = []
    real = cpu.attention_forward

    def spy(*a, **kw):
        seeds.append(int(kw.get("seed", a[5] if len(a) > 5 else 0)))
        return real(*a, **kw)
    monkeypatch.setattr(cpu, "attention_forward", spy)
    return seeds


def dropped(probs, seed: int, p: float):
    """``probs`` (..., Nq, Nk) after the kernels' dropout for ``seed``: kept where the counter-based
    hash of the flat element index says so (kernels/dropout.py), scaled by 1 / (1 - p)."""
    from fusion_pass.kernels.dropout import keep_mask
    idx = torch.arange(probs.numel(), device=probs.device).view(probs.shape)
    return probs * keep_mask(seed, idx, p) / (1 - p)
