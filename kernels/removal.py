"""When skipping a masked key is exact: the one rule that every kernel path (``cpu.py``,
``cpu_flash.py``, ``triton_attention.py``), the report (``ops.kernel_summary``) and the pass
(``fusion_pass.analyze._implies_causal``) follow.

A kernel *skips* key j of query row i when it never computes that element: no score, no
probability, no product of it with v_j, dO_i, q_i or k_j. Eager removes nothing. It computes
``p_ij = exp(e_ij - max_i) / sum_i`` from the masked element e_ij and multiplies p_ij by v_j in
the forward, by dO_i, q_i and k_j in the backward. Skipping is exact iff two things hold:

1. **p_ij is exactly 0**: exp(e_ij - max_i) underflows to 0 in the softmax's compute dtype. That
   is a fact about the row: with ``m`` the row's maximum over the keys the kernel does compute and
   ``w`` an upper bound of every skipped element, it holds when ``m - w >= MARGIN`` (then max_i is
   m and e_ij - max_i <= -MARGIN). It depends on the scores, so it is checked *at run time, per
   row*; a row that fails is computed over every key, as eager does.
2. **NaN and inf propagate as in eager**: 0 * NaN is NaN, so one non-finite value in v (forward)
   or in q, k, v, dO (backward) reaches every row or key through the zero probabilities eager
   multiplies; a row whose max is NaN or inf is NaN for every key in eager. So a call skips only
   when its inputs are finite (``torch.isfinite(x).all()``, O(N d), checked per call), and a row
   whose max is not finite fails check 1.

What a masked element is depends on the step that masks (the chain's last step: nothing after it
may move the masked value):

* **replacing** (masked_fill / where with a constant c): e_ij is c exactly, whatever the score
  was (NaN and inf included), so w = c. With c = -inf every row with a finite max passes.
* **additive** (s + M, M the masked value of the mask, e.g. finfo.min): e_ij = fl(s_ij + M) depends
  on the score. It is M exactly only while |s| < ``MaskPredicate.exact_below()`` (2^103 for
  float32 finfo.min), and s + (-inf) is NaN for s = +inf. So w = M + B (plus rounding), with B a
  per-call bound of |s| entering the step (``score_bound``: |scale| * max_i ||q_i||_1 * max|k|,
  carried through the chain's steps); an unbounded or non-finite B means no skipping in that call.

MARGIN: float32 exp(x) is below half the smallest subnormal (2^-150 = e^-103.97) for x < -103.98,
so a correctly rounded exp returns 0 there; ATen's vectorised exp (Sleef, exp_u20) returns 0 below
ln(FLT_MIN) = -87.3 or -104, and Triton's exp2.approx flushes below 2^-126. 128 leaves a margin of
24 for approximate exp implementations and for the rounding of the difference itself. float16 and
bfloat16 softmaxes compute in float32 (ATen, Triton), so they take float32's margin. float64: exp
underflows below ln(2^-1075) = -745.13; 768.

The per-call facts are 0-dim tensors on the inputs' device (``worst_masked``), so a GPU caller can
act on them without a host synchronisation.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .spec import AttentionSpec, ScoreOp, to_dtype

REPLACE, ADD = "replace", "add"
MARGIN = {"float32": 128.0, "float64": 768.0}
# relative slack for the rounding of m, w and their difference in the compute dtype (float32's
# 2^-24 with room): |m - w| moves by at most this times |m| + |w| before the comparison
_REL = 2.0 ** -20
# relative growth of a bound through one rounded step (bfloat16 rounds to 2^-8 relative)
_STEP = 1.0 + 2.0 ** -7


@dataclass(frozen=True)
class Removal:
    """How the masked elements of a spec's last step reach the softmax.

    ``kind``: REPLACE (the element is ``value``) or ADD (the element is s + ``value``);
    ``value``: the masked value as the step's result dtype holds it, or None for an additive mask
    *tensor* (its values are data: read per call, see ``worst_masked``); ``compute``: the dtype the
    softmax computes exp in; ``operand``: the step's operand kind ("predicate" or "tensor")."""

    kind: str
    value: Optional[float]
    compute: str
    operand: str

    @property
    def margin(self) -> float:
        return MARGIN[self.compute]

    def __str__(self) -> str:
        what = {REPLACE: "masked elements are", ADD: "masked elements are s +"}[self.kind]
        value = "the mask's values" if self.value is None else repr(self.value)
        return f"{what} {value}"


def recorded(value: Optional[float]) -> bool:
    """A masked value that can make skipping exact on some rows: recorded (not None, not NaN) and
    negative (-inf or finite). Whether it does on a given row is decided at run time."""
    return value is not None and not math.isnan(value) and value < 0


def _in_dtype(x: float, dtype: str) -> float:
    """x as a tensor of ``dtype`` holds it (rounded to nearest; beyond the range: +-inf)."""
    return float(torch.tensor(x, dtype=torch.float64).to(to_dtype(dtype)).item())


def _compute(spec: AttentionSpec) -> str:
    return "float64" if spec.softmax_dtype == "float64" else "float32"


@functools.lru_cache(maxsize=None)
def removal(spec: AttentionSpec) -> Optional[Removal]:
    """The Removal of the chain's last step when it masks (a fill with a constant, a predicate's
    fill, an additive predicate or an added tensor), else None. Static: says nothing about rows."""
    if not spec.score_ops:
        return None
    return step_removal(spec, spec.score_ops[-1])


def step_removal(spec: AttentionSpec, op: ScoreOp) -> Optional[Removal]:
    """The Removal of one masking step ``op`` of ``spec``'s chain (for a caller that has shown
    nothing after it moves the masked value, e.g. only casts to the dtype it already has)."""
    if op.kind in ("fill", "fill_not") and op.operand in ("none", "tensor", "predicate"):
        if op.operand == "predicate" and spec.masks[op.index].kind != "bool":
            return None
        if not recorded(op.value):
            return None
        return Removal(REPLACE, _in_dtype(op.value, op.dtype), _compute(spec),
                       "predicate" if op.operand == "predicate" else "tensor")
    if op.kind == "add" and op.operand == "predicate":
        m = spec.masks[op.index]
        if m.kind != "additive" or not recorded(m.masked):
            return None
        return Removal(ADD, _in_dtype(_in_dtype(m.masked, m.dtype), op.dtype), _compute(spec), "predicate")
    if op.kind == "add" and op.operand == "tensor":
        return Removal(ADD, None, _compute(spec), "tensor")
    return None


def skip_removal(spec: AttentionSpec) -> Optional[Removal]:
    """The Removal that lets a kernel skip the keys no row of a query block keeps under a predicate
    mask (the chain's last step reads ``spec.masks``); None with dropout (its keep-mask is drawn
    per element of the full row)."""
    r = removal(spec)
    return r if r is not None and r.operand == "predicate" and not spec.dropout_p else None


def causal_removal(spec: AttentionSpec) -> Optional[Removal]:
    """The Removal that lets a kernel skip keys j > i: the pass proved every kept element has
    j <= i (``spec.causal``), and the last step's masked value is known (recorded, or read from
    the mask tensor per call)."""
    r = removal(spec)
    return r if r is not None and spec.causal and not spec.dropout_p else None


def describe(spec: AttentionSpec) -> str:
    """The rule in words, for the report."""
    r = removal(spec)
    if r is None or (skip_removal(spec) is None and causal_removal(spec) is None):
        return ""
    return (f"masked keys are skipped only where that is exact ({r}): per call when q, k, v "
            f"(and dO) are finite{', and |s| is bounded' if r.kind == ADD else ''}; per row when "
            f"its max over the computed keys is finite and at least {r.margin:g} above every "
            f"skipped element (otherwise the row is computed over every key)")


# ---------------------------------------------------------------------------------------------
# Per call: the bound of the skipped elements
# ---------------------------------------------------------------------------------------------

def _stats(t: torch.Tensor):
    """(max |t|, every element finite) as 0-dim float64 / bool tensors, from one aminmax pass
    (NaN propagates through it; no temporary of t's size)."""
    if t.numel() == 0:
        z = torch.zeros((), dtype=torch.float64, device=t.device)
        return z, torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    lo, hi = lo.double(), hi.double()
    return torch.maximum(lo.abs(), hi.abs()), torch.isfinite(lo) & torch.isfinite(hi)


def host_stats(t: Optional[torch.Tensor]):
    """``_stats`` of a CPU tensor as Python numbers: (max |t| as a float, every element finite),
    from the same aminmax pass. For the CPU routes' per-call checks, where reading the two
    extremes costs nothing and the 0-dim tensor arithmetic of ``_stats`` (seven more ops, ~30 us
    a call) was most of a decoding step's check. None counts as finite (an absent dO)."""
    if t is None or t.numel() == 0 or not t.is_floating_point():
        return 0.0, True
    lo, hi = (x.item() for x in torch.aminmax(t))
    return max(abs(lo), abs(hi)), math.isfinite(lo) and math.isfinite(hi)


def as_stats(qmax: float, kmax: float):
    """``worst_masked``'s / ``score_bound``'s ``stats`` from ``host_stats`` of finite q, k, v."""
    yes = torch.tensor(True)
    return (torch.tensor(qmax, dtype=torch.float64), yes, torch.tensor(kmax, dtype=torch.float64),
            yes, yes)


def finite(*tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """One 0-dim bool: every element of every given floating tensor is finite."""
    out = None
    for t in tensors:
        if t is None or not t.is_floating_point():
            continue
        f = _stats(t)[1]
        out = f if out is None else out & f.to(out.device)
    return out if out is not None else torch.tensor(True)


@functools.lru_cache(maxsize=None)
def fmax(dtype: str) -> float:
    """The largest finite value of a dtype named as the spec names it."""
    return float(torch.finfo(to_dtype(dtype)).max)


@functools.lru_cache(maxsize=256)
def _index_bound(y: str, axes: tuple, sizes: tuple) -> float:
    """max |y(b, h, i, j)| over the score grid, for an integer index expression (a bias's y),
    by interval arithmetic (torch.utils._sympy.value_ranges); inf when it cannot say."""
    from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

    from .predicate import parse
    e = parse(y)
    ranges = {}
    for s in e.free_symbols:
        if s.name in axes:
            n = sizes[axes.index(s.name)]
            ranges[s] = ValueRanges(0, max(n - 1, 0))
        elif s.name.startswith("n") and s.name[1:].isdigit() and int(s.name[1:]) < len(sizes):
            n = sizes[int(s.name[1:])]
            ranges[s] = ValueRanges(n, n)
        else:
            return math.inf
    try:
        vr = bound_sympy(e, ranges)
        lo, hi = float(vr.lower), float(vr.upper)
    except Exception:  # noqa: BLE001 - an expression interval arithmetic cannot bound
        return math.inf
    return max(abs(lo), abs(hi))


def score_bound(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor,
                captured: Sequence[torch.Tensor], upto: Optional[int] = None,
                tight: bool = True, stats=None) -> torch.Tensor:
    """0-dim float64 tensor on q's device: a bound of |s| entering step ``upto`` (default: the
    last step) of the chain, for every element; inf when no finite bound is known.

    |q_i . k_j| <= ||q_i||_1 * max|k| (``tight``; one more pass over q) <= d * max|q| * max|k|;
    the computed product adds at most d * 2^-24 relative (float32 accumulation) and one rounding
    to the product's dtype. Each step then moves the bound as its function does (|c| times for a
    scale, + max|x| for an added operand, 1 after tanh, max with |c| for a fill), times one
    rounding; a bound above the step dtype's largest value may have overflowed to inf and is inf.
    ``stats``: (max|q|, max|k|) when the caller has them."""
    ops = spec.score_ops if upto is None else spec.score_ops[:upto]
    if upto is None:
        ops = ops[:-1]
    dev = q.device
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=dev)
    qmax, kmax = stats if stats is not None else (_stats(q)[0], _stats(k)[0])
    d = q.shape[-1]
    if tight:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        qn = torch.linalg.vector_norm(q, 1, dim=-1, dtype=acc).amax().double()
    else:
        qn = qmax * d
    b = qn * kmax * (1.0 + d * 2.0 ** -22) * _STEP
    inf = torch.tensor(math.inf, dtype=torch.float64, device=dev)
    b = torch.where(b > fmax(spec.qk_dtype), inf, b)
    score_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
    for op in ops:
        b = _step_bound(spec, op, b, captured, score_shape)
        b = torch.where(b * _STEP > fmax(op.dtype), inf, b * _STEP)
    return torch.where(torch.isnan(b), inf, b)


def _operand_max(spec: AttentionSpec, op: ScoreOp, captured, score_shape):
    """max |x| of a step's operand (a float or a 0-dim tensor)."""
    if op.operand == "const":
        return abs(op.value)
    if op.operand in ("scalar", "tensor"):
        amax, fin = _stats(captured[op.index])
        return torch.where(fin, amax, math.inf)
    if op.operand == "predicate":
        m = spec.masks[op.index]
        return max(abs(_in_dtype(m.kept, m.dtype)), abs(_in_dtype(m.masked, m.dtype))) \
            if m.kind == "additive" else 1.0
    if op.operand == "bias":
        bi = spec.biases[op.index]
        if bi.y_data:
            return math.inf
        R = len(bi.axes)
        ymax = _index_bound(bi.y, tuple(bi.axes), tuple(int(n) for n in score_shape[-R:]))
        amax, fin = _stats(captured[bi.x])
        return torch.where(fin, amax, math.inf) * ymax
    return math.inf


def _step_bound(spec, op: ScoreOp, b, captured, score_shape):
    k = op.kind
    if k == "tanh":
        return torch.clamp(b, max=1.0)
    if k == "cast":
        return b
    if k == "fn":
        from .pointwise import magnitude_bound
        return magnitude_bound(op.fn, op.args, b)
    if k in ("fill", "fill_not"):
        return torch.clamp(b, min=abs(op.value))
    x = _operand_max(spec, op, captured, score_shape)
    if k == "mul":
        return b * x
    if k == "div":
        if op.operand == "const":
            return b / abs(op.value) if op.value else torch.full_like(b, math.inf)
        c = captured[op.index].double().abs().min()  # a 0-dim scalar or a tensor divisor
        return torch.where(c > 0, b / c, math.inf)
    if k in ("add", "sub", "rsub"):
        return b + x
    return torch.full_like(b, math.inf)


def _upper_max(t: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
    """max of an additive mask tensor over its elements with j > i (the keys a causal kernel
    skips), read in blocks of rows (never an N x N temporary)."""
    for d in range(t.dim()):  # expanded dims hold one value: read it once
        if t.stride(d) == 0 and t.shape[d] > 1:
            t = t.narrow(d, 0, 1)
    best = torch.full((), -math.inf, dtype=torch.float64, device=t.device)
    if t.dim() < 2 or t.shape[-2] == 1 or t.shape[-1] == 1:
        return torch.maximum(best, t.double().amax()) if t.numel() else best
    step = max(1, (1 << 20) // max(nk, 1))
    cols = torch.arange(nk, device=t.device)
    for r0 in range(0, nq, step):
        r1 = min(nq, r0 + step)
        upper = cols[None, :] > torch.arange(r0, r1, device=t.device)[:, None]
        if not bool(upper.any()):
            continue
        block = t[..., r0:r1, :]
        best = torch.maximum(best, torch.where(upper, block, -math.inf).double().amax())
    return best


def worst_masked(spec: AttentionSpec, r: Removal, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, captured: Sequence[torch.Tensor],
                 grad_out: Optional[torch.Tensor] = None, finite_scores: bool = False,
                 step: Optional[int] = None, stats=None) -> torch.Tensor:
    """0-dim float64 tensor on q's device: an upper bound of every element the kernel would skip
    in this call, or +inf when the call must not skip at all (an input not finite, an additive
    mask without a finite bound of |s|). ``finite_scores``: also require a finite bound of |s| for
    a replacing fill (for kernels whose max cannot see NaN scores: Triton's max ignores NaN).

    Cost: one aminmax pass over q, k, v (and dO); for an additive mask whose masked value does not
    dwarf the cheap bound d * max|q| * max|k| (a -1e4 mask, not finfo.min), one more pass over q
    for the tighter ||q_i||_1 (on CUDA always: deciding would need a host synchronisation)."""
    dev = q.device
    step = len(spec.score_ops) - 1 if step is None else step  # the masking step's position
    inf = torch.tensor(math.inf, dtype=torch.float64, device=dev)
    if stats is not None:  # (max|q|, q finite, max|k|, k finite, v and dO finite) from the caller
        qmax, qfin, kmax, kfin, vfin = stats
        ok = qfin & kfin & vfin
    else:
        qmax, qfin = _stats(q)
        kmax, kfin = _stats(k)
        ok = qfin & kfin & finite(v, grad_out).to(dev)
    if r.kind == REPLACE:
        w = torch.tensor(r.value, dtype=torch.float64, device=dev)
        if finite_scores:
            b = score_bound(spec, q, k, captured, upto=step, tight=False, stats=(qmax, kmax))
            ok = ok & torch.isfinite(b)
        return torch.where(ok, w, inf)
    if r.value is not None:
        m = torch.tensor(r.value, dtype=torch.float64, device=dev)
    else:
        nq, nk = q.shape[-2], k.shape[-2]
        m = _upper_max(captured[spec.score_ops[step].index], nq, nk).to(dev)
    b = score_bound(spec, q, k, captured, upto=step, tight=False, stats=(qmax, kmax))
    if dev.type != "cpu" or not bool((m.abs() * 2.0 ** -20 >= b) | torch.isneginf(m)):
        b = torch.minimum(b, score_bound(spec, q, k, captured, upto=step, tight=True, stats=(qmax, kmax)))
    # fl(s + M) <= M + B + (|M| + B) * 2^-7 (one rounding, bfloat16 at worst); with M = -inf and
    # a finite B the element is -inf exactly
    w = torch.where(torch.isneginf(m), m, m + b + (m.abs() + b) * 2.0 ** -7)
    good = ok & torch.isfinite(b) & ~torch.isnan(m) & ~torch.isposinf(m)
    return torch.where(good, w, inf)


# ---------------------------------------------------------------------------------------------
# Per row
# ---------------------------------------------------------------------------------------------

def threshold(worst, r: Removal):
    """The least row max that makes skipping exact on a row, from ``worst`` (a float, or a 0-dim
    tensor for callers that must not synchronise): worst + MARGIN plus rounding slack; -inf when
    nothing is skipped but -inf, +inf when nothing may be skipped."""
    if not isinstance(worst, torch.Tensor):
        w = float(worst)
        if math.isnan(w) or w == math.inf:
            return math.inf
        return -math.inf if w == -math.inf else w + r.margin + _REL * abs(w)
    thr = worst.double() + r.margin + _REL * worst.double().abs()
    thr = torch.where(torch.isneginf(worst), worst.double(), thr)
    return torch.where(torch.isnan(thr), math.inf, thr)


def rows_ok(m: torch.Tensor, worst, r: Removal) -> torch.Tensor:
    """Per row: skipping is exact, given ``m`` the row's max over the keys the kernel computes and
    ``worst`` from ``worst_masked``: m is finite and m - worst >= MARGIN (with slack for the
    rounding of m, worst and their difference)."""
    thr = threshold(worst, r)
    if isinstance(thr, torch.Tensor):
        m = m.double()
        thr = thr.to(m.device)
    return torch.isfinite(m) & _clears(m, thr)


def _clears(m, thr):
    """m - thr >= REL |m|: the row max clears the threshold with slack for rounding (tensors or
    Python numbers alike)."""
    return m - thr >= _REL * abs(m)


def _lse_floor(lse, nk: int):
    """A lower bound of the row max over the computed keys from a float32 lse (tensor or Python
    number): lse - log(Nk), less the lse's own rounding (2^-20 |lse| + 1e-3)."""
    return lse - math.log(max(nk, 1)) - (abs(lse) * 2.0 ** -20 + 1e-3)


def rows_ok_from_lse_min(lse_min: float, nk: int, worst: float, r: Removal) -> bool:
    """``rows_ok_from_lse`` for every row at once, from the least lse of the call (a Python
    number; the caller has checked that every lse is finite). The test is increasing in the lse:
    lo = lse - log(Nk) - (2^-20 |lse| + 1e-3) has slope 1 -+ 2^-20 > 0, and lo - thr - REL |lo|
    slope 1 -+ REL > 0, so it holds on every row exactly when it holds at the least lse (float64
    rounding of these few steps, ~1e-16 relative, is far inside the 2^-20 and REL slack both
    forms carry). One aminmax of the lse instead of a dozen elementwise ops over it."""
    lo = _lse_floor(lse_min, nk)
    return math.isfinite(lo) and _clears(lo, threshold(worst, r))


def rows_ok_from_lse(lse: torch.Tensor, nk: int, worst, r: Removal) -> torch.Tensor:
    """``rows_ok`` from a row's log-sum-exp instead of its max. Sound for the lse of any set L of
    the row's elements that contains the computed keys, each element of L either computed or
    skipped (so at most worst): lse <= max(L) + log(Nk), hence lse - log(Nk) - worst >= MARGIN
    > 0 gives max over the computed keys >= worst + MARGIN. The lse of a forward that skipped
    (ATen's is_causal) and of one that did not both qualify, so a backward deciding from the
    forward's lse never skips where that is not exact. lse is float32: its own rounding is
    covered by 2^-20 |lse| + 1e-3."""
    lse = lse.double()
    lo = _lse_floor(lse, nk)
    return rows_ok(torch.where(torch.isfinite(lse), lo, torch.full_like(lo, math.nan)), worst, r)
