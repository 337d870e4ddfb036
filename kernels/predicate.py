"""Mask predicates: a mask the graph built from index arithmetic, handed to the kernels as a formula.

When the pass proves that a mask tensor equals a predicate ``keep(b, h, i, j)`` (``fusion_pass/masks/``),
the rewritten graph no longer builds the (..., Nq, Nk) tensor: the op receives the predicate in its
spec (a ``MaskSpec``) plus the small data tensors the predicate reads (a (B, Nk) padding mask,
per-token document ids), and each kernel evaluates the predicate on the tile it works on.

Two things follow:
* memory: the N x N mask is never built (the graph's mask construction becomes dead code);
* work: a kernel computes, per query block, the span of keys that any row of the block keeps, and
  skips the keys outside it (causal, sliding window, chunks, documents, left padding).

The predicate is a sympy expression over the score axes (named left to right, e.g. ``b h i j``), the
score sizes ``n0 .. n{R-1}`` (bound at run time from the call's shapes, so one spec serves every
length of a dynamic graph) and data atoms ``d0(...)``, ``d1(...)``: ``d_k`` reads the k-th data tensor
(``MaskSpec.data`` gives its position in the op's captured list) at integer index expressions.

This module generates a torch function from the expression (``keep_function``), cached per
expression; the CPU kernel evaluates it on index grids, and ``materialize`` builds the dense mask
tensor the graph would have built (used where a kernel needs the tensor, and by the tests).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import sympy
import torch

# the hand-off types live in spec.py; their names stay importable from here
from .spec import MASK_KINDS as KINDS, BiasSpec, MaskSpec, parse, to_dtype, with_operands  # noqa: F401

# ---------------------------------------------------------------------------------------------------
# code generation: sympy -> a torch function of index grids

_REL_OPS = {sympy.Eq: "==", sympy.Ne: "!=", sympy.Lt: "<", sympy.Le: "<=", sympy.Gt: ">",
            sympy.Ge: ">="}


class ExprPrinter:
    """sympy -> source: the walk over a predicate's expression shared by the code generators (torch
    here, Triton in ``triton_attention``); a subclass spells each construct. Integer semantics are
    Python's (floor division, modulo of negative values)."""

    def __call__(self, e) -> str:
        if e is sympy.true or e is sympy.false:
            return str(bool(e))
        if e.is_Symbol:
            return self.symbol(e)
        if e.is_Integer:
            return str(int(e))
        if isinstance(e, sympy.Add):
            return "(" + " + ".join(self(a) for a in e.args) + ")"
        if isinstance(e, sympy.Mul):
            if any(a.is_Number and not a.is_Integer for a in e.args):
                raise ValueError(f"non-integer factor in {e}")
            return "(" + " * ".join(self(a) for a in e.args) + ")"
        if isinstance(e, sympy.floor):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            return self.floor_div(num, den)
        if isinstance(e, sympy.Mod):
            return self.mod(*e.args)
        if isinstance(e, sympy.Abs):
            return self.abs(self(e.args[0]))
        if isinstance(e, (sympy.Max, sympy.Min)):
            out = self(e.args[0])
            for a in e.args[1:]:
                out = self.max_min(isinstance(e, sympy.Max), out, self(a))
            return out
        if isinstance(e, sympy.Piecewise):
            out = None
            for piece in reversed(e.args):
                val, cond = self(piece.expr), self(piece.cond)
                out = val if out is None and piece.cond is sympy.true else \
                    self.where(cond, val, out if out is not None else "0")
            return out
        for cls, op in _REL_OPS.items():
            if isinstance(e, cls):
                return self.rel(self(e.lhs), self(e.rhs), op)
        for cls, op in ((sympy.And, "and"), (sympy.Or, "or"), (sympy.Xor, "xor")):
            if isinstance(e, cls):
                return self.logic(op, [self(a) for a in e.args])
        if isinstance(e, sympy.Not):
            return self.not_(self(e.args[0]))
        if isinstance(e, sympy.core.function.AppliedUndef):
            return self.load(e)
        raise ValueError(f"cannot generate code for {type(e).__name__}: {e}")

    # -- spellings (the torch ones; Triton's override them) ----------------------------------
    def symbol(self, e) -> str:
        return e.name

    def floor_div(self, num, den) -> str:
        return f"_fdiv({self(num)}, {self(den)})"

    def mod(self, a, m) -> str:
        return f"_mod({self(a)}, {self(m)})"

    def abs(self, x: str) -> str:
        return f"_abs({x})"

    def max_min(self, is_max: bool, a: str, b: str) -> str:
        return f"{'_max' if is_max else '_min'}({a}, {b})"

    def where(self, c: str, a: str, b: str) -> str:
        return f"_where({c}, {a}, {b})"

    def rel(self, a: str, b: str, op: str) -> str:
        return f"_rel({a}, {b}, '{op}')"

    def logic(self, op: str, xs) -> str:
        return f"_{op}(" + ", ".join(xs) + ")"

    def not_(self, x: str) -> str:
        return f"_not({x})"

    def load(self, e) -> str:
        return f"_load({e.func.__name__}, " + ", ".join(self(a) for a in e.args) + ")"


def _t(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(x)


def _fdiv(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.div(_t(a), b, rounding_mode="floor")
    return a // b


def _mod(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.remainder(_t(a), b)
    return a % b


def _abs(a):
    return a.abs() if isinstance(a, torch.Tensor) else abs(a)


def _max(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.maximum(_t(a), _t(b))
    return max(a, b)


def _min(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(_t(a), _t(b))
    return min(a, b)


def _where(c, a, b):
    return torch.where(_t(c), _t(a), _t(b))


_RELS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
         "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def _rel(a, b, op):
    return _RELS[op](a, b)


def _and(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = out & x
    return out


def _or(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = out | x
    return out


def _xor(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = out ^ x
    return out


def _not(x):
    return ~x if isinstance(x, torch.Tensor) else not x


def _load(t, *idx):
    """t[idx] with broadcasting integer grids (advanced indexing); python ints index directly.
    Widened to int64: the predicate's integers are exact (the pass proved the graph's own
    arithmetic never wraps), so a uint8 padding mask's ``1 - d`` must not wrap here either (the
    Triton kernels load data as int64 too)."""
    out = t[tuple(idx)] if idx else t[()]
    return out.to(torch.int64)


_NS = dict(_fdiv=_fdiv, _mod=_mod, _abs=_abs, _max=_max, _min=_min, _where=_where, _rel=_rel,
           _and=_and, _or=_or, _xor=_xor, _not=_not, _load=_load, torch=torch)


def keep_source(mask: MaskSpec) -> str:
    """The generated Python source of ``keep``."""
    e = parse(mask.keep)
    args = ", ".join(list(mask.axes) + [f"n{k}" for k in range(len(mask.axes))]
                     + [f"d{k}" for k in range(len(mask.data))])
    return f"def keep({args}):\n    return {ExprPrinter()(e)}\n"


@functools.lru_cache(maxsize=None)
def keep_function(mask: MaskSpec):
    """keep(axes..., sizes..., data...) -> bool tensor (or Python bool), evaluated on whatever
    broadcastable integer grids or ints the caller passes for the axes."""
    ns = dict(_NS)
    exec(compile(keep_source(mask), f"<fusion_pass mask {mask.text or mask.keep[:40]}>", "exec"), ns)  # noqa: S102
    return ns["keep"]


def evaluate_keep(mask: MaskSpec, grids: Sequence, sizes: Sequence[int], data: Sequence[torch.Tensor]):
    """keep on the given axis grids (one per axis: an int or an integer tensor), as a bool tensor."""
    out = keep_function(mask)(*grids, *sizes, *data)
    if not isinstance(out, torch.Tensor):
        out = torch.tensor(bool(out))
    return out


def as_operand(mask: MaskSpec, keep: torch.Tensor) -> torch.Tensor:
    """The tensor the graph's mask held, from its keep values: keep itself, or the additive values."""
    if mask.kind == "bool":
        return keep
    dt = to_dtype(mask.dtype)
    return torch.where(keep, torch.tensor(mask.kept, dtype=dt), torch.tensor(mask.masked, dtype=dt))


def materialize(mask: MaskSpec, score_shape: Sequence[int], data: Sequence[torch.Tensor],
                device: Optional[torch.device] = None) -> torch.Tensor:
    """The dense mask tensor (broadcastable to ``score_shape``) the graph would have built."""
    R = len(mask.axes)
    shape = tuple(int(n) for n in score_shape[-R:]) if R else ()
    grids = []
    for k, n in enumerate(shape):
        if mask.uses_axis(mask.axes[k]):
            grids.append(torch.arange(n, device=device).reshape([-1 if d == k else 1 for d in range(R)]))
        else:
            grids.append(0)
    keep = evaluate_keep(mask, grids, shape, data)
    while keep.dim() < R:
        keep = keep.unsqueeze(0)
    return as_operand(mask, keep)


def tensor_mask_order(spec) -> list:
    """The captured positions that stay when every predicate mask is read as a tensor (those that
    are not a mask's data), in order; the materialised masks come after them."""
    data_pos = {d for m in spec.masks for d in m.data}
    return [k for k in range(len(spec.captured)) if k not in data_pos]


def tensor_mask_spec(spec):
    """The spec with every predicate mask read as a captured tensor instead (appended after the
    captured operands that are not data, ``tensor_mask_order``): the same function, for kernels
    that read masks only as tensors. ``with_tensor_masks`` builds the matching operands."""
    if not spec.masks:
        return spec
    n = len(spec.captured)  # mask m is read at n + m, renumbered by with_operands
    ops = tuple(dataclasses.replace(op, operand="none" if op.kind in ("fill", "fill_not") else "tensor",
                                    index=n + op.index) if op.operand == "predicate" else op
                for op in spec.score_ops)
    return with_operands(spec, tensor_mask_order(spec), ["tensor"] * len(spec.masks), score_ops=ops, masks=())


def with_tensor_masks(spec, captured: Sequence[torch.Tensor], score_shape: Sequence[int]):
    """(tensor_mask_spec(spec), its captured operands): each predicate materialised."""
    if not spec.masks:
        return spec, list(captured)
    tensors = [captured[k] for k in tensor_mask_order(spec)]
    for m in spec.masks:
        dev = captured[m.data[0]].device if m.data else None
        tensors.append(materialize(m, score_shape, [captured[d] for d in m.data], device=dev))
    return tensor_mask_spec(spec), tensors


# ---------------------------------------------------------------------------------------------------
# key spans: which keys a block of query rows can keep, cheaply

@dataclass(frozen=True)
class _Lin:
    """a*j + b*i + c <= 0 over the integers (c a function of the sizes n0 ..)."""
    a: int
    b: int
    c: object  # compiled: f(*sizes) -> int


@dataclass(frozen=True)
class _Eval:
    """A conjunct evaluated on a grid: over keys only (``keys_only``) or rows x keys."""
    mask: MaskSpec
    keys_only: bool


def _compile_sizes_fn(e, R: int):
    args = ", ".join(f"n{k}" for k in range(R))
    ns = dict(_NS)
    exec(f"def f({args}):\n    return {ExprPrinter()(e)}\n", ns)  # noqa: S102 - our own generated code
    return ns["f"]


def _lin(c, i, j, R):
    """c (a relational) as _Lin steps, or None when it is not linear in i, j with constant
    integer coefficients (other symbols: sizes only)."""
    rel = type(c)
    if rel not in (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt, sympy.Eq):
        return None
    d = sympy.expand(c.lhs - c.rhs)
    if any(not s.name.startswith("n") and s not in (i, j) for s in d.free_symbols) \
            or d.atoms(sympy.Function) or d.atoms(sympy.floor) or d.atoms(sympy.Mod):
        return None
    try:
        poly = sympy.Poly(d, j, i)
    except sympy.PolynomialError:
        return None
    if poly.total_degree() > 1:
        return None
    coeffs = poly.as_dict()
    a, b = coeffs.get((1, 0), 0), coeffs.get((0, 1), 0)
    if not (sympy.sympify(a).is_Integer and sympy.sympify(b).is_Integer):
        return None
    c0 = coeffs.get((0, 0), sympy.Integer(0))
    a, b = int(a), int(b)
    out = []
    # normalise to  expr <= 0  (integers: expr < 0  <=>  expr + 1 <= 0)
    if rel in (sympy.Le, sympy.Eq):
        out.append(_Lin(a, b, _compile_sizes_fn(c0, R)))
    if rel is sympy.Lt:
        out.append(_Lin(a, b, _compile_sizes_fn(c0 + 1, R)))
    if rel in (sympy.Ge, sympy.Eq):
        out.append(_Lin(-a, -b, _compile_sizes_fn(-c0, R)))
    if rel is sympy.Gt:
        out.append(_Lin(-a, -b, _compile_sizes_fn(-c0 + 1, R)))
    return out


def _plan(e, mask: MaskSpec, i, j):
    """A span plan for expression e: ("and", [...]), ("or", [...]), _Lin, _Eval or None (no
    restriction)."""
    R = len(mask.axes)
    if e is sympy.true:
        return None
    if isinstance(e, sympy.Or):
        parts = [_plan(a, mask, i, j) for a in e.args]
        return None if any(p is None for p in parts) else ("or", parts)
    if isinstance(e, sympy.And):
        parts = [p for p in (_plan(a, mask, i, j) for a in e.args) if p is not None]
        # evaluated conjuncts last: they only look at the keys the others left
        parts.sort(key=lambda p: isinstance(p, _Eval) and not p.keys_only)
        return ("and", parts) if parts else None
    if j is None or j not in e.free_symbols:
        return _Eval(conjunct_mask(mask, e), True) if i is None or i not in e.free_symbols else None
    if isinstance(e, sympy.core.relational.Relational):
        lins = _lin(e, i, j, R)
        if lins is not None:
            return ("and", lins) if len(lins) > 1 else lins[0]
    keys_only = i is None or i not in e.free_symbols
    return _Eval(conjunct_mask(mask, e), keys_only)


def conjunct_mask(mask: MaskSpec, e) -> MaskSpec:
    """A part ``e`` of ``mask``'s expression as a boolean mask of its own, not classified (the
    whole mask's classification does not describe it)."""
    return dataclasses.replace(mask, keep=sympy.srepr(e), text=str(e), kind="bool", kinds=(), band=(None, None))


def kept_expr(mask: MaskSpec, invert: bool = False):
    """The elements the mask's step keeps: ``keep``, or (``invert``: a fill's mask, which marks the
    elements it replaces) not keep in negation normal form, the expression the pass classified
    (``MaskSpec.kinds``)."""
    e = parse(mask.keep)
    if invert:
        e = sympy.Not(e)
        if isinstance(e, sympy.logic.boolalg.BooleanFunction):
            e = e.to_nnf()
    return e


def band_split(mask: MaskSpec, invert: bool = False):
    """(band, inside, rest) for a mask its spec describes whole (``MaskSpec.whole_band``): the
    kept elements are ``lo <= j - i <= hi`` (band: (lo, hi), sympy or None), which the conjuncts
    in ``inside`` (those reading both i and j) state together, and the conjuncts in ``rest``, none
    of which reads both. None for any other mask. ``invert`` must be the step's polarity
    (op.kind == "fill"), the one the pass classified."""
    band = mask.whole_band()
    if band is None:
        return None
    e = kept_expr(mask, invert)
    i, j = (next((s for s in e.free_symbols if s.name == a), None) for a in mask.axes[-2:])
    inside, rest = [], []
    for c in e.args if isinstance(e, sympy.And) else (e,):  # in the expression's order
        (inside if i in c.free_symbols and j in c.free_symbols else rest).append(c)
    return band, inside, rest


@functools.lru_cache(maxsize=None)
def span_plan(mask: MaskSpec, invert: bool = False):
    """The plan ``key_span`` follows for the elements the mask's step keeps (``invert``: not keep,
    for a fill's mask; the polarity the pass classified). A mask its spec describes whole reads
    its band from the spec (``band_split``); only the other masks (not classified, or with
    conjuncts the spec does not carry) are planned from their expression, conjunct by conjunct."""
    e = kept_expr(mask, invert)
    names = {s.name: s for s in e.free_symbols}
    i = names.get(mask.axes[-2]) if len(mask.axes) >= 2 else None
    j = names.get(mask.axes[-1])
    split = band_split(mask, invert)
    if split is not None and any(c.atoms(sympy.Abs) for c in split[1]):
        # |j - i| < w: evaluated per tile, as it always was (its band would also give it full
        # tiles in the Triton kernels: a change of behaviour, left to a change of its own)
        split = None
    if split is None:  # not classified, or conjuncts the spec does not carry: from the expression
        return _plan(e, mask, i, j)
    (lo, hi), inside, _ = split
    R = len(mask.axes)
    band = [] if hi is None else [_Lin(1, -1, _compile_sizes_fn(-hi, R))]  # j - i - hi <= 0
    band += [] if lo is None else [_Lin(-1, 1, _compile_sizes_fn(lo, R))]  # lo - (j - i) <= 0
    parts = []
    # in the expression's order, the band where its first conjunct is, as _plan takes them (the
    # order decides how narrow an evaluated conjunct's span is); evaluated conjuncts last
    for c in e.args if isinstance(e, sympy.And) else (e,):
        if c in inside:
            parts, band = parts + band, []
        elif (p := _plan(c, mask, i, j)) is not None:
            parts.append(p)
    parts.sort(key=lambda p: isinstance(p, _Eval) and not p.keys_only)
    return None if not parts else parts[0] if len(parts) == 1 else ("and", parts)


def key_span(plan, q0: int, q1: int, k0: int, k1: int, evaluate):
    """[lo, hi) within [k0, k1) holding every key j that some row i in [q0, q1) may keep under
    ``plan`` (a superset for linear bounds, exact for evaluated conjuncts), or None when no row
    keeps a key. ``evaluate(mask_spec, keys_only, q0, q1, lo, hi)`` returns keep on the grid
    (broadcastable to (heads, rows, keys)); ``sizes`` are bound inside the plan's functions by the
    caller through ``evaluate.sizes``."""
    if plan is None:
        return k0, k1
    if isinstance(plan, _Lin):
        c = plan.c(*evaluate.sizes)
        # a*j + b*i + c <= 0 for some i in [q0, q1 - 1]
        if plan.a == 0:
            best = min(plan.b * q0, plan.b * (q1 - 1)) + c
            return (k0, k1) if best <= 0 else None
        t = [(-plan.b * x - c) for x in (q0, q1 - 1)]
        if plan.a > 0:  # j <= t / a: the loosest bound over the rows
            hi = max(x // plan.a for x in t) + 1
            lo = k0
        else:  # j >= t / a (a < 0): ceil(t / a) = -((-t) // -a)... written with floor division
            lo = min(_ceil_div(x, plan.a) for x in t)
            hi = k1
        lo, hi = max(lo, k0), min(hi, k1)
        return (lo, hi) if lo < hi else None
    if isinstance(plan, _Eval):
        keep = evaluate(plan.mask, plan.keys_only, q0, q1, k0, k1)
        if keep.dim() == 0 or keep.shape[-1] == 1:
            return (k0, k1) if bool(keep.any()) else None
        cols = keep.reshape(-1, keep.shape[-1]).any(0).nonzero()
        return (k0 + int(cols[0]), k0 + int(cols[-1]) + 1) if len(cols) else None
    kind, parts = plan
    if kind == "and":
        lo, hi = k0, k1
        for p in parts:
            got = key_span(p, q0, q1, lo, hi, evaluate)
            if got is None:
                return None
            lo, hi = got
        return lo, hi
    spans = [s for s in (key_span(p, q0, q1, k0, k1, evaluate) for p in parts) if s is not None]
    if not spans:
        return None
    return min(s[0] for s in spans), max(s[1] for s in spans)


def _ceil_div(x: int, a: int) -> int:
    """ceil(x / a) for integers, a != 0."""
    return -((-x) // a)
