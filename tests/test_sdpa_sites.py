"""Attention written as ``scaled_dot_product_attention`` calls (issue 14): the default
implementation of Hugging Face models. A call whose mask the pass proves a predicate (causal +
padding, sliding windows, built from aranges in the graph) is taken: its kernels skip tiles and
never read the N x N mask. A call that already runs SDPA's best kernel (no mask, ``is_causal``
alone, a data mask) is *kept* and reported as handled, so ``strict`` does not count it as a miss.
SDPA's softmax is safe (a fully masked row gives zeros): the taken sites reproduce that."""
import math

import pytest
import torch
import torch.nn.functional as F

import fusion_pass

import test_families as fam
from helpers import check_fused, dropped, max_rel_error, profiled_op_counts, record_dropout_seeds

B, H, N, D = 2, 4, 19, 8


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py: Dynamo reset around each test


def _qkv(heads=H):
    return [torch.randn(B, h, N, D, requires_grad=True) for h in (H, heads, heads)]


def _window(n, w=5):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (j <= i) & (j > i - w)


# ---- hand-written calls ------------------------------------------------------------------------

@pytest.mark.parametrize("dynamic", [False, True])
def test_window_mask_built_from_aranges_is_taken(dynamic):
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_window(q.shape[-2]))
    expl = check_fused(f, *_qkv(), dynamic=dynamic)
    assert "sliding_window" in str(expl) and "safe softmax" in str(expl)


def test_padding_rows_that_see_no_key_give_zeros_like_sdpa():
    """Left padding on a causal window: the first queries of row 0 keep no key; SDPA gives them
    zeros (and zero gradients), eager softmax would give NaN."""
    def f(q, k, v, am):
        keep = _window(q.shape[-2]) & am[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    am = torch.ones(B, N, dtype=torch.long)
    am[0, :6] = 0
    q, k, v = _qkv()
    out = check_fused(f, q, k, v, am) and f(q, k, v, am)
    assert (out[0, :, :5] == 0).all()


def test_additive_mask_and_explicit_scale():
    def f(q, k, v):
        m = torch.zeros(q.shape[-2], q.shape[-2]).masked_fill(~_window(q.shape[-2]), float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3)
    check_fused(f, *_qkv())


def test_grouped_query_by_enable_gqa_and_by_repeat():
    def gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_window(q.shape[-2]), enable_gqa=True)

    def rep(q, k, v):
        k, v = (x.repeat_interleave(2, dim=1) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_window(q.shape[-2]))
    check_fused(gqa, *_qkv(heads=2))
    torch._dynamo.reset()
    check_fused(rep, *_qkv(heads=2))


@pytest.mark.parametrize("case", ["no_mask", "is_causal", "data_mask"])
def test_calls_already_optimal_are_kept_not_missed(case):
    mask = torch.rand(N, N) < 0.7
    mask[:, 0] = True

    def f(q, k, v):
        if case == "no_mask":
            return F.scaled_dot_product_attention(q, k, v)
        if case == "is_causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q, k, v = _qkv()
    expl = fusion_pass.explain(f, q, k, v)
    assert not expl.fused and not expl.missed
    assert [s.status for s in expl.sites] == ["kept"], str(expl)
    out = torch.compile(f, backend="fusion_pass", options={"strict": True})(q, k, v)
    assert max_rel_error([out], [f(q, k, v)]) < 1e-6


def test_dropout_site_uses_our_stream_and_says_so(monkeypatch):
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_window(q.shape[-2]), dropout_p=0.3)
    torch.manual_seed(0)  # fixed inputs: the statistical check below must not depend on test order
    q, k, v = _qkv()
    expl = fusion_pass.explain(f, q, k, v)
    assert len(expl.fused) == 1 and "not bit-equal" in str(expl)
    cf = torch.compile(f, backend="fusion_pass")
    torch.manual_seed(0)
    a = cf(q, k, v)
    torch.manual_seed(0)
    b = cf(q, k, v)
    assert torch.equal(a, b)  # repeatable under torch.manual_seed
    no_drop = F.scaled_dot_product_attention(q, k, v, attn_mask=_window(N))
    assert (a - no_drop).abs().max() > 1e-3  # dropout applied
    # our stream: the mask of kernels/dropout.py for the seed the kernel got, scaled by 1 / (1 - p);
    # output and gradients against float64 SDPA math with that mask
    seeds = record_dropout_seeds(monkeypatch)
    out = cf(q, k, v)
    assert len(seeds) == 1
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (qd @ kd.transpose(-1, -2) / math.sqrt(D)).masked_fill(~_window(N), -math.inf)
    ref = dropped(torch.softmax(s, -1), seeds[0], 0.3) @ vd
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    for a, r in zip(got, torch.autograd.grad(ref, (qd, kd, vd), g.double())):
        torch.testing.assert_close(a.double(), r, atol=1e-4, rtol=1e-4)


def test_dropout_p_zero_is_exact_and_draws_nothing():
    """dropout_p = 0 (what transformers passes in eval, and in training with attention_dropout 0) is
    no dropout at all: no seed drawn (the global RNG state after the call is eager's), no dropout in
    the spec, the same result as the call without it."""
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_window(q.shape[-2]), dropout_p=0.0)
    q, k, v = _qkv()
    expl = check_fused(f, q, k, v)
    report = str(expl.fused[0])
    assert '"dropout_p":0.0' in report and "counter-based dropout" not in report
    cf = torch.compile(f, backend="fusion_pass")
    cf(q, k, v)
    torch.manual_seed(3)
    got = cf(q, k, v)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    want = f(q, k, v)
    assert torch.equal(after, torch.get_rng_state())
    assert max_rel_error([got], [want]) < 1e-6


def test_dropout_in_a_trained_model_says_which_stream():
    """A default Mistral trained with attention_dropout 0.3: transformers passes dropout_p = 0.3 to
    SDPA; the taken sites say they draw fusion_pass's counter-based stream (equal in distribution,
    not bit-equal); in eval (dropout_p = 0) the same model equals the uncompiled one."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(**fam.TINY, num_key_value_heads=2, sliding_window=5,
                                     attention_dropout=0.3)
    model = transformers.MistralModel(cfg)
    assert model.config._attn_implementation == "sdpa"
    inputs = dict(input_ids=fam._ids(), attention_mask=fam._left_padded_mask())
    expl = fusion_pass.explain(model.train(), **inputs)
    assert len(expl.fused) == 2 and not expl.missed, str(expl)
    for site in expl.fused:
        assert "dropout p=0.3: fusion_pass's counter-based dropout" in str(site)
        assert "not bit-equal" in str(site)
    compiled = torch.compile(model, backend=fusion_pass.Backend(strict=True))
    torch.manual_seed(1)
    a = fam._output(compiled(**inputs))
    torch.manual_seed(1)
    b = fam._output(compiled(**inputs))
    assert torch.equal(a, b)  # repeatable under torch.manual_seed
    model.eval()
    with torch.no_grad():
        assert max_rel_error([fam._output(compiled(**inputs))], [fam._output(model(**inputs))]) < 1e-4


def test_one_kv_head_broadcast_without_enable_gqa_is_grouped():
    """Falcon's multi-query SDPA call: k and v have one head, which SDPA broadcasts over q's heads
    (no enable_gqa, no repeat): read as grouped-query attention, each K/V element read once."""
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_window(q.shape[-2]))
    check_fused(f, *_qkv(heads=1))


def test_key_and_value_lengths_dynamo_cannot_relate():
    """A KV cache's keys and values are separate inputs: under dynamic shapes their lengths are two
    symbols, which SDPA's shape function does not equate (P @ V's would). The site is taken: SDPA
    and the fused op both raise when the lengths differ."""
    def f(q, k, v, am):
        nq, nk = q.shape[-2], k.shape[-2]
        i, j = torch.arange(nq)[:, None] + (nk - nq), torch.arange(nk)[None, :]
        keep = (j <= i) & (j > i - 5) & am[:, None, None, :].bool()  # a window over a cache
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    q = torch.randn(B, H, 3, D)
    k, v = torch.randn(B, H, N, D), torch.randn(B, H, N, D)
    am = torch.ones(B, N, dtype=torch.long)
    am[0, :4] = 0
    torch._dynamo.mark_dynamic(k, 2)
    torch._dynamo.mark_dynamic(v, 2)
    torch._dynamo.mark_dynamic(am, 1)
    # 3 query rows against the cache, no gradient: kept by default (a few decoding rows); taken
    # here, where the two symbolic lengths are under test
    cf = torch.compile(f, backend=fusion_pass.Backend(strict=True, fuse_cpu_decode=True))
    cf(q, k, v, am)
    got, n_fwd, _ = profiled_op_counts(lambda: cf(q, k, v, am))
    assert n_fwd == 1 and max_rel_error([got], [f(q, k, v, am)]) < 1e-5
    with pytest.raises(Exception):
        cf(q, k, v[:, :, :-1], am)


def test_kept_call_with_dropout_keeps_sdpas_own_dropout():
    """A kept call (no mask) with dropout_p > 0 is SDPA's own call: the report says its dropout is
    SDPA's, and the compiled result is stock torch.compile's, bit for bit, under the same seed."""
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    q, k, v = _qkv()
    expl = fusion_pass.explain(f, q, k, v)
    assert [s.status for s in expl.sites] == ["kept"]
    assert "dropout p=0.3: SDPA's own dropout" in str(expl.sites[0]), str(expl)
    ours = torch.compile(f, backend=fusion_pass.Backend(strict=True))
    stock = torch.compile(f)
    ours(q, k, v), stock(q, k, v)
    torch.manual_seed(5)
    a = ours(q, k, v)
    torch.manual_seed(5)
    assert torch.equal(a, stock(q, k, v))


def test_the_aten_op_spelling_is_a_site_too():
    """``torch.ops.aten.scaled_dot_product_attention`` called directly (packet or overload): the
    same site as ``F.scaled_dot_product_attention``, taken with a predicate mask, kept without."""
    aten = torch.ops.aten.scaled_dot_product_attention

    def taken(q, k, v):
        return aten(q, k, v, attn_mask=_window(q.shape[-2]))

    def kept(q, k, v):
        return aten.default(q, k, v, is_causal=True)
    check_fused(taken, *_qkv())
    torch._dynamo.reset()
    q, k, v = _qkv()
    expl = fusion_pass.explain(kept, q, k, v)
    assert [s.status for s in expl.sites] == ["kept"], str(expl)
    out = torch.compile(kept, backend=fusion_pass.Backend(strict=True))(q, k, v)
    assert max_rel_error([out], [kept(q, k, v)]) < 1e-6
