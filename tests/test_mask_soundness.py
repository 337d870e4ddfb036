"""Soundness of mask predicates (fusion_pass.masks), issue 9 items 3 and 4, tested differentially.

A mask read as a predicate replaces the N x N tensor eager computes, so the predicate must be that
tensor for every input, or the analysis must refuse. Two ways it was not:
* a write into the mask's storage after it was built (``keep[:4].fill_(True)``, ``keep[0] = 0``,
  through any view, before or after its readers) was not seen;
* integer arithmetic in a narrow dtype wraps in eager (``arange(n, dtype=uint8)`` differences) but was
  read as exact integers.

The explicit tests pin those two and the rules around them (every integer node's range is proven to
fit its dtype; every operand converted to the op's computation dtype keeps its value; integer
division by a possible zero and out-of-range float -> int casts are refused; a graph's write map is
built once). The property tests draw random mask programs (aranges of every integer dtype, the ways
models broadcast them, + - * // %, abs, neg, casts, comparisons, logical ops, tril/triu, where and
masked_fill into bool or additive float masks with finite and infinite fills, padding data, in-place
writes through views before and after construction), capture each with Dynamo, and require: the
analysis refuses, or its predicate evaluated densely equals eager's mask element for element (bit
for bit for additive masks), at the captured size and, for dynamic shapes, at a second size.
"""
from __future__ import annotations

import linecache

import pytest
import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from fusion_pass import effects as E
from fusion_pass.canonicalize import value
from fusion_pass.masks import MaskPredicate, NearMissReason, analyse_mask
from fusion_pass.masks.evaluate import _bounds
from fusion_pass.masks.interpret import _Interp
from fusion_pass.masks.symbols import _P

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, event, given, settings, strategies as st  # noqa: E402

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---- capture and the proof check ---------------------------------------------------------------------

def _compile_source(source: str, name: str = "f"):
    filename = f"<mask program {abs(hash(source))}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scope = {"torch": torch, "F": F}
    exec(compile(source, filename, "exec"), scope)
    return scope[name]


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _capture(fn, calls, dynamic=False):
    """Compile ``fn`` with a backend that keeps each graph and the arguments of each of its runs
    (cloned before the run: the graph may write into its inputs); returns the records and the
    outputs of the compiled calls."""
    torch.compiler.reset()
    records = []

    def backend(gm, example_inputs):
        rec = {"gm": gm, "runs": []}
        records.append(rec)

        def run(*args):
            rec["runs"].append(_clone(args))
            return gm(*args)
        return run

    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    outs = [compiled(*_clone(args)) for args in calls]
    return records, outs


def _output_node(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return out[0] if isinstance(out, (tuple, list)) else out


def _score_shape(mask_node):
    """(B, 1, N, N) for a mask of shape (B, 1, N, N), (N, 1) or (1, N) (symbolic under dynamic shapes):
    the mask as it broadcasts into square scores."""
    shape = (1,) * (4 - value(mask_node).dim()) + tuple(value(mask_node).shape)
    N = shape[-1] if not (isinstance(shape[-1], int) and shape[-1] == 1) else shape[-2]
    return (shape[0], 1, N, N)


def _analyse(gm):
    node = _output_node(gm)
    return analyse_mask(node, _score_shape(node))


def _same_bits(a: torch.Tensor, c: torch.Tensor) -> bool:
    it = _BITS[a.element_size()]
    return a.shape == c.shape and a.dtype == c.dtype and torch.equal(a.contiguous().view(it), c.contiguous().view(it))


def _proof_check(pred: MaskPredicate, gm, run_args, eager: torch.Tensor):
    """The predicate, evaluated with this run's sizes and data, equals eager's mask."""
    sizes, data = {}, {}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph, a in zip(phs, run_args):
        pv = value(ph)
        if isinstance(pv, torch.SymInt):
            sizes[pv.node.expr] = int(a)
        if ph in pred.data:
            data[ph] = a
    shape = (1,) * (4 - eager.dim()) + tuple(eager.shape)
    score = tuple(max(s, t) for s, t in zip(shape, (1, 1, shape[-2], shape[-1])))
    want = torch.broadcast_to(eager.reshape(shape), score)
    got = pred.evaluate(score, sizes=sizes, data=data)
    if pred.kind == "bool":
        assert want.dtype == torch.bool and torch.equal(got, want), (str(pred), got.int(), want.int())
    else:
        kept = torch.tensor(pred.kept_value, dtype=want.dtype)
        # no masked value: every position is kept (a NaN would make a masked one fail the check)
        masked = torch.tensor(float("nan") if pred.masked_value is None else pred.masked_value, dtype=want.dtype)
        assert _same_bits(torch.where(got, kept, masked), want), (str(pred), want)


def _refused_or_exact(fn, calls, dynamic=False):
    """Capture, analyse, and check the predicate against eager on every call; the predicate or the
    reason is returned."""
    eager = []
    for args in calls:
        try:
            eager.append(fn(*_clone(args)))
        except RuntimeError:  # e.g. integer division by zero: eager has no mask to compare with
            assume(False)
    records, outs = _capture(fn, calls, dynamic)
    for o, e in zip(outs, eager):
        assert _same_bits(o, e) if o.is_floating_point() else torch.equal(o, e)
    results = []
    k = 0
    for rec in records:
        pred = _analyse(rec["gm"])
        results.append(pred)
        for run in rec["runs"]:
            if isinstance(pred, MaskPredicate):
                _proof_check(pred, rec["gm"], run, eager[k])
            k += 1
    return results[0]


def _x(N):
    return torch.randn(1, N)


# ---- item 3: writes into the mask's storage -------------------------------------------------------------

def causal_then_fill_view(x):
    n = x.shape[1]
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    keep[:4].fill_(True)
    return keep[None, None]


def causal_then_setitem(x):
    n = x.shape[1]
    k = torch.arange(n)
    keep = k[None, :] <= k[:, None]
    keep[2, 5] = True
    return keep[None, None]


def causal_written_after_view(x):
    n = x.shape[1]
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    out = keep[None, None]          # the mask is a view of keep ...
    keep.masked_fill_(torch.eye(n, dtype=torch.bool), False)  # ... written after it was taken
    return out


def arange_written_through_view(x):
    n = x.shape[1]
    k = torch.arange(n)
    kq = k[:, None]
    kq[0] = 100                      # writes k itself: k[None, :] below sees it too
    return (k[None, :] <= kq)[None, None]


def arange_iadd(x):
    n = x.shape[1]
    k = torch.arange(n)
    kk = k.view(1, -1)
    kk += 2
    return (k[None, :] <= k[:, None])[None, None]


@pytest.mark.parametrize("fn,writer", [(causal_then_fill_view, "fill_"), (causal_then_setitem, "setitem"),
                                       (causal_written_after_view, "masked_fill_"),
                                       (arange_written_through_view, "setitem"), (arange_iadd, "iadd")])
def test_write_through_a_view_is_refused(fn, writer):
    pred = _refused_or_exact(fn, [(_x(9),)])
    assert isinstance(pred, NearMissReason), f"{pred}: eager differs from the unwritten mask"
    assert f"({writer})" in pred and "in-place" in pred, pred


def test_issue_example_differs_from_causal():
    # the issue's program: eager keeps the first four rows entirely, plain causal would not
    m = causal_then_fill_view(_x(9))[0, 0]
    assert m[:4].all() and not torch.equal(m, torch.ones(9, 9, dtype=torch.bool).tril())


def padding_written_before(x, am):
    am[:, 0] = 1
    n = x.shape[1]
    k = torch.arange(n)
    return (k[None, None, None, :] <= k[None, None, :, None]) & am[:, None, None, :].bool()


def padding_written_after(x, am):
    n = x.shape[1]
    k = torch.arange(n)
    m = (k[None, None, None, :] <= k[None, None, :, None]) & (am[:, None, None, :] != 0)
    am.zero_()
    return m


@pytest.mark.parametrize("fn", [padding_written_before, padding_written_after])
def test_write_into_data_input_is_refused(fn):
    am = torch.randint(0, 2, (2, 7))
    pred = _refused_or_exact(fn, [(_x(7), am)])
    assert isinstance(pred, NearMissReason) and "in-place" in pred, pred


def test_unwritten_padding_is_still_read():
    def f(x, am):
        n = x.shape[1]
        k = torch.arange(n)
        other = am.clone()
        other[:, 0] = 1  # a write into a copy: not the mask's storage
        return ((k[None, None, None, :] <= k[None, None, :, None]) & am[:, None, None, :].bool(), other)
    am = torch.randint(0, 2, (2, 7))
    records, _ = _capture(f, [(_x(7), am)])
    gm = records[0]["gm"]
    pred = analyse_mask(_output_node(gm), _score_shape(_output_node(gm)))
    assert isinstance(pred, MaskPredicate) and len(pred.data) == 1, pred


def _checkpointed(writes):
    import torch.utils.checkpoint as cp

    def body(x, keep):
        if writes:
            keep[0].fill_(True)
        return x * 2

    def f(x):
        n = x.shape[1]
        k = torch.arange(n)
        keep = k[None, :] <= k[:, None]
        return cp.checkpoint(body, x, keep, use_reentrant=False), keep[None, None]
    return f


@pytest.mark.parametrize("writes", [False, True], ids=["pure_body", "body_writes"])
def test_higher_order_op_body_writes_its_operand(writes):
    # the mask is passed into an activation-checkpointing body; a write there is a write here
    records, outs = _capture(_checkpointed(writes), [(_x(6),)])
    gm = records[0]["gm"]
    assert any("tag_activation_checkpoint" in str(n.target) for n in gm.graph.nodes)
    eager = _checkpointed(writes)(_x(6))[1]
    assert torch.equal(outs[0][1], eager)
    node = next(n for n in gm.graph.nodes if n.op == "output").args[0][1]
    pred = analyse_mask(node, (1, 1, 6, 6))
    if writes:
        assert isinstance(pred, NearMissReason) and "tag_activation_checkpoint" in pred, pred
    else:
        assert isinstance(pred, MaskPredicate), pred
        _proof_check(pred, gm, records[0]["runs"][0], eager)


def test_write_map_is_built_once_per_graph(monkeypatch):
    def f(x):
        n = x.shape[1]
        k = torch.arange(n)
        return tuple((k[None, :] <= k[:, None] + d)[None, None] for d in range(12))
    records, _ = _capture(f, [(_x(8),)])
    gm = records[0]["gm"]
    calls = []
    real = E._build_writes
    monkeypatch.setattr(E, "_build_writes", lambda g: calls.append(g) or real(g))
    gm.graph.__dict__.pop(E._WRITES_ATTR, None)
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    preds = [analyse_mask(o, (1, 1, 8, 8)) for o in outs]
    assert all(isinstance(p, MaskPredicate) for p in preds)
    assert len(calls) == 1, len(calls)
    # a write added to the graph afterwards is seen: the memo is keyed on the graph's nodes
    k = next(n for n in gm.graph.nodes if n.target is torch.arange)
    with gm.graph.inserting_after(k):
        w = gm.graph.call_method("fill_", (k, 0))
    w.meta["example_value"] = value(k)
    p = analyse_mask(outs[0], (1, 1, 8, 8))
    assert isinstance(p, NearMissReason) and p.node == w.name, p
    assert len(calls) == 2


def test_opaque_and_inplace_flag_calls_count_as_writes():
    g = fx.Graph()
    a = g.placeholder("a")
    c1 = g.call_function(F.relu, (a,), {"inplace": True})
    c2 = g.call_function(F.relu, (a, True))
    c3 = g.call_module("sub", (a,))
    c4 = g.call_function(F.relu, (a,))
    c5 = g.call_function(torch.ops.aten.add_.Tensor, (a, a))
    c6 = g.call_function(torch.add, (a, a), {"out": a})
    assert E.written_operands(c1) == [a] and E.written_operands(c2) == [a]
    assert E.written_operands(c3) is E._ALL
    assert E.written_operands(c4) == []
    assert E.written_operands(c5) == [a] and E.written_operands(c6) == [a]


def test_long_where_chain_is_not_exponential(monkeypatch):
    src = ["def f(x):", "    n = x.shape[1]", "    k = torch.arange(n)", "    c = k[None, :] <= k[:, None]",
           "    m = k[None, :] < 3"]
    src += ["    m = torch.where(c, m, m)"] * 40 + ["    return m[None, None]"]
    fn = _compile_source("\n".join(src) + "\n")
    # work, not wall-clock: each node is interpreted once (memoised), and the expression size cap
    # (MAX_EXPR) refuses a value that would keep doubling
    calls = []
    real = _Interp.node
    monkeypatch.setattr(_Interp, "node", lambda self, n: calls.append(n) or real(self, n))
    _refused_or_exact(fn, [(_x(6),)])
    assert len(set(calls)) <= 60 and len(calls) <= 10 * 60, (len(set(calls)), len(calls))


# ---- item 4: integer width ----------------------------------------------------------------------------

def uint8_difference(x):
    p = torch.arange(x.shape[1], dtype=torch.uint8)
    return ((p[None] - p[:, None]) <= 0)[None, None]


def test_torch_wraps_narrow_integers():
    # what the rules below rely on, checked on this torch
    assert torch.arange(300, dtype=torch.uint8)[255:258].tolist() == [255, 0, 1]
    i8 = torch.tensor([1, 100, -100], dtype=torch.int8)
    assert (i8 + 1000).tolist() == [-23, 76, -124]            # 1000 becomes int8 -24, then wraps
    assert (i8 < 1000).tolist() == [False, False, True]        # the scalar is converted, not widened
    assert (torch.tensor([250], dtype=torch.uint8) < torch.tensor(300)).tolist() == [False]
    assert torch.tensor([-128], dtype=torch.int8).abs().item() == -128
    assert (torch.tensor([-128], dtype=torch.int8) // -1).item() == -128
    # the issue's program keeps only the diagonal
    assert torch.equal(uint8_difference(_x(6))[0, 0], torch.eye(6, dtype=torch.bool))


def int8_compare_wide_literal(x):
    p = torch.arange(x.shape[1], dtype=torch.int8)
    return (p[None, :] < 1000)[None, None]


def uint8_arange_wraps(x):
    p = torch.arange(300, dtype=torch.uint8)[:x.shape[1]]
    return (p[None, :] <= p[:, None])[None, None]


def int8_product(x):
    p = torch.arange(x.shape[1], dtype=torch.int8)
    return (p[None, :] * p[:, None] < 50)[None, None]


def narrowing_cast(x):
    p = torch.arange(x.shape[1])
    return ((p[None, :] * 40).to(torch.int8) <= p[:, None])[None, None]


def abs_of_data(x, am):
    n = x.shape[1]
    k = torch.arange(n)
    return (k[None, None, None, :] <= k[None, None, :, None]) & (am.abs() > 0)[:, None, None, :]


def floordiv_by_data(x, am):
    n = x.shape[1]
    k = torch.arange(n)
    return ((k[None, None, None, :] // am[:, None, None, :]) == 0)


def float_to_int_out_of_range(x):
    n = x.shape[1]
    k = torch.arange(n)
    f = torch.where(k[None, :] <= k[:, None], 0.0, 3e10)
    return (f.to(torch.int32) == 0)[None, None]


WRAPS = [
    ("uint8_difference", uint8_difference, 40, "sub"),
    ("int8_compare_wide_literal", int8_compare_wide_literal, 20, "lt"),
    ("uint8_arange_wraps", uint8_arange_wraps, 20, "arange"),
    ("int8_product", int8_product, 20, "mul"),
    ("narrowing_cast", narrowing_cast, 20, "to"),
    ("float_to_int_out_of_range", float_to_int_out_of_range, 6, "to"),
]


@pytest.mark.parametrize("name,fn,N,node", WRAPS, ids=[w[0] for w in WRAPS])
def test_wrapping_integer_arithmetic_is_refused(name, fn, N, node):
    pred = _refused_or_exact(fn, [(_x(N),)])
    assert isinstance(pred, NearMissReason), str(pred)
    assert node in pred.node, pred


@pytest.mark.parametrize("fn,dtype", [(abs_of_data, torch.int8), (floordiv_by_data, torch.int64)])
def test_data_over_its_full_range_is_refused(fn, dtype):
    am = torch.randint(1, 3, (2, 7), dtype=dtype)
    pred = _refused_or_exact(fn, [(_x(7), am)])
    assert isinstance(pred, NearMissReason), str(pred)


def test_kernel_evaluation_of_narrow_data_is_exact():
    import sympy
    from fusion_pass.kernels.predicate import evaluate_keep
    from fusion_pass.kernels.spec import MaskSpec

    def f(x, am):
        n = x.shape[1]
        k = torch.arange(n)
        return (k[None, None, None, :] <= k[None, None, :, None]) & ((1 - am.long()) < 0)[:, None, None, :]
    am = torch.tensor([[0, 1, 2, 2]], dtype=torch.uint8)
    records, _ = _capture(f, [(_x(4), am)])
    pred = _analyse(records[0]["gm"])
    assert isinstance(pred, MaskPredicate) and len(pred.funcs) == 1, pred
    want = pred.evaluate((1, 1, 4, 4), data={pred.data[0]: am})
    assert want[0, 0, 3, 2:].all()  # 1 - 2 < 0 in exact integers (and in the graph, in int64)
    keep = pred.keep.replace(pred.funcs[0], sympy.Function("d0", integer=True))
    spec = MaskSpec(keep=sympy.srepr(keep), axes=tuple(str(a) for a in pred.axes), data=(0,))
    grids = [torch.arange(n).view([-1 if d == k else 1 for d in range(4)]) for k, n in enumerate((1, 1, 4, 4))]
    got = evaluate_keep(spec, grids, [1, 1, 4, 4], [am])
    assert torch.equal(torch.broadcast_to(got, (1, 1, 4, 4)), want)


FITS = [
    # narrow dtypes where every value provably fits are still read
    ("int16_difference", "p = torch.arange(n, dtype=torch.int16)\n    m = (p[None] - p[:, None]).abs() < 3", 50),
    ("uint8_compare", "p = torch.arange(n, dtype=torch.uint8)\n    m = p[None, :] <= p[:, None]", 256),
    ("int8_chunks", "p = torch.arange(n, dtype=torch.int8)\n    m = (p[None, :] // 4) == (p[:, None] // 4)", 100),
    ("uint8_widened", "p = torch.arange(n, dtype=torch.uint8)\n    m = (p[None, :].long() - p[:, None]) <= -1", 40),
    ("uint8_plus_int16",
     "p = torch.arange(n, dtype=torch.uint8)\n    m = p[None, :] + torch.arange(n, dtype=torch.int16)[:, None] < 300", 200),
    ("int8_minus_one_literal", "p = torch.arange(n, dtype=torch.int8)\n    m = p[None, :] <= p[:, None] - 1", 100),
]


@pytest.mark.parametrize("name,body,N", FITS, ids=[f[0] for f in FITS])
def test_narrow_integers_that_fit_are_read(name, body, N):
    fn = _compile_source(f"def f(x):\n    n = x.shape[1]\n    {body}\n    return m[None, None]\n")
    pred = _refused_or_exact(fn, [(_x(N),)])
    assert isinstance(pred, MaskPredicate), pred


def test_dynamic_sizes_int64_is_read_uint8_is_not():
    def causal(x):
        k = torch.arange(x.shape[1])
        return (k[None, :] - k[:, None] <= 0)[None, None]
    pred = _refused_or_exact(causal, [(_x(9),), (_x(13),)], dynamic=True)
    assert isinstance(pred, MaskPredicate) and pred.sizes == {}, pred  # sizes < 2**62: no wrap
    pred = _refused_or_exact(lambda x: (torch.arange(x.shape[1], dtype=torch.uint8)[None, :] > 3)[None, None],
                             [(_x(9),), (_x(13),)], dynamic=True)
    assert isinstance(pred, NearMissReason) and "uint8" in pred, pred  # n may exceed 256


def test_bounds_helper():
    p0 = _P[0]
    env = {p0: (0, 9)}
    look = env.get
    assert _bounds(p0 - 3, look) == (-3, 6)
    assert _bounds(sympy_floor(p0, -2), look) == (-5, 0)
    assert _bounds(sympy_mod(p0 - 20, 7), look) == (0, 6)
    assert _bounds(abs(p0 - 4) * 2, look) == (0, 10)
    assert _bounds(p0 ** 2, look) == (0, 81)
    assert _bounds(sympy.Symbol("u", integer=True) + p0, look) is None


def sympy_floor(a, c):
    return sympy.floor(a / c)


def sympy_mod(a, c):
    return sympy.Mod(a, c)


# ---- differential property tests ------------------------------------------------------------------------

INT_DTYPES = [None, "torch.int8", "torch.int16", "torch.int32", "torch.int64", "torch.uint8"]
LITERALS = [0, 1, 2, 3, 5, -1, -3, 7, 100, 127, 128, 255, 256, 300, 1000, -129]
FILLS = ["-1e4", "-1e9", "float('-inf')", "torch.finfo({dt}).min"]


class _Writer:
    """Draws a program: named tensors, one statement each; kinds "int"/"bool", shapes "q" (N, 1),
    "k" (1, N), "qk" (N, N), "1" (a 1-D arange that others view)."""

    def __init__(self, draw):
        self.draw = draw
        self.lines = []
        self.vars = []          # (name, kind, shape, writable)
        self.count = 0

    def new(self, expr, kind, shape, writable=True):
        name = f"t{self.count}"
        self.count += 1
        self.lines.append(f"{name} = {expr}")
        self.vars.append((name, kind, shape, writable))
        return name, kind, shape

    def pick(self, choices):
        return self.draw(st.sampled_from(choices))

    def arange(self):
        dt = self.pick(INT_DTYPES)
        start = self.pick([0, 0, 0, 2, 100])
        kw = "" if dt is None else f", dtype={dt}"
        base = f"torch.arange(n{kw})" if start == 0 else f"torch.arange({start}, {start} + n{kw})"
        a, _, _ = self.new(base, "int", "1")
        axis = self.pick(["q", "k"])
        spell = self.pick(["index", "unsqueeze", "view", "expand"])
        if axis == "q":
            expr = {"index": f"{a}[:, None]", "unsqueeze": f"{a}.unsqueeze(1)", "view": f"{a}.view(-1, 1)",
                    "expand": f"{a}[:, None].expand(n, n)"}[spell]
        else:
            expr = {"index": f"{a}[None, :]", "unsqueeze": f"{a}.unsqueeze(0)", "view": f"{a}.view(1, -1)",
                    "expand": f"{a}[None].expand(n, n)"}[spell]
        return self.new(expr, "int", "qk" if spell == "expand" else axis, writable=spell != "expand")

    def int_expr(self, depth):
        choice = self.pick(["leaf", "leaf", "bin", "bin", "unary", "cast"] if depth > 0 else ["leaf"])
        if choice == "leaf":
            return self.arange()
        if choice == "bin":
            a = self.int_expr(depth - 1)
            op = self.pick(["+", "-", "*", "//", "%", "max"])
            if op in ("//", "%"):
                c = self.pick(["2", "3", "5", "-3", "7"])
                return self.new(f"{a[0]} {op} {c}", "int", a[2])
            if self.draw(st.booleans()):
                c = self.int_expr(depth - 1)
                shape = _join(a[2], c[2])
                if op == "max":
                    return self.new(f"torch.maximum({a[0]}, {c[0]})", "int", shape)
                return self.new(f"{a[0]} {op} {c[0]}", "int", shape)
            lit = self.pick(LITERALS)
            if op == "max":
                return self.new(f"torch.maximum({a[0]}, torch.tensor({lit}))", "int", a[2])
            expr = f"{a[0]} {op} {lit}" if self.draw(st.booleans()) else f"{lit} {op} {a[0]}"
            return self.new(expr, "int", a[2])
        if choice == "unary":
            a = self.int_expr(depth - 1)
            return self.new(self.pick([f"{a[0]}.abs()", f"torch.abs({a[0]})", f"-{a[0]}"]), "int", a[2])
        a = self.int_expr(depth - 1)
        dt = self.pick([d for d in INT_DTYPES if d] + ["long", "int"])
        return self.new(f"{a[0]}.{dt}()" if dt in ("long", "int") else f"{a[0]}.to({dt})", "int", a[2])

    def bool_expr(self, depth):
        choice = self.pick(["cmp", "cmp", "cmp", "logic", "not", "tri"] if depth > 0 else ["cmp", "tri"])
        if choice == "cmp":
            a = self.int_expr(self.draw(st.integers(0, 2)))
            op = self.pick(["<", "<=", ">", ">=", "==", "!="])
            if self.draw(st.booleans()):
                c = self.int_expr(self.draw(st.integers(0, 1)))
                return self.new(f"{a[0]} {op} {c[0]}", "bool", _join(a[2], c[2]))
            return self.new(f"{a[0]} {op} {self.pick(LITERALS)}", "bool", a[2])
        if choice == "tri":
            f = self.pick(["tril", "triu"])
            d = self.pick([0, 1, -1, 3, -4])
            src = self.pick(["torch.ones(n, n, dtype=torch.bool)", "torch.ones(n, n, dtype=torch.uint8)"])
            name, _, _ = self.new(f"{src}.{f}({d})" if d else f"{src}.{f}()", "int", "qk")
            return self.new(f"{name}.bool()" if "uint8" in src else name, "bool", "qk")
        if choice == "not":
            a = self.bool_expr(depth - 1)
            return self.new(self.pick([f"~{a[0]}", f"torch.logical_not({a[0]})"]), "bool", a[2])
        a, c = self.bool_expr(depth - 1), self.bool_expr(depth - 1)
        op = self.pick(["{} & {}", "{} | {}", "{} ^ {}", "torch.logical_and({}, {})", "torch.logical_or({}, {})"])
        return self.new(op.format(a[0], c[0]), "bool", _join(a[2], c[2]))

    def write(self, when_candidates):
        """An in-place write into one named tensor (through a view or directly)."""
        cands = [v for v in when_candidates if v[3]]
        if not cands:
            return
        name, kind, shape, _ = self.pick(cands)
        val = "True" if kind == "bool" else "1"
        stmt = self.pick([f"{name}[:2].fill_({val})", f"{name}[0] = {val}", f"{name}.view(-1)[:3].fill_({val})",
                          f"{name}.masked_fill_(torch.ones_like({name}, dtype=torch.bool), {val})",
                          f"{name} |= True" if kind == "bool" else f"{name} += 1"])
        self.lines.append(stmt)


def _join(a, c):
    return a if a == c else "qk"


@st.composite
def mask_programs(draw):
    w = _Writer(draw)
    keep = w.bool_expr(draw(st.integers(0, 2)))
    write = draw(st.sampled_from([None, None, None, None, "before", "after"]))
    if write == "before":
        w.write(w.vars)
    final = draw(st.sampled_from(["bool", "bool", "where", "masked_fill", "full_masked_fill", "one_minus"]))
    dt = draw(st.sampled_from(["torch.float32", "torch.float32", "torch.float16", "torch.bfloat16"]))
    fill = draw(st.sampled_from(FILLS)).format(dt=dt)
    k = keep[0]
    if final == "bool":
        m = k
    elif final == "where":
        m = w.new(f"torch.where({k}, torch.tensor(0.0, dtype={dt}), torch.tensor({fill}, dtype={dt}))",
                  "float", keep[2])[0]
    elif final == "masked_fill":
        m = w.new(f"torch.zeros(n, n, dtype={dt}).masked_fill(~{k}, {fill})", "float", "qk")[0]
    elif final == "full_masked_fill":
        m = w.new(f"torch.full((n, n), {fill}, dtype={dt}).masked_fill({k}, 0.0)", "float", "qk")[0]
    else:
        m = w.new(f"(1.0 - {k}.to({dt})) * {fill}", "float", keep[2])[0]
    w.lines.append(f"out = {m}[None, None]")
    if write == "after":
        w.write(w.vars)
    N = draw(st.sampled_from([1, 2, 5, 13, 70, 130, 300]))
    dynamic = N > 1 and draw(st.booleans())
    body = "\n".join("    " + line for line in ["n = x.shape[1]"] + w.lines + ["return out"])
    return f"def f(x):\n{body}\n", N, dynamic


# the default run draws 30 programs; the sweep under -m slow draws 300
@settings(max_examples=30, deadline=None, derandomize=True)
@given(mask_programs())
def test_random_mask_programs_refused_or_exact(program):
    _check_mask_program(program)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True)
@given(mask_programs())
def test_random_mask_programs_sweep(program):
    _check_mask_program(program)


def _check_mask_program(program):
    source, N, dynamic = program
    fn = _compile_source(source)
    calls = [(_x(N),)] + ([(_x(N + 7),)] if dynamic else [])
    try:
        fn(*calls[0])
    except RuntimeError:  # an invalid program (a write into an expanded view, division by zero)
        assume(False)
    _event(_refused_or_exact(fn, calls, dynamic), dynamic)


def _event(pred, dynamic):
    """What the analysis did, for --hypothesis-show-statistics."""
    if isinstance(pred, MaskPredicate):
        event(f"read as {pred.kind}" + (" (dynamic: checked at two sizes)" if dynamic else ""))
    else:
        t = pred.text
        event("refused: " + ("in-place write" if "in-place" in t else "wraps" if "wrap" in t else t[:40]))


@st.composite
def padded_programs(draw):
    """Structural part and a padding mask read from an input of some integer dtype (holding small
    values and, sometimes, its dtype's extremes), tested or converted in various ways; sometimes the
    mask is the input itself (``.bool()`` of a bool tensor is the tensor), and sometimes the input
    is written in place, before or after the mask is built."""
    dt = draw(st.sampled_from(["torch.bool", "torch.uint8", "torch.int8", "torch.int32", "torch.int64"]))
    test = draw(st.sampled_from([
        "A.bool()", "A != 0", "A == 1", "A > 0", "(A.to(torch.int16) + 1) > 1", "(A + 1) > 1", "A.abs() > 0",
        "(1 - A.long()) == 0", "(A * 2) >= 2", "A.long() // 2 == 0", "A.to(torch.int8) == 1", "-A < 0"]))
    test = test.replace("A", "am[:, None, None, :]")
    fill = draw(st.sampled_from(FILLS)).format(dt="torch.float32")
    write = draw(st.sampled_from([None] * 6 + ["am[:, 0] = 1", "am.fill_(1)", "am[1:].zero_()"]))
    lines = ["n = x.shape[1]", "k = torch.arange(n)"]
    if write and draw(st.booleans()):
        lines.append(write)
        write = None
    form = draw(st.sampled_from(["and", "and", "data_only"]))
    if form == "and":
        lines.append(f"keep = (k[None, None, None, :] <= k[None, None, :, None]) & ({test})")
    else:
        lines.append(f"keep = {test}")
    if draw(st.booleans()):
        lines.append(f"keep = torch.where(keep, 0.0, {fill})")
    if write:
        lines.append(write)
    body = "\n".join("    " + line for line in lines + ["return keep"])
    return (f"def f(x, am):\n{body}\n", dt, draw(st.sampled_from([3, 9])), draw(st.booleans()),
            draw(st.booleans()))


# the default run draws 20 programs; the sweep under -m slow 100
@settings(max_examples=20, deadline=None, derandomize=True)
@given(padded_programs())
def test_random_padding_programs_refused_or_exact(program):
    _check_padding_program(program)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, derandomize=True)
@given(padded_programs())
def test_random_padding_programs_sweep(program):
    _check_padding_program(program)


def _check_padding_program(program):
    source, dt, N, dynamic, extremes = program
    fn = _compile_source(source)
    dtype = eval(dt)

    def am(B, N):
        if dtype == torch.bool:
            return torch.rand(B, N) < 0.7
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -3), min(info.max, 3) + 1, (B, N), dtype=dtype)
        if extremes:  # the values where narrow arithmetic wraps
            t[0, -1], t[-1, -1] = info.max, info.min
        return t
    calls = [(_x(N), am(2, N))] + ([(_x(N + 4), am(3, N + 4))] if dynamic else [])
    _event(_refused_or_exact(fn, calls, dynamic), dynamic)
