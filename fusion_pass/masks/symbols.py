"""Masks, the vocabulary: the index symbols every symbolic value is written in, and the size helpers.

An intermediate value of the mask interpreter is an expression over ``_p0, _p1, ...`` (the index
along each dim of that value); a finished predicate is over the score axes ``b, h, i, j``, Dynamo's
size symbols and data atoms (undefined sympy functions ``d_<node>(...)``). Every other module of the
package imports from here; this one imports from none of them.
"""
from __future__ import annotations

import sympy
import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

# The index of an element along the k-th dim of the value being interpreted. Every intermediate value
# is an expression over these; broadcasting and views rename them; the final mask's are renamed to
# the score axes. All are nonnegative integers (element indices).
_P = tuple(sympy.Symbol(f"_p{k}", integer=True, nonnegative=True) for k in range(10))
b, h, i, j = sympy.symbols("b h i j", integer=True, nonnegative=True)

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

def _symexpr(x):
    if isinstance(x, bool):
        raise TypeError
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, torch.SymInt):
        return x.node.expr
    raise TypeError
