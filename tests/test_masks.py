"""Structural masks read from Dynamo graphs as predicates (fusion_pass.masks).

Each mask builder is captured by Dynamo (static and dynamic shapes); the backend analyses the mask
node once and returns a runner that, on every later call, runs the graph with torch.fx.Interpreter
and checks the predicate against the tensor the graph really computed (the proof check), with the
call's own sizes and data (fresh random padding each call). The class of each predicate is
asserted, and masks that depend on data in ways the predicate cannot express must give a reason.
Block sparsity is compared with a brute-force classification of the dense mask's tiles.
"""

import math

import numpy as np
import pytest
import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from fusion_pass.canonicalize import value
from fusion_pass.masks import (EMPTY, FULL, PARTIAL, MaskPredicate, NearMissReason, analyse_mask,
                               block_sparsity, dense_block_sparsity, i, is_causal, j, sliding_window)

MIN = torch.finfo(torch.float32).min


def _score_shape(node):
    mv = value(node)
    return (1,) * (4 - mv.dim()) + tuple(mv.shape)


def _check(pred: MaskPredicate, gm, mask, args, env, log):
    """The proof check: the predicate, evaluated with this call's sizes and data, equals the mask."""
    sizes = {}
    for ph, a in zip([n for n in gm.graph.nodes if n.op == "placeholder"], args):
        pv = value(ph)
        if isinstance(pv, torch.SymInt) and isinstance(pv.node.expr, sympy.Symbol):
            sizes[pv.node.expr] = int(a)
    real = env[mask]
    real4 = real.reshape((1,) * (4 - real.dim()) + tuple(real.shape))
    got = pred.evaluate(real4.shape, sizes=sizes, data={n: env[n] for n in pred.data})
    if pred.kind == "bool":
        assert torch.equal(got, real4), (str(pred), got.int(), real4.int())
    else:
        want = torch.where(got, torch.tensor(pred.kept_value, dtype=real.dtype),
                           torch.tensor(pred.masked_value, dtype=real.dtype))
        # bit-exact, signs of zero included
        assert torch.equal(want.view(torch.int32 if real.dtype == torch.float32 else torch.int64),
                           real4.contiguous().view(want.view(torch.int32 if real.dtype == torch.float32
                                                             else torch.int64).dtype)), str(pred)
    log.append((tuple(real4.shape), sizes))


def _proving_backend(results, find_masks):
    """A backend that analyses the masks of each graph and checks them on every run."""
    def be(gm, example_inputs):
        masks = find_masks(gm)
        preds = [(m, analyse_mask(m, _score_shape(m))) for m in masks]
        results.append({"gm": gm, "preds": preds, "checked": []})
        entry = results[-1]

        def run(*args):
            interp = fx.Interpreter(gm, garbage_collect_values=False)
            out = interp.run(*args)
            for m, p in preds:
                if isinstance(p, MaskPredicate):
                    _check(p, gm, m, args, interp.env, entry["checked"])
            return out
        return run
    return be


def _outputs(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    args = out.args[0]
    return list(args) if isinstance(args, (tuple, list)) else [args]


def _capture_and_prove(fn, make_args, dynamic, sizes):
    torch._dynamo.reset()
    results = []
    compiled = torch.compile(fn, backend=_proving_backend(results, _outputs), dynamic=dynamic,
                             fullgraph=True)
    for s in sizes:
        compiled(*make_args(*s))
    checked = sum(len(r["checked"]) for r in results)
    return results, checked


def _pad(B, N, gen=None):
    """A 0/1 padding mask with random left padding (at least one kept token per row)."""
    am = torch.ones(B, N, dtype=torch.long)
    for r in range(B):
        am[r, :int(torch.randint(0, N, (1,)))] = 0
    return am


# ---- hand-written builders: each returns its mask ----------------------------------------------------

def causal_tril(x):
    N = x.shape[1]
    keep = torch.tril(torch.ones(N, N, dtype=torch.bool))
    return torch.zeros(N, N).masked_fill(~keep, float("-inf"))[None, None]


def causal_arange(x):
    N = x.shape[1]
    k = torch.arange(N, device=x.device)
    keep = k[None, :] <= k[:, None]
    return torch.where(keep, 0.0, torch.finfo(x.dtype).min)[None, None, :, :]


def causal_kv_cache(x, past):
    # queries are positions past_len .. past_len + N - 1 of a key sequence of past_len + N
    P, N = past.shape[1], x.shape[1]
    q = torch.arange(P, P + N)
    kv = torch.arange(P + N)
    return (kv[None, :] <= q[:, None])[None, None]


def sliding_one_sided(x):
    N = x.shape[1]
    k = torch.arange(N)
    d = k[:, None] - k[None, :]
    return ((d >= 0) & (d < 5)).unsqueeze(0).unsqueeze(0)


def sliding_two_sided(x):
    N = x.shape[1]
    k = torch.arange(N)
    return (torch.abs(k.view(-1, 1) - k.view(1, -1)) < 4).view(1, 1, N, N)


def prefix_lm(x):
    N = x.shape[1]
    k = torch.arange(N)
    return ((k[None, :] <= k[:, None]) | (k[None, :] < 3))[None, None]


def chunked(x):
    N = x.shape[1]
    k = torch.arange(N)
    return ((k[:, None] // 4 == k[None, :] // 4) & (k[None, :] <= k[:, None]))[None, None]


def document(x, doc):
    return (doc[:, None, :, None] == doc[:, None, None, :])


def causal_padding_additive(x, am):
    N = x.shape[1]
    k = torch.arange(N)
    keep = (k[None, None, None, :] <= k[None, None, :, None]) & am[:, None, None, :].bool()
    return (1.0 - keep.float()) * torch.finfo(x.dtype).min


def causal_full_triu_padding(x, am):
    # transformers 4.x style: full(min).triu(1), expanded per batch, padding filled with min
    B, N = am.shape
    m = torch.full((N, N), torch.finfo(x.dtype).min).triu(diagonal=1)
    m = m[None, None].expand(B, 1, N, N)
    return m.masked_fill(am[:, None, None, :] == 0, torch.finfo(x.dtype).min)


class OldGPT2(torch.nn.Module):
    """GPT-2's old style: a tril buffer sliced per call (a buffer is data, read as an atom)."""

    def __init__(self, n=64):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n))

    def forward(self, x, past):
        q_len, k_len = x.shape[1], x.shape[1] + past.shape[1]
        return self.bias[:, :, k_len - q_len:k_len, :k_len]


def _x(B, N):
    return torch.randn(B, N)


CASES = [
    # name, fn, args(B, N), sizes, expected kinds, extra check
    ("causal_tril", causal_tril, lambda B, N: (_x(B, N),), ("causal",), lambda c: c.causal_offset == 0),
    ("causal_arange", causal_arange, lambda B, N: (_x(B, N),), ("causal",), lambda c: c.causal_offset == 0),
    ("causal_kv_cache", causal_kv_cache, lambda B, N: (_x(B, N), _x(B, N + 3)), ("causal",),
     lambda c: c.causal_offset != 0),
    ("sliding_one_sided", sliding_one_sided, lambda B, N: (_x(B, N),), ("sliding_window",),
     lambda c: c.band == (-4, 0) and c.window == 5),
    ("sliding_two_sided", sliding_two_sided, lambda B, N: (_x(B, N),), ("sliding_window",),
     lambda c: c.band == (-3, 3)),
    ("prefix_lm", prefix_lm, lambda B, N: (_x(B, N),), ("prefix_lm",), lambda c: c.prefix == 3),
    ("chunked", chunked, lambda B, N: (_x(B, N),), ("causal", "chunked"), lambda c: c.chunk == 4),
    ("document", document, lambda B, N: (_x(B, N), torch.sort(torch.randint(0, 3, (B, N)), dim=1)[0]),
     ("document",), lambda c: len(c.document) == 1),
    ("causal_padding_additive", causal_padding_additive, lambda B, N: (_x(B, N), _pad(B, N)),
     ("causal", "padding"), lambda c: c.causal_offset == 0 and len(c.padding) == 1),
    ("causal_full_triu_padding", causal_full_triu_padding, lambda B, N: (_x(B, N), _pad(B, N)),
     ("causal", "padding"), lambda c: c.causal_offset == 0 and len(c.padding) == 1),
]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name,fn,make,kinds,extra", CASES, ids=[c[0] for c in CASES])
def test_builder(name, fn, make, kinds, extra, dynamic):
    sizes = [(2, 11), (3, 17), (1, 9)] if dynamic else [(2, 11), (2, 11)]
    results, checked = _capture_and_prove(fn, make, dynamic, sizes)
    preds = [p for r in results for _, p in r["preds"]]
    assert preds and all(isinstance(p, MaskPredicate) for p in preds), preds
    for p in preds:
        cl = p.classify()
        assert cl.kinds == kinds, (str(p), cl)
        assert extra(cl), (str(p), cl)
    assert checked == len(sizes), "every call was proof-checked"


def test_additive_values():
    results, _ = _capture_and_prove(causal_arange, lambda B, N: (_x(B, N),), False, [(1, 6)])
    p = results[0]["preds"][0][1]
    assert p.kind == "additive" and p.masked_value == MIN and p.kept_value == 0.0
    assert p.exact_below() == 2.0 ** 103
    results, _ = _capture_and_prove(causal_tril, lambda B, N: (_x(B, N),), False, [(1, 6)])
    assert results[0]["preds"][0][1].masked_value == float("-inf")
    assert results[0]["preds"][0][1].exact_below() == float("inf")
    # (1 - keep) * min keeps -0.0 where kept (0.0 * min), and says so
    results, _ = _capture_and_prove(causal_padding_additive, lambda B, N: (_x(B, N), _pad(B, N)), False, [(2, 6)])
    p = results[0]["preds"][0][1]
    assert p.kept_value == 0.0 and str(p.kept_value) == "-0.0"


def test_kv_cache_offset_symbolic():
    results, _ = _capture_and_prove(causal_kv_cache, lambda B, N: (_x(B, N), _x(B, N + 3)), True,
                                    [(2, 8), (2, 13)])
    p = results[0]["preds"][0][1]
    off = is_causal(p)
    assert off is not None and off.free_symbols, off  # past_len: a size symbol


def test_old_gpt2_buffer_is_data(fresh_dynamo):
    results = []
    m = torch.compile(OldGPT2(), backend=_proving_backend(results, _outputs), dynamic=True)
    for N, P in ((5, 3), (7, 0), (9, 11)):
        m(_x(1, N), _x(1, P) if P else torch.empty(1, 0))
    preds = [p for r in results for _, p in r["preds"]]
    assert all(isinstance(p, MaskPredicate) for p in preds), preds
    for p in preds:  # the buffer's value is not part of the graph: the predicate reads it
        assert len(p.data) == 1 and p.classify().kinds == ("other",)
    assert sum(len(r["checked"]) for r in results) == 3


# ---- negative tests ---------------------------------------------------------------------------------

def _reason_of(fn, *args):
    results, _ = _capture_and_prove(fn, lambda *_: args, False, [()])
    p = results[0]["preds"][0][1]
    assert isinstance(p, NearMissReason), str(p)
    return p


def test_random_data_is_refused():
    def f(x):
        return (torch.rand(x.shape[0], x.shape[1]).cumsum(-1) > 0.5)[:, None, None, :]
    r = _reason_of(f, _x(2, 7))
    assert "rand" in r.node or "cumsum" in r.node, r


def test_cumsum_of_input_is_refused():
    def f(x, am):
        pos = am.cumsum(-1)
        return pos[:, None, :, None] >= pos[:, None, None, :]
    r = _reason_of(f, _x(2, 7), _pad(2, 7))
    assert "cumsum" in r, r


def test_mask_input_is_data():
    def f(x, m):
        return m + 0 if False else m * 1
    r = _reason_of(f, _x(2, 5), torch.zeros(2, 1, 5, 5))
    assert "dtype torch.float32" in r or "data" in r, r
    # the mask node being a graph input itself
    g = fx.Graph()
    ph = g.placeholder("mask")
    ph.meta["example_value"] = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    r = analyse_mask(ph, (1, 1, 4, 4))
    assert isinstance(r, NearMissReason) and "data" in r


def test_unbounded_int_data_as_float_is_refused():
    # (1 - mask.float()) * min with an int64 mask: values other than 0/1 would not be a mask
    def f(x, am):
        return (1.0 - am[:, None, None, :].float()) * torch.finfo(x.dtype).min
    r = _reason_of(f, _x(2, 5), _pad(2, 5))
    assert isinstance(r, NearMissReason)


def test_runtime_fill_value_is_refused():
    # under dynamic=True Dynamo passes a global Python float in as a tensor: a run-time value
    def f(x):
        k = torch.arange(x.shape[1])
        return torch.where(k[None, :] <= k[:, None], 0.0, MIN)[None, None]
    results, _ = _capture_and_prove(f, lambda *_: (_x(1, 5),), True, [(1, 5)])
    p = results[0]["preds"][0][1]
    assert isinstance(p, NearMissReason) and "run-time" in p, p


def test_bias_is_not_a_mask():
    def f(x):
        k = torch.arange(x.shape[1])
        return torch.where(k[None, :] <= k[:, None], 0.0, 0.5)[None, None]
    assert "bias" in _reason_of(f, _x(1, 5))


def test_inplace_is_refused():
    def f(x):
        k = torch.arange(x.shape[1])
        keep = k[None, :] <= k[:, None]
        keep.logical_and_(k[None, :] > 1)
        return keep[None, None]
    results, _ = _capture_and_prove(f, lambda *_: (_x(1, 5),), False, [()])
    p = results[0]["preds"][0][1]
    assert isinstance(p, NearMissReason) and "in-place" in p, p

    def g(x):
        k = torch.arange(x.shape[1])
        keep = k[None, :] <= k[:, None]
        keep &= k[None, :] > 1
        return keep[None, None]
    results, _ = _capture_and_prove(g, lambda *_: (_x(1, 5),), False, [()])
    p = results[0]["preds"][0][1]
    assert isinstance(p, NearMissReason), p  # operator.iand writes into keep


# ---- real models: the masks transformers 5 builds for eager attention ---------------------------------

def _softmax_masks(gm):
    """The additive mask of each attention: the other operand of the add feeding the softmax."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (F.softmax, torch.softmax) or \
                n.op == "call_method" and n.target == "softmax":
            a = n.args[0]
            if isinstance(a, fx.Node) and a.op == "call_function" and a.target.__name__ == "add":
                m = a.args[1]
                if m not in out:
                    out.append(m)
    return out


def _hf(name):
    import transformers
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              vocab_size=100, intermediate_size=128)
    if name == "llama":
        cfg, M = transformers.LlamaConfig(**kw), transformers.LlamaModel
    elif name == "mistral":
        cfg, M = transformers.MistralConfig(sliding_window=4, **kw), transformers.MistralModel
    elif name == "gemma2":
        cfg, M = transformers.Gemma2Config(sliding_window=4, head_dim=16, **kw), transformers.Gemma2Model
    else:
        cfg, M = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100), transformers.GPT2Model
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return M(cfg).eval()


HF = [("llama", True, [("causal", "padding")]),
      ("mistral", True, [("sliding_window", "padding")]),
      ("gemma2", False, [("causal", "padding"), ("sliding_window", "padding")]),
      ("gpt2", True, [("causal", "padding")])]


@pytest.mark.parametrize("name,dynamic,kinds", HF, ids=[h[0] for h in HF])
def test_hf_model_masks(name, dynamic, kinds, fresh_dynamo):
    pytest.importorskip("transformers")
    model = _hf(name)
    results = []
    compiled = torch.compile(model, backend=_proving_backend(results, _softmax_masks), dynamic=dynamic)
    sizes = [(2, 12), (3, 17)] if dynamic else [(2, 12), (2, 12)]
    with torch.no_grad():
        for B, N in sizes:
            compiled(input_ids=torch.randint(0, 100, (B, N)), attention_mask=_pad(B, N))
    preds = [p for r in results for _, p in r["preds"]]
    assert preds and all(isinstance(p, MaskPredicate) for p in preds), [str(p) for p in preds]
    got = sorted({p.classify().kinds for p in preds})
    assert got == sorted(kinds), got
    for p in preds:
        assert p.kind == "additive" and p.masked_value == MIN
        cl = p.classify()
        if "sliding_window" in cl.kinds:
            assert cl.band == (-3, 0), cl  # kv > q - 4 and kv <= q: window of 4
        else:
            assert is_causal(p) == 0
    # each distinct mask node was checked on every call
    assert sum(len(r["checked"]) for r in results) == len(sizes) * len(preds) // len(results)


# ---- block sparsity ----------------------------------------------------------------------------------

def _structural(fn, *args):
    results, _ = _capture_and_prove(fn, lambda *_: args, False, [()])
    return results[0]["preds"][0][1]


@pytest.mark.parametrize("name,fn", [("causal", causal_arange), ("sliding", sliding_one_sided),
                                     ("two_sided", sliding_two_sided), ("chunked", chunked),
                                     ("prefix", prefix_lm)])
@pytest.mark.parametrize("bm,bn", [(16, 8), (7, 13)])
def test_block_sparsity_matches_brute_force(name, fn, bm, bn):
    N = 45  # not a multiple of either block
    p = _structural(fn, _x(1, N))
    dense = p.evaluate((1, 1, N, N))[0, 0]
    got = p.block_sparsity(bm, bn, N, N)
    want = dense_block_sparsity(dense, bm, bn)
    assert np.array_equal(got, want), (got, want)
    assert (got == EMPTY).any() or name in ("two_sided", "prefix")


def test_block_sparsity_rectangular_offset():
    # causal with a KV cache: Nq != Nk and offset past_len
    p = _structural(causal_kv_cache, _x(1, 37), _x(1, 20))
    dense = p.evaluate((1, 1, 37, 57))[0, 0]
    for bm, bn in ((16, 16), (8, 32), (5, 7)):
        assert np.array_equal(p.block_sparsity(bm, bn, 37, 57), dense_block_sparsity(dense, bm, bn))


def test_block_sparsity_symbolic_sizes_and_expressions():
    # predicates given directly: a window on a symbolic offset, a Mod, and a non-unit coefficient
    s = sympy.Symbol("s", integer=True, positive=True)
    cases = [sympy.And(sympy.Le(j, i + s), sympy.Gt(j, i + s - 9)),
             sympy.Eq(sympy.Mod(i, 5), sympy.Mod(j, 5)),
             sympy.Le(2 * j, i + 3)]
    for e in cases:
        got = block_sparsity(e, 8, 16, 50, 70, sizes={"s": 20})
        ii, jj = np.arange(50)[:, None], np.arange(70)[None, :]
        ev = sympy.lambdify((i, j), e.subs(s, 20), "numpy")(ii, jj)
        dense = torch.from_numpy(np.broadcast_to(ev, (50, 70)).copy())
        assert np.array_equal(got, dense_block_sparsity(dense, 8, 16)), e


def _counting_eval(monkeypatch):
    """Count the index-grid elements block_sparsity evaluates densely (the work that would grow
    with N^2 if interval reasoning did not decide most tiles)."""
    import fusion_pass.masks.evaluate as M
    seen = []
    real = M._eval

    def counting(e, env, arrays):
        out = real(e, env, arrays)
        if env and isinstance(next(iter(env.values())), np.ndarray) and e is not None:
            seen.append(int(np.broadcast(*[v for v in env.values() if isinstance(v, np.ndarray)]).size))
        return out
    monkeypatch.setattr(M, "_eval", counting)
    return seen


def test_block_sparsity_is_cheap_at_16k(monkeypatch):
    """Work, not wall-clock: interval reasoning decides every tile off the diagonal band, so only
    the undecided tiles' elements are evaluated (a few per row of tiles, not 16k x 16k)."""
    seen = _counting_eval(monkeypatch)
    p = _structural(causal_arange, _x(1, 10))
    got = p.block_sparsity(128, 128, 16384, 16384)
    T = 128
    want = np.where(np.arange(T)[:, None] > np.arange(T)[None, :], FULL, EMPTY)
    np.fill_diagonal(want, PARTIAL)
    assert np.array_equal(got, want)
    assert seen and max(seen) <= 2 * T * 128 * 128  # the diagonal tiles' elements at most
    seen.clear()
    p = _structural(sliding_one_sided, _x(1, 10))
    got = p.block_sparsity(64, 128, 16384, 16000)
    assert got.shape == (256, 125) and (got == PARTIAL).sum() <= 2 * 256 and not (got == FULL).any()
    assert max(seen, default=0) <= 4 * 256 * 64 * 128


def test_sliding_window_helper():
    p = _structural(sliding_one_sided, _x(1, 10))
    assert sliding_window(p) == (-4, 0) and is_causal(p) is None


_STEPS = {  # the three ways a keep-mask reaches the scores
    "add": lambda s, keep: s + torch.where(keep, 0.0, MIN),
    "masked_fill": lambda s, keep: s.masked_fill(~keep, MIN),
    "where": lambda s, keep: torch.where(keep, s, MIN),
}


@pytest.mark.parametrize("step", sorted(_STEPS))
def test_spec_carries_the_mask_classification(step):
    """The pass's classification of the kept elements travels in the MaskSpec (kinds, band), so
    kernels read it instead of re-deriving it; for a fill the mask marks what is replaced."""
    import fusion_pass
    from fusion_pass.kernels.spec import AttentionSpec

    def f(q, k, v):
        ar = torch.arange(q.shape[-2])
        keep = (ar[None, :] <= ar[:, None]) & (ar[None, :] > ar[:, None] - 3)
        return _STEPS[step]((q @ k.transpose(-1, -2)) * 0.25, keep).softmax(-1) @ v

    q = torch.randn(1, 2, 16, 8)
    ex = fusion_pass.explain(f, q, q, q)
    specs = [s.spec for g in ex.graphs for s in g.sites if s.fused]
    assert len(specs) == 1 and len(specs[0].masks) == 1, specs
    m = specs[0].masks[0]
    assert m.kinds == ("sliding_window",) and m.band_exprs() == (-2, 0), m
    assert AttentionSpec.from_key(specs[0].to_key()) == specs[0]  # the key carries it


def test_masks_read_as_tensors_renumber_every_operand():
    """tensor_mask_spec drops the masks' data operands and appends the masks: steps, the
    remaining masks' and biases' operands are renumbered by the one helper (spec.with_operands)."""
    from fusion_pass.kernels import predicate
    from fusion_pass.kernels.spec import AttentionSpec, BiasSpec, MaskSpec, ScoreOp

    bb, jj, ii = sympy.symbols("b j i", integer=True, nonnegative=True)
    d0 = sympy.Function("d0")
    axes = ("b", "h", "i", "j")
    m = MaskSpec(keep=sympy.srepr(sympy.Ne(d0(bb, jj), 0)), axes=axes, data=(0,), kind="additive",
                 dtype="float32", masked=-math.inf)
    bias = BiasSpec(x=1, y=sympy.srepr(jj - ii + d0(bb, jj)), axes=axes, y_data=(3,))
    spec = AttentionSpec(
        score_ops=(ScoreOp("add", "predicate", index=0), ScoreOp("add", "tensor", index=2),
                   ScoreOp("add", "bias", index=0)),
        captured=("data", "tensor", "tensor", "data"), masks=(m,), biases=(bias,))
    t = predicate.tensor_mask_spec(spec)
    assert predicate.tensor_mask_order(spec) == [1, 2, 3]
    assert t.captured == ("tensor", "tensor", "data", "tensor") and t.masks == ()
    assert [(op.operand, op.index) for op in t.score_ops] == [("tensor", 3), ("tensor", 1), ("bias", 0)]
    assert (t.biases[0].x, t.biases[0].y_data) == (0, (2,))
