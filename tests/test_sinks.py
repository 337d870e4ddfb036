"""Attention sinks (GPT-OSS): the softmax runs over the scores and appended sink logits, and only
the scores' columns of the probabilities are kept (``AttentionSpec.sink``). Each spelling against
eager in float64 (output and every gradient, the sinks' included), with the fused op counted forward
and backward; rows eager makes zero or NaN (no key kept, -inf or +inf sinks, inf in v) compared
element by element; slices that do not drop exactly the sinks are near misses; a tiny GPT-OSS
trained and generating."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hypothesis import given, settings, strategies as st

import fusion_pass

from helpers import max_rel_error, profiled_op_counts

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

B, H, N, D = 2, 4, 40, 32


class Sinks(nn.Module):
    """GPT-OSS's spelling by default: appended, shifted by the row max, cut with ``[..., :-1]``."""

    def __init__(self, spelling="gpt-oss", m=1):
        super().__init__()
        self.spelling = spelling
        shape = (H, m) if spelling != "per-row" else (H, N, m)
        self.sinks = nn.Parameter(torch.randn(shape))

    def forward(self, q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
        if self.spelling == "per-row":
            t = self.sinks.unsqueeze(0).expand(q.shape[0], -1, -1, -1)
        else:
            t = self.sinks.reshape(1, H, 1, -1).expand(q.shape[0], -1, q.shape[-2], -1)
        if self.spelling == "first":  # the sinks before the scores, no shift, cut with [..., m:]
            p = F.softmax(torch.cat([t, w], dim=-1), dim=-1)[..., t.shape[-1]:]
        else:
            c = torch.cat([w, t], dim=-1)
            if self.spelling == "gpt-oss":
                c = c - c.max(dim=-1, keepdim=True).values
                p = F.softmax(c, dim=-1, dtype=c.dtype)[..., :-1]
            else:  # amax shift, cut at the scores' own size
                c = c - torch.amax(c, -1, keepdim=True)
                p = torch.softmax(c, -1)[:, :, :, :w.size(-1)]
        return torch.matmul(p, v)


def _inputs(dtype=torch.float64, empty_row=True, scale=1.0):
    q, k, v = (torch.randn(B, H, N, D, dtype=dtype) * scale for _ in range(3))
    mask = torch.zeros(B, 1, N, N, dtype=dtype).masked_fill(torch.ones(N, N).triu(1).bool(), float("-inf"))
    if empty_row:
        mask[1, :, 3] = float("-inf")  # a row that keeps no key: the sinks take all of it
    return q, k, v, mask


def _compare(model, args, rtol=1e-10):
    """Compiled vs eager: output (NaN where eager's is), gradients of q, k, v and the sinks; one
    fused call forward and backward."""
    args = [a.detach().requires_grad_(i < 3) for i, a in enumerate(args)]
    leaves = args[:3] + [model.sinks]
    compiled = torch.compile(model, backend="fusion_pass")
    torch.autograd.grad(compiled(*args).nansum(), leaves, allow_unused=True)
    out, nf, _ = profiled_op_counts(lambda: compiled(*args))
    ref = model(*args)
    assert nf == 1
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    assert max_rel_error([out[fin]], [ref[fin]]) < rtol
    g = torch.randn_like(ref).masked_fill(~fin, 0)
    got, _, nb = profiled_op_counts(lambda: torch.autograd.grad(out, leaves, g))
    assert nb == 1
    want = torch.autograd.grad(ref, leaves, g)
    assert max_rel_error(got, want) < rtol * 10
    return out


@pytest.mark.parametrize("spelling,m", [("gpt-oss", 1), ("first", 1), ("amax", 2), ("per-row", 2)])
def test_sink_spellings_fused_and_equal_to_eager(spelling, m):
    torch.manual_seed(0)
    model = Sinks(spelling, m).double()
    out = _compare(model, _inputs())
    assert out[1, :, 3].abs().max() == 0  # the empty row: every weight went to the sinks


def test_sinks_under_dynamic_shapes():
    """One compiled graph for two lengths: the slice's bound is symbolic (total - 1 == Nk)."""
    torch.manual_seed(4)
    model = Sinks().double()
    compiled = torch.compile(model, backend="fusion_pass", dynamic=True)
    for n in (24, 40):
        q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for _ in range(3))
        mask = torch.zeros(B, 1, n, n, dtype=torch.float64).masked_fill(
            torch.ones(n, n).triu(1).bool(), float("-inf"))
        compiled(q, k, v, mask)
        out, nf, _ = profiled_op_counts(lambda: compiled(q, k, v, mask))
        assert nf == 1
        assert max_rel_error([out], [model(q, k, v, mask)]) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinks_in_model_precisions(dtype):
    """float32 (ATen's kernel is a candidate for the forward) and bf16: as close to a float64 eager
    as eager itself is, forward and backward."""
    torch.manual_seed(1)
    model = Sinks().to(dtype)
    args = _inputs(dtype)
    args = [a.detach().requires_grad_(i < 3) for i, a in enumerate(args)]
    ref64 = Sinks().double()
    ref64.load_state_dict(model.state_dict())
    args64 = [a.detach().double().requires_grad_(i < 3) for i, a in enumerate(args)]
    compiled = torch.compile(model, backend="fusion_pass")
    torch.autograd.grad(compiled(*args).sum(), args[:3])  # compiled (and measured) first
    out, nf, _ = profiled_op_counts(lambda: compiled(*args))
    assert nf == 1
    eager, want = model(*args), ref64(*args64)
    slack = 1.5 if dtype == torch.bfloat16 else 4.0
    tol = (eager.double() - want).abs().max().item() * slack + 1e-6
    assert (out.double() - want).abs().max().item() <= tol
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, args[:3] + [model.sinks], g.to(dtype))
    eag = torch.autograd.grad(eager, args[:3] + [model.sinks], g.to(dtype))
    ref = torch.autograd.grad(want, args64[:3] + [ref64.sinks], g)
    for a, e, r in zip(got, eag, ref):
        err_e = (e.double() - r).abs().max().item()
        assert (a.double() - r).abs().max().item() <= err_e * slack + 1e-5 * r.abs().max().item()


def test_sink_rows_eager_makes_nan_or_zero():
    """A row that keeps no key is the sinks' alone (zero output) unless v holds inf there (0 * inf:
    NaN, as eager's matmul); a +inf or NaN sink makes its head's rows NaN; -inf sinks are no sinks."""
    torch.manual_seed(2)
    model = Sinks().double()
    with torch.no_grad():
        model.sinks[0] = float("inf")
        model.sinks[1] = float("nan")
        model.sinks[2] = float("-inf")
    q, k, v, mask = _inputs()
    v[1, 3, 5, 7] = float("inf")  # batch 1, head 3: its empty row 3 reads v[..., 7] as NaN
    compiled = torch.compile(model, backend="fusion_pass")
    with torch.no_grad():
        compiled(q, k, v, mask)  # compiled first
        out, nf, _ = profiled_op_counts(lambda: compiled(q, k, v, mask))
        ref = model(q, k, v, mask)
    assert nf == 1
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(ref[:, :2]).all() and torch.isnan(ref[1, 3, 3, 7])
    fin = ~torch.isnan(ref)
    assert torch.isinf(ref[fin]).sum() == torch.isinf(out[fin]).sum()
    ok = torch.isfinite(ref)
    assert (out[ok] - ref[ok]).abs().max() < 1e-12


def test_sinks_with_dropout_use_the_kernels_mask(monkeypatch):
    """Dropout on the probabilities cut back from the sinks (GPT-OSS in training): the compiled
    output and gradients equal eager's computation with the kernel's own mask for the seed drawn."""
    from helpers import dropped, record_dropout_seeds

    class Dropped(Sinks):
        def forward(self, q, k, v, mask):
            w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
            t = self.sinks.reshape(1, H, 1, -1).expand(q.shape[0], -1, q.shape[-2], -1)
            c = torch.cat([w, t], dim=-1)
            p = F.softmax(c - c.max(dim=-1, keepdim=True).values, dim=-1)[..., :-1]
            return torch.matmul(F.dropout(p, 0.25, training=True), v)

        def reference(self, q, k, v, mask, seed):
            w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
            t = self.sinks.reshape(1, H, 1, -1).expand(q.shape[0], -1, q.shape[-2], -1)
            p = F.softmax(torch.cat([w, t], dim=-1), dim=-1)[..., :-1]
            return torch.matmul(dropped(p, seed, 0.25), v)

    torch.manual_seed(3)
    model = Dropped().double()
    seeds = record_dropout_seeds(monkeypatch)
    args = [a.requires_grad_(i < 3) for i, a in enumerate(_inputs())]
    leaves = args[:3] + [model.sinks]
    compiled = torch.compile(model, backend="fusion_pass")
    torch.autograd.grad(compiled(*args).sum(), leaves)  # compiled first
    seeds.clear()
    out, nf, _ = profiled_op_counts(lambda: compiled(*args))
    assert nf == 1 and len(seeds) == 1
    ref = model.reference(*args, seeds[0])
    assert max_rel_error([out], [ref]) < 1e-10
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, leaves, g)
    assert max_rel_error(got, torch.autograd.grad(ref, leaves, g)) < 1e-9


def _eager_sinks(q, k, v, keep, sinks, scale):
    """The reference program: GPT-OSS's, on the op's operands (k, v with grouped heads)."""
    g = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(g, -3), v.repeat_interleave(g, -3)
    w = (q @ k.transpose(-1, -2)) * scale
    w = w.masked_fill(~keep, float("-inf"))
    t = sinks.expand(*w.shape[:-1], sinks.shape[-1])
    c = torch.cat([w, t], -1)
    return torch.softmax(c - c.max(-1, keepdim=True).values, -1)[..., :w.shape[-1]] @ v


@settings(max_examples=25, deadline=None)
@given(nq=st.integers(1, 70), nk=st.integers(1, 70), m=st.integers(1, 3), hkv=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2]), empty=st.floats(0, 0.5), magnitude=st.sampled_from([1.0, 30.0]),
       sink_value=st.sampled_from([None, float("-inf"), float("inf"), float("nan"), 40.0, -40.0]),
       bad_v=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_sink_op_matches_eager_everywhere(nq, nk, m, hkv, group, empty, magnitude, sink_value, bad_v, seed):
    """The op on random shapes, grouped heads, rows keeping no key, large scores, special sink
    values and inf in v: NaN where eager's is NaN, equal elsewhere, gradients included."""
    from fusion_pass.kernels.spec import AttentionSpec, ScoreOp
    gen = torch.Generator().manual_seed(seed)
    h = hkv * group
    q = torch.randn(2, h, nq, 16, generator=gen, dtype=torch.float64) * magnitude
    k = torch.randn(2, hkv, nk, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(2, hkv, nk, 16, generator=gen, dtype=torch.float64)
    keep = torch.rand(2, 1, nq, nk, generator=gen) > 0.3
    keep &= torch.rand(2, 1, nq, 1, generator=gen) >= empty  # whole rows masked
    sinks = torch.randn(1, h, 1, m, generator=gen, dtype=torch.float64)
    if sink_value is not None:
        sinks[0, 0, 0, 0] = sink_value
    if bad_v:
        v[1, 0, nk // 2, 3] = float("inf")
    scale = 0.25
    spec = AttentionSpec(score_ops=(ScoreOp("mul", "const", value=scale, dtype="float64"),
                                    ScoreOp("fill_not", "tensor", value=float("-inf"), index=0, dtype="float64")),
                         captured=("tensor", "sink"), qk_dtype="float64", softmax_dtype="float64",
                         prob_dtype="float64", out_dtype="float64", sink=m)
    leaves = [t.requires_grad_() for t in (q, k, v, sinks)]
    out = torch.ops.fusion_pass.attention(q, k, v, [keep, sinks], spec.to_key())[0]
    ref = _eager_sinks(q, k, v, keep, sinks, scale)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    assert not fin.any() or max_rel_error([out[fin]], [ref[fin]]) < 1e-10
    if not torch.isfinite(ref).all():
        return  # gradients are compared where the output is finite (an inf or NaN loss trains nothing)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    for a, b in zip(got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert max_rel_error([torch.nan_to_num(a) for a in got], [torch.nan_to_num(b) for b in want]) < 1e-9


@settings(max_examples=20, deadline=None)
@given(nq=st.integers(1, 300), nk=st.integers(1, 300), m=st.integers(1, 2), group=st.sampled_from([1, 2]),
       kind=st.sampled_from(["random", "causal", "none"]), magnitude=st.sampled_from([1.0, 10.0]),
       seed=st.integers(0, 2 ** 16))
def test_sink_op_in_float32_as_close_as_eager(nq, nk, m, group, kind, magnitude, seed):
    """float32 (ATen's kernel or the tiled path, as measured): output and gradients as close to
    float64 eager as float32 eager is. Found by it: with scores far above the sinks, 1 - c rounds
    to 0 in float32 and the sinks' gradient was lost. At scores of ~20 (magnitude 10) the
    gradients of q and k are ill-conditioned in float32 (dS of the leading key is P'(dP - D'), a
    difference of relative size w, the sinks' weight: rounding is amplified by 1/w, 16% of dS
    at w = 4e-7, for any rounding order), so there only the output and v and the sinks'
    gradients are compared; the float64 test above covers those magnitudes."""
    from fusion_pass.kernels.spec import AttentionSpec, ScoreOp
    gen = torch.Generator().manual_seed(seed)
    h = 2 * group
    q = torch.randn(1, h, nq, 64, generator=gen) * magnitude
    k, v = torch.randn(1, 2, nk, 64, generator=gen), torch.randn(1, 2, nk, 64, generator=gen)
    if kind == "random":
        keep = torch.rand(1, 1, nq, nk, generator=gen) > 0.3
    elif kind == "causal":
        keep = (torch.arange(nk)[None] <= torch.arange(nq)[:, None])[None, None]
    else:
        keep = torch.ones(1, 1, nq, nk, dtype=torch.bool)
    sinks = torch.randn(1, h, 1, m, generator=gen) * 3
    spec = AttentionSpec(score_ops=(ScoreOp("mul", "const", value=0.125),
                                    ScoreOp("fill_not", "tensor", value=float("-inf"), index=0)),
                         captured=("tensor", "sink"), sink=m)
    ours = [t.requires_grad_() for t in (q, k, v, sinks)]
    eager = [t.detach().clone().requires_grad_() for t in ours]
    exact = [t.detach().double().requires_grad_() for t in ours]
    out = torch.ops.fusion_pass.attention(*ours[:3], [keep, ours[3]], spec.to_key())[0]
    e32 = _eager_sinks(*eager[:3], keep, eager[3], 0.125)
    ref = _eager_sinks(*exact[:3], keep, exact[3], 0.125)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))

    def err(a, b):
        return ((a.double() - b).nan_to_num().abs().max() / b.nan_to_num().abs().max().clamp_min(1e-30)).item()
    # the forward's rescaling reads the kernels' float32 lse, rounded to |lse| 2^-24 (at scores of
    # 50 the sinks' weight is ~3e-6 off, where eager's exp(t - max) is often exact)
    floor = 2e-5
    assert err(out, ref) <= 4 * err(e32, ref) + floor
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    grads = zip(torch.autograd.grad(out, ours, g.float()), torch.autograd.grad(e32, eager, g.float()),
                torch.autograd.grad(ref, exact, g), "qkvt")
    for a, e, r, name in grads:
        if magnitude == 1.0 or name in "vt":
            assert err(a, r) <= 4 * err(e, r) + floor, name


@pytest.mark.parametrize("index", ["keep-sink", "one-short"])
def test_a_slice_that_keeps_other_columns_is_a_near_miss(index):
    class Wrong(Sinks):
        def forward(self, q, k, v, mask):
            w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
            t = self.sinks.reshape(1, H, 1, -1).expand(q.shape[0], -1, q.shape[-2], -1)
            p = F.softmax(torch.cat([w, t], dim=-1), dim=-1)
            p = p[..., 1:] if index == "keep-sink" else p[..., :-2]
            v2 = v if index == "keep-sink" else v[:, :, :-1]
            return torch.matmul(p, v2)

    model = Wrong().double()
    expl = fusion_pass.explain(model, *_inputs())
    assert not expl.fused and len(expl.missed) == 1, str(expl)
    # one short: the P @ V product's inner dims differ from the scores' first
    assert ("not provably exactly the scores'" if index == "keep-sink" else "inner dims") in str(expl)


def test_probabilities_with_sinks_used_elsewhere_are_a_near_miss():
    class Returned(Sinks):
        def forward(self, q, k, v, mask):
            w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
            t = self.sinks.reshape(1, H, 1, -1).expand(q.shape[0], -1, q.shape[-2], -1)
            p = F.softmax(torch.cat([w, t], dim=-1), dim=-1)
            return torch.matmul(p[..., :-1], v), p[..., -1]  # the sinks' weights are returned

    expl = fusion_pass.explain(Returned().double(), *_inputs())
    assert not expl.fused and "also used outside the region" in str(expl), str(expl)


# ---- GPT-OSS ---------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def tiny_gpt_oss():
    """Two layers, sliding window then full attention, grouped heads (4 query, 2 key/value), four
    experts; sinks drawn away from HF's zero init, so that they matter."""
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, vocab_size=100,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=64, initializer_range=0.2, rope_scaling=None,
        pad_token_id=0, bos_token_id=1, eos_token_id=None, attn_implementation="eager",
        experts_implementation="eager")  # (the grouped-GEMM experts take no float64)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 1.0)
    return model


def test_gpt_oss_sites_found_and_fused():
    """Both layers' attention (sliding window and full) is fused, in training mode too."""
    model = tiny_gpt_oss().train()
    ids = torch.randint(2, 100, (2, 20))
    expl = fusion_pass.explain(model, input_ids=ids)
    assert len(expl.fused) == 2 and not expl.missed, str(expl)
    assert all(s.spec.sink == 1 for s in expl.fused)


@pytest.mark.slow
def test_gpt_oss_trains_as_eager():
    """float64, left-padded batch: the loss and every parameter gradient (sinks included) equal to
    eager's, both layers' attention fused forward and backward."""
    model = tiny_gpt_oss().double().train()
    ids = torch.randint(2, 100, (2, 20))
    attn = torch.ones_like(ids)
    attn[1, :5] = 0
    compiled = torch.compile(model, backend="fusion_pass")
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(fn):  # float64 throughout (HF's own loss upcasts to float32 only)
        logits = fn(input_ids=ids, attention_mask=attn).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    torch.autograd.grad(loss_of(compiled), params, allow_unused=True)
    loss, nf, _ = profiled_op_counts(lambda: loss_of(compiled))
    assert nf == 2
    got, _, nb = profiled_op_counts(lambda: torch.autograd.grad(loss, params, allow_unused=True))
    assert nb == 2
    ref = loss_of(model)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    # stock Inductor alone moves this model's float64 loss by ~1e-7 (part of it computes in
    # float32): the pass may add nothing beyond that
    torch._dynamo.reset()
    stock = loss_of(torch.compile(model, backend="fusion_pass", options={"enable": False}))
    stock_g = torch.autograd.grad(stock, params, allow_unused=True)
    assert abs(loss.item() - ref.item()) <= 2 * abs(stock.item() - ref.item()) + 1e-10
    assert max_rel_error(got, want) <= 2 * max_rel_error(stock_g, want) + 1e-9
    sinks = [i for i, (n, _) in enumerate(model.named_parameters()) if n.endswith("sinks")]
    assert sinks and all(want[i].abs().max() > 0 for i in sinks)


@pytest.mark.slow
def test_gpt_oss_generates_eager_tokens():
    """Greedy generation, float32: eager's tokens; the prefill's attention fused (decoding steps
    of one row are kept for Inductor on CPU, as for every model)."""
    model = tiny_gpt_oss().eval()
    ids = torch.randint(2, 100, (2, 9))
    options = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want = model.generate(ids, **options)
    model.forward = torch.compile(model.forward, backend=fusion_pass.Backend(strict=True))
    with fusion_pass.collect_reports() as reports:
        got = model.generate(ids, **options)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert (a - b).abs().max() < 1e-4 * b.abs().max()
    sites = [s for r in reports for s in r.sites if s.attention_like]
    assert sum(s.fused for s in sites) == 2, sites  # the prefill's two layers


def test_a_shift_that_is_not_the_row_max_is_kept():
    """softmax(x - x.amax(0)) is not softmax(x) (the shift varies along the row): the rule that
    drops GPT-OSS's row-max shift must not fire, and the compiled result stays eager's."""
    from fusion_pass.canonicalize import rule_shifted_softmax

    def f(x):
        return torch.softmax(x - x.amax(0, keepdim=True), -1)

    def g(x):
        return torch.softmax(x - x.amax(-1, keepdim=True), -1)

    x = torch.randn(5, 7, dtype=torch.float64) * 30
    fired = {}
    for fn in (f, g):
        gm = torch.fx.symbolic_trace(fn)
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp
        FakeTensorProp(gm, FakeTensorMode()).propagate(x)
        for n in gm.graph.nodes:
            n.meta["example_value"] = n.meta.get("val")
        fired[fn.__name__] = any(rule_shifted_softmax(n) is not None for n in gm.graph.nodes)
    assert fired == {"f": False, "g": True}
    out = torch.compile(f, backend="fusion_pass")(x)
    assert torch.allclose(out, f(x), rtol=1e-12, atol=0)
