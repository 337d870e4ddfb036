"""The backend end to end on hand-written attentions spelled the ways models spell them: each site
rewritten into one fusion_pass::attention (counted), results and gradients equal to eager, and the
near misses that must NOT be rewritten, each with its reason."""
import math

import pytest
import torch
import torch.nn.functional as F

import fusion_pass
from fusion_pass import FusionMissedError, Options

from helpers import check_fused as _check_fused
from helpers import graph_op_count, max_rel_error, profiled_op_counts


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py: Dynamo reset around each test


def _qkv(B=2, H=3, Nq=23, Nk=23, D=16, dtype=torch.float32):
    return [torch.randn(B, H, n, D, dtype=dtype, requires_grad=True) for n in (Nq, Nk, Nk)]


# ---- spellings that must fuse --------------------------------------------------------------------

def test_matmul_transpose_scale():
    def f(q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        return torch.matmul(torch.softmax(s, dim=-1), v)
    _check_fused(f, *_qkv())


def test_operator_matmul_div_masked_fill_softmax_dtype_cast_dropout_eval():
    def f(q, k, v, mask):
        s = q @ k.transpose(2, 3) / math.sqrt(q.size(-1))
        s = s.masked_fill(mask, float("-inf"))
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        p = F.dropout(p, p=0.1, training=False)
        return p @ v
    q, k, v = _qkv(Nq=17, Nk=29)
    mask = torch.rand(2, 1, 17, 29) < 0.3
    mask[..., 0] = False  # no fully masked row: eager would give NaN there (tested elsewhere)
    _check_fused(f, q, k, v, mask)


def test_bmm_where_method_softmax_commuted_bias():
    def f(q, k, v, bias, keep):
        s = torch.bmm(q, k.transpose(1, 2))
        s = bias + s                       # commuted: the bias is the left operand
        s = torch.where(keep, s, -1e9)
        return torch.bmm(s.softmax(-1), v)
    q, k, v = (torch.randn(6, 19, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(6, 19, 19, requires_grad=True)  # a learnable bias: its gradient too
    keep = torch.rand(19, 19) < 0.8
    keep[:, 0] = True
    _check_fused(f, q, k, v, bias, keep)


def test_permuted_k_is_not_taken_for_a_transpose():
    """k given as (B, N, H, D) and permuted to (B, H, D, N): not a last-two-dims swap of anything
    in the graph, so the rewrite must derive k itself (an Inductor bug once got this wrong)."""
    def f(q, k_bnhd, v):
        kt = k_bnhd.permute(0, 2, 3, 1)
        return torch.softmax(q @ kt * 0.25, -1) @ v
    q = torch.randn(2, 3, 11, 8, requires_grad=True)
    k = torch.randn(2, 11, 3, 8, requires_grad=True)
    v = torch.randn(2, 3, 11, 8, requires_grad=True)
    _check_fused(f, q, k, v)


class ScaledByBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.2))

    def forward(self, q, k, v):
        return torch.softmax(torch.matmul(q, k.mT) * self.scale, -1) @ v


def test_scale_from_a_scalar_tensor():
    _check_fused(ScaledByBuffer(), *_qkv())


def test_two_sites_in_one_graph_and_a_plain_softmax_elsewhere():
    def f(q, k, v):
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        b = torch.softmax(a @ k.transpose(-1, -2) * 0.5, -1) @ v
        return b + torch.softmax(b, -1)  # not an attention: reported, not a miss
    expl = _check_fused(f, *_qkv(), sites=2)
    assert len(expl.missed) == 0
    assert any(s.status == "not attention" for s in expl.sites)


def test_dynamic_lengths_stay_fused_with_one_compile():
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)), -1) @ v
    compiled = torch.compile(f, backend="fusion_pass", dynamic=True)
    compiled(*_qkv(Nq=9, Nk=9))
    for n in (31, 57):
        q, k, v = _qkv(Nq=n, Nk=n)
        out, nf, _ = profiled_op_counts(lambda: compiled(q, k, v))
        assert nf == 1 and max_rel_error([out], [f(q, k, v)]) < 1e-5
    # a second length after a static first compile also stays fused (Dynamo recompiles dynamic)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="fusion_pass")
    for n in (13, 41, 66):
        q, k, v = _qkv(Nq=n, Nk=n)
        compiled(q, k, v)
        out, nf, _ = profiled_op_counts(lambda: compiled(q, k, v))
        assert nf == 1 and max_rel_error([out], [f(q, k, v)]) < 1e-5


def test_autocast_bf16_on_cpu_stays_fused_and_matches():
    def f(q, k, v):
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s, -1) @ v
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = f(q, k, v)
        compiled = torch.compile(f, backend="fusion_pass")
        compiled(q, k, v)
        out, nf, _ = profiled_op_counts(lambda: compiled(q, k, v))
    assert nf == 1 and out.dtype == ref.dtype == torch.bfloat16
    # FlashAttention's rule against the fp32 result: at most 2x eager-under-autocast's own error
    exact = f(q.detach().double(), k.detach().double(), v.detach().double())
    eager_err = (ref.double() - exact).abs().max().item()
    assert (out.double() - exact).abs().max().item() <= 2 * eager_err + 1e-3
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    assert all(a.dtype == torch.float32 for a in got)
    assert max_rel_error(got, want) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v
    q, k, v = _qkv(dtype=dtype)
    out = torch.compile(f, backend="fusion_pass")(q, k, v)
    eager = f(q, k, v)
    exact = f(q.double(), k.double(), v.double())
    assert out.dtype == dtype
    # FlashAttention's rule: at most 2x eager's own error in this dtype (plus a floor)
    eager_err = (eager.double() - exact).abs().max().item()
    assert (out.double() - exact).abs().max().item() <= 2 * eager_err + 1e-12


def test_training_dropout_fuses_and_keeps_expectation():
    def f(q, k, v):
        p = F.dropout(torch.softmax(q @ k.transpose(-1, -2), -1), p=0.25, training=True)
        return p @ v
    q, k, v = _qkv(Nq=40, Nk=40)
    expl = fusion_pass.explain(f, q, k, v)
    assert len(expl.fused) == 1 and expl.fused[0].spec.dropout_p == 0.25
    compiled = torch.compile(f, backend="fusion_pass")
    # with v = the identity the output is the dropped-out probabilities themselves: each element
    # is exactly 0 or p_ij / (1 - p), and about 3/4 of them are kept (binomial, 5 sigma)
    eye = torch.eye(40).expand(2, 3, 40, 40)
    dropped = compiled(q, k, eye)
    probs = torch.softmax(q @ k.transpose(-1, -2), -1)
    kept = dropped != 0
    assert torch.allclose(dropped[kept], (probs / 0.75)[kept], rtol=1e-5, atol=1e-7)
    frac = kept.double().mean().item()
    assert abs(frac - 0.75) < 5 * (0.75 * 0.25 / kept.numel()) ** 0.5
    assert not torch.equal(compiled(q, k, eye), dropped)  # a fresh mask per call


# ---- near misses: must NOT rewrite, with the reason -------------------------------------------

def _missed(f, *inputs):
    expl = fusion_pass.explain(f, *inputs)
    assert not expl.fused, str(expl)
    # and the compiled graph is still right
    ref = f(*inputs)
    out = torch.compile(f, backend="fusion_pass")(*inputs)
    for a, b in zip(out if isinstance(out, tuple) else [out], ref if isinstance(ref, tuple) else [ref]):
        assert torch.allclose(a, b, atol=1e-5)
    return expl


def test_probabilities_returned_are_not_fused():
    def f(q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2), -1)
        return p @ v, p
    expl = _missed(f, *_qkv())
    assert "also used outside the region" in expl.missed[0].reason


def test_scores_reused_are_not_fused():
    def f(q, k, v):
        s = q @ k.transpose(-1, -2)
        # a max, not a sum: a sum of ~3000 scores of either sign cancels, and Inductor's
        # summation order then differs from eager's by more than any fixed tolerance
        return torch.softmax(s, -1) @ v, s.amax(-1)
    expl = _missed(f, *_qkv())
    assert "also used outside the region" in expl.missed[0].reason


def test_softmax_over_queries_is_not_fused():
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v
    expl = _missed(f, *_qkv())
    assert "not the key dim" in expl.missed[0].reason


def test_products_broadcasting_both_operands_are_not_fused():
    # one K/V head broadcast over q's heads (Falcon's multi-query) fuses as grouped heads, and
    # other one-sided broadcasts are expanded (tests/test_generality.py); a product whose batch is
    # neither operand's (q shared by the batch, k by the heads) is not taken
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    q = torch.randn(1, 4, 9, 8)
    k, v = torch.randn(2, 1, 9, 8), torch.randn(2, 1, 9, 8)
    expl = _missed(f, q, k, v)
    assert "batch dims" in expl.missed[0].reason


def test_non_elementwise_score_op_is_not_fused():
    def f(q, k, v):
        s = (q @ k.transpose(-1, -2)).cumsum(-1)
        return torch.softmax(s, -1) @ v
    expl = _missed(f, *_qkv())
    assert "cumsum" in expl.sites[0].reason


def test_strict_mode_makes_a_miss_an_error():
    def f(q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2), -1)
        return p @ v, p
    with pytest.raises(Exception) as err:
        torch.compile(f, backend="fusion_pass", options={"strict": True})(*_qkv())
    assert isinstance(getattr(err.value, "inner_exception", err.value), FusionMissedError)
    assert "not fused" in str(err.value)


# ---- options, report, plain models -----------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"bogus": 1}, "unknown fusion_pass option"),
    ({"strict": "yes"}, "must be True or False"),
    ({"report": 3}, "folder path"),
])
def test_bad_options_are_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        Options.parse(options)
    m = torch.nn.Linear(4, 4)
    with pytest.raises(Exception) as err:
        torch.compile(m, backend="fusion_pass", options=options)(torch.randn(2, 4))
    assert isinstance(getattr(err.value, "inner_exception", err.value), ValueError)
    assert message in str(err.value)


def test_report_folder(tmp_path):
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    torch.compile(f, backend="fusion_pass", options={"report": str(tmp_path)})(*_qkv())
    text = next(tmp_path.glob("graph_*.txt")).read_text()
    assert "fused" in text and "fusion_pass.attention" in text and "score_mod" in text


def test_model_without_attention_compiles_as_the_default_backend():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(5, 16)
    ours = torch.compile(m, backend="fusion_pass")(x)
    torch._dynamo.reset()
    stock = torch.compile(m)(x)
    assert torch.equal(ours, stock)
    expl = fusion_pass.explain(m, x)
    assert expl.sites == [] and "0 attention site(s) fused" in str(expl)


def test_disabled_pass_leaves_the_graph_alone():
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    compiled = torch.compile(f, backend="fusion_pass", options={"enable": False})
    compiled(*_qkv())
    _, nf, _ = profiled_op_counts(lambda: compiled(*_qkv()))
    assert nf == 0


def test_rewritten_graph_has_one_op_per_site():
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.1, -1) @ v
    q, k, v = _qkv()
    gm = torch.fx.symbolic_trace(f)  # no fake values: analysis must refuse cleanly
    report = fusion_pass.run_pass(gm)
    assert graph_op_count(gm) == 0 and "no example value" in report.sites[0].reason


# ---- grouped heads --------------------------------------------------------------------------

def _repeat_kv(x, n_rep):
    """Llama's helper, verbatim in spirit: expand a new axis, then merge it into the heads."""
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


@pytest.mark.parametrize("spelling", ["repeat_kv", "repeat_interleave"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_query_attention_reads_kv_heads_once(spelling, kv_heads):
    def f(q, k, v):
        if spelling == "repeat_kv":
            k, v = _repeat_kv(k, 4 // kv_heads), _repeat_kv(v, 4 // kv_heads)
        else:
            k, v = k.repeat_interleave(4 // kv_heads, dim=1), v.repeat_interleave(4 // kv_heads, dim=1)
        s = torch.matmul(q, k.transpose(2, 3)) * 0.25
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)
    q = torch.randn(2, 4, 13, 8, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 13, 8, requires_grad=True) for _ in range(2))
    expl = _check_fused(f, q, k, v)
    after = expl.fused[0].after
    # the op reads the un-repeated k and v: no expand/reshape/repeat_interleave copies remain
    assert "l_k_" in after and "l_v_" in after
    assert "expand" not in expl.graphs[0].code_after and "repeat_interleave" not in expl.graphs[0].code_after


def test_unequal_repeats_of_k_and_v_are_left_as_copies():
    def f(q, k, v):
        k = k.repeat_interleave(4, dim=1)
        v = v.repeat_interleave(2, dim=1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    q = torch.randn(2, 4, 9, 8)
    k, v = torch.randn(2, 1, 9, 8), torch.randn(2, 2, 9, 8)
    expl = fusion_pass.explain(f, q, k, v)
    assert len(expl.fused) == 1  # still fused, on the repeated tensors
    out = torch.compile(f, backend="fusion_pass")(q, k, v)
    assert torch.allclose(out, f(q, k, v), atol=1e-6)


# ---- batch layouts and baddbmm --------------------------------------------------------------

def _bloom_style(q, k, v, alibi, mask):
    """BLOOM: a (B*H) baddbmm with ALiBi, viewed to (B, H) for the mask, back to (B*H) for PV."""
    bh, n = q.shape[0], q.shape[1]
    s = alibi.baddbmm(batch1=q, batch2=k.transpose(-1, -2), beta=1.0, alpha=0.25)
    s = s.view(mask.shape[0], bh // mask.shape[0], n, -1)
    s = s + mask
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(p.view(bh, n, -1), v)


@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
def test_baddbmm_and_batch_views_fuse(dynamic):
    B, H, N, D = 2, 3, 11, 8
    q, k, v = (torch.randn(B * H, N, D, requires_grad=True) for _ in range(3))
    alibi = torch.randn(B * H, 1, N)
    mask = torch.where(torch.rand(B, 1, N, N) < 0.2, -1e9, 0.0)
    expl = _check_fused(_bloom_style, q, k, v, alibi, mask, dynamic=dynamic)
    assert "(s * 0.25) + c0[b, h, i, j]) + c1[b, h, i, j]" in expl.fused[0].spec.score_mod_str()


def test_baddbmm_beta_scales_its_input():
    def f(q, k, v, bias):
        return torch.bmm(torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), beta=0.5, alpha=2.0), -1), v)
    q, k, v = (torch.randn(4, 9, 8, requires_grad=True) for _ in range(3))
    _check_fused(f, q, k, v, torch.randn(4, 9, 9, requires_grad=True))


def test_bias_in_the_softmax_layout_fuses():
    def f(q, k, v, bias):
        s = torch.bmm(q, k.transpose(1, 2)).view(2, 3, 7, 7) + bias
        return torch.bmm(torch.softmax(s, -1).view(6, 7, 7), v)
    q, k, v = (torch.randn(6, 7, 8, requires_grad=True) for _ in range(3))
    _check_fused(f, q, k, v, torch.randn(1, 3, 7, 7, requires_grad=True))


def test_partially_broadcast_operand_across_a_batch_view_is_fused_in_that_view():
    """(1, H, N, N) bias in a (B, H) view that is undone before the softmax: in the softmax's
    (B*H) layout the bias could only be moved by a copy, so the op works in the (B, H) view, where
    it broadcasts as in the model (it used to be a near miss: "broadcasts over part of a batch
    layout the region reshapes")."""
    def f(q, k, v, bias):
        s = (torch.bmm(q, k.transpose(1, 2)).view(2, 3, 7, 7) + bias).view(6, 7, 7)
        return torch.bmm(torch.softmax(s, -1), v)
    q, k, v = (torch.randn(6, 7, 8, requires_grad=True) for _ in range(3))
    _check_fused(f, q, k, v, torch.randn(1, 3, 7, 7, requires_grad=True))


# ---- canonical forms: einsum, decomposed softmax ----------------------------------------------

def _einsum_decomposed(q, k, v):
    s = torch.einsum("bhid,bhjd->bhij", q, k) * 0.3
    m = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - m)
    return torch.einsum("bhij,bhjd->bhid", e / e.sum(dim=-1, keepdim=True), v)


def _max_detached(q, k, v):
    s = q @ k.transpose(-1, -2)
    e = (s - s.max(dim=-1, keepdim=True)[0].detach()).exp()
    return (e / e.sum(-1, keepdim=True)) @ v


def _exp_log_softmax(q, k, v):
    return torch.log_softmax(q @ k.transpose(-1, -2) / 3.0, dim=-1).exp() @ v


@pytest.mark.parametrize("fn", [_einsum_decomposed, _max_detached, _exp_log_softmax])
def test_canonical_forms_fuse(fn):
    expl = _check_fused(fn, *_qkv(Nq=9, Nk=14), rtol=1e-5)
    assert expl.graphs[0].canonicalized or "einsum" in expl.graphs[0].code_before


def test_unstabilised_softmax_is_not_rewritten():
    """exp(s) / sum(exp(s)) overflows where softmax does not: rewriting it would change results."""
    def f(q, k, v):
        e = torch.exp(q @ k.transpose(-1, -2))
        return (e / e.sum(-1, keepdim=True)) @ v
    expl = fusion_pass.explain(f, *_qkv())
    assert not expl.fused and not expl.graphs[0].canonicalized


def test_einsum_with_moved_heads_is_not_a_product_we_read():
    def f(q, k, v):  # (B, N, H, D) operands: heads move in the equation
        s = torch.einsum("bihd,bjhd->bhij", q, k)
        return torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v)
    q, k, v = (torch.randn(2, 7, 3, 8) for _ in range(3))
    expl = _missed(f, q, k, v)
    assert not expl.fused


# ---- inspection: dump, command line, logging -------------------------------------------------

def _plain(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v


@pytest.mark.parametrize("graphviz", [True, False], ids=["with-dot", "without-dot"])
def test_dump_writes_report_kernel_source_and_picture(tmp_path, monkeypatch, graphviz):
    import shutil
    if not graphviz:
        monkeypatch.setattr(shutil, "which", lambda name: None)
    elif shutil.which("dot") is None:
        pytest.skip("graphviz is not installed here")
    torch.compile(_plain, backend="fusion_pass", options={"dump": str(tmp_path)})(*_qkv())
    files = sorted(p.name for p in tmp_path.iterdir())
    kernel = next(p for p in tmp_path.iterdir() if p.name.endswith(".kernel.py")).read_text()
    # the generated part of the kernels (the score function and predicates, as Triton functions),
    # naming the real kernel source it is compiled with
    assert "@triton.jit" in kernel and "def score_mod(" in kernel and "s * 0.5" in kernel
    assert "triton_attn/attention.py" in kernel
    assert any(f.endswith(".dot") for f in files)
    if graphviz:
        assert any(f.endswith(".svg") for f in files)
    else:
        assert "install graphviz" in (tmp_path / "NOTES.txt").read_text()


def test_command_line_explain(tmp_path, capsys):
    pytest.importorskip("transformers")
    from fusion_pass.__main__ import main
    rc = main(["explain", "transformers:GPT2Model", "--config", "n_layer=2,n_embd=32,n_head=2,vocab_size=50",
               "--dump", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "2 attention site(s) fused" in out and "score_mod" in out
    assert (tmp_path / "graph_0.txt").exists()


def test_logging_goes_through_the_fusion_pass_logger(caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="fusion_pass"):
        fusion_pass.explain(_plain, *_qkv())
    assert any(r.name == "fusion_pass" and "fused" in r.getMessage() for r in caplog.records)


def test_a_softmax_of_products_with_an_unknown_consumer_is_a_miss_not_other():
    """Scores from a product, probabilities into an op the matcher does not follow: that is a
    missed attention (strict mode raises), not 'not attention'."""
    def g(q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1).unsqueeze(2)
        return (p @ v.unsqueeze(2)).squeeze(2)
    expl = fusion_pass.explain(g, *_qkv())
    assert len(expl.missed) == 1 and "unsqueeze" in expl.missed[0].reason
    with pytest.raises(Exception) as err:
        torch.compile(g, backend="fusion_pass", options={"strict": True})(*_qkv())
    assert isinstance(getattr(err.value, "inner_exception", err.value), FusionMissedError)


def test_report_shows_structural_masks_as_proven_predicates():
    """A causal mask built from aranges in the graph is reported as its predicate and tile density
    (the predicate is proven from the graph, not guessed)."""
    def f(q, k, v):
        n = q.shape[-2]
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        mask = torch.where(j <= i, 0.0, torch.finfo(torch.float32).min)
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, -1) @ v
    expl = _check_fused(f, *_qkv(Nq=19, Nk=19))
    (line,) = expl.fused[0].masks
    assert "j <= i" in line and "causal" in line and "at Nq = Nk = 4096: 51.6%" in line


def _causal_mask(n, past=0):
    i = torch.arange(n)[:, None] + past
    j = torch.arange(n + past)[None, :]
    return torch.where(j <= i, 0.0, torch.finfo(torch.float32).min)


def test_proven_causal_mask_lets_the_kernel_skip_tiles_and_changes_nothing():
    def f(q, k, v, attention_mask):
        n = q.shape[-2]  # causal & padding, built as Hugging Face builds it
        i, j = torch.arange(n)[None, None, :, None], torch.arange(n)[None, None, None, :]
        b = torch.arange(q.shape[0])[:, None, None, None]
        keep = (j <= i) & attention_mask[b, j]
        mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, -1) @ v
    pad = torch.ones(2, 21, dtype=torch.bool)
    pad[1, 15:] = False  # right padding: every row keeps a key
    expl = _check_fused(f, *_qkv(Nq=21, Nk=21), pad)
    assert expl.fused[0].spec.causal and "is_causal" in expl.fused[0].kernels


def test_causality_is_not_claimed_without_proof():
    def softcap_after_mask(q, k, v):  # tanh lifts the masked scores back to -30: not masked any more
        s = q @ k.transpose(-1, -2) + _causal_mask(q.shape[-2])
        return torch.softmax(torch.tanh(s / 30.0) * 30.0, -1) @ v

    def kv_cache(q, k, v):  # j <= i + past: not the diagonal
        return torch.softmax(q @ k.transpose(-1, -2) + _causal_mask(q.shape[-2], past=4), -1) @ v

    def bidirectional(q, k, v, pad):
        return torch.softmax(q @ k.transpose(-1, -2) + pad, -1) @ v

    q, k, v = _qkv(Nq=9, Nk=9)
    for fn, args in ((softcap_after_mask, (q, k, v)), (kv_cache, (q, *_qkv(Nq=13, Nk=13)[1:])),
                     (bidirectional, (q, k, v, torch.zeros(2, 1, 1, 9)))):
        if fn is kv_cache:
            args = (q, *[t[..., :13, :] for t in _qkv(Nq=13, Nk=13)[1:]])
        expl = _check_fused(fn, *args)
        assert not expl.fused[0].spec.causal, fn.__name__
