"""FlexAttention's CPU kernel as a forward (``kernels/cpu_flex.py``): inference sites, and training
sites whose backward is the tiled path's.

* the kernel against float64 by the 2x-eager rule, on the patterns of test_kernel_paths.py it
  takes (float32, inference), each compiled once (seconds: a few in the default run, the rest
  under ``-m slow``);
* the per-call refusals: inputs not finite, scores without a finite bound, rows keeping no key
  under a -inf mask (eager: NaN, FlexAttention: 0);
* the rewrite proves ``inference`` only where no input of the site requires a gradient;
* end to end: a compiled model under ``no_grad`` runs the forward on FlexAttention when routed
  there, and gives eager's answer.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fusion_pass.kernels import cpu_flex, ops as kops, select
from fusion_pass.kernels.spec import AttentionSpec

from test_kernel_paths import PATTERNS, SHAPES, _check, _eager, _qkv, _spec

# (pattern, shape) in the default run (each new spec compiles FlexAttention for seconds): a
# window after a learnable bias (fill_not -inf), HF's additive finfo.min causal with a scalar
# scale, a head-dependent finfo.min window on grouped heads, the KV cache's causal offset (rows
# without a key where Nq > Nk: refused); soft-capping, rank-3 biases and the rest under -m slow
DEFAULT = {("pred_window", "odd"), ("pred_causal_additive", "odd"), ("pred_head_window", "gqa"),
           ("pred_causal_offset", "short_keys")}


def _inference_spec(pattern, shape):
    ops, kinds, captured, needs_grad, chain, *extra = PATTERNS[pattern](shape.score, torch.float32)
    spec = dataclasses.replace(_spec(ops, kinds, torch.float32, extra=extra[0] if extra else None),
                               inference=True)
    return spec, captured, chain, extra[0] if extra else {}


def _cases():
    for shape_name, shape in SHAPES.items():
        for name in shape.patterns or PATTERNS:
            spec, *_ = _inference_spec(name, shape)
            if cpu_flex.plan(spec) is None:
                continue
            marks = [] if (name, shape_name) in DEFAULT else [pytest.mark.slow]
            yield pytest.param(name, shape_name, marks=marks, id=f"{name}-{shape_name}")


def test_plan_takes_the_patterns_it_should():
    """Which patterns the Flex path takes: float32 inference chains whose masking step is the last
    and reads no data tensor; never a mask tensor's fill (its rows change per call), a data
    predicate (padding) or a 16-bit chain, and never without ``inference``; and which routes offer
    it: not where ATen's kernel takes the spec with no mask tensor (``select.FLEX_DOMINATED``)."""
    shape = SHAPES["odd"]
    taken = {n for n in PATTERNS if cpu_flex.plan(_inference_spec(n, shape)[0]) is not None}
    assert {"scale", "scalar_div", "softcap", "bias_learnable", "padding_mask", "pred_window",
            "pred_causal_fill", "pred_causal_additive", "pred_prefix_lm", "pred_chunked",
            "pred_sdpa_window", "pred_head_window", "pred_window_two_sided"} <= taken, taken
    assert not taken & {"bool_fill", "where_keep", "mask_inf", "mask_finfo_min", "mixed",
                        "pred_padding_fill", "pred_padding_additive", "pred_sdpa_padding"}, taken
    spec = _inference_spec("pred_window", shape)[0]
    ops, kinds, *rest = PATTERNS["pred_window"](shape.score, torch.bfloat16)
    low = _spec(ops, kinds, torch.bfloat16, extra=rest[-1])
    assert cpu_flex.plan(dataclasses.replace(low, inference=True)) is None
    assert cpu_flex.plan(dataclasses.replace(spec, dropout_p=0.1)) is None
    # training: offered where the backward is the tiled path's anyway (it never reads the
    # forward's lse, which this path does not compute), not where ATen's backward would need it
    train = dataclasses.replace(spec, inference=False)
    assert select.route(spec).cpu == select.route(train).cpu == ("tiled", "flex")
    # a mask tensor ATen reads as attn_mask: all three measured; not in training (ATen's backward)
    padding = _inference_spec("padding_mask", shape)[0]
    assert select.route(padding).cpu == ("aten_flash", "tiled", "flex")
    assert select.route(dataclasses.replace(padding, inference=False)).cpu == ("aten_flash", "tiled")
    # no mask tensor for ATen (plain, is_causal): FlexAttention always lost there, not offered
    for name in ("scale", "scalar_div", "pred_causal_additive", "pred_causal_fill"):
        plain = _inference_spec(name, shape)[0]
        assert cpu_flex.plan(plain) is not None, name
        assert select.route(plain).cpu == ("aten_flash", "tiled"), name


@pytest.mark.parametrize("pattern,shape_name", list(_cases()))
def test_flex_matches_float64(pattern, shape_name):
    torch.manual_seed(0)
    shape = SHAPES[shape_name]
    spec, captured, chain, extra = _inference_spec(pattern, shape)
    q, k, v = _qkv(shape, torch.float32)
    got = cpu_flex.forward(spec, q, k, v, captured)
    if min(shape.nq, shape.nk) < cpu_flex.MIN_LENGTH:
        assert got is None, "a decode row is not FlexAttention's to compute"
        return
    if min(shape.d, shape.dv or shape.d) < cpu_flex.MIN_HEAD_DIM:
        assert got is None, "a head dim below MIN_HEAD_DIM is not FlexAttention's to compute"
        return
    if extra.get("empty_rows") and cpu_flex.plan(spec).neg_inf:
        assert got is None, "a row keeping no key under -inf must be refused (eager: NaN)"
        return
    assert got is not None, f"the Flex path refused {pattern} on {shape_name}"
    out, lse = got
    go = torch.zeros(shape.lead + (shape.nq, shape.dv or shape.d))
    needs = [False] * len(captured)
    ref = _eager(q, k, v, captured, needs, chain, go, torch.float64, safe=spec.safe_softmax)
    low = _eager(q, k, v, captured, needs, chain, go, torch.float32, safe=spec.safe_softmax)
    assert out.dtype == torch.float32 and out.shape == ref[0].shape
    _check("out", out, low[0], ref[0], torch.float32)
    assert torch.isnan(lse).all()  # never read: an inference spec has no backward


def _window_case(n=40, d=32):
    torch.manual_seed(1)
    spec, captured, chain, _ = _inference_spec("pred_window", SHAPES["odd"])
    q, k, v = (torch.randn(2, 3, n, d) for _ in range(3))
    bias = torch.randn(1, 3, n, n)
    return spec, q, k, v, [bias]


@pytest.mark.parametrize("where", ["q", "k", "v", "bias"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_refuses_non_finite_inputs(where, bad):
    """A NaN or inf anywhere reaches eager's rows through 0 * v or a NaN max; FlexAttention may
    skip it (a masked block) or turn the row to 0: refused, the next candidate computes it."""
    spec, q, k, v, caps = _window_case()
    assert cpu_flex.forward(spec, q, k, v, caps) is not None
    t = {"q": q, "k": k, "v": v, "bias": caps[0]}[where]
    t[0, 1, 7, 3 if where != "bias" else 9] = bad
    assert cpu_flex.forward(spec, q, k, v, caps) is None


def test_refuses_scores_without_a_finite_bound():
    """Finite inputs whose product may overflow (|q| |k| d beyond float32's range): eager's scores
    can be inf there, so no exactness is proven."""
    spec, q, k, v, caps = _window_case()
    q[0, 0, 0, 0] = 3e37
    k[0, 0, 0, 0] = 3e37
    assert cpu_flex.forward(spec, q, k, v, caps) is None


def test_rows_keeping_no_key_are_refused_only_under_minus_inf():
    """The KV cache's causal offset with Nq > Nk: the first rows keep no key. With a -inf fill
    eager gives NaN there: refused. The finfo.min form gives a uniform row in eager, which the
    kernel computes over every key too (no BlockMask: skipping needs a kept key per row)."""
    torch.manual_seed(2)
    shape = dataclasses.replace(SHAPES["short_keys"], d=32)  # Flex takes head dims >= 32
    spec, captured, chain, extra = _inference_spec("pred_causal_offset", shape)
    assert extra["empty_rows"]
    q, k, v = _qkv(shape, torch.float32)
    assert cpu_flex.forward(spec, q, k, v, captured) is None
    ops = tuple(dataclasses.replace(o, value=torch.finfo(torch.float32).min) if o.kind == "fill" else o
                for o in spec.score_ops)
    fin = dataclasses.replace(spec, score_ops=ops)
    out, _ = cpu_flex.forward(fin, q, k, v, captured)
    m = torch.arange(shape.nk)[None, :] > torch.arange(shape.nq)[:, None] + shape.nk - shape.nq
    s = (q.double() @ k.double().transpose(-1, -2) * 0.125).masked_fill(m, torch.finfo(torch.float32).min)
    ref = torch.softmax(s, -1) @ v.double()
    assert (out.double() - ref).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------
# The rewrite's proof, and end to end
# ---------------------------------------------------------------------------------------------

class Window(torch.nn.Module):
    def __init__(self, w=5):
        super().__init__()
        self.w = w
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, x):
        q = k = v = self.proj(x).view(x.shape[0], x.shape[1], 2, 32).transpose(1, 2)
        n = x.shape[1]
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        keep = (j <= i) & (j > i - self.w)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(32)
        s = s.masked_fill(~keep, float("-inf"))
        return F.softmax(s, -1) @ v


@pytest.fixture
def spy_specs(monkeypatch):
    """The specs the attention op ran with (forward and backward)."""
    seen = []
    orig = kops._choice_key

    def key(direction, spec, *a):
        seen.append(AttentionSpec.from_key(spec))
        return orig(direction, spec, *a)
    monkeypatch.setattr(kops, "_choice_key", key)
    return seen


@pytest.mark.parametrize("mode", ["no_grad", "frozen", "training"])
def test_rewrite_proves_inference_only_without_gradients(mode, spy_specs, fresh_dynamo):
    model = Window()
    x = torch.randn(2, 12, 64)
    if mode == "frozen":
        model.requires_grad_(False)
    compiled = torch.compile(model, backend="fusion_pass")
    if mode == "no_grad":
        with torch.no_grad():
            out = compiled(x)
    else:
        out = compiled(x)
    assert spy_specs, "the attention op did not run"
    assert {s.inference for s in spy_specs} == {mode != "training"}
    torch.testing.assert_close(out, model(x))


def test_refuses_head_dims_its_template_got_wrong():
    """torch 2.13's CPU template returned wrong rows at head dims 8 and 16 (an AVX2 machine, a
    window BlockMask, 40 rows; reads of memory it did not write): below MIN_HEAD_DIM the path
    declines, the next candidate computes the call."""
    for d in (8, 16):
        spec, q, k, v, caps = _window_case(d=d)
        assert cpu_flex.forward(spec, q, k, v, caps) is None
    spec, q, k, v, caps = _window_case(d=cpu_flex.MIN_HEAD_DIM)
    assert cpu_flex.forward(spec, q, k, v, caps) is not None


def test_end_to_end_inference_runs_on_flex(monkeypatch, fresh_dynamo):
    """Routed to FlexAttention first (the static order, as a measured choice would), a compiled
    model under no_grad gets eager's answer from it; in training too (a window: no ATen kernel),
    its forward runs there and the tiled backward gives eager's gradients."""
    calls = []
    orig_route, orig_fwd = select.route, cpu_flex.forward

    def route(spec):
        r = orig_route(spec)
        return dataclasses.replace(r, cpu=("flex",) + tuple(c for c in r.cpu if c != "flex")) \
            if "flex" in r.cpu else r

    def fwd(*a):
        got = orig_fwd(*a)
        calls.append(got is not None)
        return got
    monkeypatch.setattr(select, "route", route)
    monkeypatch.setattr(cpu_flex, "forward", fwd)
    monkeypatch.setenv("FUSION_PASS_MEASURE", "0")
    model = Window(w=7)
    compiled = torch.compile(model, backend="fusion_pass")
    for n in (40, 29):  # a second length: the same compiled kernel (dynamic lengths)
        x = torch.randn(2, n, 64)
        with torch.no_grad():
            out = compiled(x)
            ref = model(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls == [True, True]
    x = torch.randn(2, 40, 64)
    out = compiled(x)
    g = torch.randn(out.shape)
    grads = torch.autograd.grad(out, list(model.parameters()), g)
    assert calls == [True, True, True]  # training: the forward on Flex too
    ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, list(model.parameters()), g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Differential: magnitudes and non-finite values against the per-call proof
# ---------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(pattern=st.sampled_from(["pred_window", "pred_causal_additive", "pred_head_window"]),
       exponent=st.integers(-3, 20), seed=st.integers(0, 2 ** 16),
       poison=st.sampled_from([None, "q", "k", "v"]), value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_flex_is_eager_or_refuses(pattern, exponent, seed, poison, value):
    """Whatever the magnitudes (up to 1e20 per element, so scores beyond float32's range) and
    wherever a NaN or inf sits, the Flex path either refuses the call or gives eager's answer:
    the same NaN pattern as eager in float64 and finite entries within the 2x-eager rule."""
    shape = SHAPES["gqa" if pattern == "pred_head_window" else "odd"]
    spec, captured, chain, _ = _inference_spec(pattern, shape)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (t * 10.0 ** (exponent / 2) for t in (
        torch.randn(t.shape, generator=g) for t in _qkv(shape, torch.float32)))
    if poison is not None:
        t = {"q": q, "k": k, "v": v}[poison]
        t.view(-1)[int(torch.randint(t.numel(), (1,), generator=g))] = value
    got = cpu_flex.forward(spec, q, k, v, captured)
    if got is None:
        assert poison is not None or exponent > 10, "refused a call with moderate finite inputs"
        return
    assert poison is None, "took a call with a non-finite input"
    go = torch.zeros(shape.lead + (shape.nq, shape.dv or shape.d))
    needs = [False] * len(captured)
    ref = _eager(q, k, v, captured, needs, chain, go, torch.float64)
    low = _eager(q, k, v, captured, needs, chain, go, torch.float32)
    _check("out", got[0], low[0], ref[0], torch.float32)


def test_block_mask_keeps_an_additive_masks_kept_value(monkeypatch):
    """With the BlockMask the score_mod leaves the masking step out; an additive mask whose kept
    value is not 0 (where(keep, 0.5, finfo.min)) still adds it to the kept elements, rounded as
    eager rounds it. (Adding it shifts every kept element of a row alike, so the softmax moves only
    by that rounding: this checks the path runs with the BlockMask and stays eager's function.)"""
    used = []
    real = cpu_flex._kernel
    monkeypatch.setattr(cpu_flex, "_kernel", lambda s, by_mask: used.append(by_mask) or real(s, by_mask))
    torch.manual_seed(3)
    shape = SHAPES["odd"]
    spec, captured, chain, _ = _inference_spec("pred_causal_additive", shape)
    m = dataclasses.replace(spec.masks[0], kept=0.5)
    spec = dataclasses.replace(spec, masks=(m,))
    q, k, v = _qkv(shape, torch.float32)
    out, _ = cpu_flex.forward(spec, q, k, v, captured)
    assert used == [True]  # the BlockMask carried the mask
    i = torch.arange(shape.nq)[:, None]
    j = torch.arange(shape.nk)[None, :]
    add = torch.where(j <= i, 0.5, float(torch.finfo(torch.float32).min)).double()
    s = q.double() @ k.double().transpose(-1, -2) * float(captured[0]) + add
    ref = torch.softmax(s, -1) @ v.double()
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_measuring_flex_does_not_recompile_the_callers_graph(tmp_path, monkeypatch, fresh_dynamo):
    """The Flex call marks its lengths dynamic on views of its own, never on the caller's tensors:
    marking the model's q (passed straight through) made the model's compiled graph recompile on
    its next call."""
    monkeypatch.setenv("FUSION_PASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(select, "MEASURE_MIN_ELEMENTS", 0)
    select.CHOICES.clear()

    def f(q, k, v):
        n = q.shape[-2]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        keep = (j <= i) & (j > i - 16)  # a window: FlexAttention is a candidate
        s = (q @ k.transpose(-1, -2) * 0.125).masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v
    q, k, v = (torch.randn(1, 8, 64, 32) for _ in range(3))
    compiles = []
    backend = torch._dynamo.lookup_backend("fusion_pass")
    compiled = torch.compile(f, backend=lambda gm, ex: compiles.append(1) or backend(gm, ex))
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    assert len(compiles) == 1, "the model's graph was compiled again"
    measured = [v for v in select.CHOICES.mem.values()]
    assert measured and "flex" in measured[0]["ms"], measured
    select.CHOICES.clear()


def test_a_finite_fill_that_outweighs_the_kept_scores_is_not_skipped():
    """where(keep, s, -1e4) with every kept score near -1e5: eager's softmax puts the weight on the
    masked keys (-1e4 > -1e5), so skipping them (a BlockMask) would be wrong; the margin check
    drops the BlockMask and the kernel computes every key, as eager."""
    shape = SHAPES["odd"]
    spec, captured, chain, _ = _inference_spec("pred_window", shape)
    ops = tuple(dataclasses.replace(o, value=-1e4) if o.kind == "fill_not" else o for o in spec.score_ops)
    spec = dataclasses.replace(spec, score_ops=ops)
    torch.manual_seed(4)
    u = torch.randn(shape.lead + (1, shape.d))
    u = u / u.norm(dim=-1, keepdim=True)
    q = (u * 700.0).expand(shape.lead + (shape.nq, shape.d)).contiguous()
    k = (-u * 700.0).expand(shape.lead + (shape.nk, shape.d)).contiguous()
    v = torch.randn(shape.lead + (shape.nk, shape.d))
    bias = torch.zeros_like(captured[0])
    out, _ = cpu_flex.forward(spec, q, k, v, [bias])
    keep = (torch.arange(shape.nk)[None, :] <= torch.arange(shape.nq)[:, None]) & \
        (torch.arange(shape.nq)[:, None] - torch.arange(shape.nk)[None, :] < 5)
    s = torch.where(keep, (q.double() @ k.double().transpose(-1, -2)) * 0.25, -1e4)
    ref = torch.softmax(s, -1) @ v.double()
    assert (out.double() - ref).abs().max().item() < 1e-4
