"""Generate stage, Triton half, the part that varies: from an ``AttentionSpec``, the source of the
small module that completes the kernels of ``attention.py`` for that spec (its contract and a
plain-attention version: ``spec_parts.py``): the score chain ``score_mod`` (and its full-tile form),
its reverse-mode derivative ``score_mod_backward`` (storing the captured operands' gradients in
``score_mod_backward_store``), the scalar operands' values (``operand_values``: loaded once per
program from their 0-dim tensors), the operand tiles (``operand_tiles``: bias tiles, each mask
predicate's ``mask{k}``) and the spec's constants (base-2 units, dropout, safe softmax).

The score chain is emitted with its explicit ``cast`` steps as an fp32 -> dtype -> fp32 round trip;
everything else is fp32. A float16 spec also gets float16's overflow: the raw product
(``qk_round``, right after each kernel's dot) and each float16 step that can pass the range become
+-inf where eager's float16 values are (``_qk_threshold``, ``_post_checks``; bf16/fp32: nothing). Mask predicates (``spec.masks``, see ``predicate.py``): each mask's
keep(b, h, i, j) is written as Triton code (``mask{k}``, from the sympy expression by
``_TritonPrinter``: Python integer semantics, data tensors read with torch's indexing rules) and
evaluated per tile, giving the tensor the graph's mask held (bool, or where(keep, kept, masked)
read as fp32); no N x N mask. Hands on to ``loader.py``: ``generate_source(spec)``; to
``launch.py``: ``predicates_supported``, ``skip_op``, the operand layout (``_data_arities``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import List, Optional, Sequence

import sympy
import torch

from .. import pointwise, predicate, removal
from ..dropout import threshold
from ..spec import AttentionSpec, ScoreOp, to_dtype

_ARITH_KINDS = {"mul", "div", "add", "sub", "rsub"}
_TL_DTYPES = {"float16": "tl.float16", "bfloat16": "tl.bfloat16"}
_FP32_MAX = float(torch.finfo(torch.float32).max)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_NONLINEAR = {"tanh", "fn", "cast"}
# float16's overflow threshold under round-to-nearest-even: an fp32 value v rounds to +-inf in
# float16 exactly when |v| >= 65520 (65504 is the largest finite, 65520 the midpoint to 2^16)
_FP16_OVERFLOW = 65520.0
# the steps whose float16 result can pass float16's range (tanh, fills and casts cannot: a cast to
# float16 is already emitted as a round trip, see _step)
_CAN_OVERFLOW = _ARITH_KINDS | {"fn"}


def _fp16_checked(spec: AttentionSpec) -> List[int]:
    """Positions of the chain steps whose float16 result eager rounds, so that a value the fp32
    kernel keeps finite is +-inf in eager (a float16 step past 65520 in magnitude)."""
    out, bound = [], math.inf  # a bound of |s| known from the chain so far (tanh: 1)
    for p, op in enumerate(spec.score_ops):
        c = abs(float(op.value)) if op.operand == "const" and op.value is not None else math.nan
        if op.kind == "tanh":
            bound = 1.0
        elif op.kind in ("mul", "div") and op.operand == "const" and math.isfinite(c) and c > 0:
            bound = bound * c if op.kind == "mul" else bound / c
        elif op.kind in ("fill", "fill_not"):
            bound = max(bound, abs(float(op.value))) if op.value is not None else math.inf
        elif op.kind != "cast":
            bound = math.inf
        # a result bounded well inside float16's range (softcap's c * tanh) cannot overflow
        if op.dtype == "float16" and op.kind in _CAN_OVERFLOW and not bound * 1.001 < 65504.0:
            out.append(p)
    return out


def _overflow_line(x: str, thr: float) -> str:
    """``x`` with |x| >= thr replaced by +-inf, sign kept (x * inf; a NaN stays NaN): float16's
    rounding to +-inf on an fp32 value (thr = 65520), one compare and a select per element."""
    return f"{x} = tl.where(tl.abs({x}) < {_lit(thr)}, {x}, {x} * {_lit(math.inf)})"


def _pre_threshold(op: ScoreOp) -> Optional[float]:
    """For a constant product or quotient ``s * c`` / ``s / c`` (c finite, non-zero): the smallest
    fp32 t such that |fl32(s * c)| >= 65520 exactly when |s| >= t (fl32(|s| * |c|) is monotone in
    |s|), so that the overflow of the step's float16 result can be tested on its input, before
    anything is folded into the constant; math.inf when no fp32 input overflows. None for other
    steps."""
    if op.kind not in ("mul", "div") or op.operand != "const":
        return None
    c = abs(float(op.value))
    if not (math.isfinite(c) and c > 0):
        return None
    one = torch.tensor(c, dtype=torch.float32)
    if one.item() == 0 or math.isinf(one.item()):
        return None

    def f(t):  # |fl32(t op c)| for an fp32 t (the kernel's fp32 arithmetic)
        t = torch.tensor(t, dtype=torch.float32)
        return float(t * one if op.kind == "mul" else t / one)

    big = float(torch.finfo(torch.float32).max)
    if f(big) < _FP16_OVERFLOW:
        return math.inf
    t = float(torch.tensor(_FP16_OVERFLOW / c if op.kind == "mul" else _FP16_OVERFLOW * c,
                           dtype=torch.float32).clamp(max=big))
    up, down = torch.tensor(math.inf), torch.tensor(0.0)
    nxt = lambda t, d: float(torch.nextafter(torch.tensor(t, dtype=torch.float32),
                                             d.to(torch.float32)))
    while f(t) < _FP16_OVERFLOW:
        t = nxt(t, up)
    while t > 0 and f(nxt(t, down)) >= _FP16_OVERFLOW:
        t = nxt(t, down)
    return t


def _qk_threshold(spec: AttentionSpec):
    """(threshold, merged): the raw product's float16 overflow test, applied right after the dot
    (``qk_round``; threshold None when the spec needs none). It covers the qk product itself (qk_dtype
    float16: |s| >= 65520) and, where the chain's first step is a constant product/quotient with a
    float16 result, that step too (merged: True): testing |s| >= min(65520, t) on the raw product
    gives +-inf exactly where either eager step overflows (+-inf times a non-zero c stays +-inf
    with the right sign), so a plain fp16 spec keeps one test and its one-FMA full-tile form."""
    thr = _FP16_OVERFLOW if spec.qk_dtype == "float16" else None
    merged = False
    ops = spec.score_ops
    if ops and 0 in _fp16_checked(spec):
        t = _pre_threshold(ops[0])
        if t is not None:
            thr = t if thr is None else min(thr, t)
            merged = True
    # (an infinite threshold: no fp32 input overflows the merged step, nothing to test)
    return (thr if thr is not None and thr != math.inf else None), merged


def _post_checks(spec: AttentionSpec) -> frozenset:
    """The chain positions tested after the step (on its natural-units fp32 result)."""
    skip = {0} if _qk_threshold(spec)[1] else set()
    return frozenset(p for p in _fp16_checked(spec) if p not in skip)


def _log2_chain(spec: AttentionSpec, ops, checks=frozenset()) -> Optional[List[str]]:
    """The chain ``ops`` as lines computing s * log2(e) (so that exp(s - m) = exp2(s' - m')),
    with log2(e) folded into its first constant scale (no extra multiply, and a division by a
    constant becomes a product), or None where that is not exact up to rounding: an operand
    whose values are unknown added after the scale point (a bias tensor may hold finfo.min, whose
    product with log2(e) overflows to -inf and would turn eager's uniform fully masked row into
    NaN), or a constant whose scaled value overflows. Nonlinear steps (tanh, pointwise functions,
    casts) stay in natural units: the scale goes after the last of them."""
    last_nl = max((p for p, op in enumerate(ops) if op.kind in _NONLINEAR), default=-1)
    # float16 overflow tests (``checks``: chain positions) must see the value in the model's
    # units: after a step still in natural units (before the fold) the result is tested against
    # 65520; the step that folds log2(e) into its constant c is tested on its input against
    # _pre_threshold(c) (|s| >= t exactly when |fl32(s * c)| >= 65520, the unfolded product), so
    # the test does not depend on the folded constant's rounding; a tested step after the fold
    # has no exact test in base-2 units (65520 * log2(e) is not where fl32(s * c) passes 65520):
    # no fold then (None; the kernels run in natural units)
    lines = []
    for p, op in enumerate(ops[:last_nl + 1]):
        lines.append(f"s = {_step(op, spec, 's')}")
        if p in checks:
            lines.append(_overflow_line("s", _FP16_OVERFLOW))
    folded = False

    def scaled(v):
        v = float(v)
        if math.isnan(v) or math.isinf(v):
            return v
        w = v * LOG2E
        return w if abs(w) <= _FP32_MAX else None  # an fp32 literal in the kernel

    for p, op in enumerate(ops[last_nl + 1:], start=last_nl + 1):
        k = op.kind
        if k in ("mul", "div"):
            if not folded and op.operand == "const":
                c = scaled(op.value) if k == "mul" else (LOG2E / op.value if op.value else None)
                if c is None or not abs(c) <= _FP32_MAX:
                    return None
                if p in checks:
                    t = _pre_threshold(op)
                    if t is None:
                        return None
                    if t != math.inf:
                        lines.append(_overflow_line("s", t))
                lines.append(f"s = s * {_lit(c)}")
                folded = True
            else:  # products commute with the scale
                if folded and p in checks:
                    return None
                lines.append(f"s = {_step(op, spec, 's')}")
                if p in checks:
                    lines.append(_overflow_line("s", _FP16_OVERFLOW))
            continue
        if p in checks:
            return None
        if not folded:
            lines.append(f"s = s * {_lit(LOG2E)}")
            folded = True
        if k in ("add", "sub", "rsub"):
            if op.operand == "const":
                v = scaled(op.value)
                if v is None:
                    return None
                x = _lit(v)
            elif op.operand == "predicate":
                m = spec.masks[op.index]
                if m.kind == "additive":
                    if scaled(_mask_value(m, m.kept)) is None or scaled(_mask_value(m, m.masked)) is None:
                        return None
                x = f"({_operand_expr(op, spec)} * {_lit(LOG2E)})"
            else:
                return None
            lines.append(f"s = {dict(add=f's + {x}', sub=f's - {x}', rsub=f'{x} - s')[k]}")
        elif k in ("fill", "fill_not"):
            v = scaled(op.value)
            if v is None:
                return None
            lines.append(f"s = {_step(dataclasses.replace(op, value=v), spec, 's')}")
        else:
            return None
    if not folded:
        lines.append(f"s = s * {_lit(LOG2E)}")
    return lines


def _natural_chain(spec: AttentionSpec, ops, checks) -> List[str]:
    """The chain in natural units, each tested float16 step followed by its overflow test."""
    lines = []
    for p, op in enumerate(ops):
        lines.append(f"s = {_step(op, spec, 's')}")
        if p in checks:
            lines.append(_overflow_line("s", _FP16_OVERFLOW))
    return lines


def _appended_check(spec: AttentionSpec, fops) -> frozenset:
    """The full-tile chain's appended kept-value step (``_full_ops``) when it is a float16 add."""
    n = len(spec.score_ops)
    if len(fops) == n and n and fops[-1] is not spec.score_ops[-1] \
            and fops[-1].dtype == "float16" and fops[-1].kind in _CAN_OVERFLOW:
        return frozenset({n - 1})
    return frozenset()


def _full_ops(spec: AttentionSpec):
    """The chain on a full tile (every row keeps every key): the skipped predicate's step is the
    identity there (a fill whose mask is false, a where keeping s) or adds the kept value; None
    when the last step is another kind (no full-tile path)."""
    op = skip_op(spec)
    if op is None:
        return spec.score_ops
    if op.kind in ("fill", "fill_not"):
        return spec.score_ops[:-1]
    m = spec.masks[op.index]
    if op.kind == "add" and m.kind == "additive":
        kept = _mask_value(m, m.kept)
        if kept == 0.0:
            return spec.score_ops[:-1]
        return spec.score_ops[:-1] + (ScoreOp("add", "const", value=kept, dtype=op.dtype),)
    return None


def _scale_only(lines: Sequence[str]) -> Optional[float]:
    """The constant c > 0 when a log2 chain is just ``s = s * c``."""
    if len(lines) == 1 and lines[0].startswith("s = s * "):
        with contextlib.suppress(ValueError):
            c = float(lines[0][len("s = s * "):])
            if c > 0 and math.isfinite(c):
                return c
    return None


_lit = pointwise.triton_literal  # a float literal Triton reads (inf and nan through float())


def _operand_expr(op: ScoreOp, spec: AttentionSpec) -> str:
    if op.operand == "const":
        return _lit(op.value)
    if op.operand == "predicate":
        # the additive mask is already fp32 (see _mask_function); a bool mask adds as 0/1
        return f"m{op.index}" if spec.masks[op.index].kind == "additive" else f"m{op.index}.to(tl.float32)"
    if spec.captured[op.index] == "scalar":
        return f"c{op.index}"
    return f"c{op.index}.to(tl.float32)"


def _step(op: ScoreOp, spec: AttentionSpec, s: str) -> str:
    """The expression of one chain step applied to the expression ``s``."""
    k = op.kind
    if k in _ARITH_KINDS:
        x = _operand_expr(op, spec)
        return {"mul": f"{s} * {x}", "div": f"{s} / {x}", "add": f"{s} + {x}",
                "sub": f"{s} - {x}", "rsub": f"{x} - {s}"}[k]
    if k == "tanh":
        # tanh via exp (tl has no tanh in every version): 1 - 2 / (exp(2s) + 1) is exact at
        # +-inf and does not overflow to NaN
        return f"1.0 - 2.0 / (tl.exp(2.0 * {s}) + 1.0)"
    if k == "cast":
        # the model's explicit cast, kept as a round trip so its rounding/overflow is eager's
        tl_dtype = _TL_DTYPES.get(op.dtype)
        return f"{s}.to({tl_dtype}).to(tl.float32)" if tl_dtype else s
    if k == "fill":
        return f"tl.where({_mask_var(op)} != 0, {_lit(op.value)}, {s})"
    if k == "fill_not":
        return f"tl.where({_mask_var(op)} != 0, {s}, {_lit(op.value)})"
    if k == "fn":  # printed from the function's sympy form (pointwise.py)
        return pointwise.triton_source(op.fn, op.args, s)[0]
    raise AssertionError(k)


def _kept_value(op: ScoreOp, spec: AttentionSpec) -> str:
    """The literal a mask step's tile holds where it keeps the score: a fill's mask is false
    there, a fill_not's (a where keeping s) true, an additive mask its kept value."""
    if op.kind == "fill":
        return "0"
    if op.kind == "fill_not":
        return "1"
    m = spec.masks[op.index]
    return _lit(_mask_value(m, m.kept)) if m.kind == "additive" else "1"


def _mask_var(op: ScoreOp) -> str:
    """The kernel variable holding the boolean mask a fill step reads."""
    return f"m{op.index}" if op.operand == "predicate" else f"c{op.index}"


def _grad_indices(spec: AttentionSpec) -> List[int]:
    """Captured operands the chain is differentiable in (masks of fills are not)."""
    return sorted({op.index for op in spec.score_ops
                   if op.kind in _ARITH_KINDS and op.operand in ("scalar", "tensor")})


def _chain_backward_lines(spec: AttentionSpec) -> List[str]:
    n = len(spec.score_ops)
    lines, started = [], set()

    def acc(i: int, expr: str):
        if i in started:
            lines.append(f"dc{i} = dc{i} + {expr}")
        else:
            lines.append(f"dc{i} = {expr}")
            started.add(i)

    for pos in reversed(range(n)):
        op = spec.score_ops[pos]
        s_in, s_out = f"s{pos}", f"s{pos + 1}"
        has_operand = op.operand in ("scalar", "tensor")
        k = op.kind
        if k in _ARITH_KINDS:
            x = _operand_expr(op, spec)
            if k == "mul":
                if has_operand:
                    acc(op.index, f"ds * {s_in}")
                lines.append(f"ds = ds * {x}")
            elif k == "div":
                if has_operand:
                    acc(op.index, f"-ds * {s_in} / ({x} * {x})")
                lines.append(f"ds = ds / {x}")
            elif k == "add":
                if has_operand:
                    acc(op.index, "ds")
            elif k == "sub":
                if has_operand:
                    acc(op.index, "-ds")
            elif k == "rsub":
                if has_operand:
                    acc(op.index, "ds")
                lines.append("ds = -ds")
        elif k == "tanh":
            lines.append(f"ds = ds * (1.0 - {s_out} * {s_out})")
        elif k == "fn":  # d f / d s from sympy (pointwise.derivative), evaluated at the step's input
            lines.append(f"ds = ds * {pointwise.triton_source(op.fn, op.args, s_in)[1]}")
        elif k == "fill":
            lines.append(f"ds = tl.where({_mask_var(op)} != 0, 0.0, ds)")
        elif k == "fill_not":
            lines.append(f"ds = tl.where({_mask_var(op)} != 0, ds, 0.0)")
        # cast: identity (the reference only rounds ds to the step's input dtype)
    return lines


# ---------------------------------------------------------------------------------------------
# Mask predicates (predicate.MaskSpec): keep(b, h, i, j) written as Triton code, per tile
# ---------------------------------------------------------------------------------------------

class _TritonPrinter(predicate.ExprPrinter):
    """Triton source evaluating a predicate on a tile. ``names`` maps the expression's symbols to
    kernel variables (int64 scalars for b, h and the sizes; int64 (BLOCK_M, 1) / (1, BLOCK_N) index
    tiles for i and j); ``data`` maps a data atom's name (d0, ...) to the kernel argument prefix of
    its tensor. Integer semantics are Python's (floor division and modulo on negative values), as
    in ``predicate.ExprPrinter``'s torch code, which is the reference."""

    def __init__(self, names: dict, data: dict):
        self.names, self.data = names, data
        self.arities = set()  # data-load helpers the code calls (_dload<arity>)

    def symbol(self, e) -> str:
        if e.name not in self.names:
            raise ValueError(f"unknown symbol {e.name}")
        return self.names[e.name]

    def floor_div(self, num, den) -> str:
        if den.is_Integer and int(den) < 0:
            num, den = -num, -den
        if den == 1:
            return self(num)
        if den.is_Integer:
            return f"_fdiv_pos({self(num)}, {int(den)})"
        return f"_fdiv({self(num)}, {self(den)})"

    def mod(self, a, m) -> str:
        if m.is_Integer and int(m) > 0:
            return f"_mod_pos({self(a)}, {int(m)})"
        return f"_mod({self(a)}, {self(m)})"

    def abs(self, x: str) -> str:
        return f"tl.where({x} < 0, -{x}, {x})"

    def max_min(self, is_max: bool, a: str, b: str) -> str:
        return f"tl.where({a} {'>' if is_max else '<'} {b}, {a}, {b})"

    def where(self, c: str, a: str, b: str) -> str:
        return f"tl.where({c}, {a}, {b})"

    def rel(self, a: str, b: str, op: str) -> str:
        return f"({a} {op} {b})"

    def logic(self, op: str, xs) -> str:
        return "(" + f" {dict(zip(('and', 'or', 'xor'), '&|^'))[op]} ".join(xs) + ")"

    def not_(self, x: str) -> str:
        return f"({x} == 0)"

    def load(self, e) -> str:
        name = e.func.__name__
        if name not in self.data:
            raise ValueError(f"unknown data atom {name}")
        prefix, n = self.data[name], len(e.args)
        self.arities.add(n)
        sizes = ", ".join(f"{prefix}_n{t}" for t in range(n))
        strides = ", ".join(f"{prefix}_s{t}" for t in range(n))
        idx = ", ".join(self(a) for a in e.args)
        return f"_dload{n}({prefix}, {', '.join(x for x in (sizes, strides, idx) if x)})"


def _dload_source(n: int) -> str:
    """A helper reading a data tensor at n integer index tiles, as torch's t[idx] does: negative
    indices count from the end; out-of-range ones (padding lanes of a tile) read 0."""
    xs = [f"x{t}" for t in range(n)]
    params = ", ".join(["P"] + [f"n{t}" for t in range(n)] + [f"s{t}" for t in range(n)] + xs)
    lines = ["@triton.jit", f"def _dload{n}({params}):", "    ok = True"]
    off = []
    for t in range(n):
        lines.append(f"    x{t} = tl.cast(x{t}, tl.int64)")
        lines.append(f"    x{t} = tl.where(x{t} < 0, x{t} + n{t}, x{t})")
        lines.append(f"    ok = ok & (x{t} >= 0) & (x{t} < n{t})")
        off.append(f"x{t} * s{t}")
    lines.append(f"    return tl.load(P + {' + '.join(off) if off else '0'}, mask=ok, other=0).to(tl.int64)")
    return "\n".join(lines)


def _axis_var(back: int) -> str:
    """The kernel variable of the score axis ``back`` places from the right (1: keys)."""
    return {1: "j", 2: "i", 3: "off_h", 4: "off_b"}[back]


def _data_arities(spec: AttentionSpec) -> dict:
    """captured index of each data tensor -> the number of indices its atoms take."""
    out = {}
    for m in spec.masks:
        for a in m.expr.atoms(sympy.core.function.AppliedUndef):
            name = a.func.__name__
            if not (name.startswith("d") and name[1:].isdigit() and int(name[1:]) < len(m.data)):
                raise ValueError(f"data atom {name} of {m} has no data tensor")
            pos = m.data[int(name[1:])]
            if out.setdefault(pos, len(a.args)) != len(a.args):
                raise ValueError(f"data tensor {pos} indexed with {out[pos]} and {len(a.args)} indices")
    return out


def _mask_value(m, x: float) -> float:
    """x in the mask's dtype, read back as fp32: what the tensor path loads from the graph's mask."""
    return float(torch.tensor(x, dtype=to_dtype(m.dtype)).to(torch.float32).item())


def _mask_function(spec: AttentionSpec, k: int, arities: dict):
    """(source of ``mask{k}``, its parameters after the tile's coordinates, data-load arities):
    the tensor the graph's mask held on one tile: the bool keep, or where(keep, kept, masked) as
    fp32 (the values rounded to the mask's dtype first, as a loaded mask tensor would be)."""
    m = spec.masks[k]
    R = len(m.axes)
    if R > 4:
        raise ValueError("a mask over more than 4 score axes")
    names = {}
    for t, name in enumerate(m.axes):
        names[name] = _axis_var(R - t)
        names[f"n{t}"] = f"n{t}"
    data, params = {}, [f"n{t}" for t in range(R)]
    for t, pos in enumerate(m.data):
        data[f"d{t}"] = f"C{pos}"
        a = arities.get(pos, 0)
        params += [f"C{pos}"] + [f"C{pos}_n{u}" for u in range(a)] + [f"C{pos}_s{u}" for u in range(a)]
    pr = _TritonPrinter(names, data)
    e = m.expr
    if e is sympy.true or e is sympy.false:
        keep = f"offs_m[:, None] {'>=' if e is sympy.true else '<'} 0"
    else:
        keep = pr(e)
    lines = ["@triton.jit",
             f"def mask{k}(off_b, off_h, offs_m, offs_n, {', '.join(params)}):",
             f"    # {m}",
             "    i = offs_m[:, None].to(tl.int64)",
             "    j = offs_n[None, :].to(tl.int64)"]
    used = {x.name for x in e.free_symbols}
    lines += [f"    n{t} = tl.cast(n{t}, tl.int64)" for t in range(R) if f"n{t}" in used]
    lines.append(f"    keep = {keep}")
    if m.kind == "additive":
        lines.append(f"    return tl.where(keep, {_lit(_mask_value(m, m.kept))}, "
                     f"{_lit(_mask_value(m, m.masked))})")
    else:
        lines.append("    return keep")
    return "\n".join(lines), params, pr.arities


def _mask_sources(spec: AttentionSpec):
    """(top-level source of the mask functions and their helpers, per mask the call's argument
    list after the tile's coordinates)."""
    if not spec.masks:
        return "", []
    arities = _data_arities(spec)
    funcs, calls, used = [], [], set()
    for k in range(len(spec.masks)):
        src, params, ar = _mask_function(spec, k, arities)
        funcs.append(src)
        used |= ar
        # in the kernels the sizes are arguments M{k}_n{t}; the data arguments keep their names
        calls.append([p.replace("n", f"M{k}_n", 1) if p.startswith("n") else p for p in params])
    helpers = [_dload_source(n) for n in sorted(used)]
    return "\n\n\n".join(helpers + funcs) + "\n\n", calls


def predicates_supported(spec: AttentionSpec, captured: Optional[Sequence[torch.Tensor]] = None) -> bool:
    """Whether the kernels evaluate every mask predicate of ``spec`` in-kernel (with ``captured``:
    also whether each data tensor has as many dims as its atoms take indices); otherwise
    ``ops.py`` hands them over materialised (``predicate.with_tensor_masks``)."""
    arities = _generated_arities(spec)
    if arities is None:
        return False
    if captured is not None:
        if len(captured) != len(spec.captured):
            return False
        for pos, a in arities.items():
            c = captured[pos]
            if c.dim() != a or c.is_floating_point() or c.is_complex():
                return False
    return True


@functools.lru_cache(maxsize=None)
def _generated_arities(spec: AttentionSpec) -> Optional[dict]:
    """The spec-only part of ``predicates_supported`` (cached per spec): the data arities when every
    mask can be generated and is used in a way the kernels support, else None."""
    try:
        arities = _data_arities(spec)
        for k in range(len(spec.masks)):
            _mask_function(spec, k, arities)
    except (ValueError, TypeError, KeyError):
        return None
    for m in spec.masks:
        if m.kind == "additive":
            if m.dtype not in ("float32", "float16", "bfloat16", "float64"):
                return None
            if not (_fits_fp32(_mask_value(m, m.kept)) and _fits_fp32(_mask_value(m, m.masked))):
                return None
            for x in (m.kept, m.masked):
                if m.dtype == "float64" and _mask_value(m, x) != x and not math.isnan(x):
                    return None  # a float64 mask value that fp32 would change
    for op in spec.score_ops:
        if op.operand != "predicate":
            continue
        m = spec.masks[op.index]
        if op.kind in ("fill", "fill_not") and m.kind != "bool":
            return None
        if op.kind not in ("fill", "fill_not") and op.kind not in _ARITH_KINDS:
            return None
    return arities



def _fits_fp32(x: float) -> bool:
    # a finite constant beyond fp32 (finfo(float64).min) would turn into -inf and change the
    # fully-masked-row semantics from finite to NaN
    x = float(x)
    return math.isnan(x) or math.isinf(x) or abs(x) <= _FP32_MAX


def skip_op(spec: AttentionSpec) -> Optional[ScoreOp]:
    """The predicate step whose masked keys the kernels may skip: the chain's last step, when the
    removal rule (``removal.skip_removal``) allows skipping at all; whether a call and each row
    may is decided at run time (``launch._threshold32``, the forward kernel's check,
    ``ranges.backward_ranges``)."""
    return spec.score_ops[-1] if removal.skip_removal(spec) is not None else None


# ---------------------------------------------------------------------------------------------
# The generated module
# ---------------------------------------------------------------------------------------------

def operand_names(spec: AttentionSpec) -> List[str]:
    """The names of the flat operand tuple OPS, in the order ``launch._operands`` passes them:
    per captured operand a scalar's 0-dim tensor ``C{i}`` (a pointer: the kernels load its value
    ``c{i}`` once per program, ``operand_values``), a tensor ``C{i}`` and its four strides, or a
    data tensor ``C{i}`` with its sizes and strides; then each mask's score sizes ``M{k}_n{t}``."""
    arities = _data_arities(spec) if spec.masks else {}
    names = []
    for i, kind in enumerate(spec.captured):
        if kind == "scalar":
            names.append(f"C{i}")
        elif kind == "data":
            a = arities.get(i, 0)
            names += [f"C{i}"] + [f"C{i}_n{u}" for u in range(a)] + [f"C{i}_s{u}" for u in range(a)]
        else:
            names += [f"C{i}", f"C{i}_sb", f"C{i}_sh", f"C{i}_sm", f"C{i}_sn"]
    for k, m in enumerate(spec.masks):
        names += [f"M{k}_n{t}" for t in range(len(m.axes))]
    return names


def _jit(signature: str, doc: str, body: Sequence[str]) -> str:
    return "\n".join(["@triton.jit", f"def {signature}:", f"    # {doc}"]
                     + ["    " + line for line in body])


def _tuple(names: Sequence[str]) -> str:
    return "(" + ", ".join(names) + ("," if len(names) == 1 else "") + ")"


def generate_source(spec: AttentionSpec) -> str:
    """The source of the module completing ``attention.py``'s kernels for ``spec``."""
    cap = spec.captured
    grads = _grad_indices(spec)
    # the tiles score_mod reads: scalars and tensor tiles, then each mask's tile (data tensors are
    # read by the mask functions only)
    tiles = [f"c{i}" for i in range(len(cap)) if cap[i] != "data"] + [f"m{k}" for k in range(len(spec.masks))]
    mask_funcs, mask_calls = _mask_sources(spec)
    names = operand_names(spec)
    # float16 overflow emulation (see _qk_threshold, _post_checks; nothing for bf16/fp32 specs)
    qk_thr = _qk_threshold(spec)
    checks = _post_checks(spec)
    lchain = _log2_chain(spec, spec.score_ops, checks)
    fold = lchain is not None
    chain = lchain if fold else _natural_chain(spec, spec.score_ops, checks)
    keep = []
    for p, op in enumerate(spec.score_ops):
        keep.append(f"s{p + 1} = {_step(op, spec, f's{p}')}")
        if p in checks:
            keep.append(_overflow_line(f"s{p + 1}", _FP16_OVERFLOW))
    bwd = _chain_backward_lines(spec)

    # operand_values replaces each scalar's pointer C{i} in OPS by its value c{i} (fp32), which
    # operand_tiles then reads
    scalars = {f"C{i}": f"c{i}" for i in range(len(cap)) if cap[i] == "scalar"}
    values = [scalars.get(n, n) for n in names]
    unpack = [f"{n} = OPS[{t}]" for t, n in enumerate(values)]
    if scalars:
        load_values = [f"{n} = OPS[{t}]" for t, n in enumerate(names)] \
            + [f"{v} = tl.load({p}).to(tl.float32)" for p, v in scalars.items()] \
            + [f"return {_tuple(values)}"]
    else:
        load_values = ["return OPS"]
    loads, full_loads = [], []
    for i, kind in enumerate(cap):
        if kind == "tensor":
            # row/col offsets in int64: an N x N bias can pass 2^31 elements
            loads.append(f"c{i} = tl.load(C{i} + off_b * C{i}_sb + off_h * C{i}_sh"
                         f" + offs_m[:, None].to(tl.int64) * C{i}_sm"
                         f" + offs_n[None, :].to(tl.int64) * C{i}_sn, mask=valid, other=0)")
            full_loads.append(loads[-1])
    skip = skip_op(spec)
    for k, m in enumerate(spec.masks):
        loads.append(f"m{k} = mask{k}(off_b, off_h, offs_m, offs_n, {', '.join(mask_calls[k])})")
        if skip is None or skip.index != k or skip.operand != "predicate":
            full_loads.append(loads[-1])
        else:
            # the skipped mask's value where a key is kept (every key of a full tile is): the
            # backward's chain reads it (a fill_not's where(m, ds, 0) zeroed every ds with 0)
            full_loads.append(f"m{k} = {_kept_value(skip, spec)}  # the skipped mask, all kept")
    fops = _full_ops(spec)
    full_chain = None
    if fops is not None:
        full_checks = frozenset(p for p in checks | _appended_check(spec, fops) if p < len(fops))
        full_chain = _log2_chain(spec, fops, full_checks) if fold else \
            _natural_chain(spec, fops, full_checks)
    full_scale = 0.0
    if full_chain is None:
        full_chain, full_loads = chain, loads  # no full-tile path: never called
    elif fold:
        full_scale = _scale_only(full_chain) or 0.0
    unpack_t = [f"{n} = T[{t}]" for t, n in enumerate(tiles)]

    store = []
    for pos, i in enumerate(grads):
        store.append(f"if (GRAD >> {pos}) & 1:")
        if cap[i] == "tensor":
            # element-wise into the (B, H, Nq, Nk) fp32 buffer; torch sums the broadcast dims
            store.append(f"    tl.store(DC[{pos}] + (off_bh * N_Q + offs_m[:, None].to(tl.int64)) * N_K"
                         f" + offs_n[None, :], dc{i}, mask=valid)")
        else:
            # one partial sum per (bh, query block, key block): deterministic, no atomics
            store.append(f"    tl.store(DC[{pos}] + (off_bh * tl.cdiv(N_Q, BLOCK_M) + pid_m) * num_n_blocks"
                         f" + blk_n, tl.sum(tl.sum(tl.where(valid, dc{i}, 0.0), 1), 0))")

    drop = spec.dropout_p > 0
    tile_args = "OPS, off_b, off_h, offs_m, offs_n, valid"
    parts = [
        "# generated by fusion_pass.kernels.triton_attention from an AttentionSpec; regenerate with\n"
        "# triton_attention.generate_source(AttentionSpec.from_key(KEY)); do not edit.\n"
        f"# KEY = {spec.to_key()}\n"
        f"# {spec}\n"
        "# The spec's parts of the kernels in fusion_pass/kernels/triton_attn/attention.py, which are\n"
        "# compiled in this module's namespace (contract: triton_attn/spec_parts.py).\n"
        "import triton\n"
        "import triton.language as tl\n\n"
        f"HAS_FULL_TILES = {fops is not None}\n"
        f"LOG2_UNITS = tl.constexpr({fold})\n"
        f"SAFE_SOFTMAX = tl.constexpr({bool(spec.safe_softmax)})\n"
        f"HAS_DROPOUT = tl.constexpr({drop})\n"
        f"DROP_THRESHOLD = tl.constexpr({threshold(spec.dropout_p) if drop else 0})\n"
        f"DROP_SCALE = tl.constexpr({_lit(1.0 / (1.0 - spec.dropout_p)) if drop else '1.0'})\n"
        f"FULL_SCALE = tl.constexpr({_lit(full_scale)})",
    ]
    if mask_funcs:
        parts.append(mask_funcs.rstrip("\n"))
    if qk_thr[0] is not None:  # else spec_parts' identity
        parts.append(_jit("qk_round(s)", "the raw product as eager's float16 holds it: +-inf past "
                          "float16's range" + (" (or past the first step's)" if qk_thr[1] else ""),
                          [_overflow_line("s", qk_thr[0]), "return s"]))
    parts += [
        _jit("operand_values(OPS)", "OPS with the scalars' values for their pointers (once per program)",
             load_values),
        _jit(f"operand_tiles({tile_args})", "the operand and mask tiles of one tile of scores",
             unpack + loads + [f"return {_tuple([t for t in tiles])}"]),
        _jit(f"operand_tiles_full({tile_args})", "the same on a full tile",
             unpack + full_loads + [f"return {_tuple([t for t in tiles])}"]),
        _jit("score_mod(s, T)", f"score_mod(s) = {spec.score_mod_str()}", unpack_t + chain + ["return s"]),
        _jit("score_mod_full(s, T)", "score_mod on a full tile", unpack_t + full_chain + ["return s"]),
        _jit("score_mod_backward(ds, s0, T)",
             "recompute the chain's intermediates, then walk it backwards (d score_mod / ds)",
             unpack_t + keep + bwd + ["return ds"]),
        _jit("score_mod_backward_store(ds, s0, T, DC, GRAD: tl.constexpr, off_bh, pid_m, blk_n, "
             "offs_m, offs_n, valid, N_Q, N_K, BLOCK_M: tl.constexpr, num_n_blocks)",
             "score_mod_backward, storing the captured operands' gradients (GRAD: which ones)",
             unpack_t + keep + bwd + store + ["return ds"]),
    ]
    return "\n\n\n".join(parts) + "\n"
