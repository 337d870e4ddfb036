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
from helpers import check_fused, max_rel_error, profiled_op_counts

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


def test_dropout_site_uses_our_stream_and_says_so():
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
    # the expected value of the output is the undropped output (dropout rescales by 1 / (1 - p))
    torch.manual_seed(1)
    mean = torch.stack([cf(q, k, v) for _ in range(200)]).mean(0)
    assert (mean - no_drop).abs().max() < 0.25


# ---- Hugging Face families with their default (SDPA) attention -----------------------------------

SDPA_FAMILIES = ["gpt2", "bert", "vit", "llama-gqa", "llama-mqa", "mistral", "gpt-neox", "granite",
                 "whisper"]  # Gemma-2 (soft-capping) has no SDPA implementation


def _build_sdpa(name, monkeypatch):
    def sdpa(cfg):
        cfg._attn_implementation = "sdpa"
        return cfg
    monkeypatch.setattr(fam, "_eager", sdpa)
    torch.manual_seed(0)
    model, inputs = fam.FAMILIES[name][0]()
    assert model.config._attn_implementation == "sdpa"
    return model, inputs


@pytest.mark.parametrize("name", SDPA_FAMILIES)
def test_family_with_default_attention_is_fused_or_kept(name, monkeypatch):
    model, inputs = _build_sdpa(name, monkeypatch)
    expl = fusion_pass.explain(model.eval(), **inputs)
    assert not expl.missed, str(expl)
    assert all(s.fused or s.kept for s in expl.sites if s.attention_like), str(expl)
    with torch.no_grad():
        want = fam._output(model(**inputs))
        got = fam._output(torch.compile(model, backend="fusion_pass")(**inputs))
    assert max_rel_error([got], [want]) < 1e-4


@pytest.mark.parametrize("name", ["llama-gqa", "mistral"])
def test_family_with_default_attention_trains_like_eager(name, monkeypatch):
    model, inputs = _build_sdpa(name, monkeypatch)
    model.train()
    expl = fusion_pass.explain(model, **inputs)
    assert expl.fused, str(expl)  # padding (and the window) make the mask a predicate
    out = fam._output(model(**inputs))
    g = torch.randn_like(out)
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(out, params, g, allow_unused=True)
    compiled = torch.compile(model, backend="fusion_pass")
    torch.autograd.grad(fam._output(compiled(**inputs)), params, g, allow_unused=True)
    got_out, nf, _ = profiled_op_counts(lambda: fam._output(compiled(**inputs)))
    assert nf == len(expl.fused)
    got = torch.autograd.grad(got_out, params, g, allow_unused=True)
    assert max_rel_error([got_out], [out]) < 1e-4
    assert max_rel_error(got, want) < 1e-3
