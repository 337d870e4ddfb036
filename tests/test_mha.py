"""nn.MultiheadAttention and the nn.Transformer layers: Dynamo keeps ``F.multi_head_attention_forward``
as one call, which the pass opens (``fusion_pass/expand.py``) so that the attention inside is fused
like any other; the inference fast paths are reported as kept. Each case against eager in float64,
forward and every gradient, with the fused op counted."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fusion_pass
from fusion_pass.backend import FusionMissedError

from helpers import max_rel_error, profiled_op_counts

E, H = 16, 4


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Out(nn.Module):
    """The module's output only, as callers write ``attn(x, x, x)[0]``: the weights are dropped."""

    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, **kw)

    def forward(self, q, k, v, **kw):
        return self.attn(q, k, v, **kw)[0]


def _seq(b, n, bf, d=E):
    x = torch.randn(b, n, d, dtype=torch.float64)
    return x if bf else x.transpose(0, 1).contiguous()


def _compare(model, args, kwargs, sites, dynamic=None, shapes=None):
    """Compiled vs eager (float64): output, gradients of the inputs and of every parameter; the
    fused op runs ``sites`` times forward and backward."""
    model = model.double()
    compiled = torch.compile(model, backend="fusion_pass", dynamic=dynamic)
    reports = []
    for a, kw in [(args, kwargs)] + list(shapes or []):
        a = [x.detach().requires_grad_(x.is_floating_point()) for x in a]
        leaves = [x for x in a if x.requires_grad] + list(model.parameters())
        with fusion_pass.collect_reports() as got:  # compile forward and backward first: then
            warm = compiled(*a, **kw)                 # profile the steady state
            torch.autograd.grad(warm.sum(), leaves, allow_unused=True)
        reports += got
        out, nf, _ = profiled_op_counts(lambda: compiled(*a, **kw))
        ref = model(*a, **kw)
        assert nf == sites
        assert max_rel_error([out], [ref]) < 1e-10
        g = torch.randn_like(ref)
        got_g, _, nb = profiled_op_counts(lambda: torch.autograd.grad(out, leaves, g, allow_unused=True))
        assert nb == sites
        want_g = torch.autograd.grad(ref, leaves, g, allow_unused=True)
        assert max_rel_error(got_g, want_g) < 1e-9
    return [s for r in reports for s in r.sites]


def _causal_bool(n):
    return torch.triu(torch.ones(n, n, dtype=torch.bool), 1)


def _padding(b, n):
    m = torch.rand(b, n) < 0.4
    m[:, 0] = False  # every row keeps a key: eager's own rows are then finite
    return m


CASES = {
    "self": lambda bf: ({}, lambda x, y: ((x, x, x), {})),
    "cross": lambda bf: ({}, lambda x, y: ((x, y, y), {})),
    "kdim_vdim": lambda bf: ({"kdim": 8, "vdim": 12},
                             lambda x, y: ((x, _seq(2, 5, bf, 8), _seq(2, 5, bf, 12)), {})),
    "key_padding_bool": lambda bf: ({}, lambda x, y: ((x, y, y), {"key_padding_mask": _padding(2, 5)})),
    "key_padding_float": lambda bf: ({}, lambda x, y: ((x, y, y), {"key_padding_mask": torch.where(
        _padding(2, 5), -1e9, 0.0).double()})),
    "causal_bool": lambda bf: ({}, lambda x, y: ((x, x, x), {"attn_mask": _causal_bool(7)})),
    "causal_is_causal": lambda bf: ({}, lambda x, y: ((x, x, x), {
        "attn_mask": nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64),
        "is_causal": True})),
    "mask_3d_and_padding": lambda bf: ({}, lambda x, y: ((x, y, y), {
        "attn_mask": torch.randn(2 * H, 7, 5, dtype=torch.float64),
        "key_padding_mask": torch.where(_padding(2, 5), float("-inf"), 0.0).double()})),
    "bias_kv": lambda bf: ({"add_bias_kv": True}, lambda x, y: ((x, y, y), {})),
    "zero_attn": lambda bf: ({"add_zero_attn": True}, lambda x, y: ((x, y, y), {})),
    "per_head_weights": lambda bf: ({"bias": False}, lambda x, y: ((x, x, x), {"average_attn_weights": False})),
}


# sequence-first layouts (the module's default) in the slow sweep; the default run has one
# (test_unbatched_input...: an unbatched input is sequence-first) and these in batch-first
@pytest.mark.parametrize("batch_first", [True, pytest.param(False, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_multihead_attention_is_fused(case, batch_first):
    torch.manual_seed(hash(case) % 1000)
    kw, make = CASES[case](batch_first)
    args, kwargs = make(_seq(2, 7, batch_first), _seq(2, 5, batch_first))
    sites = _compare(Out(batch_first=batch_first, **kw), args, kwargs, sites=1)
    assert [s.fused for s in sites] == [True], sites
    assert sites[0].module == "attn"


def test_unbatched_input_and_dynamic_lengths_with_padding():
    torch.manual_seed(0)
    sites = _compare(Out(), [torch.randn(7, E, dtype=torch.float64)] * 3, {}, sites=1)
    assert all(s.fused for s in sites)
    torch._dynamo.reset()

    def padded(b, n):
        x = torch.randn(b, n, E, dtype=torch.float64)
        return [x, x, x], {"key_padding_mask": torch.arange(n).expand(b, n) >= n - 2}
    first, more = padded(2, 7), [padded(3, 9), padded(2, 12)]
    sites = _compare(Out(batch_first=True), *first, sites=1, dynamic=True, shapes=more)
    assert sites and all(s.fused for s in sites), sites


def test_returned_weights_keep_the_site_unfused_and_say_why():
    torch.manual_seed(1)
    m = nn.MultiheadAttention(E, H, batch_first=True).double()
    x = torch.randn(2, 7, E, dtype=torch.float64)
    expl = fusion_pass.explain(m, x, x, x)
    [site] = expl.sites
    assert not site.fused and "also used outside the region" in site.reason
    out, w = torch.compile(m, backend="fusion_pass")(x, x, x)
    ref, ref_w = m(x, x, x)
    assert max_rel_error([out, w], [ref, ref_w]) < 1e-12


def test_transformer_layers_train_every_site_fused_or_kept():
    """The layers call it with need_weights=False: its body then calls SDPA, a site like any other."""
    torch.manual_seed(2)
    enc = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 7, E, dtype=torch.float64)
    mask = _causal_bool(7)
    sites = _compare(enc, [x], {"src_mask": mask}, sites=1)
    assert [s.fused for s in sites] == [True]
    dec = nn.TransformerDecoderLayer(E, H, 32, dropout=0.0, batch_first=True).double()
    mem = torch.randn(2, 5, E, dtype=torch.float64)
    expl = fusion_pass.explain(dec, x, mem, tgt_key_padding_mask=_padding(2, 7))
    assert len(expl.sites) == 2 and all(s.fused or s.kept for s in expl.sites), str(expl)
    got = torch.compile(dec, backend="fusion_pass")(x, mem, tgt_key_padding_mask=_padding(2, 7) & False)
    assert max_rel_error([got], [dec(x, mem, tgt_key_padding_mask=_padding(2, 7) & False)]) < 1e-12


def test_inference_fast_path_is_reported_kept():
    torch.manual_seed(3)
    enc = nn.TransformerEncoderLayer(E, H, 32, batch_first=True).eval()
    x = torch.randn(2, 7, E)
    with torch.no_grad():
        expl = fusion_pass.explain(enc, x)
        [site] = expl.sites
        assert site.kept and not site.fused and "_transformer_encoder_layer_fwd" in site.reason
        out = torch.compile(enc, backend=fusion_pass.Backend(strict=True))(x)  # kept: not a miss
        assert torch.allclose(out, enc(x), atol=1e-5)


def test_a_body_that_cannot_be_opened_is_reported_and_left_as_it_was(monkeypatch):
    """A body that reads a tensor's data cannot become graph nodes: the call stays whole (its
    partial recording erased), the report says why, and strict mode raises."""
    from fusion_pass import expand
    real = expand._body

    def reads_data(fn):
        body = real(fn)

        def wrapped(query, *a, **kw):
            if query.sum().item() > 1e30:  # a read of data: the recorder stops here
                pass
            return body(query, *a, **kw)
        return wrapped
    monkeypatch.setattr(expand, "_body", reads_data)
    torch.manual_seed(4)
    m = Out(batch_first=True).double()
    x = torch.randn(2, 7, E, dtype=torch.float64)
    expl = fusion_pass.explain(m, x, x, x)
    [site] = expl.sites
    assert not site.fused and not site.kept and site.attention_like
    assert "could not be opened" in site.reason and "data" in site.reason
    torch._dynamo.reset()
    out = torch.compile(m, backend="fusion_pass")(x, x, x)
    assert max_rel_error([out], [m(x, x, x)]) < 1e-12
    torch._dynamo.reset()
    with pytest.raises(Exception) as err:
        torch.compile(m, backend=fusion_pass.Backend(strict=True))(x, x, x)
    assert isinstance(err.value, FusionMissedError) or "FusionMissedError" in repr(err.value)


def test_dropout_inside_is_fused_with_its_probability():
    torch.manual_seed(5)
    m = Out(batch_first=True, dropout=0.25).double()
    x = torch.randn(2, 7, E, dtype=torch.float64)
    expl = fusion_pass.explain(m, x, x, x)
    [site] = expl.sites
    assert site.fused and site.spec.dropout_p == 0.25
    m.eval()  # training=False: the body sets p to 0
    torch._dynamo.reset()
    sites = _compare(m, [x, x, x], {}, sites=1)
    assert sites[0].fused and sites[0].spec.dropout_p == 0.0


@pytest.mark.slow
def test_inside_a_body_the_pass_does_not_rewrite_it_is_listed():
    """Under ``torch.cond`` nothing is rewritten; the closed call still shows in the report."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x, flag):
            return torch.cond(flag, lambda x: self.attn(x, x, x)[0].contiguous(), lambda x: x * 2, (x,))
    torch.manual_seed(6)
    m, x, flag = Branchy(), torch.randn(2, 7, E), torch.tensor(True)
    expl = fusion_pass.explain(m, x, flag)
    [site] = expl.sites
    assert not site.fused and site.attention_like and not site.kept
    assert "inside the body of cond" in site.reason and "multi_head_attention_forward" in site.reason
    assert torch.allclose(torch.compile(m, backend="fusion_pass")(x, flag), m(x, flag), atol=1e-5)


def test_under_autocast_the_body_is_recorded_in_its_dtypes():
    """Dynamo writes autocast as calls in the graph; the body is recorded under the same autocast,
    so its values (and the fused op's dtypes) are bf16 as they are when it runs. Recorded without
    it, the op's spec said float32 and its kernel failed on bf16 operands."""
    class Auto(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x, pad):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.attn(x, x, x, key_padding_mask=pad)[0]
    torch.manual_seed(7)
    m, x, pad = Auto(), torch.randn(2, 9, E, requires_grad=True), _padding(2, 9)
    expl = fusion_pass.explain(m, x, pad)
    [site] = expl.sites
    assert site.fused and site.spec.out_dtype == "bfloat16", str(expl)
    compiled = torch.compile(m, backend="fusion_pass")
    out, ref = compiled(x, pad), m(x, pad)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().max() < 0.05
    g, gr = torch.autograd.grad(out.float().sum(), x), torch.autograd.grad(ref.float().sum(), x)
    assert (g[0] - gr[0]).abs().max() < 0.1 * gr[0].abs().max()
