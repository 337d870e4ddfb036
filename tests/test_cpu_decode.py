"""Decoding steps on CPU (issue 11): a site whose query length is the static integer 1, or a few
rows against a cache with no gradient, is kept for Inductor by default, saying why, and fused with
``fuse_cpu_decode=True``; the per-call checks
around the kernels read no more than they need (the lse's one pass, no removal bound for a tile
that keeps every key)."""
import dataclasses
import math

import pytest
import torch

import fusion_pass
from fusion_pass.kernels import cpu, cpu_flash, removal

from helpers import max_rel_error, profiled_op_counts

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py: Dynamo reset around each test


class Gpt2(torch.nn.Module):
    """GPT-2's sliced ``tril`` buffer with a ``finfo.min`` fill."""

    def __init__(self, n_max=64):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n_max, n_max, dtype=torch.bool))
                             .view(1, 1, n_max, n_max), persistent=False)

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) / (v.size(-1) ** 0.5)
        nq, nk = q.size(-2), k.size(-2)
        fill = torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype)
        s = torch.where(self.bias[:, :, nk - nq:nk, :nk], s, fill)
        return torch.matmul(s.softmax(dim=-1), v)


class Causal(torch.nn.Module):
    """A causal mask built from aranges (a predicate: the tiled path skips the keys above it),
    aligned bottom-right for a cache."""

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        nq, nk = q.size(-2), k.size(-2)
        keep = torch.arange(nk)[None, :] <= torch.arange(nk - nq, nk)[:, None]
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        return torch.matmul(s.softmax(dim=-1), v)


def _qkv(nq, nk=40, g=None):
    g = g or torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 3, n, 16, generator=g) for n in (nq, nk, nk))


@pytest.mark.parametrize("dynamic", [False, True])
def test_one_query_row_on_cpu_is_kept_with_its_reason(dynamic):
    """Dynamo specialises a size of 1, so a decoding graph has the static 1 even when compiled
    dynamic: kept, the reason naming the option; ``strict`` accepts it; the output is eager's."""
    m = Gpt2()
    q, k, v = _qkv(1)
    expl = fusion_pass.explain(m, q, k, v, dynamic=dynamic)
    (site,) = [s for g in expl.graphs for s in g.sites]
    assert not site.fused and site.kept and not expl.missed, str(expl)
    assert "one query row on CPU" in site.reason and "fuse_cpu_decode=True" in site.reason
    assert "kept" in str(expl)
    compiled = torch.compile(m, backend=fusion_pass.Backend(strict=True), dynamic=dynamic)
    compiled(q, k, v)
    out, n_fwd, _ = profiled_op_counts(lambda: compiled(q, k, v))
    assert n_fwd == 0
    assert max_rel_error([out], [m(q, k, v)]) < 1e-5


def test_the_option_fuses_one_query_row():
    m = Gpt2()
    q, k, v = _qkv(1)
    with fusion_pass.configure(fuse_cpu_decode=True):  # explain honours it (it changes the rewrite)
        expl = fusion_pass.explain(m, q, k, v)
    assert len(expl.fused) == 1, str(expl)
    compiled = torch.compile(m, backend=fusion_pass.Backend(fuse_cpu_decode=True))
    compiled(q, k, v)
    out, n_fwd, _ = profiled_op_counts(lambda: compiled(q, k, v))
    assert n_fwd == 1 and max_rel_error([out], [m(q, k, v)]) < 1e-5


@pytest.mark.parametrize("nq", [17, 40])
def test_more_than_a_few_query_rows_are_fused(nq):
    """Past FEW_ROWS query rows (and a prefill, rows == keys) the site fuses."""
    m = Gpt2()
    expl = fusion_pass.explain(m, *_qkv(nq))
    assert len(expl.fused) == 1, str(expl)


@pytest.mark.parametrize("symbolic_keys", [False, True])
def test_a_few_query_rows_against_a_cache_are_kept_without_gradients(symbolic_keys):
    """2-16 rows against more keys (speculative or chunked decoding) with no gradient: kept, the
    reason naming the rows, the keys and the option; the compiled output is eager's and no fused
    op runs. A growing cache makes Dynamo's key length symbolic (``mark_dynamic`` here) while the
    rows stay the static 4: still kept."""
    m = Gpt2()

    def inputs(nk):
        q, k, v = _qkv(4, nk=nk)
        if symbolic_keys:
            for t in (k, v):
                torch._dynamo.mark_dynamic(t, 2)
        return q, k, v

    expl = fusion_pass.explain(m, *inputs(40))
    (site,) = [s for g in expl.graphs for s in g.sites]
    assert not site.fused and site.kept and not expl.missed, str(expl)
    assert "4 query rows against" in site.reason and "fuse_cpu_decode=True" in site.reason
    assert ("symbolic" in site.reason) == symbolic_keys, site.reason
    compiled = torch.compile(m, backend=fusion_pass.Backend(strict=True))
    for nk in (40, 48):
        q, k, v = inputs(nk)
        out, n_fwd, _ = profiled_op_counts(lambda: compiled(q, k, v))
        assert n_fwd == 0
        assert max_rel_error([out], [m(q, k, v)]) < 1e-5
    with fusion_pass.configure(fuse_cpu_decode=True):
        assert len(fusion_pass.explain(m, q, k, v).fused) == 1


def test_a_few_query_rows_fuse_when_a_gradient_is_needed():
    """The few-rows rule was measured on inference; a site whose inputs require gradients fuses
    (its backward is the fused op's), and its gradients are eager's."""
    m = Gpt2()
    q, k, v = (t.requires_grad_() for t in _qkv(4))
    expl = fusion_pass.explain(m, q, k, v)
    assert len(expl.fused) == 1, str(expl)
    compiled = torch.compile(m, backend="fusion_pass")
    out = compiled(q, k, v)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(m(q, k, v), (q, k, v), g)
    assert max_rel_error(got, want) < 1e-5


class Grouped(torch.nn.Module):
    """Llama's ``repeat_kv`` (expand + reshape) of 1 K/V head for 3 query heads."""

    def forward(self, q, k, v):
        b, h, n, d = k.shape
        k = k[:, :, None].expand(b, h, 3, n, d).reshape(b, h * 3, n, d)
        v = v[:, :, None].expand(b, h, 3, n, d).reshape(b, h * 3, n, d)
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        return torch.matmul(s.softmax(dim=-1), v)


@pytest.mark.parametrize("nk, kept", [(64, True), (2049, False)])
def test_a_few_grouped_query_rows_are_kept_only_against_a_short_cache(nk, kept):
    """The model's repeat_kv copies K and V on every call, which the fused op does not: past
    FEW_ROWS_GROUPED_KEYS keys the fused op wins, so a grouped site is kept only below it."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 4, 16, generator=g)
    k, v = (torch.randn(1, 1, nk, 16, generator=g) for _ in range(2))
    expl = fusion_pass.explain(Grouped(), q, k, v)
    (site,) = [s for g in expl.graphs for s in g.sites]
    assert site.fused != kept and (not kept or "query rows against" in site.reason), str(expl)


def test_fuse_cpu_decode_is_validated():
    with pytest.raises(ValueError, match="fuse_cpu_decode"):
        fusion_pass.Backend(fuse_cpu_decode="yes")


# ---- what the checks read ----------------------------------------------------------------------

def test_tiled_path_computes_no_removal_bound_for_a_tile_that_keeps_every_key(monkeypatch):
    """A decoding row keeps every cached key: the tiled path skips nothing, so it never computes
    the removal bound (a pass over q, k and v); a prefill's causal tiles do."""
    calls = []
    real = removal.worst_masked
    monkeypatch.setattr(removal, "worst_masked", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(cpu_flash, "usable", lambda *a, **kw: None)  # the tiled path
    m = Causal()  # 600 rows: two query blocks, the first keeps keys < 432 only
    with fusion_pass.configure(fuse_cpu_decode=True):
        compiled = torch.compile(m, backend="fusion_pass")
        for nq, expect_bound in ((1, False), (600, True)):
            q, k, v = _qkv(nq, nk=600)
            calls.clear()
            out = compiled(q, k, v)
            assert bool(calls) == expect_bound, (nq, len(calls))
            assert max_rel_error([out], [m(q, k, v)]) < 1e-5


def test_rows_ok_from_the_least_lse_decides_as_every_row_does():
    """``removal.rows_ok_from_lse_min`` (one aminmax of the lse) against the per-row test it
    replaced, on rows around the threshold, for causal and finite-fill removals."""
    g = torch.Generator().manual_seed(3)
    rs = [removal.Removal(removal.REPLACE, torch.finfo(torch.float32).min, "float32", "predicate"),
          removal.Removal(removal.REPLACE, -1e4, "float32", "tensor"),
          removal.Removal(removal.ADD, -math.inf, "float32", "predicate")]
    for r in rs:
        for worst in (-1e4, -200.0, 0.0, 37.5, -math.inf, math.inf, math.nan):
            thr = removal.threshold(worst, r)
            centre = 0.0 if not math.isfinite(thr) else thr
            for _ in range(40):
                nk = int(torch.randint(1, 5000, (), generator=g))
                spread = float(torch.rand((), generator=g)) * 20
                lse = (centre + math.log(nk) + spread * (torch.rand(64, generator=g) * 2 - 1)).float()
                want = bool(removal.rows_ok_from_lse(lse, nk, worst, r).all())
                got = removal.rows_ok_from_lse_min(float(lse.min()), nk, worst, r)
                assert got == want, (r, worst, nk, float(lse.min()))


def test_flash_rows_ok_reads_nan_inf_and_the_limits():
    call = cpu_flash.Call(0.25, None, True, removal.Removal(removal.REPLACE, -1e4, "float32", "tensor"),
                          worst=-1e4)
    lse = torch.full((2, 3, 7), 2.0)
    assert cpu_flash.rows_ok(call, lse, 7)
    for bad in (math.nan, math.inf, -math.inf, -1e4 + 50):  # the last: too close to the fill
        lse2 = lse.clone()
        lse2[1, 2, 3] = bad
        assert not cpu_flash.rows_ok(call, lse2, 7), bad
    big = lse.clone()
    big[0, 0, 0] = 2.0 ** 14  # past the backward's limit, fine for the forward
    assert cpu_flash.rows_ok(call, big, 7) and not cpu_flash.rows_ok(call, big, 7, backward=True)
    half = cpu_flash.Call(0.25, None, lse_limit=100.0)
    assert cpu_flash.rows_ok(half, lse, 7) and not cpu_flash.rows_ok(half, -big, 7)


@pytest.mark.parametrize("dtype, spelling, magnitude, reads_lse", [
    (torch.float32, "plain", 1.0, False),
    (torch.float16, "plain", 1.0, False),    # bound + log Nk under half of 65504: proven before
    (torch.float16, "plain", 6.0, True),     # the cheap bound passes the lse limit: read
    (torch.float32, "padding", 1.0, True),   # an attn_mask may empty a row: read
    (torch.float32, "buffer", 1.0, False),   # GPT-2's where(tril buffer, s, finfo.min): proven
    (torch.float32, "fill_1e4", 1.0, False),  # -1e4 is 100x the bound away: proven
    (torch.float32, "fill_1e4", 4.0, True),  # the bound reaches -1e4 + margin: read
])
def test_the_lse_is_read_only_where_a_row_can_fail(monkeypatch, dtype, spelling, magnitude, reads_lse):
    """ATen's route reads the lse after the kernel (``rows_ok``) only where a row can fail. With no
    attn_mask (``is_causal`` or nothing), q and k finite and every score within the chain's cheap
    bound (checked before the kernel), each row's max is >= -bound, so its lse is finite, a
    replacing fill's dropped keys clear the removal threshold when -bound does, and a 16-bit lse
    limit holds when bound + log Nk is under it (``Call.rows_certain``). Outputs stay eager's."""
    seen = []
    real = cpu_flash.rows_ok
    monkeypatch.setattr(cpu_flash, "rows_ok", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    n = 64
    tril = torch.ones(n, n, dtype=torch.bool).tril()[None, None]

    def f(q, k, v, m):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.125
        if spelling == "padding":
            s = s + m
        elif spelling == "buffer":
            s = torch.where(tril, s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype))
        elif spelling == "fill_1e4":
            s = s.masked_fill(~tril, -1e4)
        return torch.matmul(s.softmax(-1), v)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).mul(magnitude).to(dtype) for _ in range(3))
    m = torch.zeros(1, 1, 1, n, dtype=dtype)
    m[..., -5:] = torch.finfo(dtype).min
    compiled = torch.compile(f, backend="fusion_pass")
    compiled(q, k, v, m)
    seen.clear()
    out, n_fwd, _ = profiled_op_counts(lambda: compiled(q, k, v, m))
    assert n_fwd == 1 and bool(seen) == reads_lse, (n_fwd, seen)
    want = f(*(t.double() for t in (q, k, v, m)))
    assert max_rel_error([out.double()], [want]) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_rows_certain_only_where_the_lse_check_would_pass():
    """The pre-kernel proof implies the post-kernel check: over random causal calls (fills from
    -1e3 to finfo.min, |q|, |k| over six decades, float32 and the 16-bit lse limits, Nq <= Nk,
    float32 and bfloat16 operands), every call ``Call.rows_certain`` accepts passes ``rows_ok`` on
    the lse ATen's kernel returns. Both outcomes occur, so a proof that claimed too much would be
    caught here."""
    g = torch.Generator().manual_seed(11)
    p = cpu_flash.Plan((("const", 8.0, True),))
    seen = {"certain": 0, "lse_fails": 0}
    for trial in range(300):
        nk = int(torch.randint(1, 80, (), generator=g))
        nq = nk if trial % 2 or not cpu_flash._causal_top_left() else int(torch.randint(1, nk + 1, (), generator=g))
        mag = 10.0 ** float(torch.empty(()).uniform_(-2, 4, generator=g))
        dtype = torch.bfloat16 if trial % 5 == 0 else torch.float32  # ATen's 16-bit kernel too
        q, k, v = (torch.randn(1, 2, n, 16, generator=g).mul(mag).to(dtype) for n in (nq, nk, nk))
        fill = [-1e3, -1e4, -1e9, torch.finfo(torch.float32).min][trial % 4]
        limit = [math.inf, removal.fmax("float16") / 2, removal.fmax("bfloat16") / 2][trial % 3]
        r = removal.Removal(removal.REPLACE, fill, "float32", "predicate")
        qmax, kmax = q.abs().max().item(), k.abs().max().item()
        call = cpu_flash.Call(0.125, None, True, r, fill, lse_limit=limit,
                              bound=cpu_flash._cheap_bound(p, q, [], qmax, kmax), nk=nk)
        _, lse = cpu_flash.forward(q, k, v, 0.125, None, True)
        ok = cpu_flash.rows_ok(call, lse, nk)
        seen["certain"] += call.rows_certain
        seen["lse_fails"] += not ok
        assert ok or not call.rows_certain, (nq, nk, mag, fill, limit, call.bound)
    assert seen["certain"] > 50 and seen["lse_fails"] > 20, seen


def test_rows_certain_needs_every_fact():
    """Each fact the proof rests on, taken away alone, withdraws it."""
    r = removal.Removal(removal.REPLACE, -1e4, "float32", "predicate")
    good = cpu_flash.Call(0.125, None, True, r, -1e4, bound=100.0, nk=64)
    assert good.rows_certain
    for change in (dict(mask=torch.zeros(1, 1, 1, 64)), dict(bound=math.inf), dict(nk=None),
                   dict(bound=1e4 - 100), dict(lse_limit=100.0),
                   dict(removal=removal.Removal(removal.ADD, -1e4, "float32", "tensor"))):
        assert not dataclasses.replace(good, **change).rows_certain, change
    assert dataclasses.replace(good, lse_limit=105.0).rows_certain  # 100 + log 64 = 104.2


def test_a_few_query_rows_of_an_sdpa_call_stay_that_call():
    """A site that is one SDPA call with a few rows against a cache stays the call as written (ATen's
    kernel without the fused op's fixed cost): kept, saying so, and the key length read from v (an
    SDPA region's own output has the head dim last, not the keys)."""
    def f(q, k, v):
        nq, nk = q.shape[-2], k.shape[-2]
        keep = torch.arange(nk)[None, :] <= torch.arange(nk - nq, nk)[:, None]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    q, k, v = _qkv(3, nk=40)
    expl = fusion_pass.explain(f, q, k, v)
    (site,) = expl.sites
    assert site.kept and "3 query rows against 40 keys" in site.reason, str(expl)
    assert "SDPA call as written" in site.reason, site.reason
    compiled = torch.compile(f, backend=fusion_pass.Backend(strict=True))
    compiled(q, k, v)
    out, n_fwd, _ = profiled_op_counts(lambda: compiled(q, k, v))
    assert n_fwd == 0 and max_rel_error([out], [f(q, k, v)]) < 1e-5
    # 12 rows against 12 keys: fused (read from the SDPA output's last dim, the head dim 16, it
    # would have been "12 rows against 16 keys" and kept)
    assert len(fusion_pass.explain(f, *_qkv(12, nk=12)).fused) == 1
