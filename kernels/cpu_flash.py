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
* rows whose mask removes every key (-inf, or a huge negative value such as finfo.min on every
  key): eager's softmax gives NaN or a uniform row there, ATen's kernel gives 0 or (through an lse
  that lost its log-sum to rounding) wrong gradients, so when such a row exists (checked on the
  mask at run time, reading it once) the call goes to the tiled implementation, which reproduces
  eager.
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

from .predicate import as_operand, materialize, parse
from .spec import AttentionSpec, to_dtype

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
# float64 stays on the tiled path: our lse output is float32, too coarse for a float64 backward
_SAME_DTYPES = ("float32", "bfloat16", "float16")
# mask values at or below this mask a key for any score a model produces; a row of only such keys
# is "fully masked" (its lse would be dominated by the mask: see _mask)
_HUGE_NEGATIVE = -1e4


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
    """The attn_mask argument, and whether some row of it masks every key."""
    if p.mask_index is None:
        return None, False
    m = _as_4d(captured[p.mask_index])
    if p.mask_kind == "add":
        if m.dtype != dtype:
            return None, True  # a promoting mask: not this kernel's function
        # A row whose every key carries a huge negative mask (HF's finfo.min on left padding) has
        # its row max there; ATen saves lse = max + log(sum) in the input dtype, where log(sum)
        # rounds away next to ~1e38, and its backward then recomputes P = 1 instead of 1 / Nk
        # (gradients Nk times eager's). -inf rows give NaN in eager and 0 in ATen. Both kinds of
        # row go to the tiled path, which recomputes the softmax exactly.
        return m, bool((_unexpand(m).amax(-1) <= _HUGE_NEGATIVE).any())
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


def usable(spec: AttentionSpec, q, k, v, captured) -> Optional[tuple]:
    """(scale, attn_mask, is_causal) when ATen's kernel computes this call exactly as eager would."""
    p = plan(spec)
    if p is None or not (2 <= q.dim() <= 4) or q.device.type != "cpu":
        return None
    if q.shape[-1] != v.shape[-1] or q.shape[-2] == 0 or k.shape[-2] == 0:
        return None
    if any(t.dtype != q.dtype for t in (k, v)) or str(q.dtype).replace("torch.", "") != spec.qk_dtype:
        return None
    if p.mask_kind.startswith("pred_"):
        got = _predicate_mask(p, spec, captured, q, k)
        if got is None or got[2]:
            return None
        return _scale(p, captured), got[0], got[1]
    mask, has_empty_rows = _mask(p, captured, q.dtype)
    if has_empty_rows:
        return None
    # spec.causal: the mask keeps no element above the diagonal (proven by the pass), so ATen's
    # is_causal, which skips those tiles, removes only elements the mask removes; every row here
    # keeps a key (checked above), so their exp underflows to exactly 0 either way
    causal = spec.causal and mask is not None and q.shape[-2] <= k.shape[-2]
    return _scale(p, captured), mask, causal


def forward(q, k, v, scale, mask, causal=False):
    shape = q.shape
    out, lse = _FLASH(_as_4d(q), _as_4d(k), _as_4d(v), 0.0, causal, attn_mask=mask, scale=scale)
    return out.reshape(shape[:-1] + (v.shape[-1],)), lse.reshape(shape[:-1]).float()


def backward(grad_out, q, k, v, out, lse, scale, mask, causal=False):
    q4 = _as_4d(q)
    dq, dk, dv = _FLASH_BWD(_as_4d(grad_out).to(q.dtype), q4, _as_4d(k), _as_4d(v), _as_4d(out),
                            lse.reshape(q4.shape[:-1]), 0.0, causal, attn_mask=mask, scale=scale)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
