"""Masks, the op handlers: one function per op the interpreter reads, and the table from each
spelling of the op in Dynamo's graph to its handler.

Each handler states the semantics it relies on (checked on torch 2.13); the spellings come from the
pass's one table (``canonicalize.SPELLINGS``). A handler receives the interpreter (``interpret._Interp``:
its ``arg``/``sym`` read operands), the node and its example value, and returns a ``_V``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Optional

import sympy
import torch
import torch.fx as fx

from ..canonicalize import spelling_table, value
from .symbols import _P, _same, _symexpr
from .values import (_INT_DTYPES, _V, _add_entry, _as_bool, _cast_value, _shift, _Stop, _subs,
                     _table, _table_map)

if TYPE_CHECKING:  # annotations only: the interpreter imports this table
    from .interpret import _Interp


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


# canonical name (``canonicalize.SPELLINGS``, the pass's one table of spellings) -> handler
HANDLERS_BY_NAME: Dict[str, Any] = {
    **{op: _binary(op) for op in ("add", "sub", "rsub", "mul", "div", "floordiv", "mod", "maximum", "minimum",
                                  "lt", "le", "gt", "ge", "eq", "ne", "and", "or", "xor", "logical_and",
                                  "logical_or", "logical_xor")},
    **{op: _unary(op) for op in ("not", "logical_not", "neg", "abs")},
    "cast": _cast, "contiguous": _identity, "clone": _identity, "detach": _identity,
    "where": _where, "masked_fill": _where,
    "arange": _arange, "ones": _const(None, 1), "zeros": _const(None, 0), "full": _const(1, None),
    "tensor": _tensor_literal, "tril": _tri(True), "triu": _tri(False),
    "unsqueeze": _unsqueeze, "reshape": _view, "squeeze": _view, "expand": _expand,
    "transpose": _transpose, "permute": _transpose, "t": _transpose, "getitem": _getitem,
}
_functions, _methods = spelling_table(HANDLERS_BY_NAME)
_HANDLERS: Dict[Any, Any] = {**_functions, **_methods}


def _lookup(target):
    try:
        return _HANDLERS.get(target)
    except TypeError:
        return None
