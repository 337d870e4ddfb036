"""CPU implementation of a spec: forward and backward, never holding an Nq x Nk score matrix.

The work is cut into tiles of (a few heads) x (a block of query rows) x (all keys). Each tile's
scores are small enough to stay in cache, so the softmax and the score chain run on cached data
instead of streaming an N x N matrix through memory three or four times as the unfused graph does.
Memory is O(tile) on top of the inputs and outputs, i.e. O(N * block) per call.

Every step is the same ATen op the model itself ran, in the same dtype and order (the spec keeps
the model's score chain as it was written), so the result matches eager to the last bit for most
chains, and always within the dtype's rounding. The backward recomputes each tile's scores and
probabilities (FlashAttention's recomputation) and walks the score chain in reverse; gradients of
captured tensors (a learnable bias, a learnable scale) are summed over their broadcast dimensions.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import time
from typing import Optional, Sequence

import torch

from . import layout, pointwise, predicate, removal
from .dropout import keep_mask
from .spec import AttentionSpec, ScoreOp, to_dtype

# Elements of one score tile (1 MiB in fp32). Larger tiles amortise the per-tile Python and op
# launch cost, smaller ones keep the peak memory near SDPA's: measured at N = 4096, 12 heads, d 64
# (benchmarks/RESULTS.md), 2^18 costs 1.14x SDPA's peak where 2^19 costs 1.37x; 2^18 is the
# largest tile that keeps the peak within 1.3x of SDPA's.
TILE_ELEMENTS = 1 << 18

# fill steps of predicate masks as bitwise selects on the scores' bits (``_Operands.fill_bits``);
# False: boolean masked_fill_ (the same bits, slower), for tests and comparisons
FILL_BY_BITS = True
# rows that keep no key under a -inf fill: their all-key scores built as the constant they are
# (``_tile_parts``) instead of recomputed; False: recomputed, for tests and comparisons
NO_KEY_SHORTCUT = True


def _tiles(nh: int, nq: int, nk: int, group: int = 1):
    """Yield (h0, h1, q0, q1): head ranges and query row ranges of one batch entry. A head range
    never crosses a group of query heads that share one key/value head."""
    rows = max(1, TILE_ELEMENTS // max(nk, 1))
    span = group if group > 1 else max(nh, 1)
    if rows >= nq:
        hstep = max(1, min(rows // max(nq, 1), span))
        for g0 in range(0, nh, span):
            for h0 in range(g0, min(nh, g0 + span), hstep):
                yield h0, min(nh, g0 + span, h0 + hstep), 0, nq
    else:
        # round query blocks to 16 rows so matmuls stay aligned
        bq = max(16, (rows // 16) * 16)
        for h0 in range(nh):
            for q0 in range(0, nq, bq):
                yield h0, h0 + 1, q0, min(nq, q0 + bq)


class _Operands:
    """The spec's captured operands, expanded (as views, never copies) to the scores' shape, and
    its mask predicates, evaluated per tile (``predicate.py``).

    A tile is addressed by ``where = (bidx, h0, h1, q0, q1, k0, k1)``: the batch index except the
    heads, a head range, a query row range and a key range."""

    def __init__(self, spec: AttentionSpec, captured: Sequence[torch.Tensor], score_shape):
        self.spec = spec
        self.values = []
        for kind, c in zip(spec.captured, captured):
            if kind == "scalar":
                self.values.append(c.item())
            elif kind == "data":
                self.values.append(c)
            else:
                self.values.append(c.expand(score_shape))
        self.score_shape = tuple(score_shape)
        self._cache = {}
        # the call's skipping facts (``removal.py``): the removal step keys may be skipped under,
        # and the upper bound of the elements skipping drops (inf: this call skips nothing),
        # computed on first use (``worst``): a call whose tiles all span every key (a decoding
        # step) never reads q, k, v for it
        self.removal = None
        self._worst = math.inf
        self._worst_of = None
        # (bidx, q0, q1) -> head ranges [(h0, h1)] of query blocks where no row keeps any key
        # (``_key_range``: the key span is empty)
        self.no_key = {}
        # (factor, steps) of ``_exact_prescale`` when this call's scores cannot overflow either
        # way (``decide_prescale``), else (1.0, 0): the model's order
        self.prescale = (1.0, 0)

    def decide_prescale(self, q, k):
        """Per call: the chain's leading power-of-two scales may be applied to the query tile
        only where neither q @ k^T nor (q * 2^e) @ k^T can overflow (a bound from one aminmax
        over q and k): beyond it the model's product is inf (then NaN) where the scaled one may
        be finite. Inputs that are not finite keep the model's order too. Only where the scores
        outnumber q's and k's elements together: scaling q instead of the scores saves less than
        the check reads otherwise (a decoding step: 1 x Nk scores, an Nk x d k)."""
        factor, steps = _exact_prescale(self.spec, q.dtype)
        nq, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
        if not steps or nq * nk < (nq + nk) * d:
            return
        (qmax, qfin), (kmax, kfin) = removal.host_stats(q), removal.host_stats(k)
        bound = d * qmax * kmax * (1.0 + d * 2.0 ** -22) * removal._STEP * max(1.0, abs(factor))
        if qfin and kfin and bound < removal.fmax(self.spec.qk_dtype):
            self.prescale = (factor, steps)

    def decide_skipping(self, q, k, v, captured, grad_out=None):
        """Per call, the removal rule's first half: inputs finite (and, for an additive mask, |s|
        bounded); ``_tile_parts`` checks each row's margin."""
        self.decide_prescale(q, k)
        r = removal.skip_removal(self.spec) or removal.causal_removal(self.spec)
        self.removal = r
        self._worst, self._worst_of = math.inf, None
        if r is not None:
            self._worst_of = (q, k, v, captured, grad_out)

    @property
    def worst(self) -> float:
        if self._worst_of is not None:
            q, k, v, captured, grad_out = self._worst_of
            self._worst_of = None
            self._worst = float(removal.worst_masked(self.spec, self.removal, q, k, v, captured,
                                                     grad_out).item())
        return self._worst

    @property
    def skipping(self) -> bool:
        return self.removal is not None and self.worst < math.inf

    def operand(self, op: ScoreOp, bidx, h0, h1, q0, q1, k0, k1):
        if op.operand == "const":
            return op.value
        if op.operand == "none":
            return None
        if op.operand == "predicate":
            return self.predicate_tile(op.index, (bidx, h0, h1, q0, q1, k0, k1))
        if op.operand == "bias":
            return self.bias_tile(op.index, (bidx, h0, h1, q0, q1, k0, k1))
        return self.tile(op.index, bidx, h0, h1, q0, q1, k0, k1)

    def bias_index(self, bi: int, where) -> torch.Tensor:
        """y of bias ``bi`` on a tile, converted to the dtype the graph multiplies it in; built once
        per query block and key span (y never depends on the head in the biases the pass builds,
        and is cached by the tile's rows and keys only when that holds)."""
        spec = self.spec.biases[bi]
        ys = spec.index_spec()
        bidx, h0, h1, q0, q1, k0, k1 = where
        free = len(ys.axes) < 3 or not ys.uses_axis(ys.axes[-3])
        key = (bidx, q0, q1, k0, k1) if free else where
        hit = self._cache.get(("bias", bi))
        if hit is not None and hit[0] == key:
            return hit[1]
        y = self._keep_of(ys, where).to(to_dtype(spec.y_dtype))
        self._cache[("bias", bi)] = (key, y)
        return y

    def bias_tile(self, bi: int, where) -> torch.Tensor:
        """x * y on a tile, as the graph computes it (one conversion, one multiplication)."""
        spec = self.spec.biases[bi]
        x = self.tile(spec.x, *where)
        out = torch.mul(x, self.bias_index(bi, where))
        return out if out.dtype == to_dtype(spec.dtype) else out.to(to_dtype(spec.dtype))

    def mask(self, op: ScoreOp, where):
        """The boolean tensor a fill step reads."""
        if op.operand == "predicate":
            return self.predicate_tile(op.index, where)
        return self.tile(op.index, *where)

    def tile(self, index, bidx, h0, h1, q0, q1, k0, k1):
        v = self.values[index]
        if not isinstance(v, torch.Tensor):
            return v
        return v[bidx][..., h0:h1, q0:q1, k0:k1]

    # -- predicates --------------------------------------------------------------------------------
    def keep(self, mi: int, where) -> torch.Tensor:
        """keep of mask ``mi`` on a tile: bool, broadcastable to (heads, rows, keys)."""
        return self._keep_of(self.spec.masks[mi], where)

    def _keep_of(self, m, where) -> torch.Tensor:
        bidx, h0, h1, q0, q1, k0, k1 = where
        R = len(m.axes)
        dev = None
        for d in m.data:
            dev = self.values[d].device
        grids = []
        for k, name in enumerate(m.axes):
            back = R - k  # 1: keys, 2: queries, 3: heads, more: the batch index
            if not m.uses_axis(name):
                grids.append(0)
            elif back == 1:
                grids.append(torch.arange(k0, k1, device=dev).reshape(1, 1, -1))
            elif back == 2:
                grids.append(torch.arange(q0, q1, device=dev).reshape(1, -1, 1))
            elif back == 3:
                grids.append(torch.arange(h0, h1, device=dev).reshape(-1, 1, 1))
            else:
                grids.append(bidx[len(bidx) - (back - 3)])
        sizes = self.score_shape[-R:] if R else ()
        data = [self.values[d] for d in m.data]
        return predicate.evaluate_keep(m, grids, sizes, data)

    def _head_free(self, mi: int) -> bool:
        m = self.spec.masks[mi]
        return len(m.axes) < 3 or not m.uses_axis(m.axes[-3])

    def predicate_tile(self, mi: int, where) -> torch.Tensor:
        """The tile of the tensor the graph's mask held (keep, or the additive values); built once
        per query block and key span when the predicate does not depend on the head."""
        bidx, h0, h1, q0, q1, k0, k1 = where
        key = (bidx, q0, q1, k0, k1) if self._head_free(mi) else where
        hit = self._cache.get(("tile", mi))
        if hit is not None and hit[0] == key:
            return hit[1]
        t = predicate.as_operand(self.spec.masks[mi], self.keep(mi, where))
        self._cache[("tile", mi)] = (key, t)
        return t

    def fill_bits(self, op: ScoreOp, where, dtype: torch.dtype, value=None):
        """A fill step of a predicate mask as two bitwise ops on the scores' bit patterns:
        (keep_bits, fill_bits) such that ``bits(s) & keep_bits | fill_bits`` is, bit for bit,
        ``masked_fill`` of the step (NaN, +-inf and -0.0 scores included: the kept elements' bits are
        copied, the filled ones set to the fill value's bits). Integer ops over the tile run at the
        speed of a float add (``masked_fill_`` with a bool mask ran ~8x slower per tile); built once
        per query block and key span when the predicate does not depend on the head. None when the
        step does not qualify (a tensor mask, a dtype without an integer twin, a fill value the
        dtype cannot hold: ``masked_fill_`` then runs, and raises, as before). ``value``: fill with
        this instead of the step's value (the backward's gradient fill, 0)."""
        ib = _INT_TWIN.get(dtype)
        value = op.value if value is None else value
        if op.operand != "predicate" or op.kind not in ("fill", "fill_not") or ib is None \
                or isinstance(value, torch.Tensor):
            return None
        bidx, h0, h1, q0, q1, k0, k1 = where
        # repr: -0.0 and 0.0 (and NaN) told apart, as == would not
        key = ((bidx, q0, q1, k0, k1) if self._head_free(op.index) else where, op.kind, repr(value), dtype)
        slot = ("bits", op.index, repr(value))
        hit = self._cache.get(slot)
        if hit is not None and hit[0] == key:
            return hit[1]
        mask = self.mask(op, where)
        if mask.dtype != torch.bool:
            return None
        try:  # the fill value's bits, written by the op the step runs
            vbits = torch.zeros(1, dtype=dtype).masked_fill_(torch.ones(1, dtype=torch.bool), value).view(ib)
        except (RuntimeError, TypeError, OverflowError):
            return None
        filled = mask if op.kind == "fill" else ~mask
        zero = torch.zeros((), dtype=ib)
        keep_bits = torch.where(filled, zero, torch.full((), -1, dtype=ib))  # -1: all bits set
        fill_bits = torch.where(filled, vbits.reshape(()), zero) if int(vbits.item()) != 0 else None
        out = (keep_bits, fill_bits)
        self._cache[slot] = (key, out)
        return out

    def key_span(self, op: ScoreOp, where, nk: int):
        """[k0, k1) within where's keys holding every key some row of the tile may keep (under the
        fill semantics of ``op``); None when no row keeps any key. Linear conditions (causal,
        windows, offsets) bound the span in O(1); conditions on keys only (padding) are evaluated
        once per batch entry over the keys; the rest (chunks, documents) on the tile's grid."""
        bidx, h0, h1, q0, q1, k0, k1 = where
        m = self.spec.masks[op.index]
        plan = predicate.span_plan(m, op.kind == "fill")
        R = len(m.axes)

        def evaluate(sub, keys_only, r0, r1, lo, hi):
            if not keys_only:
                return self._keep_of(sub, (bidx, h0, h1, r0, r1, lo, hi))
            key = ("keys", sub, bidx, None if self._head_free(op.index) else (h0, h1))
            hit = self._cache.get(key)
            if hit is None:
                hit = self._keep_of(sub, (bidx, h0, h1, 0, 1, 0, nk))
                if hit.dim() and hit.shape[-1] != 1:
                    hit = hit.reshape(-1, hit.shape[-1]).any(0)
                self._cache[key] = hit
            return hit[lo:hi] if hit.dim() and hit.shape[-1] != 1 else hit

        evaluate.sizes = self.score_shape[-R:] if R else ()
        return predicate.key_span(plan, q0, q1, k0, k1, evaluate)


def _apply(op: ScoreOp, s: torch.Tensor, x, mask=None) -> torch.Tensor:
    k = op.kind
    if k == "mul":
        return s * x
    if k == "div":
        return s / x
    if k == "add":
        return s + x
    if k == "sub":
        return s - x
    if k == "rsub":
        return x - s
    if k == "tanh":
        return torch.tanh(s)
    if k == "cast":
        return s.to(to_dtype(op.dtype))
    if k == "fill":
        return s.masked_fill(mask, x)
    if k == "fill_not":
        return s.masked_fill(~mask, x)
    if k == "fn":
        return pointwise.apply(op.fn, s, op.args)
    raise AssertionError(k)


_INPLACE = {
    "mul": lambda s, x, m: s.mul_(x), "div": lambda s, x, m: s.div_(x),
    "add": lambda s, x, m: s.add_(x), "sub": lambda s, x, m: s.sub_(x),
    "rsub": lambda s, x, m: s.neg_().add_(x),  # -s + x == x - s exactly (negation is exact)
    "tanh": lambda s, x, m: s.tanh_(), "fill": lambda s, x, m: s.masked_fill_(m, x),
    "fill_not": lambda s, x, m: s.masked_fill_(~m, x),
}


# the integer dtype of each float dtype's bit patterns (same size: a view, never a copy)
_INT_TWIN = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def _fill_by_bits(s: torch.Tensor, bits) -> bool:
    """``s`` filled in place by ``_Operands.fill_bits`` (False, untouched, when the mask would
    broadcast the tile to a larger shape: the caller's op then decides)."""
    keep_bits, fill_bits = bits
    if keep_bits.dim() > s.dim() or torch.broadcast_shapes(s.shape, keep_bits.shape) != s.shape:
        return False
    b = s.view(_INT_TWIN[s.dtype])
    b.bitwise_and_(keep_bits)
    if fill_bits is not None:
        b.bitwise_or_(fill_bits)
    return True


def _score_chain(spec, ops: _Operands, s, where, keep_inputs=False, start=0):
    """Run the score chain (from step ``start``) on one tile; optionally keep each step's input
    for the backward.

    Without ``keep_inputs`` the tile is updated in place wherever the step keeps its dtype (the
    same kernels as the out-of-place ops, so the same bits), so a tile costs one buffer, not one
    per step."""
    inputs = []
    for op in spec.score_ops[start:]:
        if keep_inputs:
            inputs.append(s)
        mask = ops.mask(op, where) if op.kind in ("fill", "fill_not") else None
        x = op.value if mask is not None else ops.operand(op, *where)
        target = to_dtype(op.dtype)
        if not keep_inputs and op.kind in _INPLACE and s.dtype == target and _keeps_dtype(s, x):
            bits = ops.fill_bits(op, where, s.dtype) if mask is not None and FILL_BY_BITS else None
            if bits is None or not _fill_by_bits(s, bits):
                s = _INPLACE[op.kind](s, x, mask)
        else:
            s = _apply(op, s, x, mask=mask)
        if s.dtype != target:  # the graph's dtype for this step (e.g. under autocast)
            s = s.to(target)
    return s, inputs


def _keeps_dtype(s: torch.Tensor, x) -> bool:
    """In place is only the same op when the operand does not promote the result."""
    if isinstance(x, torch.Tensor):
        return torch.result_type(s, x) == s.dtype
    return True


def _key_range(spec: AttentionSpec, ops: "_Operands", bidx, h0, h1, q0, q1, nk: int):
    """Keys [k0, k1) a tile needs: all, or, when the call may skip (``ops.skipping``, the removal
    rule's per-call half), with a proven causal mask only j < q1, or with a predicate mask the span
    of keys some row of the tile keeps. Skipped keys are masked for every row of the tile; the rows
    on which dropping them is not exact (``removal.rows_ok``), and those that keep no key, are
    recomputed over all keys by ``_tile_parts``."""
    k0, k1 = 0, nk
    if ops.removal is None:
        return k0, k1
    # the span first: the removal bound (``ops.skipping``, a read of q, k, v) only when the span
    # leaves keys out (a decoding step's tile keeps them all)
    if removal.causal_removal(spec) is not None:
        k1 = min(nk, q1)
    if removal.skip_removal(spec) is not None:
        span = ops.key_span(spec.score_ops[-1], (bidx, h0, h1, q0, q1, k0, k1), nk)
        if span is None:  # no row keeps a key: eager's softmax sees every key (NaN or uniform)
            if ops.skipping:
                ops.no_key.setdefault((bidx, q0, q1), []).append((h0, h1))
            return 0, nk
        k0, k1 = span
    if (k0, k1) == (0, nk) or not ops.skipping:
        return 0, nk
    return k0, k1


def _exact_prescale(spec: AttentionSpec, dtype: torch.dtype):
    """(factor, steps): the chain's leading steps that multiply or divide by a constant power of
    two, folded into one factor applied to the query tile instead of the (rows x keys) scores.
    Scaling by a power of two is exact, in the products and the sums alike, so q @ k^T * 2^e and
    (q * 2^e) @ k^T are the same bits outside the subnormal and overflow ranges (the call's
    ``_Operands.decide_prescale`` rules out overflow; a subnormal term changes a score by
    ~1e-45)."""
    factor, steps = 1.0, 0
    for op in spec.score_ops:
        if op.kind not in ("mul", "div") or op.operand != "const" or to_dtype(op.dtype) != dtype \
                or to_dtype(spec.qk_dtype) != dtype:
            break
        m, e = math.frexp(op.value) if op.value and math.isfinite(op.value) else (0.0, 0)
        if abs(m) != 0.5:
            break
        factor = factor * op.value if op.kind == "mul" else factor / op.value
        steps += 1
    return factor, steps


def _tile_scores(spec, ops, qt, kb, kh, where, keep_inputs=False):
    """Scores of a tile over its keys [k0, k1), through the score chain, and their row max:
    (s0, s, inputs, where, m)."""
    bidx, h0, h1, q0, q1, k0, k1 = where
    start, qs = 0, qt
    if not keep_inputs:
        scale, start = ops.prescale
        if start:
            qs = qt * scale
    s0 = torch.matmul(qs, kb[kh][..., k0:k1, :].transpose(-1, -2))
    s, inputs = _score_chain(spec, ops, s0, where, keep_inputs=keep_inputs, start=start)
    return s0, s, inputs, where, s.amax(-1, keepdim=True)


def _neg_inf_fill(ops: "_Operands", keep_inputs: bool) -> bool:
    """The chain's last step replaces masked elements by -inf (so a row's element at a masked key
    is -inf whatever its score) or adds -inf to them (SDPA's boolean mask, an additive -inf
    predicate: -inf for every finite score, and skipping under an additive step already required
    a finite bound of |s| for this call), the call skips, and no step's input is needed."""
    r = ops.removal
    return NO_KEY_SHORTCUT and not keep_inputs and r is not None \
        and r.kind in (removal.REPLACE, removal.ADD) and r.value == -math.inf and ops.skipping


def _tile_parts(spec, ops, qt, kb, kh, where, keep_inputs=False):
    """The tile's scores as a list of row runs (r0, r1, s0, s, inputs, where, m), rows relative to
    the tile. Usually one run over the tile's key span. A row on which dropping the keys outside the
    span is not exact (``removal.rows_ok``: its max is not finite, or not far enough above the
    skipped elements, as on a row that keeps no key inside the span, left padding) must see every
    key, as eager does: the runs of such rows are recomputed over all keys, the other rows keep
    their span's scores."""
    bidx, h0, h1, q0, q1, k0, k1 = where
    nk = kb.shape[-2]
    if k0 == 0 and k1 == nk and \
            any(a <= h0 and h1 <= b for a, b in ops.no_key.get((bidx, q0, q1), ())) and \
            _neg_inf_fill(ops, keep_inputs):
        # no row of the tile keeps a key: all its elements are -inf exactly (see below)
        shape = tuple(torch.broadcast_shapes(qt.shape[:-2], kb[kh].shape[:-2])) + (q1 - q0,)
        s = torch.full(shape + (nk,), -math.inf, dtype=to_dtype(spec.score_ops[-1].dtype), device=qt.device)
        return [(0, q1 - q0, qt.new_empty(shape + (0,)), s, [], where,
                 torch.full(shape + (1,), -math.inf, dtype=s.dtype, device=s.device))]
    s0, s, inputs, where, m = _tile_scores(spec, ops, qt, kb, kh, where, keep_inputs)
    if k0 == 0 and k1 == nk:
        return [(0, q1 - q0, s0, s, inputs, where, m)]
    bad = (~removal.rows_ok(m, ops.worst, ops.removal)).reshape(-1, q1 - q0).any(0)  # per row, over heads
    if not bool(bad.any()):
        return [(0, q1 - q0, s0, s, inputs, where, m)]
    # rows whose max over the span is -inf for every head of the tile, under a last step that
    # replaces masked elements by -inf: every key outside the span is masked for every row of the
    # tile, so the row's elements over all keys are -inf exactly (whatever the scores: NaN and inf
    # included); their all-key run is that constant tile, not a recomputation (same softmax, same
    # products after it). Not with ``keep_inputs`` (the backward then reads each step's input).
    empty = None
    if _neg_inf_fill(ops, keep_inputs):
        empty = (m == -math.inf).reshape(-1, q1 - q0).all(0).tolist()
    parts = []
    flags = bad.tolist()
    r0 = 0
    while r0 < len(flags):
        r1 = r0
        while r1 < len(flags) and flags[r1] == flags[r0] and \
                (empty is None or not flags[r0] or empty[r1] == empty[r0]):
            r1 += 1
        if flags[r0] and empty is not None and all(empty[r0:r1]):  # rows keeping no key at all
            wr = (bidx, h0, h1, q0 + r0, q0 + r1, 0, nk)
            sr = torch.full(tuple(s.shape[:-2]) + (r1 - r0, nk), -math.inf, dtype=s.dtype, device=s.device)
            parts.append((r0, r1, s0[..., r0:r1, :0], sr, [], wr, m[..., r0:r1, :]))
        elif flags[r0]:  # rows keeping no key in the span: all keys
            wr = (bidx, h0, h1, q0 + r0, q0 + r1, 0, nk)
            parts.append((r0, r1) + _tile_scores(spec, ops, qt[..., r0:r1, :], kb, kh, wr, keep_inputs))
        else:
            rows = slice(r0, r1)
            parts.append((r0, r1, s0[..., rows, :], s[..., rows, :],
                          [t[..., rows, :] for t in inputs], (bidx, h0, h1, q0 + r0, q0 + r1, k0, k1),
                          m[..., rows, :]))
        r0 = r1
    return parts


# query rows per block when a predicate mask drives the tiling, and the scores a tile may hold
# (heads are grouped per block to fill it over the block's key span). Larger than TILE_ELEMENTS:
# these tiles cover only the keys the block needs, and fewer, larger tiles halve the per-tile op
# overhead (sliding window 256 at N = 2048: 23 ms with 128 rows / 2^20 against 28 ms with 64 / 2^18,
# benchmarks/RESULTS.md). 2^18 scores (1 MiB fp32) per tile with 128 rows: per-call peak at N = 2048
# 13.0 -> 9.1 MiB (window) and 19.1 -> 10.3 MiB (soft-cap + causal), the time within noise (window)
# to ~7% slower (soft-cap) under load 3-5 (issue 11's target: peak <= 1.3x the anchor's).
Q_BLOCK = 128
SPAN_TILE_ELEMENTS = 1 << 18


def _flush_subnormal(p: torch.Tensor) -> torch.Tensor:
    """Probabilities below the smallest normal fp32 / bf16 number (2^-126) set to 0, in place.

    exp(s - max) of scores 87-103 below their row max is subnormal (ALiBi over long distances,
    soft-capped or masked rows); the products then run on the CPU's slow subnormal path: ALiBi +
    causal at N = 2048 took 189 ms instead of 84 ms (benchmarks/RESULTS.md). What is dropped is
    below 2^-126 per probability, under N * 2^-126 * max|v| per output element: far below fp32's
    rounding of any output that is not itself subnormal. fp16 (whose smallest normal is 6e-5) and
    fp64 probabilities are left as they are."""
    if p.dtype in (torch.float32, torch.bfloat16):
        torch.threshold_(p, _SMALLEST_NORMAL, 0.0)
    return p


_SMALLEST_NORMAL = 2.0 ** -126


def _safe(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """SDPA's safe softmax: a row whose every score is -inf (its max ``m`` is -inf) has
    probabilities 0, not softmax's NaN; with them its output and its gradients are 0."""
    empty = m == -math.inf
    return p.masked_fill(empty, 0.0) if bool(empty.any()) else p


def _tile_plan(spec: AttentionSpec, ops: "_Operands", bidx, nh: int, nq: int, nk: int, group: int):
    """Yield (h0, h1, q0, q1, k0, k1) for one batch entry. With head-independent predicate masks:
    query blocks of Q_BLOCK rows, each block's key span computed once, and as many heads per tile
    as fit TILE_ELEMENTS over that span (one mask tile serves them all); otherwise ``_tiles``."""
    if not _q_outer(spec, ops):
        for h0, h1, q0, q1 in _tiles(nh, nq, nk, group):
            yield (h0, h1, q0, q1) + _key_range(spec, ops, bidx, h0, h1, q0, q1, nk)
        return
    span_heads = group if group > 1 else max(nh, 1)
    bq = min(nq, Q_BLOCK)
    for q0 in range(0, nq, bq):
        q1 = min(nq, q0 + bq)
        k0, k1 = _key_range(spec, ops, bidx, 0, nh, q0, q1, nk)
        hstep = max(1, min(span_heads, SPAN_TILE_ELEMENTS // max((q1 - q0) * (k1 - k0), 1)))
        for g0 in range(0, nh, span_heads):
            for h0 in range(g0, min(nh, g0 + span_heads), hstep):
                yield h0, min(nh, g0 + span_heads, h0 + hstep), q0, q1, k0, k1


def _q_outer(spec: AttentionSpec, ops: "_Operands") -> bool:
    """Walk heads inside query blocks when every predicate is head-independent (one mask tile and
    one key span per block, shared by the heads)."""
    return bool(spec.masks) and all(ops._head_free(k) for k in range(len(spec.masks)))


def _batch_indices(batch_shape):
    """All index tuples over the batch dims except the last (heads), which tiles cover."""
    return itertools.product(*[range(n) for n in batch_shape[:-1]])


def _flat_row_offset(bidx, batch_shape, h0, nq, q0):
    flat = 0
    for i, n in zip(bidx, batch_shape[:-1]):
        flat = flat * n + i
    return (flat * batch_shape[-1] + h0) * nq + q0


def _dropout_tile(seed, p, bidx, batch_shape, h0, h1, q0, q1, nq, nk, device):
    """Keep-mask of one tile, indexed by the element's flat position in (..., Nq, Nk)."""
    base = _flat_row_offset(bidx, batch_shape, h0, nq, q0)
    rows = (torch.arange(h1 - h0, device=device)[:, None] * nq
            + torch.arange(q1 - q0, device=device)[None, :] + base)
    index = rows[..., None] * nk + torch.arange(nk, device=device)
    return keep_mask(seed, index, p)


def _group(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per key/value head (grouped-query attention); 1 for ordinary attention."""
    return q.shape[-3] // k.shape[-3] if k.shape[-3] else 1


def _kv_heads(h0: int, h1: int, group: int) -> slice:
    """The key/value heads of query heads h0:h1 (one shared head when grouped: tiles stay
    inside a group, and the products broadcast it over the tile's query heads)."""
    return slice(h0, h1) if group == 1 else slice(h0 // group, h0 // group + 1)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """(..., N, D) with at least one batch dim (the heads dim the tiles walk)."""
    return t if t.dim() >= 3 else t.unsqueeze(0)


class _CpuShare:
    """Whether other processes keep this machine's cores busy, from /proc/stat (all cores' busy
    time) minus /proc/self/stat (ours) since the last look (at most every ``PERIOD`` s).

    Why: the tiled path is many medium-sized ATen ops, each an OpenMP parallel region; with the
    other core busy, the thread that finishes first spin-waits at each region's barrier on the
    core its partner needs, so every region costs a scheduler time slice. Measured here (2 cores,
    load average 7, window mask, N = 1024, H = 12): 231-554 ms on 2 threads, 72-76 ms on 1. On a
    quiet machine 2 threads are faster, so the count is chosen per call from what the others
    used since the previous look (two small file reads, ~50 us, against calls of milliseconds)."""

    PERIOD = 0.25
    BUSY = 0.5  # cores' worth of other processes' work that makes one thread the faster choice

    def __init__(self):
        self.last = None
        self.busy = False
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _read(self):
        with open("/proc/stat") as f:
            cpu = f.readline().split()[1:]
        total_busy = sum(int(x) for i, x in enumerate(cpu[:8]) if i not in (3, 4))  # not idle, iowait
        with open("/proc/self/stat") as f:
            ours = f.read().rsplit(")", 1)[1].split()
        own = int(ours[11]) + int(ours[12])  # utime, stime
        return time.monotonic(), total_busy, own

    def others_busy(self) -> bool:
        if self.last is not None and time.monotonic() - self.last[0] < self.PERIOD:
            return self.busy  # looked less than PERIOD ago: no file read (a decoding step's ~40 us)
        try:
            now = self._read()
        except (OSError, ValueError, IndexError):
            return False
        if self.last is None:
            self.last = now
            return False
        dt = now[0] - self.last[0]
        others = ((now[1] - self.last[1]) - (now[2] - self.last[2])) / self.tick
        self.busy = others / dt >= self.BUSY
        self.last = now
        return self.busy


_SHARE = _CpuShare()


def one_thread(when=None):
    """Decorator: run the function with one intra-op thread (then restore the caller's count)
    whenever ``when()`` holds (always without ``when``)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            n = torch.get_num_threads()
            if n == 1 or (when is not None and not when()):
                return fn(*args, **kwargs)
            torch.set_num_threads(1)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.set_num_threads(n)
        return run
    return wrap


# The tiled forward and backward run on one intra-op thread while other processes keep the cores
# busy (``_CpuShare``), else on the caller's count. Their results must not depend on that choice (a
# gradient that changed with the machine's load would break run-to-run determinism), so every
# reduction here is one whose ATen kernel gives the same bits on any thread count: softmax and
# sums over the last dim of a tile are parallel over rows (each row summed by one thread, in
# order); a sum to few elements goes through ``_sum_dims``; matrix products were checked equal.
# ``torch._softmax_backward_data`` is not among them: its last-dim kernel gave other bits on 1 and
# 2 threads for rows whose length is not a multiple of the vector width (383 keys: a window's key
# span), so the backward writes it out (``_softmax_backward``). Tested bitwise on 1 and 2 threads,
# forward and backward (tests/test_cpu_threads.py). Measured (2 cores, load 3, window 256,
# N = 2048, H = 12): backward 2.8-5.6 s on 2 threads, 145-201 ms on one.
_threads_for_share = one_thread(when=lambda: _SHARE.others_busy())


@_threads_for_share
def attention_forward(q, k, v, captured, spec: AttentionSpec, seed: int = 0, lse_dtype=torch.float32):
    """Returns (out, lse): lse is the row log-sum-exp of the final scores, in ``lse_dtype``."""
    squeeze = q.dim() == 2
    # the output in the layout the op returns (``layout.out_empty``), written tile by tile
    out = _as_3d(layout.out_empty(q, tuple(q.shape[:-1]) + (v.shape[-1],), to_dtype(spec.out_dtype)))
    q, k, v = _as_3d(q), _as_3d(k), _as_3d(v)
    batch = tuple(q.shape[:-2])
    nq, nk, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    score_shape = batch + (nq, nk)
    ops = _Operands(spec, captured, score_shape)
    lse = torch.empty(batch + (nq,), dtype=lse_dtype, device=q.device)
    group = _group(q, k)
    sm_dtype, p_dtype = to_dtype(spec.softmax_dtype), to_dtype(spec.prob_dtype)
    p_drop = spec.dropout_p
    if nq == 0 or math.prod(batch) == 0:
        return (out.squeeze(0), lse.squeeze(0)) if squeeze else (out, lse)
    if nk == 0:  # softmax over an empty row: eager gives an empty P and a zero output
        out.zero_()
        lse.fill_(-math.inf)
        return (out.squeeze(0), lse.squeeze(0)) if squeeze else (out, lse)
    ops.decide_skipping(q, k, v, captured)
    with torch.autocast(q.device.type, enabled=False):
        for bidx in _batch_indices(batch):
            qb, kb, vb = q[bidx], k[bidx], v[bidx]
            for where in _tile_plan(spec, ops, bidx, batch[-1], nq, nk, group):
                h0, h1, q0, q1 = where[:4]
                kh = _kv_heads(h0, h1, group)
                where = (bidx,) + where
                for _, _, _, s, _, part, m in _tile_parts(spec, ops, qb[h0:h1, q0:q1], kb, kh, where):
                    a0, a1, k0, k1 = part[3:]
                    p = torch.softmax(s, -1, dtype=sm_dtype)
                    del s
                    _flush_subnormal(p)
                    if spec.safe_softmax:
                        p = _safe(p, m)
                    # lse = max + log(sum exp(s - max)), and p at the argmax (its largest element)
                    # is 1 / sum exp(s - max); a row of only -inf scores has lse -inf (not NaN)
                    row = (m.to(lse.dtype) - torch.log(p.amax(-1, keepdim=True).to(lse.dtype))).squeeze(-1)
                    if spec.safe_softmax:
                        row = row.masked_fill_(torch.isneginf(m).squeeze(-1), -math.inf)
                    lse[bidx][h0:h1, a0:a1] = row
                    if p.dtype != p_dtype:
                        p = p.to(p_dtype)
                    if p_drop:
                        keep = _dropout_tile(seed, p_drop, bidx, batch, h0, h1, a0, a1, nq, nk, q.device)
                        p = p * keep * (1.0 / (1.0 - p_drop))
                    o = out[bidx][h0:h1, a0:a1]
                    if o.is_contiguous():
                        torch.matmul(p, vb[kh][..., k0:k1, :], out=o)
                    else:  # rows of several heads: matmul's out= may not fold a broadcast product
                        o.copy_(torch.matmul(p, vb[kh][..., k0:k1, :]))
    return (out.squeeze(0), lse.squeeze(0)) if squeeze else (out, lse)


def _heads_sum(t: torch.Tensor, group: int) -> torch.Tensor:
    """Grouped heads: the query heads of a tile all feed one key/value head; sum their parts."""
    return t if group == 1 else t.sum(0, keepdim=True)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _reduce_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum a tile-shaped gradient over the dims where the operand tile broadcasts (size 1)."""
    dims = [d for d in range(t.dim()) if shape[d] == 1 and t.shape[d] != 1]
    return _sum_dims(t, dims) if dims else t


# ATen sums a reduction with several outputs in parallel over the outputs (each in one thread, in
# order) and one of fewer than GRAIN_SIZE (32768) elements serially: both give the same bits on
# any thread count. A larger sum to one element is split across the threads: that one is cut into
# rows first.
_ROW = 1024


def _sum_dims(t: torch.Tensor, dims) -> torch.Tensor:
    """``t.sum(dims, keepdim=True)`` with bits that do not depend on the intra-op thread count:
    one dim at a time from the innermost, and a sum to one element of a long vector by rows."""
    for d in sorted(dims, reverse=True):
        if t.numel() == t.shape[d] and t.shape[d] > _ROW:  # one output: a full reduction
            t = _sum_all(t).reshape([1] * t.dim())
        else:
            t = t.sum(d, keepdim=True)
    return t


def _sum_all(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    while flat.numel() > _ROW:
        pad = (-flat.numel()) % _ROW
        if pad:  # + 0.0 changes no partial sum
            flat = torch.cat([flat, flat.new_zeros(pad)])
        flat = flat.view(-1, _ROW).sum(-1)
    return flat.sum()


def _softmax_backward(dp: torch.Tensor, p: torch.Tensor, dtype: torch.dtype, row_delta=None) -> torch.Tensor:
    """``torch._softmax_backward_data(dp, p, -1, dtype)``: p * (dp - rowsum(dp * p)), returned in
    ``dtype``, written out so its bits do not depend on the thread count (see
    ``_threads_for_share``); ``dp`` (a fresh tile) may be overwritten. As ATen's kernel does, a
    16-bit tile computes in float32 and rounds once at the end (in bf16 throughout, a learnable
    scale's gradient, a sum over the whole tile, was 30x eager's error).
    ``row_delta``: rowsum(dp * p) is also returned there (attention sinks)."""
    if p.dtype in (torch.float16, torch.bfloat16):
        dp, p = dp.float(), p.float()
    prod = dp * p
    if prod.numel() == prod.shape[-1]:  # one row: a sum to one element (``_sum_dims``)
        delta = _sum_dims(prod, [prod.dim() - 1])
    else:
        delta = prod.sum(-1, keepdim=True)
    del prod
    if row_delta is not None:
        row_delta.copy_(delta)
    ds = dp.sub_(delta).mul_(p)
    return ds.to(dtype) if ds.dtype != dtype else ds


@_threads_for_share
def attention_backward(grad_out, q, k, v, captured, out, lse, spec: AttentionSpec,
                       seed: int = 0, needs_grad: Optional[Sequence[bool]] = None, sinks=None,
                       dsinks=None):
    """Returns (dq, dk, dv, [d captured_i or None]).

    Attention sinks (``AttentionSpec.sink``; the spec given is the sink-free one): ``sinks``, the
    sink logits broadcast to (..., Nq, m), are appended to each tile's scores for the softmax and
    cut off after it, as in eager (P' is the combined softmax's, with its conditioning: no lse
    read), and their gradient per row, -P'_sink * rowsum(dP * P'), is written to ``dsinks``
    (..., Nq, m)."""
    # gradients in the layout the op returns (``layout.grad_empty``): written there, not copied
    dq0, dk0, dv0 = layout.grad_empty(q).zero_(), _accumulator(k), _accumulator(v)
    k_in, v_in = k, v
    q, k, v, grad_out = _as_3d(q), _as_3d(k), _as_3d(v), _as_3d(grad_out)
    dq, dk, dv = _as_3d(dq0), _as_3d(dk0), _as_3d(dv0)
    if sinks is not None:
        m_sinks = sinks.shape[-1]
        sinks = sinks.reshape(q.shape[:-1] + (m_sinks,))
        dsinks = dsinks.view(q.shape[:-1] + (m_sinks,))
    batch = tuple(q.shape[:-2])
    nq, nk = q.shape[-2], k.shape[-2]
    score_shape = batch + (nq, nk)
    needs_grad = list(needs_grad) if needs_grad is not None else [False] * len(captured)
    group = _group(q, k)
    ops = _Operands(spec, captured, score_shape)
    sm_dtype, p_dtype = to_dtype(spec.softmax_dtype), to_dtype(spec.prob_dtype)
    p_drop = spec.dropout_p

    # gradient buffers in fp32, shaped like the operand padded to the scores' rank
    dcap = []
    for kind, c, ng in zip(spec.captured, captured, needs_grad):
        if not ng:
            dcap.append(None)
        else:
            padded = (1,) * (len(score_shape) - c.dim()) + tuple(c.shape)
            dcap.append(torch.zeros(padded, dtype=_acc(c.dtype), device=c.device))
    grad_out = grad_out.to(to_dtype(spec.out_dtype))
    # the chain's backward reads a step's input only for tanh (its output) and for the gradient of
    # a captured factor; otherwise the recomputation runs in place like the forward
    keep_inputs = any(op.kind in ("tanh", "fn") or op.kind in ("mul", "div") and op.captured_index is not None
                      and dcap[op.captured_index] is not None for op in spec.score_ops)

    if nq and nk and math.prod(batch):
        ops.decide_skipping(q, k, v, captured, grad_out)
        with torch.autocast(q.device.type, enabled=False):
            for bidx in _batch_indices(batch):
                qb, kb, vb, dob = q[bidx], k[bidx], v[bidx], grad_out[bidx]
                for where in _tile_plan(spec, ops, bidx, batch[-1], nq, nk, group):
                    h0, h1, q0, q1 = where[:4]
                    kh = _kv_heads(h0, h1, group)
                    qt, dot = qb[h0:h1, q0:q1], dob[h0:h1, q0:q1]
                    where = (bidx,) + where
                    for r0, r1, s0, s, inputs, part, m in _tile_parts(spec, ops, qt, kb, kh, where,
                                                                      keep_inputs=keep_inputs):
                        a0, a1, k0, k1 = part[3:]
                        qr, dor = qt[..., r0:r1, :], dot[..., r0:r1, :]
                        kt, vt = kb[kh][..., k0:k1, :], vb[kh][..., k0:k1, :]
                        if sinks is None:
                            p = _flush_subnormal(torch.softmax(s, -1, dtype=sm_dtype))
                        else:
                            t = sinks[bidx][h0:h1, a0:a1].to(s.dtype)
                            p = torch.softmax(torch.cat([s, t.expand(*s.shape[:-1], m_sinks)], -1), -1,
                                              dtype=sm_dtype)
                            p, p_sinks = _flush_subnormal(p[..., :-m_sinks]), p[..., -m_sinks:]
                        if spec.safe_softmax:
                            p = _safe(p, m)
                        pc = p.to(p_dtype) if p.dtype != p_dtype else p
                        if p_drop:
                            keep = _dropout_tile(seed, p_drop, bidx, batch, h0, h1, a0, a1, nq, nk, q.device)
                            # the forward's own ops, in the probabilities' dtype: a float32 scale
                            # tensor would promote 16-bit tiles (and the matmuls then refuse them)
                            pd = pc * keep * (1.0 / (1.0 - p_drop))
                        else:
                            pd = pc
                        dv[bidx][kh][..., k0:k1, :] += _heads_sum(torch.matmul(pd.transpose(-1, -2), dor),
                                                                group).to(dv.dtype)
                        dpd = torch.matmul(dor, vt.transpose(-1, -2))
                        dpc = dpd * keep * (1.0 / (1.0 - p_drop)) if p_drop else dpd
                        dp = dpc.to(p.dtype) if dpc.dtype != p.dtype else dpc
                        if sinks is None:
                            ds = _softmax_backward(dp, p, s.dtype)
                        else:  # the sink columns' dP is 0: d t = P'_t (0 - rowsum(dP * P'))
                            delta = torch.empty(p.shape[:-1] + (1,), dtype=dsinks.dtype, device=p.device)
                            ds = _softmax_backward(dp, p, s.dtype, row_delta=delta)
                            dsinks[bidx][h0:h1, a0:a1] = -(p_sinks.to(delta.dtype) * delta)
                        ds = _chain_backward(spec, ops, inputs, s, ds, part, dcap)
                        ds = ds.to(s0.dtype) if ds.dtype != s0.dtype else ds
                        dq[bidx][h0:h1, a0:a1] = torch.matmul(ds, kt)
                        dk[bidx][kh][..., k0:k1, :] += _heads_sum(torch.matmul(ds.transpose(-1, -2), qr),
                                                                group).to(dk.dtype)

    grads = []
    for c, g in zip(captured, dcap):
        grads.append(None if g is None else g.reshape(c.shape).to(c.dtype))
    return dq0, _in_dtype(dk0, k_in), _in_dtype(dv0, v_in), grads


def _accumulator(t: torch.Tensor) -> torch.Tensor:
    """dK or dV, zeroed: accumulated over query tiles in at least fp32; in the op's layout when
    that is t's dtype, else (16-bit t) a float32 buffer ``_in_dtype`` converts once at the end."""
    if _acc(t.dtype) == t.dtype:
        return layout.grad_empty(t).zero_()
    return torch.zeros(t.shape, dtype=_acc(t.dtype), device=t.device)


def _in_dtype(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """g in like's dtype and the op's gradient layout: g itself, or one converting copy."""
    return g if g.dtype == like.dtype else layout.grad_empty(like).copy_(g)


def _chain_backward(spec, ops: _Operands, inputs, s_out, ds, where, dcap):
    """Reverse-mode through the score chain; accumulates operand gradients into ``dcap``.
    ``inputs``: each step's input tile, or empty when no step needs them (see the caller)."""
    steps = spec.score_ops
    in_dtypes = [to_dtype(spec.qk_dtype)] + [to_dtype(op.dtype) for op in steps[:-1]]
    outs = list(inputs[1:]) + [s_out] if inputs else [None] * (len(steps) - 1) + [s_out]
    ins = list(inputs) if inputs else [None] * len(steps)
    for op, s_in, s_o, in_dt in zip(reversed(steps), reversed(ins), reversed(outs), reversed(in_dtypes)):
        x = None if op.kind in ("fill", "fill_not", "tanh", "cast", "fn") else ops.operand(op, *where)
        kind = op.kind
        d_operand = None
        wants = op.captured_index is not None and dcap[op.captured_index] is not None
        if kind == "mul":
            if wants:
                d_operand = ds * s_in
            ds = ds.mul_(x) if _keeps_dtype(ds, x) else ds * x
        elif kind == "div":
            if wants:
                d_operand = -ds * s_in / (x * x)
            ds = ds.div_(x) if _keeps_dtype(ds, x) else ds / x
        elif kind in ("add", "rsub"):
            d_operand = ds if wants else None
            if kind == "rsub":
                ds = -ds  # not in place: d_operand may still be this tile
        elif kind == "sub":
            d_operand = -ds if wants else None
        elif kind == "tanh":
            ds = ds * (1 - s_o * s_o)
        elif kind == "cast":
            pass
        elif kind == "fn":
            # d f / d s from sympy (pointwise.derivative), written so that its conventions at kinks
            # are eager's (relu'(0) = 0, clamp' = 1 on the closed interval), evaluated on the tile
            ds = pointwise.backward(op.fn, op.args, s_in, ds)
        elif kind in ("fill", "fill_not"):
            bits = ops.fill_bits(op, where, ds.dtype, value=0) if FILL_BY_BITS else None
            if bits is None or not _fill_by_bits(ds, bits):
                mask = ops.mask(op, where)
                ds = ds.masked_fill_(mask if kind == "fill" else ~mask, 0)
        if d_operand is not None and op.operand in ("tensor", "scalar"):
            _accumulate(dcap[op.index], d_operand, where, spec.captured[op.index])
        if op.operand == "bias" and dcap[spec.biases[op.index].x] is not None:
            # d(x * y)/dx = y: the gradient of ALiBi's slopes, summed where x broadcasts
            bi = spec.biases[op.index]
            _accumulate(dcap[bi.x], ds * ops.bias_index(op.index, where), where, "tensor")
        if ds.dtype != in_dt:
            ds = ds.to(in_dt)
    return ds


def _accumulate(buf: torch.Tensor, g: torch.Tensor, where, kind):
    bidx, h0, h1, q0, q1, k0, k1 = where
    if kind == "scalar":
        buf += _sum_all(g.to(buf.dtype))
        return
    # buf has the scores' rank: (*batch, Nq, Nk) with 1 where the operand broadcasts
    view = buf
    for i in bidx:
        view = view[i if view.shape[0] != 1 else 0]
    hs = slice(h0, h1) if view.shape[0] != 1 else slice(0, 1)
    qs = slice(q0, q1) if view.shape[1] != 1 else slice(0, 1)
    ks = slice(k0, k1) if view.shape[2] != 1 else slice(0, 1)
    view = view[hs, qs, ks]
    view += _reduce_to(g.to(buf.dtype), view.shape)
