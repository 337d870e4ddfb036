"""FlexAttention's CPU kernel as a forward candidate.

torch's FlexAttention compiles ``softmax(score_mod(q @ k^T))`` with a BlockMask into a vectorised
C++ kernel on CPU (Inductor's CPU flex template) that skips the key blocks no row keeps. On window,
soft-cap and ALiBi sites it is 1.4-1.9x faster than the tiled implementation (RESULTS.md, issue 11),
but on CPU it has no backward and returns no log-sum-exp. So it computes forwards only, inside
the op (detached inputs): for specs the rewrite proved ``inference``, and for training specs whose
backward is the tiled path's (``select.route``: no ATen kernel for the spec), which recomputes
from q, k, v and never reads the forward's lse. The lse this path returns is NaN; a backward that
did read it (ATen's) would fail ``cpu_flash.rows_ok`` and recompute on the tiled path.

**What it computes.** ``score_mod`` here is the spec's chain itself, step by step in the model's
order (``_chain``): every step float32, as eager computes it, the masking step included (the
masked elements get the graph's own value: -inf, finfo.min, s + M). So without a BlockMask the
kernel computes eager's function with its own summation order, as ATen's flash kernel does.

**Exactness, per call** (``prepare``): eager and this kernel differ only where a row is non-finite
or where blocks are skipped, so the call is taken only when

1. q, k, v and every float captured tensor are finite, and the chain's score entering its masking
   step (or leaving the chain, when nothing masks) has a finite bound (``removal.score_bound``):
   then every score is finite except masked elements that are -inf, no NaN arises;
2. when the masked value can be -inf (a -inf fill, s + (-inf)), or a BlockMask is used, every row
   keeps a key (``_rows_keep``, evaluated once per spec and sizes): eager's all -inf row is NaN,
   FlexAttention's is 0;
3. a BlockMask (skip blocks no row keeps) only for the chain's last step being a predicate mask
   without data tensors, and only where skipping is exact by the removal rule (``removal.py``):
   a row's max is at least the least kept element (>= -bound + kept value, by 1. and 2.), which
   must exceed every masked element by ``MARGIN`` (always for -inf; for finfo.min whenever the
   bound is not astronomically large). Inside partial blocks FlexAttention sets masked elements to
   -inf instead of the fill, which is the same skipping, under the same proof; so with the
   BlockMask the score_mod leaves the masking step out (``_kernel``), and the predicate is
   evaluated on partial blocks only, as a hand-written mask_mod is.

Anything else returns None and the next candidate computes the call. float32 only: with 16-bit
inputs eager rounds each step to 16 bits, and FlexAttention does not.

**Compilation.** One ``torch.compile(..., dynamic=True)`` per spec (a fresh code object, so
Dynamo's recompile limit counts per spec, and every sequence length shares one kernel), compiled
on the spec's first call (seconds: it is measured against the other candidates only when it is
warm, ``select._measure``). BlockMasks are cached per spec and sizes.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import cpu, predicate, removal
from .spec import AttentionSpec, to_dtype

log = logging.getLogger("fusion_pass.kernels")

_OPS = ("mul", "div", "add", "sub", "rsub", "tanh", "cast", "fill", "fill_not", "fn")
# a BlockMask is built (materialising the mask once per spec and sizes) up to this many elements
BLOCK_MASK_MAX_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class FlexPlan:
    step: Optional[int]                     # the masking step (last step), or None
    removal: Optional[removal.Removal]      # its removal (None: it masks nothing skippable)
    block_mask: bool                        # its predicate may become a BlockMask
    neg_inf: bool                           # its masked value may be -inf (rows must keep a key)


def _is_mask_step(spec: AttentionSpec, op) -> bool:
    return op.kind in ("fill", "fill_not") or (op.kind == "add" and op.operand == "predicate")


@functools.lru_cache(maxsize=None)
def plan(spec: AttentionSpec) -> Optional[FlexPlan]:
    """The static half: a float32 spec without dropout whose chain FlexAttention can evaluate,
    with at most one masking step and that one last; None otherwise. (Which specs it is offered
    for, inference or also training, is ``select.route``'s call.)"""
    if spec.dropout_p:
        return None
    dts = {spec.qk_dtype, spec.softmax_dtype, spec.prob_dtype, spec.out_dtype}
    dts |= {op.dtype for op in spec.score_ops}
    if dts != {"float32"}:
        return None
    if any(bi.y_data for bi in spec.biases):
        return None
    for n, op in enumerate(spec.score_ops):
        if op.kind not in _OPS:
            return None
        if _is_mask_step(spec, op) and n != len(spec.score_ops) - 1:
            return None  # a later step moves the masked values: no bound of them is proven here
        if op.kind in ("fill", "fill_not"):
            if op.operand != "predicate" or op.value is None or math.isnan(op.value) \
                    or op.value == math.inf:
                return None  # a mask tensor's rows cannot be checked once per shape
        if op.operand == "predicate" and spec.masks[op.index].data:
            return None  # a data mask (padding) changes per call: no cached rows or BlockMask
        if op.operand == "predicate" and op.kind == "add":
            m = spec.masks[op.index]
            if m.kind != "additive" or not all(map(math.isfinite, (m.kept,))) or \
                    math.isnan(m.masked) or m.masked == math.inf:
                return None
        elif op.operand == "predicate" and spec.masks[op.index].kind != "bool":
            return None
    if not spec.score_ops or not _is_mask_step(spec, spec.score_ops[-1]):
        return FlexPlan(None, None, False, False)
    step = len(spec.score_ops) - 1
    op = spec.score_ops[step]
    r = removal.step_removal(spec, op)
    masked = op.value if op.kind != "add" else spec.masks[op.index].masked
    return FlexPlan(step, r, r is not None and r.operand == "predicate", masked == -math.inf)


# ---------------------------------------------------------------------------------------------
# The chain as a score_mod
# ---------------------------------------------------------------------------------------------

def _batch_index(b, h, batch_shape):
    """The score's batch indices from FlexAttention's (b, h), for the 4-D view ``_as_4d`` makes
    of scores with at most two batch dims: (b, h) for 4-D scores, h for 3-D, none for 2-D."""
    return [b, h][2 - len(batch_shape):]


def _steps(spec: AttentionSpec):
    """The chain as plain tuples, resolved once outside the compiled function (Dynamo then traces
    only arithmetic): (the step, its kind, operand, value, index, keep function, its axes count,
    the additive mask's values and dtypes)."""
    out = []
    for op in spec.score_ops:
        keep = R = kept = masked = mdt = ydt = bdt = None
        index = op.index
        if op.operand == "predicate":
            m = spec.masks[op.index]
            keep, R = predicate.keep_function(m), len(m.axes)
            kept, masked = m.kept, m.masked
            mdt = to_dtype(m.dtype) if m.kind == "additive" else None
        elif op.operand == "bias":
            bi = spec.biases[op.index]
            keep, R = predicate.keep_function(bi.index_spec()), len(bi.axes)
            ydt, bdt, index = to_dtype(bi.y_dtype), to_dtype(bi.dtype), bi.x
        out.append((op, op.kind, op.operand, op.value, index, keep, R, kept, masked, mdt, ydt, bdt))
    return tuple(out)


def _chain(steps, s, idx, cidx, sizes, caps):
    """The score chain on one element: ``idx`` its full index in the score's own dims (batch
    indices, i, j) and ``sizes`` those dims' sizes, for the predicates; ``cidx`` (b, h, i, j) its
    index in ``caps``, the captured operands (tensors as 4-D views expanded to FlexAttention's
    scores, scalars as 0-dim float32 tensors)."""
    for op, kind, operand, value, index, keep, R, kept, masked, mdt, ydt, bdt in steps:
        x = None
        if operand == "const":
            x = value
        elif operand == "scalar":
            x = caps[index]
        elif operand == "tensor":
            x = caps[index][cidx]
        elif operand == "predicate":
            k = keep(*idx[len(idx) - R:], *sizes[len(sizes) - R:])
            if kind == "add":
                x = torch.where(k, torch.tensor(kept, dtype=mdt), torch.tensor(masked, dtype=mdt))
            else:
                x = k
        elif operand == "bias":
            y = torch.as_tensor(keep(*idx[len(idx) - R:], *sizes[len(sizes) - R:])).to(ydt)
            x = torch.mul(caps[index][cidx], y)
            if x.dtype != bdt:
                x = x.to(bdt)
        # the step itself: the tiled path's own (a fill's x is its mask, its value the constant)
        fill = kind in ("fill", "fill_not")
        s = cpu._apply(op, s, value if fill else x, mask=x if fill else None)
    return s


def _kept_fn(spec: AttentionSpec, p: FlexPlan):
    """The masking step's kept elements as a function of the full index (the BlockMask's
    mask_mod)."""
    op = spec.score_ops[p.step]
    m = spec.masks[op.index]
    keep, R, invert = predicate.keep_function(m), len(m.axes), op.kind == "fill"

    def kept(idx, sizes):
        k = torch.as_tensor(keep(*idx[len(idx) - R:], *sizes[len(sizes) - R:]))
        return ~k if invert else k
    return kept


# ---------------------------------------------------------------------------------------------
# Per spec: the compiled kernel; per spec and sizes: the BlockMask and the rows check
# ---------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
# (spec, rank, head dims, grouped) whose kernel failed to compile: never tried again (the
# compile is seconds; its failures are the template's, per shape class, e.g. a decode row)
_BROKEN = set()
# FlexAttention's CPU template tiles queries and keys; below these lengths (decode rows, a few
# keys) it is not the fast kernel and its code generation has failed (Nq = 1): not offered
MIN_LENGTH = 16
# Nor below this head dim: torch 2.13's CPU template returned wrong rows at head dims 8 and 16 on an
# AVX2 machine (2026-12-02: a causal or window BlockMask, lengths 8, 40, 72, 88, 104, 120; in 2-26
# of 30 repeated calls with fresh inputs, so it reads memory it did not write). Head dims 4, 24,
# 32, 48, 64, 80, 96, 128 gave eager's answer on every call of the same sweep; 24 is left out too,
# one step from the bad ones. Models' head dims are 32-256.
MIN_HEAD_DIM = 32


@functools.lru_cache(maxsize=64)
def _kernel(spec: AttentionSpec, masked_by_block_mask: bool):
    """The compiled call of ``spec``. ``masked_by_block_mask``: the call passes the BlockMask of
    the last step, under the proof that skipping is exact (``_exact``); FlexAttention then sets
    every masked element of a partial block to -inf itself and skips the empty blocks, so the
    score_mod leaves the masking step out (a kept element is s itself, or s + the additive mask's
    kept value): the predicate is evaluated on partial blocks only, as a hand-written mask_mod."""
    from torch.nn.attention.flex_attention import flex_attention

    steps = _steps(spec)
    if masked_by_block_mask:
        last = spec.score_ops[-1]
        steps = steps[:-1]
        kept = spec.masks[last.index].kept if last.kind == "add" else 0.0
        if kept != 0.0:  # s + kept on the kept elements, in the step's dtype
            steps += _steps(dataclasses.replace(spec, score_ops=(
                dataclasses.replace(last, operand="const", value=kept, index=None),)))
    kinds = spec.captured

    def run(q, k, v, block_mask, gqa, raw, nt):
        # the score's sizes as 0-dim int64 tensors (``nt``) for the predicates: a symbolic int
        # captured by the score_mod fails FlexAttention's lowering under dynamic lengths; the
        # captured tensors (4-D views) expanded here, to the (symbolic) shape of the scores
        # (expanded outside, Inductor's CPU template fails to compile them under dynamic lengths)
        sizes = [nt[d] for d in range(nt.shape[0])]
        batch_shape = sizes[:-2]
        shape = tuple(q.shape[:-1]) + (k.shape[-2],)
        caps = [c.expand(shape) if kind == "tensor" else c for c, kind in zip(raw, kinds)]

        def score_mod(s, b, h, i, j):
            idx = _batch_index(b, h, batch_shape) + [i, j]
            return _chain(steps, s, idx, (b, h, i, j), sizes, caps)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0,
                              enable_gqa=gqa)
    # a fresh code object per spec: Dynamo's cache (and its recompile limit) is per code object
    code = run.__code__.replace(co_name=f"fusion_pass_flex_{abs(hash(spec.to_key())) % 10**8}")
    fresh = type(run)(code, run.__globals__, code.co_name, run.__defaults__, run.__closure__)
    # automatic dynamic shapes: the constants of the chain stay constants (``dynamic=True`` would
    # make its floats symbolic, which FlexAttention's lowering refuses); the sequence lengths are
    # marked dynamic per call, the BlockMask's block counts become dynamic on their first change
    return torch.compile(fresh, dynamic=None)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """A new view, 4-D (leading dims of size 1): never the caller's tensor object, since the call
    marks its lengths dynamic for Dynamo, which would make the caller's own compiled graph
    recompile for dynamic shapes (its guards read those marks)."""
    return t.view((1,) * (4 - t.dim()) + tuple(t.shape))


@functools.lru_cache(maxsize=32)
def _rows_keep(spec: AttentionSpec, sizes: tuple) -> bool:
    """Every row of the masking step keeps at least one key, over the score sizes ``sizes``
    (evaluated in blocks of rows over the axes the predicate reads, once per spec and sizes)."""
    p = plan(spec)
    op = spec.score_ops[p.step]
    m = spec.masks[op.index]
    R = len(m.axes)
    ax_sizes = sizes[len(sizes) - R:]
    nq, nk = ax_sizes[-2], ax_sizes[-1]
    if nk == 0:
        return nq == 0
    grids_lead = []
    for d in range(R - 2):
        used = m.uses_axis(m.axes[d])
        n = ax_sizes[d] if used else 1
        grids_lead.append(torch.arange(n).reshape([-1 if e == d else 1 for e in range(R)]))
    step = max(1, (1 << 22) // max(nk, 1))
    j = torch.arange(nk).reshape([1] * (R - 1) + [-1])
    for r0 in range(0, nq, step):
        i = torch.arange(r0, min(nq, r0 + step)).reshape([1] * (R - 2) + [-1, 1])
        keep = torch.as_tensor(predicate.evaluate_keep(m, grids_lead + [i, j], ax_sizes, []))
        kept = ~keep if op.kind == "fill" else keep
        kept = kept.expand(torch.broadcast_shapes(kept.shape, i.shape, j.shape))
        if not bool(kept.any(-1).all()):
            return False
    return True


_BLOCK_MASKS = {}


def _block_mask(spec: AttentionSpec, p: FlexPlan, batch_shape: tuple, nq: int, nk: int):
    """The BlockMask of the masking step's kept elements for these sizes (cached); None when the
    mask would be too large to build once."""
    key = (spec, batch_shape, nq, nk)
    with _LOCK:
        hit = _BLOCK_MASKS.get(key)
    if hit is not None:
        return hit
    m = spec.masks[spec.score_ops[p.step].index]
    R = len(m.axes)
    reads_batch = any(m.uses_axis(a) for a in m.axes[:R - 2])
    if nq * nk * (max(1, math.prod(batch_shape)) if reads_batch else 1) > BLOCK_MASK_MAX_ELEMENTS:
        return None
    from torch.nn.attention.flex_attention import create_block_mask
    kept = _kept_fn(spec, p)
    sizes = [torch.tensor(n, dtype=torch.int64) for n in tuple(batch_shape) + (nq, nk)]

    def mask_mod(b, h, i, j):
        return kept(_batch_index(b, h, sizes[:-2]) + [i, j], sizes)
    if reads_batch:
        B = max(1, math.prod(batch_shape[:-1])) if len(batch_shape) >= 2 else 1
        H = batch_shape[-1] if batch_shape else 1
        bm = create_block_mask(mask_mod, B, H, nq, nk, device="cpu")
    else:
        bm = create_block_mask(mask_mod, None, None, nq, nk, device="cpu")
    with _LOCK:
        if len(_BLOCK_MASKS) > 64:
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = bm
    return bm


# ---------------------------------------------------------------------------------------------
# The call
# ---------------------------------------------------------------------------------------------

def _least_kept(spec: AttentionSpec, p: FlexPlan, bound: float) -> float:
    """A lower bound of every kept element leaving the chain, from ``bound`` >= |s| entering the
    masking step: s itself (a fill), or s + kept (an additive predicate, one rounding)."""
    op = spec.score_ops[p.step]
    if op.kind == "add":
        kept = spec.masks[op.index].kept
        return (-bound + kept) - (bound + abs(kept)) * 2.0 ** -20
    return -bound


# The dispatch keys a plain eager call excludes (autocast's), read at import. A custom op's
# implementation runs with every key above the backend excluded (vmap, functionalisation, Python
# modes...), where FlexAttention's own tracing of the score_mod and create_block_mask's vmap fail
# ("querying is_contiguous inside of vmap"). ``_eager_dispatch`` restores an eager call's set for
# the Flex call (what stays excluded: the intersection, so autocast stays off as the op wants).
_EAGER_EXCLUDE = torch._C._dispatch_tls_local_exclude_set()


def _eager_dispatch():
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                           torch._C._dispatch_tls_local_exclude_set() & _EAGER_EXCLUDE)


def forward(spec: AttentionSpec, q, k, v, captured: Sequence[torch.Tensor]):
    """``_forward`` under an eager call's dispatch keys (``_eager_dispatch``)."""
    with _eager_dispatch():
        return _forward(spec, q, k, v, captured)


def _forward(spec: AttentionSpec, q, k, v, captured: Sequence[torch.Tensor]):
    """(out, lse) computed by FlexAttention when it computes this call exactly (lse NaN: an
    inference spec's lse is never read), else None.

    The per-call facts (inputs finite, the score bound, the skipping margin) come from one
    aminmax pass over each input, before the kernel runs. A call whose inputs are not finite or
    astronomically large returns None (the next candidate computes it); one whose skipping margin
    fails runs without the BlockMask."""
    p = plan(spec)
    if p is None or q.device.type != "cpu":
        return None
    if any(t.dtype != torch.float32 for t in (q, k, v)) or not 2 <= q.dim() <= 4:
        return None  # more batch dims than (b, h): not flattened here (never a model's)
    nq, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if min(nq, nk) < MIN_LENGTH or min(d, v.shape[-1]) < MIN_HEAD_DIM:
        return None
    key = (spec, q.dim(), d, v.shape[-1], q.dim() > 2 and q.shape[-3] != k.shape[-3])
    if key in _BROKEN:
        return None
    batch_shape = tuple(q.shape[:-2])
    sizes = batch_shape + (nq, nk)
    rows = _rows_keep(spec, sizes) if p.step is not None else True
    if p.neg_inf and not rows:
        return None  # eager's row of only -inf is NaN; FlexAttention's is 0
    bm = None
    if p.block_mask and rows:  # used only if the margin below holds for this call
        bm = _block_mask(spec, p, batch_shape, nq, nk)
    # scalars as float32 0-dim tensors (eager converts a Python number to the scores' float32);
    # tensors as 4-D views (leading dims of size 1), as q, k, v are viewed
    # detached views: a training site's inputs require gradients, which FlexAttention refuses on
    # CPU; this op's backward is the tiled path's, which recomputes from q, k, v
    caps = [torch.tensor(c.item(), dtype=torch.float32) if kind == "scalar"
            else c.detach().reshape((1,) * (4 - c.dim()) + tuple(c.shape)) if kind == "tensor"
            else c for c, kind in zip(captured, spec.captured)]
    q4, k4, v4 = _as_4d(q.detach()), _as_4d(k.detach()), _as_4d(v.detach())
    gqa = q4.shape[1] != k4.shape[1]
    for t in (q4, k4, v4):
        if t.shape[-2] > 1:  # 0/1-sized dims are specialised by Dynamo anyway
            torch._dynamo.maybe_mark_dynamic(t, 2)
    exact, bm = _call_facts(spec, p, q, k, v, captured, rows, bm)
    if not exact:
        return None
    try:
        out = _kernel(spec, bm is not None)(q4, k4, v4, bm, gqa, caps,
                                            torch.tensor(sizes, dtype=torch.int64))
    except Exception as e:  # noqa: BLE001 - a chain Inductor's flex template cannot compile
        log.warning("fusion_pass: FlexAttention could not compile %s (%s: %s); the other "
                    "kernels compute it", spec, type(e).__name__, str(e)[:3000])
        _BROKEN.add(key)
        return None
    out = out.reshape(tuple(q.shape[:-1]) + (v.shape[-1],))
    lse = torch.full(tuple(q.shape[:-1]), math.nan, dtype=torch.float32)
    return out, lse


@cpu._threads_for_share
def _call_facts(spec, p: FlexPlan, q, k, v, captured, rows: bool, bm):
    """(whether FlexAttention computes this call exactly, the BlockMask to use: ``bm``, or None
    where skipping is not proven for this call). The call's facts: max |x| and finiteness of q, k,
    v and the float operands, one pass each (``removal.host_stats``), before the kernel runs; on the
    caller's threads unless other processes keep the cores busy (``cpu._threads_for_share``, as
    ``cpu_flash.usable``'s): three (1, 12, 2048, 64) float32 operands after a cache flush took
    452-473 us on 2 threads, 678-683 us on one (2026-12-02)."""
    stats = [removal.host_stats(t) for t in (q, k, v)]
    stats += [removal.host_stats(c) for c, kind in zip(captured, spec.captured)
              if kind in ("tensor", "scalar") and c.is_floating_point()]
    if not all(fin for _, fin in stats):
        return False, None
    qmax, _, kmax, _, _ = removal.as_stats(stats[0][0], stats[1][0])
    if _exact(spec, p, qmax, kmax, q, k, v, captured, rows, bm is not None):
        return True, bm
    if bm is None:
        return False, None
    # skipping is not proven for this call: compute every block
    return _exact(spec, p, qmax, kmax, q, k, v, captured, rows, False), None


def _exact(spec, p: FlexPlan, qmax, kmax, q, k, v, captured, rows: bool, skipped: bool) -> bool:
    """The call's result equals eager's function (see the module's docstring), given that every
    input is finite and max |q|, max |k| (0-dim float64)."""
    upto = p.step if p.step is not None else len(spec.score_ops)
    fin = torch.tensor(True)  # checked by the caller
    bound = float(removal.score_bound(spec, q, k, captured, upto=upto, tight=False, stats=(qmax, kmax)))
    if not math.isfinite(bound):
        return False
    if p.step is None:
        return True
    op = spec.score_ops[p.step]
    masked = op.value if op.kind != "add" else spec.masks[op.index].masked
    # s + M with a finite M rounds to -inf (as in eager) only beyond float32's largest value plus
    # half its last unit (2^103); a fill's masked elements are its constant exactly
    if not rows and op.kind == "add" and \
            (bound + abs(masked)) * (1 + 2.0 ** -20) >= float(torch.finfo(torch.float32).max) + 2.0 ** 103:
        return False
    if not skipped:
        return True
    w = removal.worst_masked(spec, p.removal, q, k, v, captured, step=p.step,
                             stats=(qmax, fin, kmax, fin, fin))
    least = torch.tensor(_least_kept(spec, p, bound), dtype=torch.float64)
    return bool(removal.rows_ok(least, w, p.removal))
