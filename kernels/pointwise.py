"""Pointwise score functions: the one table of unary elementwise ops a score chain may apply to the
running score (``sin(s)``, ``gelu(s)``, ``clamp(s, -c, c)``, ``s * s``...), beyond the arithmetic,
fill, tanh and cast steps ``spec.ScoreOp`` names itself.

Each entry gives the function three ways, all from this table:

* ``torch``: the ATen op the model itself called, applied to a tile by the CPU implementation, so
  the forward is the model's own arithmetic bit for bit; its backward there runs the same op's
  autograd formula on the tile (eager's own derivative, including its conventions at kinks);
* ``sympy``: the function as a symbolic expression of ``x`` (written so that ``sympy.diff`` gives
  torch's subgradient at a kink: relu' = 0 at 0, |x|' = 0 at 0, clamp' = 1 on the closed
  interval), for the report and for the Triton kernels, whose forward and derivative are printed
  from it (``triton_source``).

A step is ``ScoreOp(kind="fn", fn=<name>, args=<constants>)``; ``args`` are the op's constant
arguments after the input (clamp's bounds, pow's exponent, leaky_relu's slope, gelu's tanh flag).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import sympy
import torch
import torch.nn.functional as F

x = sympy.Symbol("x", real=True)


@dataclass(frozen=True)
class Pointwise:
    torch: Callable          # (tensor, *args) -> tensor, the model's own op
    sympy: Callable          # (sympy expr, *args) -> sympy expr
    nargs: int = 0           # constant arguments after the input


def _pw(cond_val, otherwise):
    return sympy.Piecewise(*cond_val, (otherwise, True))


def _gelu(e, tanh_approx=False):
    if tanh_approx:
        c = sympy.sqrt(2 / sympy.pi)
        return e / 2 * (1 + sympy.tanh(c * (e + sympy.Float(0.044715) * e ** 3)))
    return e / 2 * (1 + sympy.erf(e / sympy.sqrt(2)))


def _softplus(e, beta=1.0, threshold=20.0):
    # torch: x where beta * x > threshold, else log1p(exp(beta * x)) / beta
    return _pw([(e, e * beta > threshold)], sympy.log(1 + sympy.exp(beta * e)) / beta)


FUNCTIONS = {
    "sin": Pointwise(torch.sin, sympy.sin),
    "cos": Pointwise(torch.cos, sympy.cos),
    "exp": Pointwise(torch.exp, sympy.exp),
    "expm1": Pointwise(torch.expm1, lambda e: sympy.exp(e) - 1),
    "log": Pointwise(torch.log, sympy.log),
    "log1p": Pointwise(torch.log1p, lambda e: sympy.log(1 + e)),
    "sqrt": Pointwise(torch.sqrt, sympy.sqrt),
    "rsqrt": Pointwise(torch.rsqrt, lambda e: 1 / sympy.sqrt(e)),
    "reciprocal": Pointwise(torch.reciprocal, lambda e: 1 / e),
    "neg": Pointwise(torch.neg, lambda e: -e),
    "square": Pointwise(torch.square, lambda e: e * e),
    "mul_self": Pointwise(lambda t: t * t, lambda e: e * e),  # s * s, as the model wrote it
    "abs": Pointwise(torch.abs, lambda e: _pw([(e, e > 0), (-e, e < 0)], sympy.Integer(0))),
    "sigmoid": Pointwise(torch.sigmoid, lambda e: 1 / (1 + sympy.exp(-e))),
    "erf": Pointwise(torch.erf, sympy.erf),
    "relu": Pointwise(torch.relu, lambda e: _pw([(e, e > 0)], sympy.Integer(0))),
    "silu": Pointwise(F.silu, lambda e: e / (1 + sympy.exp(-e))),
    "gelu": Pointwise(lambda t, tanh_approx=False: F.gelu(t, approximate="tanh" if tanh_approx else "none"),
                      _gelu, 1),
    "softplus": Pointwise(lambda t, beta=1.0, threshold=20.0: F.softplus(t, beta, threshold), _softplus, 2),
    "leaky_relu": Pointwise(lambda t, slope=0.01: F.leaky_relu(t, slope),
                            lambda e, slope=0.01: _pw([(e, e > 0)], slope * e), 1),
    "clamp": Pointwise(lambda t, lo=None, hi=None: torch.clamp(t, lo, hi),
                       lambda e, lo=None, hi=None: _clamp(e, lo, hi), 2),
    "pow": Pointwise(lambda t, c: torch.pow(t, c), lambda e, c: e ** sympy.nsimplify(c), 1),
}


def _clamp(e, lo, hi):
    pieces = []
    if lo is not None:
        pieces.append((sympy.Float(lo), e < lo))
    if hi is not None:
        pieces.append((sympy.Float(hi), e > hi))
    return _pw(pieces, e) if pieces else e


def apply(name: str, t: torch.Tensor, args: tuple) -> torch.Tensor:
    return FUNCTIONS[name].torch(t, *args)


def expr(name: str, e, args: tuple):
    """The function applied to the sympy expression ``e``."""
    return FUNCTIONS[name].sympy(e, *args)


def derivative(name: str, args: tuple):
    """d f / d x as a sympy expression of ``x``."""
    return sympy.diff(expr(name, x, args), x)


# ---- printing to Triton ------------------------------------------------------------------------

class _Unsupported(Exception):
    pass


def triton_literal(v) -> str:
    """A Python float literal Triton reads as fp32 (inf and nan through float())."""
    v = float(v)
    if math.isnan(v):
        return 'float("nan")'
    if math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    return repr(v)


def _print(e, var: str) -> str:
    """A Triton fp32 expression for the sympy expression ``e`` of ``x`` (printed as ``var``)."""
    if e == x:
        return var
    if not e.free_symbols:  # a constant subexpression (sqrt(2), 1/pi): one fp32 literal
        v = complex(e.evalf())
        if v.imag:
            raise _Unsupported(f"complex constant {e}")
        return triton_literal(v.real)
    if isinstance(e, sympy.Add):
        return "(" + " + ".join(_print(a, var) for a in e.args) + ")"
    if isinstance(e, sympy.Mul):
        num, den = [], []
        for a in e.args:
            if isinstance(a, sympy.Pow) and a.exp.is_Number and a.exp < 0:
                den.append(_print(a.base ** -a.exp, var))
            else:
                num.append(_print(a, var))
        out = " * ".join(num) if num else "1.0"
        return f"({out} / ({' * '.join(den)}))" if den else f"({out})"
    if isinstance(e, sympy.Pow):
        b, p = e.base, e.exp
        if p == sympy.Rational(1, 2):
            return f"tl.sqrt({_print(b, var)})"
        if p == sympy.Rational(-1, 2):
            return f"(1.0 / tl.sqrt({_print(b, var)}))"
        if p.is_Integer and 0 < abs(int(p)) <= 8:
            base = _print(b, var)
            prod = " * ".join([base] * abs(int(p)))
            return f"({prod})" if p > 0 else f"(1.0 / ({prod}))"
        if p.is_Number:
            return f"tl.exp({triton_literal(p)} * tl.log({_print(b, var)}))"
        raise _Unsupported(f"power {e}")
    if isinstance(e, sympy.exp):
        return f"tl.exp({_print(e.args[0], var)})"
    if isinstance(e, sympy.log):
        return f"tl.log({_print(e.args[0], var)})"
    if isinstance(e, sympy.sin):
        return f"tl.sin({_print(e.args[0], var)})"
    if isinstance(e, sympy.cos):
        return f"tl.cos({_print(e.args[0], var)})"
    if isinstance(e, sympy.erf):
        return f"tl.erf({_print(e.args[0], var)})"
    if isinstance(e, sympy.tanh):
        a = _print(e.args[0], var)
        return f"(1.0 - 2.0 / (tl.exp(2.0 * {a}) + 1.0))"  # exact at +-inf, no overflow to NaN
    if isinstance(e, sympy.Piecewise):
        out = _print(e.args[-1].expr, var)
        if e.args[-1].cond is not sympy.true:
            raise _Unsupported("a Piecewise without a default")
        for piece in reversed(e.args[:-1]):
            out = f"tl.where({_print_cond(piece.cond, var)}, {_print(piece.expr, var)}, {out})"
        return out
    raise _Unsupported(f"{type(e).__name__}")


_RELS = {sympy.StrictGreaterThan: ">", sympy.StrictLessThan: "<", sympy.GreaterThan: ">=",
         sympy.LessThan: "<=", sympy.Equality: "==", sympy.Unequality: "!="}


def _print_cond(c, var: str) -> str:
    if type(c) in _RELS:
        return f"({_print(c.lhs, var)} {_RELS[type(c)]} {_print(c.rhs, var)})"
    if isinstance(c, sympy.And):
        return "(" + " & ".join(_print_cond(a, var) for a in c.args) + ")"
    if isinstance(c, sympy.Or):
        return "(" + " | ".join(_print_cond(a, var) for a in c.args) + ")"
    raise _Unsupported(f"condition {c}")


def triton_source(name: str, args: tuple, var: str) -> Optional[tuple]:
    """(forward, derivative) Triton expressions of ``var``, or None when the printer lacks a
    construct (then the spec runs on the tiled implementation, on every device)."""
    try:
        return _print(expr(name, x, args), var), _print(derivative(name, args), var)
    except _Unsupported:
        return None


def magnitude_bound(name: str, args: tuple, b):
    """An upper bound of |f(s)| given |s| <= b (a float64 0-dim tensor), for the removal rule's
    bound on the scores (``removal.score_bound``); +inf where f is unbounded near its domain's
    edge (log, reciprocal...). Each bound holds for every real s with |s| <= b."""
    inf = torch.full_like(b, math.inf)
    if name in ("sin", "cos", "sigmoid", "erf"):
        return torch.clamp(b, max=1.0)
    if name in ("abs", "neg", "relu", "gelu", "silu"):  # |gelu(s)|, |silu(s)| <= |s|
        return b
    if name == "leaky_relu":
        return b * max(1.0, abs(args[0]))
    if name in ("square", "mul_self"):
        return b * b
    if name == "exp":
        return torch.exp(b)
    if name == "expm1":
        return torch.expm1(b)
    if name == "softplus":  # softplus(s) <= max(s, 0) + log(2) / beta
        return b + math.log(2.0) / args[0] if args[0] > 0 else inf
    if name == "clamp":
        lo, hi = args
        if lo is not None and hi is not None:
            return torch.clamp(b, max=max(abs(lo), abs(hi)))
        return torch.maximum(b, torch.tensor(abs(lo if lo is not None else hi), dtype=b.dtype))
    if name == "pow" and float(args[0]) >= 0:
        return b ** float(args[0])
    return inf


# ---- evaluating on tiles (the CPU backward) ------------------------------------------------------

def evaluate(e, t: torch.Tensor) -> torch.Tensor:
    """The sympy expression ``e`` of ``x`` evaluated elementwise on the tile ``t`` with torch ops
    in t's dtype: the CPU implementation's derivative of a pointwise step (the same sympy form
    the Triton kernels print)."""
    if e == x:
        return t
    if not e.free_symbols:
        return torch.full_like(t, float(complex(e.evalf()).real))
    if isinstance(e, sympy.Add):
        out = evaluate(e.args[0], t)
        for a in e.args[1:]:
            out = out + evaluate(a, t)
        return out
    if isinstance(e, sympy.Mul):
        out = evaluate(e.args[0], t)
        for a in e.args[1:]:
            out = out * evaluate(a, t)
        return out
    if isinstance(e, sympy.Pow):
        b, p = evaluate(e.base, t), e.exp
        if p.is_Integer:
            return b ** int(p)
        if p.is_Number:
            return b ** float(p)
        return b ** evaluate(p, t)
    for f, op in ((sympy.exp, torch.exp), (sympy.log, torch.log), (sympy.sin, torch.sin),
                  (sympy.cos, torch.cos), (sympy.erf, torch.erf), (sympy.tanh, torch.tanh)):
        if isinstance(e, f):
            return op(evaluate(e.args[0], t))
    if isinstance(e, sympy.Piecewise):
        out = evaluate(e.args[-1].expr, t)
        for piece in reversed(e.args[:-1]):
            out = torch.where(_evaluate_cond(piece.cond, t), evaluate(piece.expr, t), out)
        return out
    raise NotImplementedError(f"pointwise.evaluate: {type(e).__name__}")


def _evaluate_cond(c, t):
    ops = {sympy.StrictGreaterThan: torch.gt, sympy.StrictLessThan: torch.lt, sympy.GreaterThan: torch.ge,
           sympy.LessThan: torch.le, sympy.Equality: torch.eq, sympy.Unequality: torch.ne}
    if type(c) in ops:
        return ops[type(c)](evaluate(c.lhs, t), evaluate(c.rhs, t))
    if isinstance(c, sympy.And):
        out = _evaluate_cond(c.args[0], t)
        for a in c.args[1:]:
            out = out & _evaluate_cond(a, t)
        return out
    if isinstance(c, sympy.Or):
        out = _evaluate_cond(c.args[0], t)
        for a in c.args[1:]:
            out = out | _evaluate_cond(a, t)
        return out
    raise NotImplementedError(f"pointwise.evaluate: condition {c}")


@functools.lru_cache(maxsize=None)
def _derivative_cached(name: str, args: tuple):
    return derivative(name, args)


def backward(name: str, args: tuple, s_in: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """ds * f'(s_in), f' from sympy (``derivative``), evaluated on the tile."""
    return ds * evaluate(_derivative_cached(name, args), s_in).to(ds.dtype)
