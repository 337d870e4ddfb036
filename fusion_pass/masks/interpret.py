"""Masks, the interpreter and the entry points ``analyse_mask`` / ``analyse_index``.

``_Interp`` walks the nodes that build a mask, once each (memoised), dispatching on the handler
table; it proves every integer node's exact value fits its dtype (``_bounds`` over the index
ranges, Dynamo's size ranges and data dtypes) and that nothing writes into a storage it reads.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple, Union

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.numbers import IntInfinity, NegativeIntInfinity

from ..canonicalize import value
# aliasing (which storages the graph writes into): one rule for the whole pass, in effects.py
from ..effects import Writes as _Writes, graph_writes as _graph_writes
from .evaluate import _bounds
from .handlers import _HANDLERS, _lookup
from .predicate import MaskPredicate, NearMissReason
from .symbols import _P, _axes, _same, _symexpr, _uses
from .values import _FLOAT_DTYPES, _INT_DTYPES, _V, _canon, _check_size, _key, _name, _Stop

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

def _num(x):
    """A shape-environment bound (sympy integer or Dynamo's int_oo) as a Python int or +-inf."""
    if isinstance(x, IntInfinity) or x == sympy.oo or x == math.inf:
        return math.inf
    if isinstance(x, NegativeIntInfinity) or x == -sympy.oo or x == -math.inf:
        return -math.inf
    return int(x)


def _fmt(x) -> str:
    return str(x) if not isinstance(x, float) else ("inf" if x > 0 else "-inf")

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
