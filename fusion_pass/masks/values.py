"""Masks, the interpreter's values: what each graph node is, symbolically.

A ``_V`` is a boolean (a sympy Boolean), an integer (an exact sympy expression) or a float tensor
as a finite table {condition: value}, whose values are computed by torch in the graph's own dtypes
(never in sympy). Helpers here rename indices (broadcasting, views), bring a handler's result to
the node's dtype and rank (``_canon``), and map torch over tables (``_table_map``). ``_Stop`` is
how any step refuses: it becomes the caller's ``NearMissReason``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import sympy
import torch
import torch.fx as fx

from .symbols import _P

MAX_TABLE = 16  # distinct (condition, value) entries a float tensor may carry

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

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

MAX_EXPR = 4000  # sympy tree size (counted with shared subexpressions repeated) of one node's value

def _key(v):
    """Table values are merged by exact identity: -0.0 and 0.0 stay apart (they are both 0 as addends
    but we keep the graph's values as they are)."""
    if isinstance(v, float):
        return (v, math.copysign(1.0, v))
    return (v, 1.0)

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

def _name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))

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
