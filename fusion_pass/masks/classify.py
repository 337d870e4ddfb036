"""Masks, classification: what a proven predicate is (causal, sliding window, prefix-LM, chunked,
document, padding and their conjunctions), read off its normal form, so implied by the proof.

Hands on ``MaskClass``: the kinds, the band ``lo <= j - i <= hi``, the prefix, chunk and data
conjuncts; the spec carries the kinds and the band to the kernels (``kernels/spec.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import sympy

from .symbols import _has_data, b, h, i, j

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


def carried(keep, invert: bool = False) -> dict:
    """The classification a ``MaskSpec`` carries to the kernels (its ``kinds`` and ``band`` fields)
    for ``keep``, the mask's expression as the kernels read it (sizes n0 .., data d0 ..);
    ``invert``: the mask marks the elements a fill replaces, so the kept ones are ``not keep``."""
    e = keep
    if invert:
        e = sympy.Not(e)
        if isinstance(e, sympy.logic.boolalg.BooleanFunction):
            e = e.to_nnf()
    cl = classify(e)
    return dict(kinds=cl.kinds, band=tuple(None if x is None else sympy.srepr(x) for x in cl.band))
