"""CPU fast path: ATen's fused flash-attention CPU kernel, for the specs it expresses exactly.

PyTorch ships an IO-aware, blocked, multi-threaded C++ flash-attention kernel for CPU
(``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward). It computes
``softmax(q @ k^T * scale + mask) @ v`` and never materialises the scores. When a spec is exactly
that function, we call it: it is 2-3x faster than tiles of ATen ops driven from Python
(benchmarks/RESULTS.md). Everything else (soft-capping, fills the removal rule does not clear,
dropout, gradients of a learnable bias, mixed dtypes) runs on the tiled implementation in ``cpu.py``.

"Exactly" is checked, not assumed:
* the score chain, normalised (``plan``: casts to the chain's one dtype dropped), is scale steps
  (``* c``, ``/ c``, constants or 0-dim tensors) followed by at most one mask step: ``+ tensor``
  (additive mask or bias), or a replacing fill (a boolean mask, a predicate) with -inf or a
  finite value (finfo.min, -1e9, -1e4): ATen gets a -inf mask or ``is_causal`` for it, so a finite
  fill's keys are dropped, which is exact only where the removal rule proves it (per call: finite
  inputs and scores; per row on the lse: ``rows_ok``), else the tiled path recomputes;
* masks: a predicate's ``j <= i`` part becomes ``is_causal``, a part depending on one index a
  (B, 1, 1, N) mask; a mask tensor or a data matrix read in place (GPT-2's sliced ``tril`` buffer)
  is ``is_causal`` when the call's values are exactly ``j <= i`` (checked per call, never cached:
  they are data), a small matrix (decoding) a -inf mask; ATen's top-left alignment is checked once
  per process (``_causal_top_left``), so Nq != Nk is routed too;
* one dtype throughout (scores, softmax, probabilities and output: no casts, no promotion);
* no dropout; 2-D to 4-D operands with equal head dims for q, k and v;
* finite q, k, v (and dO in the backward), checked per call: ATen adds a -inf mask where eager
  replaces (NaN + -inf is NaN where masked_fill gives -inf) and skips what is_causal removes, so
  NaN and inf would propagate differently; such calls take the tiled implementation;
* rows whose mask removes every key with -inf: eager's softmax gives NaN there, ATen's kernel 0
  (and lse 0), so when such a row exists (checked on the mask) the call goes to the tiled path,
  except for sites that were SDPA calls (``spec.safe_softmax``: 0 there too, ``_empty_rows_zero``);
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
import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import sympy
import torch

from . import predicate, removal
from .cpu import _threads_for_share
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
    """A spec normalised to ATen's function ``softmax(s * scale + attn_mask) @ v``: its scale steps,
    the step that masks and how, and that step's removal (computed once per spec, cached).

    Normalisation: casts to the one dtype the chain has are identities and dropped; a replacing
    fill (``masked_fill`` / ``where``) becomes a -inf mask (or ``is_causal``) whatever its value
    (-inf, finfo.min, -1e9, -1e4): with -inf that is exact for finite scores, with a finite fill
    only where the removal rule (``removal.py``) proves the masked keys' probabilities are exactly
    0, per call and per row (``drops``)."""

    scales: tuple        # (kind, value-or-index, divide?) for each scale step, in order
    mask_index: Optional[int] = None
    mask_kind: str = ""  # "add": additive tensor; "fill": bool, masked where True; "fill_not": where
    # False; "pred_<kind>": the same with the mask given as spec.masks[mask_index] (a predicate)
    step: Optional[int] = None               # the masking step's position in spec.score_ops
    removal: Optional[removal.Removal] = None  # what the masking step's masked elements are

    @property
    def fill(self) -> Optional[float]:
        """A replacing fill's value as its step's dtype holds it (None: additive)."""
        return self.removal.value if self.mask_kind.endswith("fill") or \
            self.mask_kind.endswith("fill_not") else None

    @property
    def finite_fill(self) -> bool:
        return self.fill is not None and self.fill != -math.inf


@functools.lru_cache(maxsize=None)
def plan(spec: AttentionSpec) -> Optional[Plan]:
    dts = {spec.qk_dtype, spec.softmax_dtype, spec.prob_dtype, spec.out_dtype}
    dts |= {op.dtype for op in spec.score_ops}
    if len(dts) != 1 or spec.qk_dtype not in _SAME_DTYPES or spec.dropout_p:
        return None
    scales, step = [], None
    for n, op in enumerate(spec.score_ops):
        if op.kind == "cast":
            continue  # one dtype throughout (checked above): a cast to it changes nothing
        if step is not None:
            return None  # a step after the mask (e.g. scaling the mask) is not SDPA's function
        if op.kind in ("mul", "div") and op.operand in ("const", "scalar"):
            scales.append((op.operand, op.value if op.operand == "const" else op.index, op.kind == "div"))
        elif op.kind == "add" and op.operand in ("tensor", "predicate") or \
                op.kind in ("fill", "fill_not") and removal.recorded(op.value):
            step = n
        else:
            return None
    if step is None:
        return Plan(tuple(scales))
    op = spec.score_ops[step]
    kind = op.kind
    r = removal.step_removal(spec, op)
    if kind != "add" and r is None:
        return None  # a fill whose masked value the removal rule cannot name
    if op.operand == "predicate":
        kind = "pred_" + kind
    return Plan(tuple(scales), op.index, kind, step, r)


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


@functools.lru_cache(maxsize=2)
def _lower(nq: int, nk: int) -> torch.Tensor:
    """The bool (nq, nk) matrix j <= i, kept for the next call of the same lengths (nq * nk bytes)."""
    return torch.ones(nq, nk, dtype=torch.bool).tril_()


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """A bool matrix read as int64 words (8 keys at a time) when its layout allows, else itself."""
    if t.dtype == torch.bool and t.stride(-1) == 1 and t.shape[-1] % 8 == 0 and \
            t.stride(-2) % 8 == 0 and t.storage_offset() % 8 == 0 and t.data_ptr() % 8 == 0:
        return t.view(torch.int64)
    return t


def _keeps_lower(keep: torch.Tensor, nq: int, nk: int) -> bool:
    """keep[..., i, j] == (j <= i) for every element of the (nq, nk) scores (broadcast rows or
    keys never qualify, unless there is one of them): the mask is exactly ATen's ``is_causal``
    (top-left aligned, ``_causal_top_left``). A per-call check of the data, O(Nq Nk / 8) word
    compares: a mask tensor's values are data, so no cache of an earlier answer is a proof."""
    keep = _unexpand(keep)
    if keep.dim() < 2 or keep.dtype != torch.bool or tuple(keep.shape[-2:]) != (nq, nk):
        return False
    ref = _as_words(_lower(nq, nk))
    for idx in itertools.product(*(range(n) for n in keep.shape[:-2])):
        got = _as_words(keep[idx])
        if got.dtype != ref.dtype:
            got, want = keep[idx], _lower(nq, nk)
        else:
            want = ref
        if not torch.equal(got, want):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _causal_top_left() -> bool:
    """ATen's CPU flash kernel with ``is_causal`` drops keys j > i (top-left alignment) also when
    Nq != Nk: checked once per process on this torch against an explicit -inf mask (its source,
    ``FlashAttentionKernel.cpp``, masks ``col > row`` of the block grid). Where it did not hold,
    ``is_causal`` is used only for Nq == Nk (both alignments agree there)."""
    g = torch.Generator().manual_seed(0)
    for nq, nk in ((3, 7), (7, 3), (33, 70), (70, 33)):
        q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (nq, nk, nk))
        mask = torch.zeros(nq, nk).masked_fill_(~_lower(nq, nk).clone(), -math.inf)[None, None]
        out, _ = _FLASH(q, k, v, 0.0, True, scale=0.5)
        ref, _ = _FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=0.5)
        if not torch.allclose(out, ref, atol=1e-6, rtol=1e-5):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _empty_rows_zero() -> bool:
    """ATen's CPU flash kernel gives a row whose every key is masked (-inf) output 0 and, in its
    backward, gradient 0 (and no contribution to dk, dv): SDPA's safe softmax (``spec.safe_softmax``),
    so such rows need no tiled recompute for sites that were SDPA calls. Checked once per process
    on this torch against the safe softmax's definition."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 19, 8, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 1, 19)
    mask[..., :5] = -math.inf
    out, lse = _FLASH(q, k, v, 0.0, True, attn_mask=mask, scale=0.5)
    do = torch.randn(out.shape, generator=g)
    dq, dk, dv = _FLASH_BWD(do, q, k, v, out, lse, 0.0, True, attn_mask=mask, scale=0.5)
    keep = torch.ones(19, 19, dtype=torch.bool).tril_() & (torch.arange(19) >= 5)
    # products as sums (not matmul: a profile of the first call would read it as the tiled path)
    s = (q.double()[..., :, None, :] * k.double()[..., None, :, :]).sum(-1) * 0.5
    p = torch.softmax(s.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0)  # safe: empty rows 0
    ref = (p[..., :, :, None] * v.double()[..., None, :, :]).sum(-2)
    dv_ref = (p[..., :, :, None] * do.double()[..., :, None, :]).sum(-3)
    return bool(out[..., :5, :].eq(0).all() and dq[..., :5, :].eq(0).all()
                and torch.allclose(out.double(), ref, atol=1e-5)
                and torch.allclose(dv.double(), dv_ref, atol=1e-4))


def _mask(p: Plan, captured, q, k):
    """(attn_mask, is_causal), whether some row keeps no key, for a mask tensor; None: the mask is
    not this kernel's function."""
    m = _as_4d(captured[p.mask_index])
    dtype = q.dtype
    if p.mask_kind == "add":
        if m.dtype != dtype:
            return None  # a promoting mask: not this kernel's function
        # -inf on every key of a row: NaN in eager, 0 in ATen (the tiled path reproduces eager).
        # Rows of huge finite values (finfo.min on left padding) are exact in ATen's forward; its
        # backward checks the lse (_LSE_LIMIT).
        return (m, False), bool(torch.isneginf(_unexpand(m).amax(-1)).any())
    if m.dtype != torch.bool:
        return None
    keep = ~m if p.mask_kind == "fill" else m
    if _keeps_lower(keep, q.shape[-2], k.shape[-2]) and _causal_ok(q, k):
        return (None, True), False  # every row keeps key 0
    keep = _unexpand(keep)
    if bool(keep.all()):
        return (None, False), False  # nothing masked (a decoding row against its cache)
    empty = bool((~keep).all(-1).any())
    # ATen's kernel takes a mask of the query's dtype: -inf where masked, 0 where kept (s + 0 == s
    # and s + -inf == -inf exactly, so this is the same function). Broadcast dims stay broadcast.
    return (torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, -math.inf), False), empty


def _causal_ok(q, k) -> bool:
    return q.shape[-2] == k.shape[-2] or _causal_top_left()


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
    tensor). A mask its spec describes whole reads the split off its band (``band_split``):
    causal when the band is exactly j - i <= 0. Symbolic work, done once per mask."""
    split = predicate.band_split(m, fill)
    # a fill's mask whose negation normalises to other conjuncts ((j > i) | pad) keeps the split it
    # always had, from the negation as sympy leaves it (reading the band would route it to ATen:
    # a change of behaviour, left to a change of its own)
    if split is not None and predicate.kept_expr(m, fill) == _keep_expr(m, fill):
        (lo, hi), inside, rest = split
        if inside and not (lo is None and hi == 0 and len(inside) == 1):
            return False, None  # a window, an offset, or a band in several conjuncts
        return bool(inside), predicate.conjunct_mask(m, sympy.And(*rest))
    # not classified, or conjuncts the spec does not carry: from the expression
    keep = _keep_expr(m, fill)
    names = {s.name: s for s in keep.free_symbols}
    i, j = names.get(m.axes[-2]), names.get(m.axes[-1])
    parts = sympy.And.make_args(keep)
    causal = i is not None and j is not None and any(_is_tril(c, i, j) for c in parts)
    if causal:
        parts = [c for c in parts if not _is_tril(c, i, j)]
    rest = sympy.And(*parts)
    if i is not None and j is not None and i in rest.free_symbols and j in rest.free_symbols:
        return causal, None  # e.g. a sliding window: the tiled path skips its empty tiles instead
    return causal, predicate.conjunct_mask(m, rest)


def _keep_expr(m, fill: bool):
    keep = parse(m.keep)
    return sympy.Not(keep) if fill else keep


@functools.lru_cache(maxsize=None)
def _data_matrix(m, fill: bool):
    """(data position, leading indices, (row, key) offsets, nonzero?) when keep is exactly
    ``d(c.., i + a, j + b) != 0`` (or ``== 0``): a data tensor read at constant leading indices and
    the score's own (i, j) plus constant offsets, as GPT-2's sliced ``tril`` buffer is (the offsets:
    a slice the pass folded into the index). Then keep is a view of the data (no gather), checked per call by
    ``_keeps_lower``. None for any other form."""
    keep = _keep_expr(m, fill)
    if not isinstance(keep, (sympy.Ne, sympy.Eq)) or keep.rhs != 0 or not m.axes:
        return None
    f = keep.lhs
    name = str(getattr(f, "func", ""))
    if not (name.startswith("d") and name[1:].isdigit() and int(name[1:]) < len(m.data)):
        return None
    *lead, i, j = f.args if len(f.args) >= 2 else (None, None)
    names = {s.name: s for s in keep.free_symbols}
    offsets = []
    for arg, axis in ((i, m.axes[-2]), (j, m.axes[-1])):
        sym = names.get(axis)
        off = sympy.expand(arg - sym) if sym is not None and arg is not None else None
        if off is None or not isinstance(off, sympy.Integer) or int(off) < 0:
            return None  # the score's own index plus a constant offset (a slice the pass folded)
        offsets.append(int(off))
    if not all(isinstance(c, sympy.Integer) and int(c) >= 0 for c in lead):
        return None
    return m.data[int(name[1:])], tuple(int(c) for c in lead), tuple(offsets), isinstance(keep, sympy.Ne)


def _data_keep(m, fill: bool, captured, nq: int, nk: int) -> Optional[torch.Tensor]:
    """keep as a (nq, nk) bool tensor read from the data tensor in place (``_data_matrix``)."""
    form = _data_matrix(m, fill)
    if form is None:
        return None
    pos, lead, (oi, oj), nonzero = form
    t = captured[pos]
    if t.dim() != len(lead) + 2 or any(c >= n for c, n in zip(lead, t.shape)) or \
            t.shape[-2] < oi + nq or t.shape[-1] < oj + nk:
        return None  # eager's indexing would fail or wrap: the tiled path reports it as eager does
    t = t[lead][oi:oi + nq, oj:oj + nk]
    if t.dtype == torch.bool:
        return t if nonzero else ~t
    return t != 0 if nonzero else t == 0


def mask_form(spec: AttentionSpec, p: Plan) -> Optional[str]:
    """How ATen's kernel takes the plan's mask, in words (the report's); None: it never can (a
    predicate depending on both i and j beyond j <= i, e.g. a sliding window). Static."""
    if p.mask_index is None:
        return ""
    if p.mask_kind.startswith("pred_"):
        m = spec.masks[p.mask_index]
        fill = p.mask_kind == "pred_fill"
        causal, rest = _split_causal(m, fill)
        if rest is None:
            return ("is_causal when the call's data matrix is exactly j <= i (checked per call), "
                    "a -inf mask when it is no larger than q or k (decoding)"
                    if _data_matrix(m, fill) is not None else None)
        if rest.keep == _TRUE:
            return "is_causal" if causal else ""
        return ("is_causal and " if causal else "") + \
            f"a mask of the part that depends on one index ({rest.text}), built per call"
    if p.mask_kind == "add":
        return "the mask tensor as attn_mask" + (", and is_causal (proven)" if spec.causal else "")
    return "is_causal when the call's mask is exactly j <= i (checked per call), else a -inf mask"


def _predicate_mask(p: Plan, spec: AttentionSpec, captured, q, k):
    """((attn_mask, is_causal), has_empty_rows) for a predicate mask, or None when ATen's kernel
    cannot take it without an N x N tensor. keep = (j <= i) & rest: the causal part becomes
    ``is_causal``, the rest is materialised when it does not depend on both i and j (a
    (B, 1, 1, Nk) padding mask). A keep read straight from a data matrix (GPT-2's buffer) is
    ``is_causal`` when this call's data is exactly j <= i (``_keeps_lower``)."""
    m = spec.masks[p.mask_index]
    fill = p.mask_kind == "pred_fill"
    causal, rest_spec = _split_causal(m, fill)
    nq, nk = q.shape[-2], k.shape[-2]
    if rest_spec is None:
        keep = _data_keep(m, fill, captured, nq, nk)
        if keep is None:
            return None
        if _keeps_lower(keep, nq, nk) and _causal_ok(q, k):
            return (None, True), False
        if keep.numel() > max(q.numel(), k.numel()):
            # a dense mask larger than q and k (a prefill's N x N): the tiled path reads the data
            # in tiles rather than this call building an N x N tensor
            return None
        # a small matrix (GPT-2 decoding: a few rows against the cache, bottom-right slice): as a
        # -inf mask, all ones as none
        if bool(keep.all()):
            return (None, False), False
        mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill_(~keep, -math.inf)
        return (mask[None, None], False), bool((~keep).all(-1).any())
    if causal and not _causal_ok(q, k):
        return None
    if rest_spec.keep == _TRUE:  # keep is exactly the causal part: no mask at all
        return (None, causal), False
    score_shape = tuple(q.shape[:-1]) + (nk,)
    rest_keep = _as_4d(materialize(rest_spec, score_shape, [captured[d] for d in m.data]))
    if causal:  # row i keeps key 0 under the causal part: a row is empty only if rest drops it
        empty = bool((~rest_keep[..., 0]).any())
    else:
        empty = bool((~rest_keep.any(-1)).any())
    if bool(rest_keep.all()):
        return (None, causal), empty
    if p.mask_kind == "pred_add":
        if to_dtype(m.dtype) != q.dtype:
            return None
        mask = as_operand(m, rest_keep)
    else:
        mask = torch.zeros(rest_keep.shape, dtype=q.dtype).masked_fill_(~rest_keep, -math.inf)
    return (mask, causal), empty


@dataclass(frozen=True)
class Call:
    """How one call runs on ATen's kernel: its scale and attn_mask, whether it uses is_causal, and
    (when it drops elements eager weighs: keys j > i with is_causal, or a finite fill turned into
    -inf) the removal step and the bound of the elements it drops."""

    scale: float
    mask: Optional[torch.Tensor]
    causal: bool = False
    removal: Optional[removal.Removal] = None
    worst: float = math.inf
    # 16-bit chains: every row's |lse| at most half the dtype's largest value (``usable``)
    lse_limit: float = math.inf
    # a bound of |score| at every step of the model's chain and of ATen's own scaled scores
    # (``_cheap_bound``); inf: none known before the kernel runs
    bound: float = math.inf
    nk: Optional[int] = None  # the call's key count (``rows_certain``'s log Nk)

    @property
    def rows_certain(self) -> bool:
        """``rows_ok`` holds before the kernel runs, for any q, k, v ``usable`` accepted. No
        attn_mask, so each row computes key 0 (``is_causal`` is top-left, ``_causal_ok``) or every
        key; q and k are finite and every score, eager's and ATen's, lies in [-bound, bound]
        (``usable`` checked both). So each row's computed max is >= -bound and its lse, between
        that max and the max + log Nk, is finite; where the call drops elements, that max clears
        the removal threshold when -bound does (the test is increasing in the max,
        ``removal._clears``); and the lse limit holds when bound + log Nk (with the lse's float32
        rounding) is under it. The per-row test then has nothing left to find (it cost one pass
        over the lse right after the kernel, ~0.1 ms at N = 1024). A replacing fill is the only
        removal decided here: an additive mask's dropped elements come with an attn_mask."""
        if self.mask is not None:
            return False
        if not self.causal and self.removal is None and self.lse_limit == math.inf:
            return True  # no mask, nothing dropped: finite scores give a finite lse
        b = self.bound
        if not math.isfinite(b) or self.nk is None:
            return False
        if self.removal is not None and not (
                self.removal.kind == removal.REPLACE
                and removal._clears(-b, removal.threshold(self.worst, self.removal))):
            return False
        return (b + math.log(self.nk)) * (1 + 2.0 ** -20) + 1e-3 <= self.lse_limit


# The per-call checks (O(N d) reductions over q, k, v, dO and the lse, a (B, 1, 1, N) mask, a
# data matrix's compare) run on one intra-op thread while other processes keep the cores busy
# (``cpu._SHARE``, as the tiled path decides). Each check is a separate small parallel region:
# with two threads and the other core busy, the thread that finishes first spin-waits at the
# region's barrier on the core its partner needs, so every region costs a scheduler time slice:
# ``aminmax`` of a 3 MiB q took 8 ms with 2 threads against 0.08 ms with 1 (measured here, load
# average 2), and the checks of one call ~25 ms, more than half of ATen's flash kernel at
# N = 1024. On a quiet machine two threads read faster: right after the previous call's kernel
# (cold caches) aminmax of a 3 MiB q took 172 us on 2 threads against 235 on 1, and GPT-2's
# 1024 x 1024 buffer compare 330 against 624. (``set_num_threads`` is per calling thread under
# OpenMP, ~0.3 us.) Hence the tiled path's decorator, ``cpu._threads_for_share``, on ``usable``
# and ``rows_ok``.


@_threads_for_share
def usable(spec: AttentionSpec, q, k, v, captured, grad_out=None) -> Optional[Call]:
    """How ATen's kernel computes this call exactly as eager would, before running it (the rows'
    part of the removal rule is checked on its lse afterwards: ``rows_ok``); None: not at all.

    A 16-bit chain adds its mask to the scores in that dtype, where s + M past the largest value
    is +-inf, and ATen's kernel adds them in float32: a row whose |lse| stays below half the
    largest value has no element past it on the positive side (lse >= every element), and its
    elements past it on the negative side have probability exactly 0 in both (their distance to
    the row max exceeds float32's exp range), so such rows are eager's (``lse_limit``, checked by
    ``rows_ok``); a fully masked row under finfo.min (left padding) is not, and is recomputed."""
    call = _usable(spec, q, k, v, captured, grad_out)
    if call is not None and q.dtype in (torch.float16, torch.bfloat16):
        call = dataclasses.replace(call, lse_limit=removal.fmax(spec.qk_dtype) / 2)
    return call


def _usable(spec: AttentionSpec, q, k, v, captured, grad_out=None) -> Optional[Call]:
    p = plan(spec)
    if p is None or not (2 <= q.dim() <= 4) or q.device.type != "cpu":
        return None
    if q.shape[-1] != v.shape[-1] or q.shape[-2] == 0 or k.shape[-2] == 0:
        return None
    if any(t.dtype != q.dtype for t in (k, v)) or str(q.dtype).replace("torch.", "") != spec.qk_dtype:
        return None
    # the mask's form first: a call ATen's kernel cannot take (a dense mask larger than q) is
    # refused before the checks below read q, k and v
    got = ((None, False), False)
    if p.mask_index is not None:
        if p.mask_kind.startswith("pred_"):
            got = _predicate_mask(p, spec, captured, q, k)
        else:
            got = _mask(p, captured, q, k)
        if got is None:
            return None  # not this kernel's function
        if got[1] and not (spec.safe_softmax and not p.finite_fill and _empty_rows_zero()):
            return None  # a row with no key: eager gives NaN (a finite fill: uniform), ATen 0
    # one aminmax pass per operand serves every check below (finiteness, score bound, removal),
    # read as Python numbers (``removal.host_stats``: the checks of a decoding step are ~0.1 ms)
    (qmax, qfin), (kmax, kfin), (_, vfin), (_, gfin) = (
        removal.host_stats(_memory_order(t)) for t in (q, k, v, grad_out))
    if not (qfin and kfin and vfin and gfin):
        return None  # NaN / inf: the tiled path applies the model's steps as eager does
    scale = _scale(p, captured)
    bound = _cheap_bound(p, q, captured, qmax, kmax)
    if not _scores_bounded(spec, p, q, k, captured, qmax, kmax, bound):
        # a score may overflow in the model's steps (its q @ k^T in the qk dtype, then each
        # scale) where ATen's kernel, which scales and accumulates in float32 its own way, stays
        # finite (eager NaN, ATen a number): the tiled path applies the model's steps
        return None
    mask, causal = got[0]
    facts = dict(bound=bound, nk=k.shape[-2])
    if mask is None and not causal:
        # this call masks nothing (a decoding row against its whole cache): ATen's function with
        # no mask is the model's, which replaces or adds nothing here; no removal question
        return Call(scale, None, **facts)
    # spec.causal: the mask keeps no element above the diagonal (proven by the pass), so ATen's
    # is_causal removes only masked elements; whether that is exact is the removal rule's question
    use_causal = causal or (spec.causal and mask is not None and p.mask_kind == "add"
                            and q.shape[-2] <= k.shape[-2] and _causal_ok(q, k))
    # elements eager weighs (exp(e - max) may be > 0) that ATen gives probability 0: those
    # is_causal skips unless they are -inf in eager, and a finite fill's (-inf in ATen's mask)
    drops = p.finite_fill or use_causal and p.fill is None
    if not drops:
        return Call(scale, mask, use_causal, **facts)
    worst = _worst(spec, p, q, k, v, captured, grad_out, qmax, kmax)
    if worst < math.inf:
        return Call(scale, mask, use_causal, p.removal, worst, **facts)
    if not causal and not p.finite_fill:
        return Call(scale, mask, **facts)  # the additive mask alone is the function: no is_causal
    return None


def _memory_order(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t with its dims permuted into memory order (strides decreasing): the same elements, so a
    reduction over all of them (the finiteness check's ``aminmax``) reads it in place, where a
    head-transposed q/k/v view ((B, N, H, D) memory seen as (B, H, N, D)) made ``aminmax`` copy
    the whole tensor first (~0.2 ms per operand at N = 1024, d = 384, on every call)."""
    if t is None or t.is_contiguous():
        return t
    return t.permute(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d])))


def _cheap_bound(p: Plan, q, captured, qmax: float, kmax: float) -> float:
    """A bound of |score| at every step of the plan's chain before its mask, from max |q| and
    max |k| (Python numbers): d max|q| max|k| for q @ k^T with its accumulation's rounding
    (d 2^-22 covers gamma_d of float32 in any summation order, with or without FMA), then each
    scale factor taken as max(|c|, 1 / |c|) and each step's rounding (``removal._STEP``). It bounds
    ATen's scaled scores too: its one scale is the product of the plan's, at most the product of
    those factors, applied with one float32 rounding. inf when a scale is 0 or not finite."""
    d = q.shape[-1]
    cheap = d * qmax * kmax * (1.0 + d * 2.0 ** -22) * removal._STEP ** (len(p.scales) + 1)
    for kind, x, _ in p.scales:
        c = abs(x if kind == "const" else captured[x].item())
        cheap *= max(c, 1.0 / c) if 0 < c < math.inf else math.inf
    return cheap if cheap == cheap else math.inf


def _scores_bounded(spec: AttentionSpec, p: Plan, q, k, captured, qmax: float, kmax: float,
                    cheap: float) -> bool:
    """Every score entering the masking step (or softmax) is finite in the model's own steps:
    ``removal.score_bound`` of the steps before it (q @ k^T in the qk dtype, then the scales,
    each rounded). The chain's ``_cheap_bound`` bounds every step's scores at once; it is far
    below the dtypes' largest value for ordinary inputs, and only where it is not (float16's
    65504, or |q|, |k| ~ 1e18) is the exact bound computed."""
    upto = p.step if p.step is not None else len(spec.score_ops)
    top = min(removal.fmax(t) for t in {spec.qk_dtype} | {op.dtype for op in spec.score_ops[:upto]})
    if cheap < top:
        return True
    stats = tuple(torch.tensor(x, dtype=torch.float64) for x in (qmax, kmax))
    b = removal.score_bound(spec, q, k, captured, upto=upto, tight=False, stats=stats)
    return math.isfinite(float(b.item()))


def _worst(spec: AttentionSpec, p: Plan, q, k, v, captured, grad_out, qmax: float, kmax: float) -> float:
    """The bound of the elements this call drops (``removal.worst_masked``, for q, k, v and dO
    already found finite); inf: none may go. A replacing fill's dropped elements are its value,
    read from the plan without tensor arithmetic (``worst_masked``'s REPLACE case)."""
    if p.removal is None:
        return math.inf
    if p.removal.kind == removal.REPLACE:
        return float(p.removal.value)
    return float(removal.worst_masked(spec, p.removal, q, k, v, captured, grad_out, step=p.step,
                                      stats=removal.as_stats(qmax, kmax)).item())


@_threads_for_share
def rows_ok(call: Call, lse: torch.Tensor, nk: int, backward: bool = False) -> bool:
    """The per-row half of the rules, on the lse of this call's forward: every row has a finite lse;
    where the call drops elements eager weighs, every row's dropped elements have probability
    exactly 0 (``removal.rows_ok_from_lse_min``, from the least lse); in the backward,
    |lse| <= _LSE_LIMIT."""
    if lse.numel() == 0:
        return True
    # every test is on |lse| or increasing in the lse: the least and largest lse decide all rows
    # (one pass; NaN propagates through aminmax)
    lo, hi = (x.item() for x in torch.aminmax(lse))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return False
    if max(abs(lo), abs(hi)) > (_LSE_LIMIT if backward else call.lse_limit):
        return False
    return call.removal is None or removal.rows_ok_from_lse_min(lo, nk, call.worst, call.removal)


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
