"""Stage 4, analyse (masks): read the subgraph that builds an attention mask as a predicate.

A mask reaches the scores as a boolean "keep" tensor (``where(keep, s, min)``, ``masked_fill``) or as
an additive float tensor (``s + mask`` with ``mask = where(keep, 0, finfo.min)``,
``masked_fill(~keep, -inf)``, ``(1 - keep.float()) * min``...). When that tensor is built in the graph
from index arithmetic (arange, tril/triu, comparisons, abs, //, %, and/or/not, indexing a padding
mask by aranges), the kernel does not need to load it: it can compute ``keep(b, h, i, j)`` and skip
whole tiles that are known empty. ``analyse_mask`` walks the nodes that build the mask and
interprets each op *symbolically* (sympy), so the predicate it returns equals the graph's mask by
construction; nothing is guessed from names or sampled values. Where an op is outside what it can
interpret, it returns a ``NearMissReason`` naming the node, and the caller keeps the mask as a
tensor (loaded by the kernel), which is always correct.

What it hands on (to the spec and the kernels): a ``MaskPredicate``:
* ``keep``: a sympy Boolean over the score axes ``b, h, i, j`` (batch, head, query, key), Dynamo's
  size symbols (``s27``...), and *data atoms*: ``d_<node>(b, j)``, a tensor from the graph (padding
  mask, document ids, a registered buffer) indexed by index expressions; ``data`` lists those nodes;
* for additive masks the kept value (0) and the masked value (finfo.min or -inf), and
  ``exact_below()``: the |s| below which ``s + masked == masked`` in the mask's dtype, so the caller can
  prove ``s + mask == where(keep, s, masked)``;
* ``classify()``: causal (any offset), sliding window (one or two sided), prefix-LM, chunked,
  document (block-diagonal from ids), padding, and their conjunctions;
* ``block_sparsity(...)``: for block sizes and concrete lengths, each tile empty / full / partial for
  the data-free part of the predicate (interval reasoning per tile, exact dense evaluation of the tiles
  it cannot decide), and ``evaluate(...)``: the dense mask, used by the tests as the proof check.

Soundness rules kept throughout:
* integers are exact in sympy, and torch's are equal to them only without wraparound, so every
  integer node's value range (index symbols over 0 <= p < size, sizes from Dynamo's shape
  environment and below ``DIM_BOUND``, data over its dtype's whole range) is proven to fit the node's
  dtype, and every operand to fit the dtype the op computes in (``uint8_t < 300`` compares with 44);
  integer division or remainder by a possible 0 and float -> int casts out of range are refused;
* float values are never computed in sympy, only in torch, in the graph's own dtypes and promotion
  (a float tensor is a finite table {condition: value});
* aliasing: any node read whose storage some node of the graph may write (in place, through any
  view, before or after, ``out=``, setitem, a higher-order op's body, an opaque call) is refused;
* data is only a graph input (placeholder or attribute) of integer or boolean dtype.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._sympy.numbers import IntInfinity, NegativeIntInfinity

from ..canonicalize import value

# The index of an element along the k-th dim of the value being interpreted. Every intermediate value
# is an expression over these; broadcasting and views rename them; the final mask's are renamed to
# the score axes. All are nonnegative integers (element indices).
_P = tuple(sympy.Symbol(f"_p{k}", integer=True, nonnegative=True) for k in range(10))
b, h, i, j = sympy.symbols("b h i j", integer=True, nonnegative=True)

MAX_TABLE = 16  # distinct (condition, value) entries a float tensor may carry

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class NearMissReason(str):
    """Why a mask was not read as a predicate: ``"<node>: <text>"``; ``.node`` is the node's name."""

    def __new__(cls, node, text: str):
        name = node.name if isinstance(node, fx.Node) else str(node)
        s = super().__new__(cls, f"{name}: {text}")
        s.node = name
        s.text = text
        return s


class _Stop(Exception):
    def __init__(self, node, text):
        super().__init__(text)
        self.node, self.text = node, text


@dataclass
class _V:
    """A symbolic value. kind "bool": expr is a sympy Boolean; "int": a sympy integer expression;
    "table": a list of (condition, python number), the conditions a partition, the numbers exact
    elements of ``dtype``. ``rank`` None: a Python scalar (its own promotion category in torch)."""
    kind: str
    expr: Any
    dtype: Optional[torch.dtype]
    rank: Optional[int]


# ---------------------------------------------------------------------------------------------------
# the predicate handed on

@dataclass
class MaskPredicate:
    keep: Any                              # sympy Boolean over axes, size symbols and data atoms
    kind: str                              # "bool": keep == mask element; "additive": see below
    axes: Tuple[sympy.Symbol, ...]         # the score axes, left to right (b, h, i, j for 4-D scores)
    data: Tuple[fx.Node, ...] = ()         # tensors read by the data atoms, in the order of ``funcs``
    funcs: Tuple[Any, ...] = ()            # sympy functions d_<node>, one per data tensor
    sizes: Dict[Any, Optional[int]] = field(default_factory=dict)  # size symbol -> hint at capture
    dtype: Optional[torch.dtype] = None    # the mask's dtype
    kept_value: Optional[float] = None     # additive: the mask's value where keep (0.0 or -0.0)
    masked_value: Optional[float] = None   # additive: the value everywhere else
    node: Optional[fx.Node] = None

    def __str__(self):
        extra = f", masked={self.masked_value}" if self.kind == "additive" else ""
        return f"MaskPredicate({self.kind}: {self.keep}{extra})"

    def exact_below(self) -> float:
        """additive: s + masked_value == masked_value (in ``dtype``, round to nearest) for every finite
        |s| below this; -inf absorbs every finite s. With finfo(float32).min it is 2**103."""
        m = self.masked_value
        if m is None:
            return 0.0
        if m == -math.inf:
            return math.inf
        t = torch.tensor(m, dtype=self.dtype)
        gap = (torch.nextafter(t, torch.zeros_like(t)) - t).abs().item()  # spacing toward zero
        return gap / 2  # strictly below half a spacing the sum rounds back to m

    def structural(self):
        """The conjunction of the data-free conjuncts of ``keep`` (keep == structural & data part)."""
        return sympy.And(*[c for c in sympy.And.make_args(self.keep) if not _has_data(c)])

    def data_part(self):
        return sympy.And(*[c for c in sympy.And.make_args(self.keep) if _has_data(c)])

    def classify(self) -> "MaskClass":
        return classify(self.keep)

    def evaluate(self, shape: Sequence[int], sizes: Optional[Dict] = None,
                 data: Optional[Dict[fx.Node, torch.Tensor]] = None) -> torch.Tensor:
        """The dense boolean keep-mask of the score ``shape`` (concrete ints): ``sizes`` binds size
        symbols (by symbol or name; hints by default), ``data`` the data nodes' tensors."""
        expr = _bind_sizes(self.keep, self.sizes, sizes)
        grids = {}
        for k, (ax, n) in enumerate(zip(self.axes, shape)):
            g = np.arange(int(n)).reshape([-1 if d == k else 1 for d in range(len(shape))])
            grids[ax] = g
        arrays = {}
        for f, node in zip(self.funcs, self.data):
            if data is None or node not in data:
                if _uses(expr, f):
                    raise ValueError(f"evaluate needs the tensor of data node {node.name}")
                continue
            t = data[node]
            # the predicate's integers are exact: data of a narrow dtype is widened before any
            # arithmetic (numpy would wrap uint8 1 - d, or refuse it)
            arrays[f] = t.detach().cpu().to(torch.int64).numpy()
        out = _eval(expr, grids, arrays)
        return torch.from_numpy(np.broadcast_to(np.asarray(out, dtype=bool), tuple(int(n) for n in shape)).copy())

    def block_sparsity(self, block_m: int, block_n: int, n_q: int, n_k: int,
                       sizes: Optional[Dict] = None, batch: Optional[Dict] = None) -> np.ndarray:
        return block_sparsity(self.structural(), block_m, block_n, n_q, n_k,
                              sizes=_merge_sizes(self.sizes, sizes), batch=batch)


def _has_data(e) -> bool:
    return any(isinstance(f, sympy.core.function.AppliedUndef) for f in e.atoms(sympy.Function))


def _uses(e, f) -> bool:
    return any(a.func == f for a in e.atoms(sympy.core.function.AppliedUndef))


def _merge_sizes(hints, sizes):
    out = {}
    for s, v in (hints or {}).items():
        if v is not None:
            out[s] = v
    for s, v in (sizes or {}).items():
        out[s] = v
    return out


def _bind_sizes(expr, hints, sizes):
    merged = _merge_sizes(hints, sizes)
    by_name = {str(k): v for k, v in merged.items()}
    sub = {s: sympy.Integer(by_name[s.name]) for s in expr.free_symbols
           if s.name in by_name and s not in (b, h, i, j)}
    return expr.xreplace(sub) if sub else expr


# ---------------------------------------------------------------------------------------------------
# entry point

def analyse_mask(node: fx.Node, score_shape: Sequence[Any]) -> Union[MaskPredicate, NearMissReason]:
    """The predicate of mask ``node`` as it broadcasts into scores of ``score_shape`` (ints or SymInts),
    or the reason it cannot be proven."""
    if not isinstance(node, fx.Node):
        return NearMissReason(str(node), "the mask is not a graph node")
    if node.op in ("placeholder", "get_attr"):
        return NearMissReason(node, "the mask is data (a graph input): loaded as a tensor")
    got = _interpret(node, score_shape, "the mask")
    if isinstance(got, NearMissReason):
        return got
    mv, v, interp, ren = got
    R = len(score_shape)
    axes = _axes(R)
    hints = interp.hints()
    data, funcs = tuple(interp.data), tuple(interp.funcs)
    if v.kind == "bool":
        keep = v.expr.xreplace(ren)
        return _finish(MaskPredicate(keep, "bool", axes, data, funcs, hints, mv.dtype, node=node))
    if v.kind != "table" or mv.dtype not in _FLOAT_DTYPES:
        return NearMissReason(node, f"a {mv.dtype} mask is neither boolean nor an additive float mask")
    keep_conds, masked = [], {}
    for c, val in v.expr:
        if val == 0:
            keep_conds.append(c)
        else:
            masked.setdefault(_key(val), []).append(c)
    if len(masked) > 1:
        return NearMissReason(node, f"masked positions carry different values {sorted(masked)}: a fully "
                              "masked row would not match one masked value")
    zeros = {_key(val) for c, val in v.expr if val == 0}
    if len(zeros) > 1:
        return NearMissReason(node, "kept positions hold both +0.0 and -0.0")
    kept = next(iter(zeros))[0] if zeros else None
    m = next(iter(masked))[0] if masked else None
    if m is not None and not (m < 0):
        return NearMissReason(node, f"the additive tensor takes the value {m}: a bias, not a mask")
    keep = sympy.Or(*keep_conds).xreplace(ren)
    return _finish(MaskPredicate(keep, "additive", axes, data, funcs, hints, mv.dtype,
                                 kept_value=0.0 if kept is None else kept, masked_value=m, node=node))


def analyse_index(node: fx.Node, score_shape: Sequence[Any]) -> Union[MaskPredicate, NearMissReason]:
    """An integer tensor built from index arithmetic (ALiBi's ``j - i``, ``-abs(j - i)``), as an
    exact integer expression over the score axes it broadcasts into: a ``MaskPredicate`` whose
    ``keep`` holds that expression (kind "int"), or the reason it is not one."""
    if not isinstance(node, fx.Node) or node.op in ("placeholder", "get_attr"):
        return NearMissReason(str(node), "not built in the graph")
    mv = value(node)
    if not isinstance(mv, torch.Tensor) or mv.dtype not in _INT_DTYPES:
        return NearMissReason(node, "not an integer tensor")
    got = _interpret(node, score_shape, "the tensor")
    if isinstance(got, NearMissReason):
        return got
    mv, v, interp, ren = got
    if v.kind != "int":
        return NearMissReason(node, "not an integer expression")
    pred = MaskPredicate(v.expr.xreplace(ren), "int", _axes(len(score_shape)), tuple(interp.data),
                         tuple(interp.funcs), interp.hints(), mv.dtype, node=node)
    return _finish(pred)


def _interpret(node: fx.Node, score_shape, what: str):
    """(value, symbolic value, interpreter, {_P[k]: score axis}) of ``node``, or why not."""
    mv = value(node)
    if not isinstance(mv, torch.Tensor):
        return NearMissReason(node, f"no example tensor recorded for {what}")
    R = len(score_shape)
    if mv.dim() > R:
        return NearMissReason(node, f"{what} has rank {mv.dim()} > the scores' {R}")
    interp = _Interp()
    try:
        v = interp.node(node)
    except _Stop as e:
        return NearMissReason(e.node, e.text)
    except RecursionError:  # the interpreter recurses once per node on the way up
        return NearMissReason(node, f"{what} is built by a chain of nodes too deep to interpret")
    ren = _rename_to_axes(mv, score_shape)
    if isinstance(ren, str):
        return NearMissReason(node, f"{what}: {ren}")
    return mv, v, interp, ren


def _rename_to_axes(mv: torch.Tensor, score_shape):
    """{_P[k]: score axis} for a value of shape mv.shape broadcast (right-aligned) into the scores,
    or why it would enlarge them."""
    R = len(score_shape)
    axes, ren, r = _axes(R), {}, mv.dim()
    for k, s in enumerate(mv.shape):
        if isinstance(s, int) and s == 1:
            continue  # broadcast: the value does not depend on this index (normalised to 0)
        if not _same(s, score_shape[R - r + k]):
            return (f"dim {k} of size {s} does not provably equal the scores' {score_shape[R - r + k]} "
                    "(broadcasting would enlarge them)")
        ren[_P[k]] = axes[R - r + k]
    return ren


def _finish(p: MaskPredicate):
    # only the size symbols the predicate uses; one without a hint is listed with None (the caller
    # must bind it)
    p.sizes = {s: v for s, v in p.sizes.items() if s in p.keep.free_symbols}
    for s in p.keep.free_symbols:
        if s not in p.axes and s not in p.sizes:
            p.sizes[s] = None
    used = [k for k, f in enumerate(p.funcs) if _uses(p.keep, f)]
    p.data = tuple(p.data[k] for k in used)
    p.funcs = tuple(p.funcs[k] for k in used)
    return p


def _axes(R: int):
    names = {4: "b h i j", 3: "b i j", 2: "i j", 1: "j"}
    if R in names:
        return tuple(sympy.symbols(names[R], integer=True, nonnegative=True)) if R > 1 else (j,)
    lead = sympy.symbols(" ".join(f"x{k}" for k in range(R - 4)), integer=True, nonnegative=True)
    lead = lead if isinstance(lead, tuple) else (lead,)
    return tuple(lead) + (b, h, i, j)


def _same(a, b_) -> bool:
    if isinstance(a, int) and isinstance(b_, int):
        return a == b_
    try:
        return bool(statically_known_true(a == b_))
    except Exception:  # noqa: BLE001 - an undecidable symbolic comparison is "not proven"
        return False


def _key(v):
    """Table values are merged by exact identity: -0.0 and 0.0 stay apart (they are both 0 as addends
    but we keep the graph's values as they are)."""
    if isinstance(v, float):
        return (v, math.copysign(1.0, v))
    return (v, 1.0)


# ---------------------------------------------------------------------------------------------------
# the interpreter

def _symexpr(x):
    if isinstance(x, bool):
        raise TypeError
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, torch.SymInt):
        return x.node.expr
    raise TypeError


# aliasing (which storages the graph writes into): one rule for the whole pass, in effects.py
from ..effects import Writes as _Writes, graph_writes as _graph_writes  # noqa: E402


def _bool_true(e) -> bool:
    return e is sympy.true


# Integer semantics, checked on torch 2.13 (CPU), that the width rules rely on:
# * arithmetic wraps in the computation dtype: arange(300, dtype=uint8) is 0..255, 0..43;
#   arange(-3, 3, dtype=uint8) is 253, 254, 255, 0, 1, 2; uint8 a - b and int64 max + 1 wrap;
# * a Python scalar or 0-dim tensor operand is converted to the tensor's dtype, wrapping, also in
#   comparisons: int8_t + 1000 adds -24, int8_t < 1000 compares with -24, uint8_t < -1 with 255,
#   uint8_t < tensor(300) with 44; tensors of two dtypes promote (uint8 + int8 is int16), no wrap;
# * abs(int8 -128) and -(int8 -128) are -128, int8 -128 // -1 is -128; integer // 0 and % 0 raise;
# * torch.full(.., -1, dtype=uint8) is 255, but fills that do not fit (300 for uint8, -129 for int8)
#   raise, as do where / masked_fill with such scalars; float -> int outside the range is
#   platform-dependent (see _check_float_to_int).
# Every integer node's exact value is therefore proven to fit its dtype, and every operand the dtype
# its op computes in; wraparound is not modelled, the mask is refused instead.
#
# Every dimension of every tensor is assumed below 2**62: no tensor a machine can hold (or a kernel
# iterate over) comes near it, and Dynamo gives size symbols no upper bound (int_oo). With it,
# index arithmetic of the usual forms on int64 (q - k, q + past, |q - k|) is proven not to wrap;
# products of two sizes are not, and are refused in int64 unless the sizes are static.
DIM_BOUND = 2 ** 62
MAX_EXPR = 4000  # sympy tree size (counted with shared subexpressions repeated) of one node's value


def _num(x):
    """A shape-environment bound (sympy integer or Dynamo's int_oo) as a Python int or +-inf."""
    if isinstance(x, IntInfinity) or x == sympy.oo or x == math.inf:
        return math.inf
    if isinstance(x, NegativeIntInfinity) or x == -sympy.oo or x == -math.inf:
        return -math.inf
    return int(x)


def _fmt(x) -> str:
    return str(x) if not isinstance(x, float) else ("inf" if x > 0 else "-inf")


def _imul(x, y):
    """Interval-endpoint product, with 0 * inf = 0 (a zero factor is exactly zero)."""
    return 0 if x == 0 or y == 0 else x * y


def _bounds(e, lookup, memo=None):
    """(lo, hi) (Python ints or +-inf) containing every value of integer expression ``e`` when each
    symbol and data function ranges over ``lookup(atom)``; None when ``e`` has a form not bounded
    here. Interval arithmetic: sound, not tight (correlations between operands are dropped)."""
    memo = {} if memo is None else memo
    if e in memo:
        return memo[e]

    def rec(x):
        return _bounds(x, lookup, memo)

    out = None
    if e.is_Integer:
        out = (int(e), int(e))
    elif e.is_Symbol or isinstance(e, sympy.core.function.AppliedUndef):
        out = lookup(e if e.is_Symbol else e.func)
    elif isinstance(e, sympy.Add):
        rs = [rec(a) for a in e.args]
        if all(rs):
            out = (sum(r[0] for r in rs), sum(r[1] for r in rs))
    elif isinstance(e, sympy.Mul):
        if all(not (a.is_Rational and not a.is_Integer) for a in e.args):
            rs = [rec(a) for a in e.args]
            if all(rs):
                lo = hi = 1
                for r in rs:
                    c = [_imul(lo, r[0]), _imul(lo, r[1]), _imul(hi, r[0]), _imul(hi, r[1])]
                    lo, hi = min(c), max(c)
                out = (lo, hi)
    elif isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) >= 0:
        r, k = rec(e.base), int(e.exp)
        if r:
            c = [r[0] ** k, r[1] ** k]
            lo = 0 if k % 2 == 0 and r[0] <= 0 <= r[1] else min(c)
            out = (lo, max(c)) if k else (1, 1)
    elif isinstance(e, sympy.floor):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        rn, rd = rec(num), rec(den)
        if rn and rd and not rd[0] <= 0 <= rd[1] and all(isinstance(x, int) for x in rn + rd):
            # num / den is monotone in each argument on a box where den keeps its sign
            c = [a // d for a in rn for d in rd]
            out = (min(c), max(c))
    elif isinstance(e, sympy.Mod):
        ra, rm = rec(e.args[0]), rec(e.args[1])
        if ra and rm and not rm[0] <= 0 <= rm[1]:
            if rm[0] > 0:
                out = ra if 0 <= ra[0] and ra[1] < rm[0] else (0, rm[1] - 1)
            else:
                out = ra if rm[1] < ra[0] and ra[1] <= 0 else (rm[0] + 1, 0)
    elif isinstance(e, sympy.Abs):
        r = rec(e.args[0])
        if r:
            lo = r[0] if r[0] > 0 else -r[1] if r[1] < 0 else 0
            out = (lo, max(abs(r[0]), abs(r[1])))
    elif isinstance(e, (sympy.Max, sympy.Min)):
        rs = [rec(a) for a in e.args]
        if all(rs):
            f = max if isinstance(e, sympy.Max) else min
            out = (f(r[0] for r in rs), f(r[1] for r in rs))
    elif isinstance(e, sympy.Piecewise):
        rs = [rec(a.expr) for a in e.args if a.cond is not sympy.false]
        if rs and all(rs):
            out = (min(r[0] for r in rs), max(r[1] for r in rs))
    memo[e] = out
    return out


def _tree_size(e, cap: int, memo=None) -> int:
    """Nodes of ``e`` as a tree (what sympy's recursive walks visit), computed over the DAG, stopping
    once past ``cap``: a guard against ``m = where(c, m, m)`` chains that double the tree per node."""
    memo = {} if memo is None else memo
    if e in memo:
        return memo[e]
    total = 1
    for a in e.args:
        total += _tree_size(a, cap, memo)
        if total > cap:
            break
    memo[e] = total
    return total


def _check_size(v: _V, n):
    exprs = [v.expr] if v.kind != "table" else [c for c, _ in v.expr]
    memo, total = {}, 0
    for x in exprs:
        if isinstance(x, sympy.Basic):
            total += _tree_size(x, MAX_EXPR, memo)
        if total > MAX_EXPR:
            raise _Stop(n, f"the value's expression grows past {MAX_EXPR} terms")


class _Interp:
    def __init__(self):
        self.memo: Dict[fx.Node, _V] = {}
        self.data: List[fx.Node] = []
        self.funcs: List[Any] = []
        self.shape_envs = []
        self.writes: Dict[fx.Graph, _Writes] = {}
        self.ranges: Dict[fx.Node, Tuple[Any, Any]] = {}   # proven value range of each integer node
        self.atom_ranges: Dict[Any, Tuple[int, int]] = {}  # data function -> its dtype's range

    # -- aliasing --------------------------------------------------------------------------------------
    def check_unwritten(self, n: fx.Node):
        """``n``'s recorded value is what every reader sees only if nothing writes into its storage."""
        w = self.writes.get(n.graph)
        if w is None:
            w = self.writes[n.graph] = _graph_writes(n.graph)
        ws = w.of(n)
        if ws is None:
            raise _Stop(n, f"no storage recorded for {n.name}: an in-place write into it cannot be ruled out")
        if ws:
            u = ws[0]
            raise _Stop(u, f"an in-place write ({_name(u)}) may change {n.name}, directly or through a "
                           "view of its storage")

    # -- integer ranges --------------------------------------------------------------------------------
    def sym_range(self, s) -> Tuple[Any, Any]:
        """A size symbol's range from Dynamo's shape environment, with the bound we assume on sizes:
        every tensor dimension (so every nonnegative symbol) is below ``DIM_BOUND``."""
        for env in self.shape_envs:
            r = getattr(env, "var_to_range", {}).get(s)
            if r is not None:
                lo, hi = _num(r.lower), _num(r.upper)
                if lo >= 0:
                    hi = min(hi, DIM_BOUND - 1)
                return lo, hi
        return -math.inf, math.inf

    def dim_hi(self, d) -> Any:
        """The largest value a dimension of size ``d`` (int or SymInt) can have."""
        if isinstance(d, int):
            return d
        r = _bounds(_symexpr(d), self.lookup)
        return DIM_BOUND - 1 if r is None else min(r[1], DIM_BOUND - 1)

    def lookup(self, x, env=None):
        if env is not None and x in env:
            return env[x]
        if isinstance(x, sympy.Symbol):
            return self.sym_range(x)
        return self.atom_ranges.get(x)

    def int_range(self, e, shape):
        """(lo, hi) bounding integer expression ``e`` over a value of ``shape`` (its index symbols
        over 0 <= p < size), or None when not bounded; "empty" when the value has no elements."""
        env = {}
        for k, d in enumerate(shape):
            hi = self.dim_hi(d)
            if hi <= 0:
                return "empty"
            env[_P[k]] = (0, hi - 1)
        return _bounds(e, lambda x: self.lookup(x, env))

    def check_width(self, n, e, shape, dt: torch.dtype, what: str):
        """Prove that integer ``e`` (the exact value of ``what``) fits ``dt``: torch computes in ``dt``
        and wraps around where sympy's integers would not."""
        r = self.int_range(e, shape)
        if r == "empty":
            return r
        info = torch.iinfo(dt)
        if r is None or r[0] < info.min or r[1] > info.max:
            got = "is not bounded here" if r is None else f"ranges over [{_fmt(r[0])}, {_fmt(r[1])}]"
            raise _Stop(n, f"{what} {got}, not provably inside {dt}'s [{info.min}, {info.max}]: torch "
                           "would wrap around")
        return r

    def operand_range(self, a, X: _V):
        """The range of an integer or boolean operand (a literal, a SymInt or a tensor node); "empty"
        for a tensor without elements."""
        if X.kind == "bool":
            return 0, 1
        if isinstance(a, fx.Node):
            if a not in self.ranges:
                self.ranges[a] = _bounds(X.expr, self.lookup) if X.rank is None else None
            return self.ranges[a]
        return int(a), int(a)

    def check_promoted(self, n, pairs, ct: torch.dtype):
        """Each integer operand, converted to the computation dtype ``ct`` (a Python scalar or a 0-dim
        tensor is converted to the other operand's dtype, wrapping: ``uint8_t < 300`` compares with
        44), must keep its value."""
        if ct not in _INT_DTYPES:
            return
        info = torch.iinfo(ct)
        for a, X in pairs:
            if X.kind not in ("int", "bool") or X.dtype == ct:
                continue
            r = self.operand_range(a, X)
            if r == "empty":
                continue
            if r is None or r[0] < info.min or r[1] > info.max:
                got = "unbounded" if r is None else f"in [{_fmt(r[0])}, {_fmt(r[1])}]"
                raise _Stop(n, f"operand {a!r} ({got}) is converted to {ct} for this op and may wrap around")

    def hints(self):
        out = {}
        for env in self.shape_envs:
            table = getattr(env, "backed_var_to_val", None)
            table = table if table is not None else getattr(env, "var_to_val", {})
            for s, v in table.items():
                try:
                    out[s] = int(v)
                except (TypeError, ValueError):
                    pass
        return out

    # -- arguments -----------------------------------------------------------------------------------
    def arg(self, a) -> _V:
        if isinstance(a, fx.Node):
            return self.node(a)
        if isinstance(a, bool):
            return _V("bool", sympy.true if a else sympy.false, None, None)
        if isinstance(a, int):
            return _V("int", sympy.Integer(a), None, None)
        if isinstance(a, float):
            return _V("table", [(sympy.true, a)], None, None)
        raise _Stop(str(a), f"argument {a!r} is not a number or a node")

    def sym(self, a, where):
        """An integer-valued size argument: a Python int or a SymInt node, as a sympy expression."""
        v = value(a) if isinstance(a, fx.Node) else a
        if isinstance(v, torch.SymInt):
            self.shape_envs.append(v.node.shape_env) if v.node.shape_env not in self.shape_envs else None
        try:
            return _symexpr(v)
        except TypeError:
            raise _Stop(where, f"{a!r} is not an integer size") from None

    # -- nodes ---------------------------------------------------------------------------------------
    def node(self, n: fx.Node) -> _V:
        if n in self.memo:
            return self.memo[n]
        v = value(n)
        if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
            # a Python integer (Dynamo's SymInt arithmetic is exact): no width to check
            res = _V("int", self.sym(n, n), None, None)
            self.memo[n] = res
            return res
        if isinstance(v, (float, torch.SymFloat, torch.SymBool)):
            raise _Stop(n, "a run-time number (e.g. .item() of a tensor input), not a constant")
        if not isinstance(v, torch.Tensor):
            raise _Stop(n, "no example tensor recorded")
        self.check_unwritten(n)
        for s in v.shape:
            if isinstance(s, torch.SymInt) and s.node.shape_env not in self.shape_envs:
                self.shape_envs.append(s.node.shape_env)
        if n.op in ("placeholder", "get_attr"):
            res = self.leaf(n, v)
        elif n.op in ("call_function", "call_method"):
            handler = _HANDLERS.get(n.target) if n.op == "call_method" else _lookup(n.target)
            if handler is None:
                raise _Stop(n, f"{_name(n)} is not interpreted (not index arithmetic)")
            res = handler(self, n, v)
        else:
            raise _Stop(n, f"{n.op} node is not interpreted")
        res = _canon(res, v, n)
        _check_size(res, n)
        if res.kind == "int":
            self.ranges[n] = self.check_width(n, res.expr, v.shape, v.dtype, f"the {v.dtype} value of {n.name}")
        self.memo[n] = res
        return res

    def leaf(self, n: fx.Node, v: torch.Tensor) -> _V:
        if v.dtype not in _INT_DTYPES + (torch.bool,):
            raise _Stop(n, f"data tensor of dtype {v.dtype}: only integer or boolean data is read as atoms")
        f = sympy.Function(f"d_{n.name}", integer=True)
        self.data.append(n)
        self.funcs.append(f)
        # data may hold any value of its dtype
        self.atom_ranges[f] = (0, 1) if v.dtype == torch.bool else (torch.iinfo(v.dtype).min, torch.iinfo(v.dtype).max)
        atom = f(*_P[:v.dim()]) if v.dim() else f()
        if v.dtype == torch.bool:
            return _V("bool", sympy.Ne(atom, 0), v.dtype, v.dim())
        return _V("int", atom, v.dtype, v.dim())


def _name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def _lookup(target):
    try:
        return _HANDLERS.get(target)
    except TypeError:
        return None


def _subs(v: _V, mapping) -> _V:
    if not mapping:
        return v
    if v.kind == "table":
        return _V("table", [(c.xreplace(mapping), x) for c, x in v.expr], v.dtype, v.rank)
    return _V(v.kind, v.expr.xreplace(mapping), v.dtype, v.rank)


def _shift(v: _V, r: int) -> _V:
    """Right-aligned broadcasting: dim k of a rank-ra value is dim k + r - ra of the result."""
    if v.rank is None or v.rank == r:
        return v
    off = r - v.rank
    return _subs(v, {_P[k]: _P[k + off] for k in range(v.rank)})


def _canon(res: _V, v: torch.Tensor, n) -> _V:
    """Bring a handler's result to the node's dtype/rank: size-1 dims do not depend on their index
    (so broadcasting them is a no-op), bool tensors are Booleans, integer tensors expressions, float
    tensors tables."""
    res = _V(res.kind, res.expr, res.dtype, res.rank)
    if res.rank not in (None, v.dim()):
        raise _Stop(n, "internal: rank mismatch")  # a handler bug must never become a wrong predicate
    res.rank = v.dim()
    zero = {_P[k]: sympy.Integer(0) for k, s in enumerate(v.shape) if isinstance(s, int) and s == 1}
    res = _subs(res, zero)
    dt = v.dtype
    if dt == torch.bool:
        e = _as_bool(res, n)
        return _V("bool", e, dt, v.dim())
    if dt in _INT_DTYPES:
        if res.kind == "bool":
            return _V("int", sympy.Piecewise((1, res.expr), (0, True)), dt, v.dim())
        if res.kind == "table":
            return _V("int", _table_to_int(res.expr, n), dt, v.dim())
        return _V("int", res.expr, dt, v.dim())
    if dt in _FLOAT_DTYPES:
        if res.kind != "table":
            raise _Stop(n, "internal: float value not computed as a table")
        return _V("table", res.expr, dt, v.dim())
    raise _Stop(n, f"dtype {dt} is not interpreted")


def _as_bool(v: _V, n) -> Any:
    if v.kind == "bool":
        return v.expr
    if v.kind == "int":
        return sympy.Ne(v.expr, 0)
    return sympy.Or(*[c for c, x in v.expr if x != 0])


def _table_to_int(t, n):
    if len(t) == 1:
        return sympy.Integer(int(t[0][1]))
    return sympy.Piecewise(*[(sympy.Integer(int(x)), c) for c, x in t[:-1]], (sympy.Integer(int(t[-1][1])), True))


def _table(v: _V, n) -> List[Tuple[Any, Any]]:
    """Any value as a finite table, when it is one."""
    if v.kind == "table":
        return v.expr
    if v.kind == "bool":
        if v.expr is sympy.true or v.expr is sympy.false:
            return [(sympy.true, bool(v.expr))]
        return [(v.expr, True), (sympy.Not(v.expr), False)]
    e = v.expr
    if e.is_Integer:
        return [(sympy.true, int(e))]
    if isinstance(e, sympy.Piecewise) and all(a.expr.is_Integer for a in e.args):
        out, prev = [], sympy.false
        for a in e.args:
            out.append((sympy.And(a.cond, sympy.Not(prev)), int(a.expr)))
            prev = sympy.Or(prev, a.cond)
        return [(c, x) for c, x in out if c is not sympy.false]
    raise _Stop(n, "an integer tensor with unboundedly many values is mixed with floats")


def _scalar_tensor(x, v: _V):
    """A table entry as torch sees it in the graph: a Python scalar stays one (its own promotion
    category); a 0-dim tensor stays 0-dim; any other tensor is 1-element 1-D."""
    if v.dtype is None:
        return x
    t = torch.tensor(x, dtype=v.dtype)
    return t if v.rank == 0 else t.reshape(1)


def _cast_value(x, src: Optional[torch.dtype], dst: torch.dtype):
    if src is None:
        src = torch.bool if isinstance(x, bool) else torch.int64 if isinstance(x, int) else torch.float64
    return torch.tensor(x, dtype=src).to(dst).item()


def _add_entry(out: dict, cond, val, n):
    if isinstance(val, float) and math.isnan(val):
        raise _Stop(n, "a NaN in the mask")
    k = _key(val)
    if k in out:
        out[k] = (sympy.Or(out[k][0], cond), val)
    else:
        out[k] = (cond, val)
    if len(out) > MAX_TABLE:
        raise _Stop(n, f"the mask takes more than {MAX_TABLE} distinct values")


def _table_map(tabs: List[List[Tuple[Any, Any]]], fn, n, out_dtype):
    """Apply fn entrywise over the product of tables (conditions intersected), in torch."""
    out: dict = {}

    def rec(k, cond, vals):
        if cond is sympy.false:
            return
        if k == len(tabs):
            try:
                r = fn(*vals)
            except (RuntimeError, ZeroDivisionError, OverflowError) as e:  # e.g. integer // 0
                raise _Stop(n, f"torch raises on an element: {e}") from None
            if isinstance(r, torch.Tensor):
                if r.dtype != out_dtype:
                    raise _Stop(n, f"computed dtype {r.dtype} differs from the graph's {out_dtype}")
                r = r.reshape(-1)[0].item()
            _add_entry(out, cond, r, n)
            return
        for c, x in tabs[k][0]:
            rec(k + 1, sympy.And(cond, c), vals + [_scalar_tensor(x, tabs[k][1])])

    rec(0, sympy.true, [])
    return [(c, x) for c, x in out.values()]


# ---------------------------------------------------------------------------------------------------
# op handlers: each states the semantics it relies on

def _out_dtype(v):
    return v.dtype


_INT_OPS = {
    "add": lambda a, c: a + c, "sub": lambda a, c: a - c, "mul": lambda a, c: a * c,
    "rsub": lambda a, c: c - a,
    # torch's // and % on integers are Python's floor division and remainder (sign of the divisor)
    "floordiv": lambda a, c: sympy.floor(a / c), "mod": lambda a, c: sympy.Mod(a, c),
    "maximum": lambda a, c: sympy.Max(a, c), "minimum": lambda a, c: sympy.Min(a, c),
}
_CMP = {"lt": sympy.Lt, "le": sympy.Le, "gt": sympy.Gt, "ge": sympy.Ge, "eq": sympy.Eq, "ne": sympy.Ne}
_TORCH_FN = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "rsub": torch.rsub,
    "floordiv": torch.floor_divide, "mod": torch.remainder, "maximum": torch.maximum,
    "minimum": torch.minimum, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
    "eq": torch.eq, "ne": torch.ne, "and": torch.bitwise_and, "or": torch.bitwise_or,
    "xor": torch.bitwise_xor, "logical_and": torch.logical_and, "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
}


def _as_tensorish(x):
    """torch.maximum etc. take tensors only; Python scalars become 0-dim tensors of their kind."""
    return x if isinstance(x, torch.Tensor) else torch.tensor(x)


def _binary(op: str):
    def handle(it: _Interp, n: fx.Node, v: torch.Tensor) -> _V:
        if n.kwargs.get("alpha", 1) != 1:
            raise _Stop(n, "add/sub with alpha")
        a_, c_ = n.args[0], (n.args[1] if len(n.args) > 1 else n.kwargs.get("other"))
        name = op
        if name == "div":
            rm = n.kwargs.get("rounding_mode", n.args[2] if len(n.args) > 2 else None)
            if rm == "floor":
                name = "floordiv"
            elif rm is not None:
                raise _Stop(n, f"division with rounding_mode={rm!r}")
        r = v.dim()
        A, C = _shift(it.arg(a_), r), _shift(it.arg(c_), r)
        dt = v.dtype
        if name in ("and", "or", "xor"):
            if dt != torch.bool:
                raise _Stop(n, "bitwise op on integers")
            x, y = _as_bool(A, n), _as_bool(C, n)
            return _V("bool", {"and": sympy.And, "or": sympy.Or, "xor": sympy.Xor}[name](x, y), dt, r)
        if name in ("logical_and", "logical_or", "logical_xor"):
            x, y = _as_bool(A, n), _as_bool(C, n)
            f = {"logical_and": sympy.And, "logical_or": sympy.Or, "logical_xor": sympy.Xor}[name]
            return _V("bool", f(x, y), dt, r)
        exact_int = all(X.kind in ("int", "bool") for X in (A, C))
        if exact_int and (name in _CMP and dt == torch.bool or name in _INT_OPS and dt in _INT_DTYPES):
            # sympy's integers are exact; torch's are too as long as each operand, converted to the
            # dtype the op computes in, keeps its value (the result's own range is checked by the
            # caller, in the node's dtype)
            it.check_promoted(n, ((a_, A), (c_, C)), _compute_dtype(A, C, dt))
            if name in ("floordiv", "mod"):
                rc = it.operand_range(c_, C)
                if rc is None or rc != "empty" and rc[0] <= 0 <= rc[1]:
                    raise _Stop(n, f"the divisor {c_!r} may be 0 (torch raises ZeroDivisionError on integers)")
            x, y = _to_int(A), _to_int(C)
            if name in _CMP:
                return _V("bool", _CMP[name](x, y), dt, r)
            return _V("int", _INT_OPS[name](x, y), dt, r)
        # floats (or integers meeting floats): computed entry by entry in torch, with the graph's
        # operand kinds, so promotion and rounding are the graph's own
        fn = _TORCH_FN.get(name)
        if fn is None:
            raise _Stop(n, f"{name} is not interpreted on these operands")
        if name in ("maximum", "minimum"):
            fn = (lambda f: (lambda x, y: f(_as_tensorish(x), _as_tensorish(y))))(fn)
        tab = _table_map([(_table(A, n), A), (_table(C, n), C)], fn, n, dt)
        return _V("table", tab, dt, r)
    return handle


def _compute_dtype(A: _V, C: _V, dt: torch.dtype) -> torch.dtype:
    """The dtype torch computes a binary op in (its type promotion: a Python scalar or a 0-dim tensor
    does not widen a dimensioned tensor of its own category)."""
    def rep(X):
        if X.rank is None:
            return True if X.kind == "bool" else 1 if X.kind == "int" else 1.0
        return torch.empty((1,) * X.rank, dtype=X.dtype, device="meta")
    try:
        return torch.result_type(rep(A), rep(C))
    except (TypeError, RuntimeError):
        return dt


def _to_int(x: _V):
    if x.kind == "bool":
        return sympy.Piecewise((1, x.expr), (0, True))
    return x.expr


def _unary(op: str):
    def handle(it: _Interp, n, v):
        A = it.arg(n.args[0])
        dt = v.dtype
        if op in ("not", "logical_not"):
            if op == "not" and dt != torch.bool:
                raise _Stop(n, "bitwise not of integers")
            return _V("bool", sympy.Not(_as_bool(A, n)), dt, v.dim())
        if A.kind == "int" and dt in _INT_DTYPES:
            return _V("int", {"neg": lambda e: -e, "abs": sympy.Abs}[op](A.expr), dt, v.dim())
        fn = {"neg": torch.neg, "abs": torch.abs}[op]
        return _V("table", _table_map([(_table(A, n), A)], fn, n, dt), dt, v.dim())
    return handle


def _cast(it: _Interp, n, v):
    """x.to(...), x.bool(), x.float(), x.type(...), x.type_as(y): the value keeps its elements, the
    dtype (read off the node's example value) converts them."""
    if n.kwargs.get("memory_format") not in (None, torch.contiguous_format, torch.preserve_format):
        raise _Stop(n, "cast with a memory format")
    A = it.arg(n.args[0])
    dt = v.dtype
    if A.kind == "bool" and dt == torch.bool:
        return _V("bool", A.expr, dt, A.rank)
    if dt == torch.bool:
        return _V("bool", _as_bool(A, n), dt, A.rank)
    if A.kind in ("int", "bool") and dt in _INT_DTYPES:
        # exact when the value fits dt, which the caller proves for every integer node (a narrowing
        # cast wraps: int64 200 -> int8 is -56)
        return _V("int", _to_int(A), dt, A.rank)
    if dt in _INT_DTYPES and A.kind == "table":
        _check_float_to_int(A.expr, dt, n)
    tab = _table_map([(_table(A, n), A)],
                     lambda x: (x if isinstance(x, torch.Tensor) else torch.tensor(x)).to(dt), n, dt)
    return _V("table", tab, dt, A.rank)


def _check_float_to_int(table, dt: torch.dtype, n):
    """A float converted to an integer dtype is truncated toward zero; out of the dtype's range (or
    inf, NaN) the result is platform-dependent (on x86 CPUs float -> int32 gives INT_MIN for 3e10 and
    inf; GPUs saturate), so only values whose truncation fits are read."""
    info = torch.iinfo(dt)
    for _, x in table:
        if isinstance(x, float) and (not math.isfinite(x) or not info.min <= math.trunc(x) <= info.max):
            raise _Stop(n, f"the float {x} converted to {dt} is out of its range (platform-dependent)")


def _identity(it, n, v):
    if n.kwargs.get("memory_format") not in (None, torch.contiguous_format, torch.preserve_format):
        raise _Stop(n, "copy with a memory format")
    return it.arg(n.args[0])


def _where(it: _Interp, n, v):
    """torch.where(c, a, b); x.where(c, y) == where(c, x, y); masked_fill(x, m, y) == where(m, y, x).
    Each branch's elements are cast to the result dtype (promotion picks it, no arithmetic)."""
    if n.target == "masked_fill" or n.target is torch.masked_fill:
        x, m, y = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs["mask"], \
            n.args[2] if len(n.args) > 2 else n.kwargs["value"]
        c_, a_, b_ = m, y, x
    elif n.op == "call_method":
        c_, a_, b_ = n.args[1], n.args[0], n.args[2]
    else:
        if len(n.args) + len(n.kwargs) != 3:
            raise _Stop(n, "where(cond) is nonzero(), not a select")
        c_, a_, b_ = n.args[0], n.args[1], n.args[2]
    r = v.dim()
    C, A, B = (_shift(it.arg(x), r) for x in (c_, a_, b_))
    c = _as_bool(C, n)
    dt = v.dtype
    if dt == torch.bool and A.kind == "bool" and B.kind == "bool":
        return _V("bool", sympy.Or(sympy.And(c, A.expr), sympy.And(sympy.Not(c), B.expr)), dt, r)
    if dt in _INT_DTYPES and A.kind in ("int", "bool") and B.kind in ("int", "bool"):
        return _V("int", sympy.Piecewise((_to_int(A), c), (_to_int(B), True)), dt, r)
    out: dict = {}
    for cond, X in ((c, A), (sympy.Not(c), B)):
        for cx, x in _table(X, n):
            cc = sympy.And(cond, cx)
            if cc is not sympy.false:
                _add_entry(out, cc, _cast_value(x, X.dtype, dt), n)
    return _V("table", list(out.values()), dt, r)


def _arange(it: _Interp, n, v):
    """arange(end) / arange(start, end[, step]): element p is start + p * step (integer dtypes only:
    a float arange accumulates rounding)."""
    if v.dtype not in _INT_DTYPES:
        raise _Stop(n, f"arange of dtype {v.dtype}")
    args = list(n.args)
    kw = n.kwargs
    if len(args) == 1:
        start, step = kw.get("start", 0), kw.get("step", 1)
    else:
        start = args[0]
        step = args[2] if len(args) > 2 else kw.get("step", 1)
    s0, st = it.sym(start, n), it.sym(step, n)
    return _V("int", s0 + st * _P[0], v.dtype, 1)


def _const(fill_pos: Optional[int], fill_default):
    """ones/zeros/full/new_*/*_like/tensor(literal): every element equals the fill, in the dtype."""
    def handle(it, n, v):
        if fill_pos is None:
            fill = fill_default
        else:
            fill = n.args[fill_pos] if len(n.args) > fill_pos else n.kwargs.get("fill_value")
        if isinstance(fill, fx.Node) or not isinstance(fill, (bool, int, float)):
            raise _Stop(n, f"fill value {fill!r} is not a literal")
        if v.dtype in _INT_DTYPES:
            _check_float_to_int([(sympy.true, fill)], v.dtype, n)
        # torch.full(.., -1, dtype=uint8) is 255 (the int64 -> uint8 conversion _cast_value makes);
        # fills that do not fit otherwise (300 for uint8) raise in eager, so never reach a graph
        x = _cast_value(fill, None, v.dtype)
        if v.dtype == torch.bool:
            return _V("bool", sympy.true if x else sympy.false, v.dtype, v.dim())
        if v.dtype in _INT_DTYPES:
            return _V("int", sympy.Integer(int(x)), v.dtype, v.dim())
        return _V("table", [(sympy.true, x)], v.dtype, v.dim())
    return handle


def _tensor_literal(it, n, v):
    if v.dim() != 0 or not n.args or not isinstance(n.args[0], (bool, int, float)):
        raise _Stop(n, "torch.tensor of something other than a literal number")
    return _const(0, None)(it, n, v)


def _tri(lower: bool):
    """tril(x, k): element (.., p, q) is x's where q - p <= k, else 0; triu: where q - p >= k."""
    def handle(it, n, v):
        A = it.arg(n.args[0])
        k = n.args[1] if len(n.args) > 1 else n.kwargs.get("diagonal", 0)
        kk = it.sym(k, n)
        r = v.dim()
        if r < 2:
            raise _Stop(n, "tril/triu of a tensor of rank < 2")
        p, q = _P[r - 2], _P[r - 1]
        cond = sympy.Le(q - p, kk) if lower else sympy.Ge(q - p, kk)
        A = _shift(A, r)
        if A.kind == "bool":
            return _V("bool", sympy.And(A.expr, cond), v.dtype, r)
        if A.kind == "int":
            return _V("int", sympy.Piecewise((A.expr, cond), (0, True)), v.dtype, r)
        out: dict = {}
        for c, x in A.expr:
            _add_entry(out, sympy.And(c, cond), x, n)
        _add_entry(out, sympy.Not(cond), _cast_value(0, None, v.dtype), n)
        return _V("table", list(out.values()), v.dtype, r)
    return handle


def _unsqueeze(it, n, v):
    A = it.arg(n.args[0])
    d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    if not isinstance(d, int):
        raise _Stop(n, "unsqueeze with a run-time dim")
    d = d % (A.rank + 1)
    return _V(A.kind, _subs(A, {_P[k]: _P[k + 1] for k in range(d, A.rank)}).expr, A.dtype, A.rank + 1)


def _dims_map(n, in_shape, out_shape):
    """Views that only insert or remove size-1 dims: the non-1 dims in order, provably equal."""
    ins = [(k, s) for k, s in enumerate(in_shape) if not (isinstance(s, int) and s == 1)]
    outs = [(k, s) for k, s in enumerate(out_shape) if not (isinstance(s, int) and s == 1)]
    if len(ins) != len(outs) or not all(_same(a, c) for (_, a), (_, c) in zip(ins, outs)):
        raise _Stop(n, f"a reshape {tuple(in_shape)} -> {tuple(out_shape)} that moves elements between dims")
    return {_P[a]: _P[c] for (a, _), (c, _) in zip(ins, outs)}


def _view(it, n, v):
    src = n.args[0]
    if any(isinstance(x, torch.dtype) for x in n.args[1:]):
        raise _Stop(n, "a view as another dtype (bit cast)")
    A = it.arg(src)
    mp = _dims_map(n, value(src).shape, v.shape)
    return _V(A.kind, _subs(A, mp).expr, A.dtype, v.dim())


def _expand(it, n, v):
    """expand / broadcast_to / expand_as: new leading dims; size-1 dims repeat an element that does not
    depend on its index."""
    A = it.arg(n.args[0])
    return _V(A.kind, _shift(A, v.dim()).expr, A.dtype, v.dim())


def _transpose(it, n, v):
    A = it.arg(n.args[0])
    r = A.rank
    if n.target in ("t",) or n.target is torch.t:
        perm = list(range(r))[::-1] if r == 2 else list(range(r))
    elif n.target in ("transpose",) or n.target is torch.transpose:
        d0, d1 = n.args[1] % r, n.args[2] % r
        perm = list(range(r))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        dims = n.args[1:] if n.op == "call_method" else (n.args[1],)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        perm = [d % r for d in dims]
    # out dim k is in dim perm[k]
    return _V(A.kind, _subs(A, {_P[perm[k]]: _P[k] for k in range(r)}).expr, A.dtype, r)


def _getitem(it: _Interp, n, v):
    src, idx = n.args
    A = it.arg(src)
    sv = value(src)
    if not isinstance(sv, torch.Tensor):
        raise _Stop(n, "indexing a non-tensor")
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(x, (fx.Node, list)) for x in idx):
        return _advanced(it, n, v, A, sv, idx)
    # basic indexing: expand the Ellipsis, then walk dims
    n_real = sum(1 for x in idx if x is not None and x is not Ellipsis)
    if sum(1 for x in idx if x is Ellipsis) > 1:
        raise _Stop(n, "two Ellipses")
    full = []
    for x in idx:
        if x is Ellipsis:
            full += [slice(None)] * (A.rank - n_real)
        else:
            full.append(x)
    full += [slice(None)] * (A.rank - sum(1 for x in full if x is not None))
    mp, d, o = {}, 0, 0
    for x in full:
        if x is None:
            o += 1
            continue
        size = sv.shape[d]
        if isinstance(x, int) and not isinstance(x, bool):
            pos = x if x >= 0 else None
            if pos is None:
                pos = _nonneg(sympy.Integer(x) + _symexpr(size), n, "a negative index")
            mp[_P[d]] = sympy.Integer(pos) if isinstance(pos, int) else pos
            d += 1
            continue
        if isinstance(x, slice):
            step = 1 if x.step is None else x.step
            if not isinstance(step, int) or step <= 0:
                raise _Stop(n, "a slice with a non-literal or non-positive step")
            if x.start is None:
                start = sympy.Integer(0)
            elif isinstance(x.start, int) and x.start < 0:
                start = _nonneg(sympy.Max(sympy.Integer(x.start) + _symexpr(size), 0), n, "a negative slice start")
            else:
                start = _nonneg(it.sym(x.start, n), n, "a slice start")
            mp[_P[d]] = start + step * _P[o]
            d += 1
            o += 1
            continue
        raise _Stop(n, f"index {x!r} is not interpreted")
    if o != v.dim():
        raise _Stop(n, "internal: indexing rank")
    return _V(A.kind, _subs(A, mp).expr, A.dtype, v.dim())


def _nonneg(e, n, what):
    e = sympy.sympify(e)
    if e.is_nonnegative:
        return e
    raise _Stop(n, f"{what} {e} is not provably nonnegative (it would count from the end)")


def _advanced(it, n, v, A, sv, idx):
    """x[t0, t1, ...] with integer index tensors on the leading dims (then nothing or full slices):
    element (q..., rest...) is x[t0[q...], t1[q...], ..., rest...], q the broadcast index; the
    indices must be provably nonnegative (a negative one counts from the end)."""
    tens = []
    for k, x in enumerate(idx):
        if isinstance(x, fx.Node):
            if tens is None or len(tens) != k:
                raise _Stop(n, "index tensors after a slice or None")
            tens.append(x)
        elif isinstance(x, slice) and x == slice(None):
            continue
        elif x is Ellipsis and k == len(idx) - 1:
            continue
        else:
            raise _Stop(n, f"advanced index {x!r} mixed with tensors")
    if any(isinstance(x, slice) for x in idx[:len(tens)]):
        raise _Stop(n, "index tensors after a slice")
    k = len(tens)
    rb = v.dim() - (A.rank - k)
    mp = {}
    for m, t in enumerate(tens):
        T = it.arg(t)
        if T.kind != "int" or T.dtype not in (torch.int64, torch.int32):
            raise _Stop(t, "a boolean or float index tensor")
        e = _shift(T, rb).expr
        rt = it.ranges.get(t)
        mp[_P[m]] = e if rt is not None and rt != "empty" and rt[0] >= 0 else _nonneg(e, t, "index")
    for m in range(k, A.rank):
        mp[_P[m]] = _P[m - k + rb]
    return _V(A.kind, _subs(A, mp).expr, A.dtype, v.dim())


_HANDLERS: Dict[Any, Any] = {}


def _reg(handler, *keys):
    for k in keys:
        _HANDLERS[k] = handler


for _op, _keys in {
    "add": (operator.add, torch.add, "add", "__add__", "__radd__"),
    "sub": (operator.sub, torch.sub, torch.subtract, "sub", "__sub__"),
    "rsub": (torch.rsub, "__rsub__"),
    "mul": (operator.mul, torch.mul, torch.multiply, "mul", "__mul__", "__rmul__"),
    "div": (operator.truediv, torch.div, torch.true_divide, torch.divide, "div", "true_divide", "divide"),
    "floordiv": (operator.floordiv, torch.floor_divide, "floor_divide", "__floordiv__"),
    "mod": (operator.mod, torch.remainder, "remainder", "__mod__"),
    "maximum": (torch.maximum, "maximum"), "minimum": (torch.minimum, "minimum"),
    "lt": (operator.lt, torch.lt, torch.less, "lt", "less"), "le": (operator.le, torch.le, "le", "less_equal"),
    "gt": (operator.gt, torch.gt, torch.greater, "gt", "greater"), "ge": (operator.ge, torch.ge, "ge", "greater_equal"),
    "eq": (operator.eq, torch.eq, "eq"), "ne": (operator.ne, torch.ne, "ne", "not_equal"),
    "and": (operator.and_, torch.bitwise_and, "bitwise_and", "__and__"),
    "or": (operator.or_, torch.bitwise_or, "bitwise_or", "__or__"),
    "xor": (operator.xor, torch.bitwise_xor, "bitwise_xor", "__xor__"),
    "logical_and": (torch.logical_and, "logical_and"), "logical_or": (torch.logical_or, "logical_or"),
    "logical_xor": (torch.logical_xor, "logical_xor"),
}.items():
    _reg(_binary(_op), *_keys)
_reg(_unary("not"), operator.invert, torch.bitwise_not, "bitwise_not", "__invert__")
_reg(_unary("logical_not"), torch.logical_not, "logical_not")
_reg(_unary("neg"), operator.neg, torch.neg, "neg", "__neg__")
_reg(_unary("abs"), torch.abs, abs, "abs")
_reg(_cast, "to", "bool", "int", "long", "float", "half", "double", "bfloat16", "type", "type_as")
_reg(_identity, "contiguous", "clone", "detach", torch.clone, torch.detach)
_reg(_where, torch.where, "where", torch.masked_fill, "masked_fill")
_reg(_arange, torch.arange)
_reg(_const(None, 1), torch.ones, "new_ones", torch.ones_like)
_reg(_const(None, 0), torch.zeros, "new_zeros", torch.zeros_like)
_reg(_const(1, None), torch.full, "new_full", torch.full_like)
_reg(_tensor_literal, torch.tensor, torch.scalar_tensor)
_reg(_tri(True), torch.tril, "tril")
_reg(_tri(False), torch.triu, "triu")
_reg(_unsqueeze, torch.unsqueeze, "unsqueeze")
_reg(_view, "view", "reshape", torch.reshape, "squeeze", torch.squeeze)
_reg(_expand, "expand", "expand_as", "broadcast_to", torch.broadcast_to)
_reg(_transpose, "transpose", torch.transpose, "permute", torch.permute, "t", torch.t)
_reg(_getitem, operator.getitem)


# ---------------------------------------------------------------------------------------------------
# classification

@dataclass
class MaskClass:
    """What the predicate is, read off its normal form (so implied by the proven predicate).

    ``band``: (lo, hi) with keep requiring lo <= j - i <= hi (None: unbounded), from causal,
    sliding-window and |i - j| < w conjuncts; ``prefix``: P when a conjunct is (j - i <= hi) | (j < P);
    ``chunk``: c for i // c == j // c; ``document``/``padding``: data conjuncts (doc[b, i] == doc[b, j];
    a data atom read at (b, j) or (b, i)); ``other``: conjuncts not recognised.
    """
    kinds: Tuple[str, ...]
    band: Tuple[Any, Any] = (None, None)
    prefix: Any = None
    chunk: Any = None
    document: Tuple[Any, ...] = ()
    padding: Tuple[Any, ...] = ()
    other: Tuple[Any, ...] = ()

    @property
    def causal_offset(self):
        return self.band[1] if self.band[0] is None and self.band[1] is not None else None

    @property
    def window(self):
        lo, hi = self.band
        return None if lo is None or hi is None else sympy.simplify(hi - lo + 1)


def _linear(e):
    """(ci, cj, rest) with e == ci*i + cj*j + rest, ci, cj integers, rest free of b, h, i, j."""
    e = sympy.expand(e)
    ci, cj = e.coeff(i), e.coeff(j)
    rest = sympy.expand(e - ci * i - cj * j)
    if not (ci.is_Integer and cj.is_Integer) or rest.free_symbols & {b, h, i, j}:
        return None
    return int(ci), int(cj), rest


def _diff_bound(rel):
    """A relational read as a bound on j - i, j or i alone: ("band"/"j"/"i", lo, hi)."""
    if not isinstance(rel, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt)):
        return None
    e = rel.lhs - rel.rhs
    if isinstance(rel, (sympy.Ge, sympy.Gt)):
        e = -e
    strict = isinstance(rel, (sympy.Lt, sympy.Gt))
    lin = _linear(e)
    if lin is None:
        return None
    ci, cj, rest = lin
    c = -rest - (1 if strict else 0)  # ci*i + cj*j <= c   (integers)
    if (ci, cj) == (-1, 1):
        return ("band", None, c)
    if (ci, cj) == (1, -1):
        return ("band", -c, None)
    if (ci, cj) == (0, 1):
        return ("j", None, c)
    if (ci, cj) == (1, 0):
        return ("i", None, c)
    return None


def classify(keep) -> MaskClass:
    kinds, other, docs, pads = [], [], [], []
    lo = hi = None
    prefix = chunk = None
    for c in sympy.And.make_args(keep):
        if c is sympy.true:
            continue
        bd = _diff_bound(c)
        if bd and bd[0] == "band":
            if bd[1] is not None:
                lo = bd[1] if lo is None else sympy.Max(lo, bd[1])
            if bd[2] is not None:
                hi = bd[2] if hi is None else sympy.Min(hi, bd[2])
            continue
        if isinstance(c, (sympy.Lt, sympy.Le)) and isinstance(c.lhs, sympy.Abs):
            lin = _linear(c.lhs.args[0])
            if lin and lin[:2] in ((1, -1), (-1, 1)) and lin[2] == 0 and not c.rhs.free_symbols & {b, h, i, j}:
                w = c.rhs - (1 if isinstance(c, sympy.Lt) else 0)  # |j - i| <= w
                lo = -w if lo is None else sympy.Max(lo, -w)
                hi = w if hi is None else sympy.Min(hi, w)
                continue
        if isinstance(c, sympy.Or) and len(c.args) == 2:
            parts = [_diff_bound(a) for a in c.args]
            if all(parts) and {p[0] for p in parts} == {"band", "j"}:
                band = next(p for p in parts if p[0] == "band")
                jb = next(p for p in parts if p[0] == "j")
                if band[1] is None and jb[2] is not None:
                    hi = band[2] if hi is None else sympy.Min(hi, band[2])
                    prefix = jb[2] + 1
                    kinds.append("prefix_lm")
                    continue
        if isinstance(c, sympy.Eq) and all(isinstance(s, sympy.floor) for s in (c.lhs, c.rhs)):
            x, y = c.lhs.args[0], c.rhs.args[0]
            cx, cy = sympy.expand(x).coeff(i), sympy.expand(y).coeff(j)
            cx2, cy2 = sympy.expand(x).coeff(j), sympy.expand(y).coeff(i)
            if cx2 == 0 and cy2 == 0 and cx == cy and cx != 0 and sympy.expand(x - cx * i) == 0 \
                    and sympy.expand(y - cy * j) == 0:
                chunk = 1 / cx
                continue
            if cx2 == cy2 and cx2 != 0 and cx == 0 and cy == 0 and sympy.expand(x - cx2 * j) == 0 \
                    and sympy.expand(y - cy2 * i) == 0:
                chunk = 1 / cx2
                continue
        if isinstance(c, sympy.Eq) and all(isinstance(s, sympy.core.function.AppliedUndef) for s in (c.lhs, c.rhs)) \
                and c.lhs.func == c.rhs.func:
            a1, a2 = c.lhs.args, c.rhs.args
            diff = [k for k in range(len(a1)) if a1[k] != a2[k]]
            if len(diff) == 1 and {a1[diff[0]], a2[diff[0]]} == {i, j} and \
                    not any(s in (i, j) for k in range(len(a1)) if k != diff[0] for s in sympy.sympify(a1[k]).free_symbols):
                docs.append(c)
                continue
        if _has_data(c) and not (c.free_symbols & {i}) and j in c.free_symbols:
            pads.append(c)
            continue
        if _has_data(c) and not (c.free_symbols & {j}) and i in c.free_symbols:
            pads.append(c)
            continue
        other.append(c)
    if lo is not None or hi is not None:
        if "prefix_lm" not in kinds:
            if lo is None:
                kinds.append("causal")
            elif hi is not None:
                kinds.append("sliding_window")
            else:
                kinds.append("band")
    if chunk is not None:
        kinds.append("chunked")
    if docs:
        kinds.append("document")
    if pads:
        kinds.append("padding")
    if other:
        kinds.append("other")
    if not kinds:
        kinds.append("full")
    return MaskClass(tuple(kinds), (lo, hi), prefix, chunk, tuple(docs), tuple(pads), tuple(other))


def is_causal(pred) -> Optional[Any]:
    """The offset o when the structural part of the predicate is exactly j <= i + o (o may be a size
    expression, e.g. past_len), else None. Data conjuncts (padding) are allowed alongside."""
    keep = pred.structural() if isinstance(pred, MaskPredicate) else \
        sympy.And(*[c for c in sympy.And.make_args(pred) if not _has_data(c)])
    cl = classify(keep)
    return cl.causal_offset if cl.kinds == ("causal",) else None


def sliding_window(pred) -> Optional[Tuple[Any, Any]]:
    """(lo, hi) when the structural part is exactly lo <= j - i <= hi (one-sided: hi == 0)."""
    keep = pred.structural() if isinstance(pred, MaskPredicate) else pred
    cl = classify(keep)
    return cl.band if cl.kinds == ("sliding_window",) else None


# ---------------------------------------------------------------------------------------------------
# evaluation: dense (numpy, exact integers) and by intervals (per tile)

def _eval(e, env, arrays):
    """e evaluated on numpy integer grids (env: symbol -> array), data functions on arrays."""
    if e is sympy.true or e is sympy.false:
        return bool(e)
    if e.is_Symbol:
        if e not in env:
            raise ValueError(f"no value for symbol {e}")
        return env[e]
    if e.is_Integer:
        return int(e)
    if isinstance(e, sympy.Add):
        return sum(_eval(a, env, arrays) for a in e.args)
    if isinstance(e, sympy.Mul):
        out = 1
        for a in e.args:
            if a.is_Rational and not a.is_Integer:
                raise ValueError(f"non-integer value in {e}")
            out = out * _eval(a, env, arrays)
        return out
    if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) >= 0:
        return np.power(_eval(e.base, env, arrays), int(e.exp))
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        return np.floor_divide(_eval(num, env, arrays), _eval(den, env, arrays))
    if isinstance(e, sympy.Mod):
        return np.mod(_eval(e.args[0], env, arrays), _eval(e.args[1], env, arrays))
    if isinstance(e, sympy.Abs):
        return np.abs(_eval(e.args[0], env, arrays))
    if isinstance(e, (sympy.Max, sympy.Min)):
        f = np.maximum if isinstance(e, sympy.Max) else np.minimum
        vals = [_eval(a, env, arrays) for a in e.args]
        out = vals[0]
        for x in vals[1:]:
            out = f(out, x)
        return out
    if isinstance(e, sympy.Piecewise):
        conds = [np.asarray(_eval(a.cond, env, arrays)) for a in e.args]
        vals = [np.asarray(_eval(a.expr, env, arrays)) for a in e.args]
        shape = np.broadcast_shapes(*[c.shape for c in conds], *[x.shape for x in vals])
        return np.select([np.broadcast_to(c, shape) for c in conds], [np.broadcast_to(x, shape) for x in vals])
    rel = {sympy.Eq: np.equal, sympy.Ne: np.not_equal, sympy.Lt: np.less, sympy.Le: np.less_equal,
           sympy.Gt: np.greater, sympy.Ge: np.greater_equal}
    for cls, f in rel.items():
        if isinstance(e, cls):
            return f(_eval(e.lhs, env, arrays), _eval(e.rhs, env, arrays))
    if isinstance(e, sympy.And):
        return _reduce(np.logical_and, [_eval(a, env, arrays) for a in e.args])
    if isinstance(e, sympy.Or):
        return _reduce(np.logical_or, [_eval(a, env, arrays) for a in e.args])
    if isinstance(e, sympy.Xor):
        return _reduce(np.logical_xor, [_eval(a, env, arrays) for a in e.args])
    if isinstance(e, sympy.Not):
        return np.logical_not(_eval(e.args[0], env, arrays))
    if isinstance(e, sympy.core.function.AppliedUndef):
        if e.func not in arrays:
            raise ValueError(f"no tensor for data atom {e.func}")
        arr = arrays[e.func]
        idx = tuple(np.asarray(_eval(a, env, arrays)) for a in e.args)
        return arr[idx] if idx else arr[()]
    raise ValueError(f"cannot evaluate {type(e).__name__}: {e}")


def _reduce(f, xs):
    out = xs[0]
    for x in xs[1:]:
        out = f(out, x)
    return out


def _iv(e, env):
    """Interval (lo, hi) of integer expression e over the boxes in env (symbol -> (lo, hi) arrays),
    or None when not bounded by these rules (the caller then treats the atom as unknown)."""
    if e.is_Integer:
        return int(e), int(e)
    if e.is_Symbol:
        return env.get(e)
    if isinstance(e, sympy.Add):
        lo = hi = 0
        for a in e.args:
            r = _iv(a, env)
            if r is None:
                return None
            lo, hi = lo + r[0], hi + r[1]
        return lo, hi
    if isinstance(e, sympy.Mul):
        lo = hi = 1
        for a in e.args:
            if a.is_Rational and not a.is_Integer:
                return None
            r = _iv(a, env)
            if r is None:
                return None
            cands = [lo * r[0], lo * r[1], hi * r[0], hi * r[1]]
            lo, hi = _reduce(np.minimum, cands), _reduce(np.maximum, cands)
        return lo, hi
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if not den.is_Integer or int(den) <= 0:
            return None
        r = _iv(num, env)
        if r is None:
            return None
        return np.floor_divide(r[0], int(den)), np.floor_divide(r[1], int(den))  # monotone
    if isinstance(e, sympy.Mod):
        m = e.args[1]
        r = _iv(e.args[0], env)
        if r is None or not m.is_Integer or int(m) <= 0:
            return None
        m = int(m)
        same = np.floor_divide(r[0], m) == np.floor_divide(r[1], m)
        return np.where(same, np.mod(r[0], m), 0), np.where(same, np.mod(r[1], m), m - 1)
    if isinstance(e, sympy.Abs):
        r = _iv(e.args[0], env)
        if r is None:
            return None
        lo = np.where(r[0] > 0, r[0], np.where(r[1] < 0, -r[1], 0))
        return lo, np.maximum(np.abs(r[0]), np.abs(r[1]))
    if isinstance(e, (sympy.Max, sympy.Min)):
        rs = [_iv(a, env) for a in e.args]
        if any(r is None for r in rs):
            return None
        f = np.maximum if isinstance(e, sympy.Max) else np.minimum
        return _reduce(f, [r[0] for r in rs]), _reduce(f, [r[1] for r in rs])
    return None


def _tri_iv(e, env, shape):
    """Three-valued truth of e over each box: (can_be_true, can_be_false) boolean arrays."""
    yes, no = np.ones(shape, bool), np.zeros(shape, bool)
    if e is sympy.true:
        return yes, no
    if e is sympy.false:
        return no, yes
    if isinstance(e, sympy.And):
        parts = [_tri_iv(a, env, shape) for a in e.args]
        return _reduce(np.logical_and, [p[0] for p in parts]), _reduce(np.logical_or, [p[1] for p in parts])
    if isinstance(e, sympy.Or):
        parts = [_tri_iv(a, env, shape) for a in e.args]
        return _reduce(np.logical_or, [p[0] for p in parts]), _reduce(np.logical_and, [p[1] for p in parts])
    if isinstance(e, sympy.Not):
        t, f = _tri_iv(e.args[0], env, shape)
        return f, t
    if isinstance(e, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt, sympy.Eq, sympy.Ne)):
        r = _iv(sympy.expand(e.lhs - e.rhs), env)
        if r is None:
            return yes, yes
        lo, hi = np.broadcast_to(r[0], shape), np.broadcast_to(r[1], shape)
        if isinstance(e, sympy.Le):
            return lo <= 0, hi > 0
        if isinstance(e, sympy.Lt):
            return lo < 0, hi >= 0
        if isinstance(e, sympy.Ge):
            return hi >= 0, lo < 0
        if isinstance(e, sympy.Gt):
            return hi > 0, lo <= 0
        eq_t, eq_f = (lo <= 0) & (hi >= 0), ~((lo == 0) & (hi == 0))
        return (eq_t, eq_f) if isinstance(e, sympy.Eq) else (eq_f, eq_t)
    return yes, yes


EMPTY, PARTIAL, FULL = 0, 1, 2


def block_sparsity(structural, block_m: int, block_n: int, n_q: int, n_k: int,
                   sizes: Optional[Dict] = None, batch: Optional[Dict] = None,
                   dense_budget: int = 1 << 22) -> np.ndarray:
    """Tile classes (EMPTY / PARTIAL / FULL, shape (ceil(n_q/bm), ceil(n_k/bn))) of a data-free
    predicate over i in [0, n_q), j in [0, n_k). Every tile is first judged by interval reasoning
    (sound: "full" and "empty" only when proven for the whole box); the tiles it cannot decide are
    evaluated densely on their index grid, so the result is exact. ``batch``: {b: B, h: H} when the
    predicate depends on b or h (a tile is full/empty only if it is so for every b, h)."""
    if _has_data(structural):
        raise ValueError("block_sparsity takes the data-free (structural) part of a predicate")
    expr = _bind_sizes(structural, {}, sizes)
    extra = sorted((s for s in expr.free_symbols if s not in (i, j)), key=str)
    ranges = {}
    for s in extra:
        if batch is None or s not in batch and str(s) not in {str(k) for k in batch}:
            raise ValueError(f"symbol {s} needs a value (sizes=) or a range (batch=)")
        n = batch[s] if s in batch else {str(k): v for k, v in batch.items()}[str(s)]
        ranges[s] = int(n)
    tq, tk = -(-n_q // block_m), -(-n_k // block_n)
    i0 = (np.arange(tq) * block_m)[:, None]
    i1 = np.minimum(i0 + block_m, n_q) - 1
    j0 = (np.arange(tk) * block_n)[None, :]
    j1 = np.minimum(j0 + block_n, n_k) - 1
    env = {i: (i0, i1), j: (j0, j1)}
    for s, n in ranges.items():
        env[s] = (0, n - 1)
    can_t, can_f = _tri_iv(expr, env, (tq, tk))
    out = np.full((tq, tk), PARTIAL, np.int8)
    out[can_t & ~can_f] = FULL
    out[~can_t & can_f] = EMPTY
    undecided = np.argwhere(can_t & can_f)
    if len(undecided):
        # exact answer for the rest: evaluate their elements, in batches bounded by dense_budget
        nb = int(np.prod([n for n in ranges.values()])) if ranges else 1
        per = max(1, dense_budget // (block_m * block_n * nb))
        extra_syms = list(ranges)
        for s in range(0, len(undecided), per):
            chunk = undecided[s:s + per]
            ii = chunk[:, 0:1] * block_m + np.arange(block_m)[None, :]       # (U, bm)
            jj = chunk[:, 1:2] * block_n + np.arange(block_n)[None, :]       # (U, bn)
            vi, vj = ii < n_q, jj < n_k
            nd = len(extra_syms)
            genv = {i: ii.reshape(len(chunk), *([1] * nd), block_m, 1),
                    j: jj.reshape(len(chunk), *([1] * nd), 1, block_n)}
            for k, sym in enumerate(extra_syms):
                shp = [1] * (nd + 3)
                shp[1 + k] = ranges[sym]
                genv[sym] = np.arange(ranges[sym]).reshape(shp)
            val = np.asarray(_eval(expr, genv, {}), dtype=bool)
            valid = (vi[:, :, None] & vj[:, None, :]).reshape(len(chunk), *([1] * nd), block_m, block_n)
            shape = np.broadcast_shapes(val.shape, valid.shape, (len(chunk),) + tuple(ranges.values()) + (block_m, block_n))
            val, valid = np.broadcast_to(val, shape), np.broadcast_to(valid, shape)
            axes = tuple(range(1, len(shape)))
            anyk = (val & valid).any(axis=axes)
            allk = (val | ~valid).all(axis=axes)
            cls = np.where(allk, FULL, np.where(anyk, PARTIAL, EMPTY)).astype(np.int8)
            out[chunk[:, 0], chunk[:, 1]] = cls
    return out


def dense_block_sparsity(mask: torch.Tensor, block_m: int, block_n: int) -> np.ndarray:
    """Reference: tile classes of a dense (n_q, n_k) boolean mask."""
    m = mask.cpu().numpy().astype(bool)
    nq, nk = m.shape
    tq, tk = -(-nq // block_m), -(-nk // block_n)
    out = np.empty((tq, tk), np.int8)
    for a in range(tq):
        for c in range(tk):
            t = m[a * block_m:(a + 1) * block_m, c * block_n:(c + 1) * block_n]
            out[a, c] = FULL if t.all() else EMPTY if not t.any() else PARTIAL
    return out
