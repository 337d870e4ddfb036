"""CPU fast path: ATen's fused flash-attention CPU kernel, for the specs it expresses exactly.

PyTorch ships an IO-aware, blocked, multi-threaded C++ flash-attention kernel for CPU
(``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward). It computes
``softmax(q @ k^T * scale + mask) @ v`` and never materialises the scores. When a spec is exactly
that function, we call it: it is 2-3x faster than tiles of ATen ops driven from Python
(benchmarks/RESULTS.md). Everything else (soft-capping, replacing fills, dropout, gradients of a
learnable bias, mixed dtypes) runs on the tiled implementation in ``cpu.py``.

"Exactly" is checked, not assumed:
* the score chain is scale steps (``* c``, ``/ c``, constants or 0-dim tensors) followed by at
  most one mask step: ``+ tensor`` (additive mask or bias) or a fill with -inf (a boolean mask);
* one dtype throughout (scores, softmax, probabilities and output: no casts, no promotion);
* no dropout; 2-D to 4-D operands with equal head dims for q, k and v;
* finite q, k, v (and dO in the backward), checked per call: ATen adds a -inf mask where eager
  replaces (NaN + -inf is NaN where masked_fill gives -inf) and skips what is_causal removes, so
  NaN and inf would propagate differently; such calls take the tiled implementation;
* rows whose mask removes every key with -inf: eager's softmax gives NaN there, ATen's kernel 0
  (and lse 0), so when such a row exists (checked on the mask) the call goes to the tiled path;
* ``is_causal`` (keys j > i never computed) only where the removal rule (``removal.py``) proves
  their probabilities are exactly 0: per call, finite inputs (and a bound of |s| for an additive
  mask); per row, checked on the lse ATen returns (``removal.rows_ok_from_lse``). When a row fails,
  the forward is recomputed by the tiled path; the backward decides from the lse it is given, by
  the same rule, so it never skips where that is not exact;
* the backward recomputes P = exp(s - lse) from the fp32 lse the forward saved: where |lse| is
  huge (a row whose every key carries finfo.min: lse = max + log(sum) loses log(sum) to rounding,
  and P = 1 instead of 1 / Nk), the backward takes the tiled path (``_LSE_LIMIT``).
Rounding differs from eager only in where the scale is applied (one fp32 rounding).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import sympy
import torch

from . import removal
from .predicate import as_operand, materialize, parse
from .spec import AttentionSpec, to_dtype

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
# float64 stays on the tiled path: our lse output is float32, too coarse for a float64 backward
_SAME_DTYPES = ("float32", "bfloat16", "float16")
# ATen's backward recomputes P = exp(s - lse) from the forward's fp32 lse, whose rounding is
# |lse| * 2^-24: at |lse| <= 2^13 that is <= 2^-11, the order of eager's own rounding of scores of
# that size; beyond it the lse is dominated by a huge mask value (finfo.min on every key of a row,
# where log(sum) is lost entirely and P = 1 instead of 1 / Nk) and the backward takes the tiled path
_LSE_LIMIT = 2.0 ** 13


@dataclass(frozen=True)
class Plan:
    """How a spec maps onto ATen's kernel: scale factors and the mask operand."""

    scales: tuple        # (kind, value-or-index, divide?) for each scale step, in order
    mask_index: Optional[int] = None
    mask_kind: str = ""  # "add": additive tensor; "fill": bool, masked where True; "fill_not": where
    # False; "pred_<kind>": the same with the mask given as spec.masks[mask_index] (a predicate)


@functools.lru_cache(maxsize=None)
def plan(spec: AttentionSpec) -> Optional[Plan]:
    dts = {spec.qk_dtype, spec.softmax_dtype, spec.prob_dtype, spec.out_dtype}
    dts |= {op.dtype for op in spec.score_ops}
    if len(dts) != 1 or spec.qk_dtype not in _SAME_DTYPES or spec.dropout_p:
        return None
    scales, mask_index, mask_kind = [], None, ""
    for op in spec.score_ops:
        if mask_index is not None:
            return None  # a step after the mask (e.g. scaling the mask) is not SDPA's function
        if op.kind in ("mul", "div") and op.operand in ("const", "scalar"):
            scales.append((op.operand, op.value if op.operand == "const" else op.index, op.kind == "div"))
        elif op.kind == "add" and op.operand in ("tensor", "predicate"):
            mask_index, mask_kind = op.index, "add"
        elif op.kind in ("fill", "fill_not") and op.value == -math.inf:
            mask_index, mask_kind = op.index, op.kind
        else:
            return None
        if op.operand == "predicate":
            mask_kind = "pred_" + mask_kind
    return Plan(tuple(scales), mask_index, mask_kind)


def _scale(p: Plan, captured: Sequence[torch.Tensor]) -> float:
    scale = 1.0
    for kind, x, divide in p.scales:
        value = x if kind == "const" else captured[x].item()
        scale = scale / value if divide else scale * value
    return scale


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _unexpand(t: torch.Tensor) -> torch.Tensor:
    """t without its expanded (stride 0) dims: same values under broadcasting, fewer elements."""
    for d in range(t.dim()):
        if t.stride(d) == 0 and t.shape[d] > 1:
            t = t.narrow(d, 0, 1)
    return t


def _mask(p: Plan, captured, dtype):
    """The attn_mask argument, and whether some row of it masks every key with -inf."""
    if p.mask_index is None:
        return None, False
    m = _as_4d(captured[p.mask_index])
    if p.mask_kind == "add":
        if m.dtype != dtype:
            return None, True  # a promoting mask: not this kernel's function
        # -inf on every key of a row: NaN in eager, 0 in ATen (the tiled path reproduces eager).
        # Rows of huge finite values (finfo.min on left padding) are exact in ATen's forward; its
        # backward checks the lse (_LSE_LIMIT).
        return m, bool(torch.isneginf(_unexpand(m).amax(-1)).any())
    if m.dtype != torch.bool:
        return None, True
    keep = ~m if p.mask_kind == "fill" else m
    if bool((~keep).all(-1).any()):
        return None, True
    # ATen's kernel takes a mask of the query's dtype: -inf where masked, 0 where kept (s + 0 == s
    # and s + -inf == -inf exactly, so this is the same function). Broadcast dims stay broadcast.
    keep = _unexpand(keep)
    return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, -math.inf), False


def _is_tril(c, i, j) -> bool:
    """c is exactly j <= i over the integers (in any of sympy's spellings)."""
    if not isinstance(c, sympy.core.relational.Relational) or not c.free_symbols <= {i, j}:
        return False
    d = sympy.expand(c.lhs - c.rhs)
    forms = {sympy.Le: d, sympy.Lt: d + 1, sympy.Ge: -d, sympy.Gt: -d + 1}
    for cls, le0 in forms.items():
        if type(c) is cls:
            return sympy.expand(le0 - (j - i)) == 0
    return False


_TRUE = sympy.srepr(sympy.true)


@functools.lru_cache(maxsize=None)
def _split_causal(m, fill: bool):
    """(causal, rest): keep (or not keep, for a fill) = (j <= i if causal) & rest; rest is a bool
    MaskSpec, or None when it depends on both i and j (then ATen's kernel would need an N x N
    tensor). Symbolic work, done once per mask."""
    keep = parse(m.keep)
    if fill:
        keep = sympy.Not(keep)
    names = {s.name: s for s in keep.free_symbols}
    i, j = names.get(m.axes[-2]), names.get(m.axes[-1])
    parts = sympy.And.make_args(keep)
    causal = i is not None and j is not None and any(_is_tril(c, i, j) for c in parts)
    if causal:
        parts = [c for c in parts if not _is_tril(c, i, j)]
    rest = sympy.And(*parts)
    if i is not None and j is not None and i in rest.free_symbols and j in rest.free_symbols:
        return causal, None  # e.g. a sliding window: the tiled path skips its empty tiles instead
    return causal, dataclasses.replace(m, keep=sympy.srepr(rest), text=str(rest), kind="bool")


def _predicate_mask(p: Plan, spec: AttentionSpec, captured, q, k):
    """(attn_mask, is_causal, has_empty_rows) for a predicate mask, or None when ATen's kernel
    cannot take it without an N x N tensor. keep = (j <= i) & rest: the causal part becomes
    ``is_causal`` (Nq == Nk only: top-left and bottom-right alignment agree there), the rest is
    materialised when it does not depend on both i and j (a (B, 1, 1, Nk) padding mask)."""
    m = spec.masks[p.mask_index]
    causal, rest_spec = _split_causal(m, p.mask_kind == "pred_fill")
    if rest_spec is None or causal and q.shape[-2] != k.shape[-2]:
        return None
    if rest_spec.keep == _TRUE:  # keep is exactly the causal part: no mask at all
        return None, causal, False
    score_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
    rest_keep = _as_4d(materialize(rest_spec, score_shape, [captured[d] for d in m.data]))
    if causal:  # row i keeps key 0 under the causal part: a row is empty only if rest drops it
        empty = bool((~rest_keep[..., 0]).any())
    else:
        empty = bool((~rest_keep.any(-1)).any())
    if bool(rest_keep.all()):
        return None, causal, False
    if p.mask_kind == "pred_add":
        if to_dtype(m.dtype) != q.dtype:
            return None
        mask = as_operand(m, rest_keep)
    else:
        mask = torch.zeros(rest_keep.shape, dtype=q.dtype).masked_fill_(~rest_keep, -math.inf)
    return mask, causal, empty


@dataclass(frozen=True)
class Call:
    """How one call runs on ATen's kernel: its scale and attn_mask, whether it uses is_causal, and
    (with is_causal) the removal step and the bound of the elements is_causal drops."""

    scale: float
    mask: Optional[torch.Tensor]
    causal: bool = False
    removal: Optional[removal.Removal] = None
    worst: float = math.inf


def _on_one_thread(fn):
    """Run ``fn`` (the per-call checks: O(N d) reductions over q, k, v, dO and the lse, a
    (B, 1, 1, N) mask) with one intra-op thread, then restore the caller's count. Each check is a
    separate small parallel region: with two threads and the other core busy (any other process),
    the thread that finishes first spin-waits at the region's barrier on the core its partner
    needs, so every region costs a scheduler time slice: ``aminmax`` of a 3 MiB q took 8 ms with
    2 threads against 0.08 ms with 1 (measured here, load average 2), and the checks of one call
    ~25 ms, more than half of ATen's flash kernel at N = 1024. On one thread they cost ~0.1-0.3 ms
    on a quiet machine too. (``set_num_threads`` is per calling thread under OpenMP, ~0.3 us.)"""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        n = torch.get_num_threads()
        if n == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)
    return run


@_on_one_thread
def usable(spec: AttentionSpec, q, k, v, captured, grad_out=None) -> Optional[Call]:
    """How ATen's kernel computes this call exactly as eager would, before running it (the rows'
    part of the removal rule is checked on its lse afterwards: ``rows_ok``); None: not at all."""
    p = plan(spec)
    if p is None or not (2 <= q.dim() <= 4) or q.device.type != "cpu":
        return None
    if q.shape[-1] != v.shape[-1] or q.shape[-2] == 0 or k.shape[-2] == 0:
        return None
    if any(t.dtype != q.dtype for t in (k, v)) or str(q.dtype).replace("torch.", "") != spec.qk_dtype:
        return None
    if not bool(removal.finite(*(_memory_order(t) for t in (q, k, v, grad_out)))):
        return None  # NaN / inf: the tiled path applies the model's steps as eager does
    if p.mask_kind.startswith("pred_"):
        got = _predicate_mask(p, spec, captured, q, k)
        if got is None or got[2]:
            return None
        mask, causal = got[0], got[1]
        if causal:
            r, worst = _causal_facts(spec, q, k, v, captured, grad_out)
            if r is None:
                return None  # the predicate's causal part must then be a dense mask: tiled path
            return Call(_scale(p, captured), mask, True, r, worst)
        return Call(_scale(p, captured), mask)
    mask, has_empty_rows = _mask(p, captured, q.dtype)
    if has_empty_rows:
        return None
    if p.mask_kind in ("fill", "fill_not") and not _scores_finite(spec, q, k, captured):
        return None  # ATen adds the -inf where eager replaces: the same only for finite scores
    # spec.causal: the mask keeps no element above the diagonal (proven by the pass), so ATen's
    # is_causal removes only masked elements; whether that is exact is the removal rule's question
    if spec.causal and mask is not None and q.shape[-2] <= k.shape[-2]:
        r, worst = _causal_facts(spec, q, k, v, captured, grad_out)
        if r is not None:
            return Call(_scale(p, captured), mask, True, r, worst)
    return Call(_scale(p, captured), mask)


def _memory_order(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t with its dims permuted into memory order (strides decreasing): the same elements, so a
    reduction over all of them (the finiteness check's ``aminmax``) reads it in place, where a
    head-transposed q/k/v view ((B, N, H, D) memory seen as (B, H, N, D)) made ``aminmax`` copy
    the whole tensor first (~0.2 ms per operand at N = 1024, d = 384, on every call)."""
    if t is None or t.is_contiguous():
        return t
    return t.permute(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d])))


def _scores_finite(spec: AttentionSpec, q, k, captured) -> bool:
    return math.isfinite(float(removal.score_bound(spec, q, k, captured, tight=False).item()))


def _causal_facts(spec: AttentionSpec, q, k, v, captured, grad_out):
    """(removal, worst) when the call may drop the keys j > i, else (None, inf)."""
    r = removal.causal_removal(spec)
    if r is None:
        return None, math.inf
    worst = float(removal.worst_masked(spec, r, q, k, v, captured, grad_out).item())
    return (r, worst) if worst < math.inf else (None, math.inf)


@_on_one_thread
def rows_ok(call: Call, lse: torch.Tensor, nk: int, backward: bool = False) -> bool:
    """The per-row half of the rules, on the lse of this call's forward: every row has a finite lse;
    with is_causal, every row's dropped keys have probability exactly 0
    (``removal.rows_ok_from_lse``); in the backward, |lse| <= _LSE_LIMIT."""
    if lse.numel() == 0:
        return True
    ok = torch.isfinite(lse)
    if backward:
        ok &= lse.abs() <= _LSE_LIMIT
    if call.causal:
        ok &= removal.rows_ok_from_lse(lse, nk, call.worst, call.removal)
    return bool(ok.all())


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """ATen's CPU flash kernel indexes the head dim as if its stride were 1 (SDPA checks it and
    otherwise takes its math path): a K stored transposed (``kt.transpose(-2, -1)``, strides
    (..., 1, N)) gave wrong results. Such an operand is copied, O(N * d), never O(N^2)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def forward(q, k, v, scale, mask, causal=False):
    shape = q.shape
    q4, k4, v4 = (_as_4d(_unit_last(t)) for t in (q, k, v))
    out, lse = _FLASH(q4, k4, v4, 0.0, causal, attn_mask=mask, scale=scale)
    return out.reshape(shape[:-1] + (v.shape[-1],)), lse.reshape(shape[:-1]).float()


def backward(grad_out, q, k, v, out, lse, scale, mask, causal=False):
    q4 = _as_4d(_unit_last(q))
    dq, dk, dv = _FLASH_BWD(_as_4d(_unit_last(grad_out.to(q.dtype))), q4, _as_4d(_unit_last(k)),
                            _as_4d(_unit_last(v)), _as_4d(_unit_last(out)),
                            lse.reshape(q4.shape[:-1]), 0.0, causal, attn_mask=mask, scale=scale)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
