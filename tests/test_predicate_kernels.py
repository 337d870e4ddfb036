"""Masks read as predicates by the kernels (kernels/predicate.py): the graph stops building the
N x N mask, the op receives the predicate and its small data tensors, and the CPU kernels skip the
keys no row of a query block keeps.

For each mask builder of test_masks.py (causal, KV-cache offset, sliding windows, prefix-LM,
chunked, documents, causal + left padding), an attention written the way models write it is
compiled with the backend (static and dynamic shapes) and checked for:
* one fused op per call, whose spec carries the predicate, and no N x N tensor among its operands;
* output and gradients of q, k, v against the float64 eager reference;
* rows that keep no key (left padding) giving exactly what eager gives.
Tile sizes are made small so that the tiled path walks many query blocks and key spans.
"""
import math

import pytest
import torch

import fusion_pass
from fusion_pass.kernels import cpu, predicate
from fusion_pass.kernels.spec import AttentionSpec

from helpers import max_rel_error, profiled_op_counts
from test_masks import CASES

MIN = torch.finfo(torch.float32).min


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py: Dynamo reset around each test


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 1 << 9)
    monkeypatch.setattr(cpu, "SPAN_TILE_ELEMENTS", 1 << 9)
    monkeypatch.setattr(cpu, "Q_BLOCK", 8)


def _attention(builder, fill):
    def f(q, k, v, x, *extra):
        m = builder(x, *extra)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if m.dtype == torch.bool:
            s = s.masked_fill(~m, fill)
        else:
            s = s + m
        return torch.matmul(torch.softmax(s, dim=-1), v)
    return f


def _inputs(make, builder, B, N, H=3, D=16, dtype=torch.float32):
    args = make(B, N)
    nk = builder(*args).shape[-1]
    q = torch.randn(B, H, N, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, nk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, nk, D, dtype=dtype, requires_grad=True)
    return (q, k, v) + tuple(args)


def _specs(f, args, dynamic):
    ex = fusion_pass.explain(f, *args, dynamic=dynamic)
    return [s.spec for g in ex.graphs for s in g.sites if s.fused]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name,builder,make,kinds,extra", CASES, ids=[c[0] for c in CASES])
def test_predicate_mask_fused_exact_and_skipping(name, builder, make, kinds, extra, dynamic, small_tiles):
    fill = -math.inf
    f = _attention(builder, fill)
    compiled = torch.compile(f, backend="fusion_pass", dynamic=dynamic)
    for B, N in ([(2, 24), (3, 29)] if dynamic else [(2, 24)]):
        args = _inputs(make, builder, B, N)
        specs = _specs(f, args, dynamic)
        assert len(specs) == 1 and len(specs[0].masks) == 1, specs
        assert "tensor" not in specs[0].captured, "the N x N mask is no operand any more"
        compiled(*args)  # compiles (outside the profiled call)
        out, nf, _ = profiled_op_counts(lambda: compiled(*args))
        assert nf == 1
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, args[:3], g)
        ref_args = [a.detach().double().requires_grad_() if a.is_floating_point() and a.dim() == 4
                    else a for a in args]
        ref = f(*ref_args)
        ref_grads = torch.autograd.grad(ref, ref_args[:3], g.double())
        assert torch.isnan(out).equal(torch.isnan(ref)), "NaN rows differ from eager's"
        ok = ~torch.isnan(ref)
        assert max_rel_error([out[ok]], [ref[ok]]) < 1e-5
        assert max_rel_error([torch.nan_to_num(x) for x in grads],
                             [torch.nan_to_num(x) for x in ref_grads]) < 1e-5


def test_left_padding_rows_with_no_key_match_eager(small_tiles):
    """causal & padding, padding on the left: the first rows of a padded sequence keep no key.
    With finfo.min, eager's softmax is uniform over every key there; with -inf it is NaN."""
    def f(q, k, v, am, fill):
        N = q.shape[-2]
        pos = torch.arange(N)
        keep = (pos[None, None, None, :] <= pos[None, None, :, None]) & am[:, None, None, :].bool()
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        s = s.masked_fill(~keep, fill)
        return torch.matmul(s.softmax(-1), v)

    am = torch.ones(2, 40, dtype=torch.long)
    am[1, :13] = 0
    for fill in (MIN, -math.inf):
        torch._dynamo.reset()
        q, k, v = (torch.randn(2, 2, 40, 16, requires_grad=True) for _ in range(3))
        compiled = torch.compile(lambda q, k, v, am: f(q, k, v, am, fill), backend="fusion_pass")
        compiled(q, k, v, am)
        out, nf, _ = profiled_op_counts(lambda: compiled(q, k, v, am))
        assert nf == 1
        ref = f(q.double(), k.double(), v.double(), am, fill)
        assert torch.isnan(out).equal(torch.isnan(ref))
        ok = ~torch.isnan(ref)
        assert (out[ok].double() - ref[ok]).abs().max() < 1e-5
        if fill == MIN:
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, (q, k, v), g)
            qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
            want = torch.autograd.grad(f(qd, kd, vd, am, fill), (qd, kd, vd), g.double())
            assert max_rel_error(got, want) < 1e-5


def _window_spec(w):
    """spec of (s * 0.25) + where(i - w < j <= i, 0, min): a sliding window read as a predicate."""
    import sympy
    i, j = (sympy.Symbol(n, integer=True, nonnegative=True) for n in "ij")
    keep = sympy.And(j <= i, j > i - w)
    m = predicate.MaskSpec(keep=sympy.srepr(keep), axes=("b", "h", "i", "j"), kind="additive",
                           dtype="float32", kept=0.0, masked=MIN, text=str(keep))
    from fusion_pass.kernels.spec import ScoreOp
    f64 = dict(qk_dtype="float64", softmax_dtype="float64", prob_dtype="float64", out_dtype="float64")
    return AttentionSpec(score_ops=(ScoreOp("mul", "const", 0.25, dtype="float64"),
                                    ScoreOp("add", "predicate", index=0, dtype="float64")),
                         masks=(m,), **f64)


def test_tiled_path_skips_keys_outside_the_window(monkeypatch):
    """N = 256, window 16, query blocks of 16 rows: each block needs at most 31 of 256 keys."""
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 16 * 256)
    monkeypatch.setattr(cpu, "Q_BLOCK", 16)
    spec = _window_spec(16)
    seen = []
    real = cpu._tile_scores

    def spy(spec_, ops, qt, kb, kh, where, keep_inputs=False):
        r = real(spec_, ops, qt, kb, kh, where, keep_inputs)
        seen.append((r[3][4] - r[3][3]) * (r[3][6] - r[3][5]))
        return r

    monkeypatch.setattr(cpu, "_tile_scores", spy)
    q, k, v = (torch.randn(1, 2, 256, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = torch.ops.fusion_pass.attention(q, k, v, [], spec.to_key())[0]
    computed = sum(seen) / (2 * 256 * 256)
    assert computed < 0.13, computed  # the window's density is 16 * 256 / 256^2 ~ 6%; blocks add a bit
    dense = predicate.materialize(spec.masks[0], (1, 2, 256, 256), [])
    s = (q @ k.transpose(-1, -2)) * 0.25 + dense.double()
    ref = s.softmax(-1) @ v
    assert (out - ref).abs().max() < 1e-12
    g = torch.randn_like(out)
    seen.clear()
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    assert sum(seen) / (2 * 256 * 256) < 0.13
    assert max_rel_error(got, want) < 1e-10


def test_materialize_and_codegen_agree_with_the_graph_mask():
    """The generated keep function, evaluated on a dense grid, equals the mask the graph built."""
    for name, builder, make, _, _ in CASES:
        args = make(2, 13)
        x, extra = args[0], args[1:]
        if name == "causal_kv_cache":
            continue  # its own keys are longer than the queries; covered by the compile test
        f = _attention(builder, MIN)
        q, k, v = (torch.randn(2, 1, 13, 16) for _ in range(3))
        specs = _specs(f, (q, k, v, x) + tuple(extra), False)
        m = specs[0].masks[0]
        data = [a for a in extra if not a.is_floating_point()]
        got = predicate.materialize(m, (2, 1, 13, 13), data)
        want = builder(x, *extra)
        if m.kind == "bool":  # the graph fills where ~mask: that inverted tensor is the operand
            want = ~want
        assert torch.equal(got.expand(2, 1, 13, 13), want.expand(2, 1, 13, 13)), name


@pytest.mark.parametrize("family,window", [("gpt2", None), ("llama-gqa", None), ("mistral", 5),
                                           ("gemma2", 5)])
def test_hugging_face_masks_reach_the_kernels_as_predicates(family, window):
    """transformers' eager masks (causal + the user's padding mask, Mistral's sliding window,
    Gemma-2's alternating sliding/global layers): every site's mask is a predicate reading the
    (B, N) padding mask, not an N x N operand."""
    pytest.importorskip("transformers")
    from test_families import FAMILIES
    model, inputs = FAMILIES[family][0]()
    ex = fusion_pass.explain(model, **inputs)
    sites = [s for g in ex.graphs for s in g.sites if s.fused]
    assert sites and len(sites) == len([s for g in ex.graphs for s in g.sites])
    windows = []
    for s in sites:
        assert len(s.spec.masks) == 1 and "tensor" not in s.spec.captured, s.spec
        text = s.spec.masks[0].text
        assert "j <= i" in text and "d0(b, j)" in text, text
        windows.append(f"i - {window}" in text if window else False)
    if family == "mistral":
        assert all(windows)
    elif family == "gemma2":  # layer 0 slides, layer 1 is global
        assert windows == [True, False]
    else:
        assert not any(windows)


def test_bf16_llama_with_left_padding_matches_eager():
    """A bf16 model: the additive mask is finfo(bf16).min in bf16, read as a predicate; outputs
    within bf16 rounding of eager's (FlashAttention's rule: no worse than twice eager's own error
    against an fp32 run of the same weights)."""
    pytest.importorskip("transformers")
    from test_families import FAMILIES
    model, inputs = FAMILIES["llama-gqa"][0]()
    ref32 = model.eval()(**inputs).last_hidden_state
    model = model.to(torch.bfloat16)
    compiled = torch.compile(model, backend="fusion_pass")
    with torch.no_grad():
        eager = model(**inputs).last_hidden_state.float()
        compiled(**inputs)
        out, nf, _ = profiled_op_counts(lambda: compiled(**inputs).last_hidden_state.float())
    assert nf == 2
    ex = fusion_pass.explain(model, **inputs)
    masks = [s.spec.masks[0] for g in ex.graphs for s in g.sites if s.fused]
    assert len(masks) == 2 and all(m.dtype == "bfloat16" and m.masked == torch.finfo(torch.bfloat16).min
                                   for m in masks), masks
    err_eager = (eager - ref32).abs().max().item()
    err_ours = (out - ref32).abs().max().item()
    assert err_ours <= 2 * err_eager + 1e-3, (err_ours, err_eager)


def test_registered_causal_buffer_is_read_in_the_kernel_and_skipped(small_tiles, monkeypatch):
    """GPT-2's old style: a tril buffer sliced per call. Its contents are not in the graph, so the
    predicate reads the buffer (a data atom); the kernel still skips the key blocks the buffer
    masks for a whole query block, found at run time."""
    class OldGPT2Attention(torch.nn.Module):
        def __init__(self, n=64):
            super().__init__()
            self.register_buffer("bias", torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n))

        def forward(self, q, k, v):
            nq, nk = q.shape[-2], k.shape[-2]
            s = torch.matmul(q, k.transpose(-1, -2)) / 4.0
            causal = self.bias[:, :, nk - nq:nk, :nk]
            s = torch.where(causal, s, torch.tensor(MIN, dtype=s.dtype))
            return torch.matmul(s.softmax(-1), v)

    mod = OldGPT2Attention()
    q, k, v = (torch.randn(2, 3, 48, 16, requires_grad=True) for _ in range(3))
    specs = _specs(mod, (q, k, v), False)
    assert len(specs) == 1 and len(specs[0].masks) == 1 and specs[0].captured == ("data",)
    seen = []
    real = cpu._tile_scores

    def spy(*a, **kw):
        r = real(*a, **kw)
        seen.append((r[3][4] - r[3][3]) * (r[3][6] - r[3][5]) * (r[3][2] - r[3][1]))
        return r

    monkeypatch.setattr(cpu, "_tile_scores", spy)
    compiled = torch.compile(mod, backend="fusion_pass")
    out = compiled(q, k, v)
    assert sum(seen) < 0.7 * 2 * 3 * 48 * 48  # the causal half (plus diagonal blocks) only
    ref = mod(*(t.detach().double().requires_grad_() for t in (q, k, v)))
    assert max_rel_error([out], [ref]) < 1e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(mod(qd, kd, vd), (qd, kd, vd), g.double())
    assert max_rel_error(got, want) < 1e-5


class _Alibi(torch.nn.Module):
    """ALiBi written by hand: per-head slopes times j - i (or -|j - i|) built from aranges, added to
    the scores; optionally learnable slopes and a causal mask."""

    def __init__(self, heads, learn=False, symmetric=False, causal=False):
        super().__init__()
        slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)])
        self.slopes = torch.nn.Parameter(slopes) if learn else torch.nn.Parameter(slopes, requires_grad=False)
        self.symmetric, self.causal = symmetric, causal

    def forward(self, q, k, v):
        n = q.shape[-2]
        pos = torch.arange(n)
        rel = pos[None, :] - pos[:, None]
        if self.symmetric:
            rel = -torch.abs(rel)
        bias = (self.slopes[:, None, None] * rel).unsqueeze(0)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias
        if self.causal:
            s = s + torch.where(rel <= 0, 0.0, MIN)
        return torch.matmul(s.softmax(-1), v)


@pytest.mark.parametrize("symmetric,causal", [(False, False), (True, False), (False, True)])
def test_alibi_from_indices_is_computed_in_the_kernel(symmetric, causal, small_tiles):
    """The (1, H, N, N) ALiBi tensor is not built: the op takes the (H,) slopes and computes
    slope[h] * (j - i) per tile, bit for bit as the graph's one conversion and multiplication;
    the slopes' gradient is the sum of ds * (j - i). Outputs and gradients (slopes included)
    against float64 eager."""
    torch.manual_seed(0)
    mod = _Alibi(3, learn=True, symmetric=symmetric, causal=causal)
    q, k, v = (torch.randn(2, 3, 40, 16, requires_grad=True) for _ in range(3))
    specs = _specs(mod, (q, k, v), False)
    assert len(specs) == 1 and len(specs[0].biases) == 1, specs
    assert specs[0].captured == ("tensor",) and ("Abs" in str(specs[0])) == symmetric
    compiled = torch.compile(mod, backend="fusion_pass")
    compiled(q, k, v)
    out, nf, _ = profiled_op_counts(lambda: compiled(q, k, v))
    assert nf == 1
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, mod.slopes), g)
    ref_mod = _Alibi(3, learn=True, symmetric=symmetric, causal=causal).double()
    ref_mod.slopes.data.copy_(mod.slopes.data.double())
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ref_mod(qd, kd, vd)
    want = torch.autograd.grad(ref, (qd, kd, vd, ref_mod.slopes), g.double())
    assert max_rel_error([out], [ref]) < 1e-5
    assert max_rel_error(got, want) < 1e-4


def test_alibi_bias_tile_is_the_graphs_tensor_bit_for_bit():
    """The kernel's x * y equals the graph's tensor exactly (one conversion, one IEEE product)."""
    mod = _Alibi(5, symmetric=True)
    q = torch.randn(1, 5, 33, 16)
    spec = _specs(mod, (q, q, q), False)[0]
    ops = cpu._Operands(spec, [mod.slopes.detach()[:, None, None]], (1, 5, 33, 33))
    tile = ops.bias_tile(0, ((0,), 0, 5, 0, 33, 0, 33))
    pos = torch.arange(33)
    want = mod.slopes.detach()[:, None, None] * -torch.abs(pos[None, :] - pos[:, None])
    assert torch.equal(tile, want)


@pytest.mark.parametrize("nq,nk", [(0, 7), (7, 0), (0, 0)])
def test_predicate_specs_on_empty_sequences(nq, nk):
    """Empty queries or keys: the eager conventions (an empty output; a zero output and -inf
    log-sum-exp over an empty key set), forward and backward, with a window predicate."""
    spec = _window_spec(3)
    q = torch.randn(1, 2, nq, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, nk, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, nk, 16, dtype=torch.float64, requires_grad=True)
    out, lse, _ = torch.ops.fusion_pass.attention(q, k, v, [], spec.to_key())
    assert out.shape == (1, 2, nq, 16) and not out.isnan().any() and (out == 0).all()
    if nq and not nk:
        assert torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)


def test_mistral_long_window_training_with_left_padding_skips_and_matches_eager(monkeypatch):
    """A real model at a length where the tiled path's query blocks (128 rows) skip keys: Mistral,
    sliding window 64, 300 tokens, left padding, training; outputs and every parameter gradient
    against eager, and fewer scores computed than the dense N x N."""
    transformers = pytest.importorskip("transformers")
    from test_families import TINY
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=64)
    cfg._attn_implementation = "eager"
    model = transformers.MistralModel(cfg)
    n = 300
    ids = torch.randint(3, 100, (2, n))
    am = torch.ones(2, n, dtype=torch.long)
    am[1, :37] = 0
    seen, depth = [], [0]
    real = cpu._tile_scores

    def spy(*a, **kw):  # the scores of each tile as finally computed (a recomputation counts once)
        depth[0] += 1
        try:
            r = real(*a, **kw)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            w = r[3]
            seen.append((w[2] - w[1]) * (w[4] - w[3]) * (w[6] - w[5]))
        return r

    monkeypatch.setattr(cpu, "_tile_scores", spy)
    compiled = torch.compile(model, backend="fusion_pass")
    out = compiled(input_ids=ids, attention_mask=am).last_hidden_state
    ref = model(input_ids=ids, attention_mask=am).last_hidden_state
    g = torch.randn_like(out)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    assert max_rel_error([out], [ref]) < 1e-4
    assert max_rel_error(got, want) < 1e-4
    heads = TINY["num_attention_heads"]
    dense = 2 * heads * n * n * TINY["num_hidden_layers"] * 2  # forward and backward, every layer
    # window 64 in query blocks of 128 rows: ~51% of N x N for the unpadded sequence; the padded
    # one recomputes its first block (rows that keep no key) over every key: ~75%
    assert 0 < sum(seen) < 0.7 * dense, sum(seen) / dense
