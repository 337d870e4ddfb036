"""Host side of block skipping: which key blocks each query block visits (and the transpose, for the
dK/dV kernel), which of them are full tiles, and the backward's widening of those ranges where the
removal rule fails on a row. Torch ops on the data's device; no kernel code.

For masks whose rows keep one interval of keys moving with i (causal, windows, bands, KV-cache
offsets) none of these tensors is built: ``linear_band`` hands four integers to the kernels,
which compute the same ranges themselves (``attention._band_key_blocks``).

``block_ranges`` shares its result across calls through an explicit cache (``RangeCache``, one per
process: ``RANGES``) when the predicate reads data tensors (a padding mask): the layers of a model
evaluate the mask once per forward instead of once each.
"""
from __future__ import annotations

import functools
import weakref
from typing import Optional, Sequence

import sympy
import torch
import triton

from .. import predicate, removal
from ..spec import AttentionSpec
from .codegen import _full_ops, skip_op

# elements of one chunk of keep evaluated at once while building the block ranges (the
# evaluation's int64 intermediates are 8x that in bytes)
RANGE_CHUNK_ELEMENTS = {"cuda": 1 << 24}
_RANGE_CHUNK_DEFAULT = 1 << 22


class RangeCache:
    """Block ranges computed from data tensors, per (mask, step kind, score shape, blocks, device,
    identity of the data tensors): an entry holds weak references to the data tensors, their
    version counters and the result, and is used only while the very same tensors are unchanged.
    A few entries (``size``), oldest dropped first."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: dict = {}

    def clear(self) -> None:
        self.entries.clear()

    def get(self, key, data):
        hit = self.entries.get(key)
        if hit is not None and all(r() is t for r, t in zip(hit[0], data)) \
                and hit[1] == tuple(t._version for t in data):
            return hit[2]
        return None

    def put(self, key, data, result) -> None:
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = (tuple(weakref.ref(t) for t in data), tuple(t._version for t in data),
                             result)


RANGES = RangeCache()


def block_ranges(spec: AttentionSpec, captured: Sequence[torch.Tensor], score_shape4,
                 block_m: int, block_n: int, device=None):
    """``_block_ranges``, shared across calls: when the predicate reads data tensors (a padding
    mask), the result is kept (``RANGES``) for the next call with the same spec, shape and blocks
    that reads the very same tensors (identity) unchanged since (their version counters)."""
    op = skip_op(spec)
    if op is None or not spec.masks[op.index].data:
        return _block_ranges(spec, captured, score_shape4, block_m, block_n, device)
    data = [captured[d] for d in spec.masks[op.index].data]
    key = (spec.masks[op.index], op.kind, tuple(int(x) for x in score_shape4), block_m, block_n,
           str(device), tuple(id(t) for t in data))
    res = RANGES.get(key, data)
    if res is None:
        res = _block_ranges(spec, captured, score_shape4, block_m, block_n, device)
        RANGES.put(key, data, res)
    return res


def _block_ranges(spec: AttentionSpec, captured: Sequence[torch.Tensor], score_shape4,
                  block_m: int, block_n: int, device=None):
    """None when the spec's chain does not allow skipping; else (rows, cols), int32 tensors on the
    data's device (exact for evaluated predicates; for conjunctions of linear conditions computed
    in O(Nq) from per-row intervals, ``_linear_block_ranges``, equal on convex masks):

    * rows (Bm, Hm, cdiv(Nq, block_m), 2): per query block, [lo, hi) of the key blocks holding a key
      some row of the block keeps; all key blocks when some row of the block keeps no key (eager
      then normalises over every key: uniform for a finite fill, NaN for -inf);
    * cols (Bm, Hm, cdiv(Nk, block_n), 2): per key block, [lo, hi) of the query blocks whose range
      contains it (the dK/dV kernel's loop).

    Bm, Hm are B, H, or 1 where the predicate does not depend on the batch index / the head (the
    kernels read them with stride 0). keep is evaluated with the torch code of predicate.py in
    chunks of query rows (never an Nq x Nk buffer at once)."""
    op = skip_op(spec)
    if op is None:
        return None
    m = spec.masks[op.index]
    R = len(m.axes)
    B, H, nq, nk = (int(x) for x in score_shape4)
    fast = _linear_block_ranges(m, op.kind == "fill", tuple(int(x) for x in score_shape4[4 - R:]),
                                nq, nk, block_m, block_n, device)
    if fast is not None:
        return fast
    uses = {back: m.uses_axis(m.axes[R - back]) for back in range(1, R + 1)}
    Bm = B if uses.get(4) else 1
    Hm = H if uses.get(3) else 1
    data = [captured[d] for d in m.data]
    dev = device if device is not None else data[0].device if data else None
    n_mb, n_nb = triton.cdiv(nq, block_m), triton.cdiv(nk, block_n)
    sizes = tuple(score_shape4[4 - R:])
    budget = RANGE_CHUNK_ELEMENTS.get(torch.device(dev).type if dev is not None else "cpu",
                                      _RANGE_CHUNK_DEFAULT)
    rows_per = max(block_m, (budget // max(1, Bm * Hm * nk)) // block_m * block_m)
    jj = torch.arange(nk, device=dev).reshape(1, 1, 1, nk)
    visit = torch.empty((Bm, Hm, n_mb, n_nb), dtype=torch.bool, device=dev)
    rowless = torch.empty((Bm, Hm, n_mb), dtype=torch.bool, device=dev)
    for q0 in range(0, nq, rows_per):
        q1 = min(nq, q0 + rows_per)
        grids = []
        for t in range(R):
            back = R - t
            if not uses[back]:
                grids.append(0)
            elif back == 1:
                grids.append(jj)
            elif back == 2:
                grids.append(torch.arange(q0, q1, device=dev).reshape(1, 1, -1, 1))
            elif back == 3:
                grids.append(torch.arange(Hm, device=dev).reshape(1, -1, 1, 1))
            else:
                grids.append(torch.arange(Bm, device=dev).reshape(-1, 1, 1, 1))
        keep = predicate.evaluate_keep(m, grids, sizes, data).to(torch.bool)
        if op.kind == "fill":
            keep = ~keep
        keep = torch.broadcast_to(keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape)),
                                  (Bm, Hm, q1 - q0, nk))
        mb0, mb1 = q0 // block_m, triton.cdiv(q1, block_m)
        pad_m, pad_n = (mb1 - mb0) * block_m - (q1 - q0), n_nb * block_n - nk
        kp = torch.nn.functional.pad(keep, (0, pad_n, 0, pad_m))  # padding keeps nothing
        visit[:, :, mb0:mb1] = kp.reshape(Bm, Hm, mb1 - mb0, block_m, n_nb, block_n).any(5).any(3)
        # a padding row is no row: only real rows that keep no key count
        none = torch.nn.functional.pad(~keep.any(-1), (0, pad_m))
        rowless[:, :, mb0:mb1] = none.reshape(Bm, Hm, mb1 - mb0, block_m).any(-1)
    idx = torch.arange(n_nb, device=dev)
    lo = torch.where(visit, idx, n_nb).amin(-1)
    hi = torch.where(visit, idx + 1, 0).amax(-1)
    return _ranges(lo, hi, rowless, n_mb, n_nb, dev)


def _ranges(lo, hi, rowless, n_mb: int, n_nb: int, dev):
    """(rows, cols) of block_ranges from per-query-block key-block bounds [lo, hi) and the blocks
    holding a row that keeps no key (those visit every key block)."""
    idx = torch.arange(n_nb, device=dev)
    lo = torch.where(rowless, 0, lo)
    hi = torch.where(rowless, n_nb, hi)
    hi = torch.maximum(hi, lo)
    rows = torch.stack([lo, hi], -1).to(torch.int32).contiguous()
    # the transpose: key block nb is visited by query block mb when lo[mb] <= nb < hi[mb]
    inside = (lo[..., None] <= idx) & (idx < hi[..., None])  # (Bm, Hm, n_mb, n_nb)
    midx = torch.arange(n_mb, device=dev)[:, None]
    clo = torch.where(inside, midx, n_mb).amin(-2)
    chi = torch.where(inside, midx + 1, 0).amax(-2)
    chi = torch.maximum(chi, clo)
    cols = torch.stack([clo, chi], -1).to(torch.int32).contiguous()
    return rows, cols


def _linear_block_ranges(m, invert: bool, sizes, nq: int, nk: int, block_m: int, block_n: int, dev):
    """block_ranges for a predicate that is a conjunction of linear conditions on i and j (causal,
    windows, KV-cache offsets) with no data, batch or head: every row's kept keys are an interval
    [lo(i), hi(i)] computed in O(Nq) (no Nq x Nk evaluation), a row keeps no key when it is empty,
    and a query block visits the key blocks from its rows' smallest lo to their largest hi (a
    superset of the blocks holding a kept key, which is all the kernels need). None otherwise."""
    rows = _linear_rows(m, invert, sizes, nq, nk, dev)
    if rows is None:
        return None
    lo, hi = rows
    empty = lo > hi
    n_mb, n_nb = triton.cdiv(nq, block_m), triton.cdiv(nk, block_n)
    pad = n_mb * block_m - nq
    blo = torch.nn.functional.pad(torch.where(empty, nk, lo), (0, pad), value=nk)
    bhi = torch.nn.functional.pad(torch.where(empty, -1, hi), (0, pad), value=-1)
    rowless = torch.nn.functional.pad(empty, (0, pad)).reshape(n_mb, block_m).any(-1)
    klo = torch.div(blo.reshape(n_mb, block_m).amin(-1), block_n, rounding_mode="floor")
    khi = torch.div(bhi.reshape(n_mb, block_m).amax(-1), block_n, rounding_mode="floor") + 1
    klo, khi = klo.clamp(0, n_nb), khi.clamp(0, n_nb)
    return _ranges(klo.reshape(1, 1, n_mb), khi.reshape(1, 1, n_mb), rowless.reshape(1, 1, n_mb),
                   n_mb, n_nb, dev)


def full_ranges(spec: AttentionSpec, score_shape4, block_m: int, block_n: int, device=None):
    """Per query block, [flo, fhi) of the key blocks every (real) row keeps whole and that lie
    inside the keys: the forward's full tiles, which skip the mask step and bounds checks. An int32
    (1, 1, n_mb, 2) tensor for a conjunction of linear conditions (causal, windows: each row keeps
    an interval, ``predicate.span_plan``), computed in O(Nq); None otherwise (no full tiles)."""
    op = skip_op(spec)
    if op is None or _full_ops(spec) is None:
        return None
    m = spec.masks[op.index]
    R = len(m.axes)
    B, H, nq, nk = (int(x) for x in score_shape4)
    if not _plan_is_whole(m, op.kind == "fill"):
        return None
    rows = _linear_rows(m, op.kind == "fill", tuple(int(x) for x in score_shape4[4 - R:]), nq, nk,
                        device)
    if rows is None:
        return None
    lo, hi = rows  # kept keys of row i: [lo(i), hi(i)] (empty when lo > hi)
    n_mb = triton.cdiv(nq, block_m)
    pad = n_mb * block_m - nq
    # padding rows do not constrain; an empty real row leaves its block no full tile
    flo = torch.nn.functional.pad(lo, (0, pad), value=-1).reshape(n_mb, block_m).amax(-1)
    fhi = torch.nn.functional.pad(hi, (0, pad), value=nk).reshape(n_mb, block_m).amin(-1)
    kb_lo = torch.div(flo + block_n - 1, block_n, rounding_mode="floor").clamp(min=0)
    kb_hi = torch.div(torch.minimum(fhi + 1, torch.full_like(fhi, nk)), block_n,
                      rounding_mode="floor")
    kb_hi = torch.maximum(kb_hi, kb_lo)
    return torch.stack([kb_lo, kb_hi], -1).to(torch.int32).reshape(1, 1, n_mb, 2).contiguous()


def _linear_rows(m, invert: bool, sizes, nq: int, nk: int, dev):
    """(lo, hi) int64 (Nq,) of the keys each row keeps, for a conjunction of linear conditions on
    i and j with no data, batch or head (``predicate.span_plan``: the band the spec carries, or
    for a mask it does not describe, the conditions read off its expression); None otherwise."""
    plan = predicate.span_plan(m, invert)
    parts = plan[1] if isinstance(plan, tuple) and plan[0] == "and" else [plan]
    if plan is None or not all(isinstance(p, predicate._Lin) for p in parts):
        return None
    i = torch.arange(nq, device=dev, dtype=torch.int64)
    lo = torch.zeros(nq, dtype=torch.int64, device=dev)
    hi = torch.full((nq,), nk - 1, dtype=torch.int64, device=dev)
    for p in parts:  # a*j + b*i + c <= 0
        t = -p.b * i - p.c(*sizes)
        if p.a > 0:
            hi = torch.minimum(hi, torch.div(t, p.a, rounding_mode="floor"))
        elif p.a < 0:
            lo = torch.maximum(lo, -torch.div(-t, p.a, rounding_mode="floor"))
        else:  # no j: the row keeps every key or none
            hi = torch.where(t >= 0, hi, -1)
    return lo, hi




def linear_band(spec: AttentionSpec, score_shape4):
    """(B_LO, B_HI, K_LO, K_HI), Python ints, when every row i of the skipping step's mask keeps
    exactly the keys [max(K_LO, i + B_LO), min(K_HI, i + B_HI)] (empty when that is): a
    conjunction of linear conditions (``predicate.span_plan``) each on j - i (causal, windows,
    bands, KV-cache offsets) or on j alone, with no data, batch or head. The kernels then compute
    their block ranges and full tiles from these (``attention._band_key_blocks``) and no range
    tensor is built; they are exactly ``_linear_rows``' intervals. None for every other mask
    (the tensor ranges: ``block_ranges``, ``full_ranges``). Bounds that no row reaches are
    clipped to [-Nq, Nk] (B_LO, B_HI), [0, Nk] and [-1, Nk - 1] (K_LO, K_HI), which keeps the
    kernels' arithmetic far from overflow and changes no row's interval (nor which rows are
    empty); memoised per (mask, polarity, sizes): no tensor, a dict look-up per call."""
    op = skip_op(spec)
    if op is None:
        return None
    m = spec.masks[op.index]
    if m.data:
        return None
    R = len(m.axes)
    return _band(m, op.kind == "fill", tuple(int(x) for x in score_shape4[4 - R:]),
                 int(score_shape4[2]), int(score_shape4[3]))


@functools.cache
def _plan_is_whole(m, invert: bool) -> bool:
    """Whether ``predicate.span_plan``'s conjuncts state the kept set exactly: it leaves out a
    conjunct that reads the query index but not the key (``(i < 100) & (j <= i)`` plans as
    ``j <= i``), which is sound for the key blocks a query block visits (a superset) but not for
    full tiles, where every element taken must be kept."""
    e = predicate.kept_expr(m, invert)
    j = m.axes[-1]
    return all(any(s.name == j for s in c.free_symbols)
               for c in (e.args if isinstance(e, sympy.And) else (e,)))


@functools.lru_cache(maxsize=1024)
def _band(m, invert: bool, sizes, nq: int, nk: int):
    if not _plan_is_whole(m, invert):
        return None  # the tensor ranges, and no full tiles
    plan = predicate.span_plan(m, invert)
    parts = plan[1] if isinstance(plan, tuple) and plan[0] == "and" else [plan]
    if plan is None or not all(isinstance(p, predicate._Lin) for p in parts):
        return None
    b_lo, b_hi, k_lo, k_hi = -nq, nk, 0, nk - 1
    for p in parts:  # a*j + b*i + c <= 0, as _linear_rows reads them
        c0 = p.c(*sizes)
        try:
            c = int(c0)
        except (TypeError, ValueError, OverflowError):
            return None
        if c != c0:
            return None  # a bound that is not an integer: the tensor ranges, as before
        if p.a != 0 and p.b == -p.a:  # a (j - i) <= -c
            if p.a > 0:
                b_hi = min(b_hi, (-c) // p.a)
            else:
                b_lo = max(b_lo, -(c // p.a))
        elif p.a != 0 and p.b == 0:  # a j <= -c
            if p.a > 0:
                k_hi = min(k_hi, (-c) // p.a)
            else:
                k_lo = max(k_lo, -(c // p.a))
        elif p.a == 0 and p.b == 0:  # a constant: every row keeps every key or none
            if c > 0:
                k_hi = -1
        else:
            return None  # a bound on i alone, or another slope: the tensor ranges
    return _clip(b_lo, -nq, nk), _clip(b_hi, -nq, nk), _clip(k_lo, 0, nk), _clip(k_hi, -1, nk - 1)


def _clip(x: int, lo: int, hi: int) -> int:
    return min(max(x, lo), hi)


def backward_ranges(spec: AttentionSpec, ranges, q, k, v, do, captured, lse, bm: int, n_mb: int,
                     n_nb: int):
    """The backward's block ranges: the forward's, except that every query block with a row on
    which the removal rule does not prove skipping exact, decided from the lse the forward saved
    (``removal.rows_ok_from_lse``, with dO among the inputs that must be finite), visits every
    key block (and the dK/dV ranges follow). Torch ops on the device: no host round trip."""
    r = removal.skip_removal(spec)
    B, H, nq = lse.shape
    worst = removal.worst_masked(spec, r, q, k, v, captured, do, finite_scores=True)
    fail = ~removal.rows_ok_from_lse(lse, k.shape[-2], worst, r)
    fail = torch.nn.functional.pad(fail, (0, n_mb * bm - nq)).reshape(B, H, n_mb, bm).any(-1)
    rows = ranges[0]
    lo = rows[..., 0].expand(B, H, n_mb)
    hi = rows[..., 1].expand(B, H, n_mb)
    return _ranges(lo, hi, fail, n_mb, n_nb, lse.device)


_DUMMIES: dict = {}


def dummy(device, dtype=torch.int32) -> torch.Tensor:
    """A 2-element zero tensor of ``dtype`` on ``device``, made once: the pointer a kernel gets
    for ranges (or a threshold) it does not read (no allocation per call). Shared by every call:
    a kernel may read it, never write it."""
    key = (str(torch.device(device)), dtype)
    t = _DUMMIES.get(key)
    if t is None:
        t = _DUMMIES[key] = torch.zeros(2, dtype=dtype, device=device)
    return t


def _range_args(ranges: Optional[torch.Tensor], B: int, H: int, device):
    """(RANGES, r_sb, r_sh) for a kernel: the per-(b, h) block ranges with stride 0 where the
    predicate broadcasts; a dummy when nothing is skipped or the kernel computes them (BAND)."""
    if ranges is None:
        return [dummy(device), 0, 0]
    sb = ranges.stride(0) if ranges.shape[0] == B and B > 1 else 0
    sh = ranges.stride(1) if ranges.shape[1] == H and H > 1 else 0
    return [ranges, sb, sh]



