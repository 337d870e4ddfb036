"""Stage 4, analyse: turn a matched region into an ``AttentionSpec`` plus its captured operands,
or into a ``NearMiss`` when equivalence cannot be proven.

What is proven here, from Dynamo's fake tensors (symbolic shapes included):
* q, k^T, v and the probabilities have the same batch dims (no broadcasting inside the products)
  and compatible inner dims, so the fused op computes the same products;
* every score-chain operand broadcasts to the scores without enlarging them;
* the softmax is over the last dim; dropout has a constant probability;
* the dtypes of every step are recorded, so the kernels reproduce the graph's casts (autocast
  included: an autocast product computes in its output dtype, so its operands are cast to it).

Hands on: ``Analysis`` (spec + graph operands) to the rewriter.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator

import sympy
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fusion_pass.kernels.spec import AttentionSpec, ScoreOp, dtype_name

from .canonicalize import value, view
from .match import NearMiss, Region
from .normalize import scales_before_masks

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Analysis:
    region: Region
    spec: AttentionSpec
    captured: List[fx.Node]            # operand nodes, in the spec's order
    captured_kinds: List[str]          # "tensor", "scalar" or "symnum" (see _Captured)
    captured_preps: List[tuple]        # what the rewriter does to each operand first
    q_dtype: torch.dtype               # dtypes the products compute in (cast q/k/v to these)
    v_dtype: torch.dtype
    frames: "Frames" = None
    masks: List[str] = None            # report lines: each mask operand's proven predicate


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - an unprovable symbolic comparison is simply "not proven"
        return False


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _broadcasts_into(operand_shape, score_shape) -> bool:
    """operand broadcasts to score_shape without enlarging it: each dim is 1 or equal."""
    if len(operand_shape) > len(score_shape):
        return False
    pad = len(score_shape) - len(operand_shape)
    return all(_same(o, 1) or _same(o, s) for o, s in zip(operand_shape, score_shape[pad:]))


class _Captured:
    """Operands of the score chain, deduplicated (one mask read by two steps is one input).

    kind "tensor": a tensor node; "scalar": a 0-dim tensor node read as a number; "symnum": a
    symbolic number node (e.g. ``math.sqrt(q.size(-1))`` under dynamic shapes), which the rewriter
    wraps into a 0-dim float64 tensor and the spec reads as a "scalar". ``prep`` lists what the
    rewriter does to the node first: ("mul", beta) for baddbmm's input, ("to_frame",) to move a
    tensor from the batch layout of its step to the region's (see ``Frames``).
    """

    def __init__(self):
        self.nodes: List[fx.Node] = []
        self.kinds: List[str] = []
        self.preps: List[tuple] = []

    def add(self, node: fx.Node, kind: str, prep: tuple = ()) -> int:
        for i, (n, k, p) in enumerate(zip(self.nodes, self.kinds, self.preps)):
            if n is node and k == kind and p == prep:
                return i
        self.nodes.append(node)
        self.kinds.append(kind)
        self.preps.append(prep)
        return len(self.nodes) - 1

    @property
    def spec_kinds(self):
        return tuple("scalar" if k == "symnum" else k for k in self.kinds)


@dataclass
class Frames:
    """Batch layouts. Models may view the scores between batch layouts inside the region, e.g.
    BLOOM's (B*H, Nq, Nk) product viewed as (B, H, Nq, Nk) for the mask, then back to (B*H, ...)
    for the PV product. A view that keeps the last two dims is exactly a row-major reshape of the
    leading dims, so the op works in one layout, the softmax's ("canonical"), and the rewriter
    reshapes q, k, v, the operands and the output to and from it.

    ``sizes``: the canonical batch sizes as graph arguments (ints or size nodes), taken from the
    last view before the softmax; None when the canonical layout is the QK product's own.
    """

    sizes: Optional[list] = None
    reshape_qk: bool = False
    reshape_v: bool = False
    reshape_out: bool = False
    expand_k: bool = False   # k has one head broadcast over q's heads, v has them all: expand k
    expand_v: bool = False   # the other way round
    full_q: bool = False     # expand q to k's batch dims in the QK product's layout (then move it)
    full_k: bool = False     # expand k to q's batch dims in the QK product's layout (then move it)
    full_v: object = None    # expand v to the P @ V product's batch dims: their sizes (a list),
    #                          or "q" when that layout is the op's own (q's sizes after any move)


def _broadcast_mode(qb, kb, group: int) -> Optional[str]:
    """How a product broadcasts its second operand's batch dims ``kb`` into the first's ``qb``:
    None when equal; "head" when kb is qb except that its last batch dim (the heads) is 1, one
    head over all of q's, which the fused op reads as grouped heads (``ops._grouped``); "full"
    for any other right-aligned broadcast (each dim 1 or equal, fewer dims allowed), which the
    rewriter expands; "no" when qb itself would be broadcast or the batch enlarged. With heads
    repeated (``group`` > 1) the heads must match and only the dims before them may broadcast (the
    rewriter then expands those, keeping the unrepeated heads)."""
    if _same_shape(qb, kb):
        return None
    if len(kb) > len(qb) or not _broadcasts_into(kb, qb):
        return "no"
    if group > 1:
        return "full" if len(kb) == len(qb) >= 1 and _same(kb[-1], qb[-1]) else "no"
    if len(qb) == len(kb) >= 1 and _same_shape(qb[:-1], kb[:-1]) and isinstance(kb[-1], int) \
            and kb[-1] == 1:
        return "head"
    return "full"


def _number(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def analyse(region: Region) -> Union[Analysis, NearMiss]:
    if region.sdpa is not None:
        return _analyse_sdpa(region)
    site = region.site
    qv, ktv, vv = value(region.q), value(region.kt), value(region.v)
    if region.group > 1:  # the checks below are on the products' own (repeated) operands
        vv = value(region.repeats[1])
    sv, pvv = value(region.softmax), value(region.pv)
    for name, t in (("q", qv), ("k^T", ktv), ("v", vv), ("softmax", sv), ("P @ V", pvv)):
        if not isinstance(t, torch.Tensor):
            return NearMiss(site, region.qk.name, f"no example value recorded for {name}")
    rank = qv.dim()
    kt_shape = tuple(ktv.shape)
    if region.kt_is_k and len(kt_shape) >= 2:
        kt_shape = kt_shape[:-2] + (kt_shape[-1], kt_shape[-2])
    # q and k^T meet in one product, so they share a batch layout; v meets the probabilities in
    # the other, possibly in another layout (BLOOM's (B*H, N, N) bmm after a 4-D QK product): its
    # batch dims are checked against the probabilities' below, and the frames reconcile the two
    if rank < 2 or ktv.dim() < 2 or vv.dim() < 2:
        return NearMiss(site, region.qk.name, f"q, k^T, v have ranks {qv.dim()}, {ktv.dim()}, "
                        f"{vv.dim()}; the products need rank >= 2")
    frames = Frames()
    # k^T's batch dims: q's (None), or broadcast by the product into q's: one head shared by all
    # of q's ("head", multi-query), or any other broadcast ("full": expanded, a view, in the rewrite)
    k_mode = _broadcast_mode(tuple(qv.shape[:-2]), kt_shape[:-2], region.group)
    if k_mode == "no":
        # the other way round: q broadcast into k's batch dims (queries shared by every batch
        # element, e.g. learned latents): expanded in the rewrite
        if _broadcast_mode(kt_shape[:-2], tuple(qv.shape[:-2]), region.group) == "no":
            return NearMiss(site, region.qk.name, f"batch dims of q {tuple(qv.shape)} and k^T "
                            f"{kt_shape} are not provably equal, nor one broadcast into the other's "
                            "(the product would enlarge both)")
        frames.full_q, k_mode = True, None
    if not (_same(qv.shape[-1], kt_shape[-2]) and _same(kt_shape[-1], vv.shape[-2])):
        return NearMiss(site, region.pv.name, "inner dims of the products are not provably equal")
    for name, t in (("q", qv), ("k", ktv), ("v", vv)):
        if t.dtype not in FLOAT_DTYPES:
            return NearMiss(site, region.qk.name, f"{name} has dtype {t.dtype}; the fused op takes "
                            "floating point inputs")
    if any(t.device != qv.device for t in (ktv, vv)):
        return NearMiss(site, region.qk.name, "q, k, v live on different devices")

    # -- softmax over the last dim -----------------------------------------------------------------
    sm = view(region.softmax)
    dim = sm.args[1]
    if not isinstance(dim, int) or dim % sv.dim() != sv.dim() - 1:
        return NearMiss(site, site, f"softmax over dim {dim}, not the key dim (last)")

    # -- the score chain, with the batch layout ("frame") each step works in ---------------------
    qk_dtype = value(region.qk).dtype
    qk_shape = tuple(value(region.qk).shape)
    cur = qk_shape
    steps = []  # (op, pos, frame shape at the step)
    seen = []   # (frame shape, its batch sizes as graph arguments) after each batch reshape
    for op, pos in region.score_chain:
        out = value(op.node)
        if not isinstance(out, torch.Tensor):
            return NearMiss(site, op.node.name, f"no example value recorded for {op.node.name}")
        if op.name == "reshape":
            if not _same_shape(out.shape[-2:], cur[-2:]):
                return NearMiss(site, op.node.name, "a reshape of the scores that moves the query or "
                                "key dims")
            sizes = list(op.args[1])
            # an inferred (-1) batch size is kept as is: the rewriter reshapes tensors of the same
            # batch numel to these sizes, so reshape infers the same number for each of them
            if sum(1 for x in sizes[:-2] if isinstance(x, int) and x == -1) > 1:
                return NearMiss(site, op.node.name, "a batch reshape with two inferred (-1) sizes")
            frames.sizes = sizes[:-2]
            cur = tuple(out.shape)
            seen.append((cur, sizes[:-2]))
            continue
        if not _same_shape(out.shape, cur):
            return NearMiss(site, op.node.name, f"{op.name} changes the scores' shape")
        steps.append((op, pos, cur))

    def score_ops(canonical):
        """The score steps with the op working in batch layout ``canonical``: (captured, ops)."""
        captured, ops = _Captured(), []
        qk_moved = not _same_shape(qk_shape[:-2], canonical[:-2])
        if region.qk_input is not None:
            res = _baddbmm_ops(region, captured, qk_shape, site, qk_moved, canonical)
            if isinstance(res, NearMiss):
                return res
            ops += res
        for op, pos, frame in steps:
            moved = not _same_shape(frame[:-2], canonical[:-2])
            res = _score_op(op, pos, value(op.node).dtype, captured, frame, site, moved, canonical)
            if isinstance(res, NearMiss):
                return res
            if res is not None:
                ops.append(res)
        return captured, ops

    # The op works in the softmax's layout, unless an operand broadcasts over part of a batch dim
    # that layout merges (FSMT's (B, 1, N, N) mask added to (B*H, N, N) scores viewed as
    # (B, H, N, N) and back): then in the finest layout the scores pass through, where it
    # broadcasts as it does in the model (q, k, v and the output move there and back by views)
    canonical = cur
    res = score_ops(canonical)
    if isinstance(res, NearMiss) and res.reason.endswith(_PART_OF_A_LAYOUT):
        finest = max(seen, key=lambda fs: len(fs[0]))
        if len(finest[0]) > len(canonical):
            alt = score_ops(finest[0])
            if not isinstance(alt, NearMiss):
                res, canonical, frames.sizes = alt, finest[0], finest[1]
    if isinstance(res, NearMiss):
        return res
    captured, ops = res
    sink_cols = 0
    if region.sink is not None:
        sink_cols = _sink_columns(region, cur, canonical, site)
        if isinstance(sink_cols, NearMiss):
            return sink_cols
    qk_moved = not _same_shape(qk_shape[:-2], canonical[:-2])
    if not qk_moved:
        frames.sizes = None
    frames.reshape_qk = qk_moved

    # -- softmax -> PV ---------------------------------------------------------------------------
    softmax_dtype = sv.dtype
    prob_dtype = softmax_dtype
    dropout_p = 0.0
    p_frame = cur  # the softmax's layout
    p_sizes = None  # the batch sizes (graph arguments) of the last reshape of the probabilities
    for op in region.prob_chain:
        if op.name == "reshape":
            pv_ = value(op.node)
            if pv_ is None or not _same_shape(pv_.shape[-2:], p_frame[-2:]):
                return NearMiss(site, op.node.name, "a reshape of the probabilities that moves the "
                                "query or key dims")
            p_frame = tuple(pv_.shape)
            p_sizes = list(op.args[1])[:-2]
        elif op.name == "cast":
            prob_dtype = value(op.node).dtype
        elif op.name == "dropout":
            p, training = op.args[1], op.args[2]
            if not isinstance(training, bool):
                return NearMiss(site, op.node.name, "dropout's training flag is a run-time value")
            if not _number(p):
                return NearMiss(site, op.node.name, f"dropout probability is a run-time value "
                                f"({describe_value(p)}); the kernel needs it at compile time")
            if training and p > 0:
                if dropout_p:
                    return NearMiss(site, op.node.name, "two dropouts on the probabilities")
                if p >= 1:
                    return NearMiss(site, op.node.name, "dropout with p >= 1 zeroes everything")
                dropout_p = float(p)
            prob_dtype = value(op.node).dtype
    v_mode = _broadcast_mode(tuple(p_frame[:-2]), tuple(vv.shape[:-2]), region.group)
    if v_mode == "no" or not _same(p_frame[-1], vv.shape[-2]):
        return NearMiss(site, region.pv.name, f"P {p_frame} and v {tuple(vv.shape)} do not multiply "
                        "without broadcasting P or enlarging the batch")
    frames.reshape_v = frames.reshape_out = not _same_shape(p_frame[:-2], canonical[:-2])
    # One K/V head shared by every query head (Falcon's multi-query ``q @ k^T`` with k of shape
    # (B, 1, N, D)) is grouped-query attention with one group, which the op takes as it is. An
    # operand broadcast over other batch dims, or one that moves to another batch layout, is first
    # expanded (a view) in its own product's layout to what the product's broadcast reads (a move
    # then copies, as repeat_kv's reshape does); when only one of k, v is still shared, the
    # rewriter expands it to the other's heads
    if v_mode == "full" or v_mode == "head" and frames.reshape_v:
        if frames.reshape_v:
            # an inferred (-1) size is the probabilities' own size there, when that is a number
            full = [p_frame[d] if isinstance(x, int) and x == -1 else x for d, x in enumerate(p_sizes or [])]
            if p_sizes is None or any(not isinstance(x, (int, fx.Node)) for x in full):
                return NearMiss(site, region.pv.name, "v is broadcast over the probabilities' batch "
                                "dims in a batch layout with an inferred (-1) symbolic size")
            frames.full_v = full
        else:
            frames.full_v = "q"  # the probabilities' layout is the op's: q's sizes there
        v_mode = None
    if k_mode == "full" or k_mode == "head" and frames.reshape_qk:
        frames.full_k, k_mode = True, None
    frames.expand_k = k_mode == "head" and v_mode != "head"
    frames.expand_v = v_mode == "head" and k_mode != "head"
    if (frames.reshape_qk or frames.reshape_v) and region.group > 1:
        # grouped heads across a batch reshape: keep the repeated copies (still fused)
        region.k, region.v, region.group = region.repeats[0], region.repeats[1], 1
        region.repeats = []
    out_dtype = pvv.dtype
    v_dtype = vv.dtype
    if out_dtype != prob_dtype or out_dtype != v_dtype:
        # eager matmul refuses mixed dtypes, so a traced one ran under autocast, which casts both
        # operands to its compute dtype: the recorded output dtype
        prob_dtype = out_dtype
        v_dtype = out_dtype

    spec = AttentionSpec(
        score_ops=tuple(ops), captured=captured.spec_kinds, qk_dtype=dtype_name(qk_dtype),
        softmax_dtype=dtype_name(softmax_dtype), prob_dtype=dtype_name(prob_dtype),
        out_dtype=dtype_name(out_dtype), dropout_p=dropout_p)
    # a positive scale written after a -inf fill goes before it (the same bits): the mask is then
    # the last step, which routing and the removal rule read (normalize.py)
    spec = scales_before_masks(spec)
    lines, causal, preds = _mask_predicates(spec, captured, canonical)
    if causal:
        spec = dataclasses.replace(spec, causal=True)
    if preds:
        spec, captured = _with_predicates(spec, captured, preds, canonical)
        spec = scales_before_masks(spec)  # a 0 / -inf additive predicate may now move a scale
    if sink_cols:  # the sink logits: always the last operand
        captured.nodes.append(region.sink.logits)
        captured.kinds.append("sink")
        captured.preps.append(())
        spec = dataclasses.replace(spec, sink=sink_cols, captured=spec.captured + ("sink",))
    from .match import shape_only
    for n in region.nodes:
        for u in n.users:
            if n is not region.pv and shape_only(u, n) and any(
                    size_source(d, [region.q, region.kt]) is None for d in value(n).shape):
                return NearMiss(site, u.name, f"{u.name} reads the shape of {n.name}, whose sizes "
                                "are not sizes of q or k")
    return _analysis(region, spec, captured, qk_dtype, v_dtype, frames, lines)


def _analyse_sdpa(region: Region) -> Union[Analysis, NearMiss]:
    """scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) as
    a spec: scale, then the mask (a boolean mask keeps where True: ``where(m, s, -inf)``; a float
    mask is added; ``is_causal`` keeps j <= i, top-left aligned as SDPA's own), softmax in float32,
    dropout, P @ V. SDPA's softmax is *safe*: a row whose every score is -inf gives zeros (not
    eager softmax's NaN), hence ``safe_softmax``. The site is taken only when that gains: when the
    mask is proven a predicate, so the kernels skip tiles and never read an N x N mask; an SDPA call
    with no mask, with ``is_causal`` alone or with a data mask already runs ATen's fused kernel,
    and is reported as kept."""
    op, site, node = region.sdpa, region.site, region.pv
    kw = op.kwargs
    qv, kv, vv, ov = value(region.q), value(region.kt), value(region.repeats[1] if region.group > 1
                                                               else region.v), value(node)
    if not all(isinstance(t, torch.Tensor) for t in (qv, kv, vv, ov)):
        return NearMiss(site, node.name, "no example value recorded for q, k, v or the output")
    if not (qv.dim() == kv.dim() == vv.dim() >= 2):
        return NearMiss(site, node.name, f"q, k, v have ranks {qv.dim()}, {kv.dim()}, {vv.dim()}")
    if qv.dtype not in FLOAT_DTYPES or kv.dtype != qv.dtype or vv.dtype != qv.dtype:
        return NearMiss(site, node.name, "q, k, v are not of one floating dtype")
    gqa = kw.get("enable_gqa")
    if not isinstance(gqa, bool):
        return NearMiss(site, node.name, "enable_gqa is a run-time value")
    qb, kb = tuple(qv.shape[:-2]), tuple(kv.shape[:-2])
    if gqa and qv.dim() >= 3 and not _same(qb[-1], kb[-1]):
        if not (_same_shape(qb[:-1], kb[:-1]) and isinstance(qb[-1], int) and isinstance(kb[-1], int)
                and kb[-1] > 0 and qb[-1] % kb[-1] == 0):
            return NearMiss(site, node.name, "enable_gqa with head counts that do not divide")
        region.group = qb[-1] // kb[-1]
    elif (region.group == 1 and qv.dim() >= 3 and _same_shape(qb[:-1], kb[:-1])
          and isinstance(qb[-1], int) and qb[-1] > 1 and isinstance(kb[-1], int) and kb[-1] == 1):
        # one K/V head that SDPA broadcasts over q's heads (Falcon's multi-query, no enable_gqa):
        # every query head reads head 0, which is grouped-query attention with one group
        region.group = qb[-1]
    elif not _same_shape(qb, kb):
        return NearMiss(site, node.name, f"batch dims of q {tuple(qv.shape)} and k {tuple(kv.shape)} "
                        "are not provably equal")
    # k's and v's lengths: equal, or two sizes Dynamo could not relate (a KV cache's keys and values
    # are separate inputs, and SDPA's shape function, unlike P @ V's, asserts nothing between them).
    # SDPA raises on unequal lengths and so does the fused op (its run-time check): either way the
    # call fails, so the site is taken; lengths that are known and differ are not
    nk, nv = kv.shape[-2], vv.shape[-2]
    lengths_pair = _same(nk, nv) or not (isinstance(nk, int) and isinstance(nv, int))
    if not (_same_shape(kb, tuple(vv.shape[:-2])) and _same(qv.shape[-1], kv.shape[-1])
            and lengths_pair):
        return NearMiss(site, node.name, f"k {tuple(kv.shape)} and v {tuple(vv.shape)} do not pair, "
                        f"or q {tuple(qv.shape)} and k have different head dims")
    p = kw.get("dropout_p")
    if not _number(p) or not 0 <= p < 1:
        return NearMiss(site, node.name, f"dropout_p {describe_value(p)} is not a constant in [0, 1)")
    causal = kw.get("is_causal")
    if not isinstance(causal, bool):
        return NearMiss(site, node.name, "is_causal is a run-time value")
    mask = kw.get("attn_mask")
    if causal and mask is not None:
        return NearMiss(site, node.name, "attn_mask together with is_causal (SDPA refuses it)")
    if causal or mask is None:
        return NearMiss(site, node.name, "kept: SDPA's own fused kernel is already the fastest exact "
                        "kernel for this call (" + ("is_causal alone: it skips the tiles above the "
                        "diagonal itself" if causal else "no mask: nothing to skip") + ")"
                        + _kept_dropout(p), kept=True)

    dt = qv.dtype
    acc = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt  # SDPA's score dtype
    da = dtype_name(acc)
    score_shape = tuple(qv.shape[:-1]) + (kv.shape[-2],)
    captured, ops = _Captured(), []
    scale = kw.get("scale")
    if scale is None:
        e = qv.shape[-1]
        if isinstance(e, int):
            ops.append(ScoreOp("mul", "const", value=1.0 / math.sqrt(e), dtype=da))
        else:  # a symbolic head dim: 1 / sqrt(q.size(-1)) computed in the graph, read per call
            ops.append(ScoreOp("mul", "scalar", index=captured.add(region.q, "scalar",
                                                                   (("inv_sqrt_size", -1),)), dtype=da))
    elif _number(scale):
        ops.append(ScoreOp("mul", "const", value=float(scale), dtype=da))
    elif isinstance(scale, fx.Node) and isinstance(value(scale), (torch.SymFloat, torch.SymInt)):
        ops.append(ScoreOp("mul", "scalar", index=captured.add(scale, "symnum"), dtype=da))
    else:
        return NearMiss(site, node.name, f"scale {describe_value(scale)} is not a number")
    if mask is not None:
        mv = value(mask)
        if not isinstance(mask, fx.Node) or not isinstance(mv, torch.Tensor):
            return NearMiss(site, node.name, "attn_mask is not a graph tensor")
        if not _broadcasts_into(tuple(mv.shape), score_shape):
            return NearMiss(site, node.name, f"attn_mask {tuple(mv.shape)} does not broadcast into "
                            f"the scores {score_shape}")
        if mv.dtype == torch.bool:
            ops.append(ScoreOp("fill_not", "none", value=-math.inf, index=captured.add(mask, "tensor"),
                               dtype=da))
        elif mv.dtype == dt:
            ops.append(ScoreOp("add", "tensor", index=captured.add(mask, "tensor"), dtype=da))
        else:
            return NearMiss(site, node.name, f"attn_mask of dtype {mv.dtype} with {dt} inputs")
    spec = AttentionSpec(score_ops=tuple(ops), captured=captured.spec_kinds, qk_dtype=da,
                         softmax_dtype=da, prob_dtype=dtype_name(dt), out_dtype=dtype_name(dt),
                         dropout_p=float(p), safe_softmax=True)
    lines, _, preds = _mask_predicates(spec, captured, score_shape)
    if not preds:
        return NearMiss(site, node.name, "kept: SDPA's own fused kernel is already the fastest exact "
                        "kernel for this call (its mask is data, which SDPA reads as the kernels "
                        "would: nothing to skip)" + _kept_dropout(p), kept=True)
    spec, captured = _with_predicates(spec, captured, preds, score_shape)
    spec = _sdpa_additive(spec)
    if p:
        lines.append(f"dropout p={p}: fusion_pass's counter-based dropout, equal in distribution to "
                     "SDPA's, not bit-equal (a different random stream)")
    return _analysis(region, spec, captured, acc, dt, Frames(), lines)


def _sdpa_additive(spec: AttentionSpec) -> AttentionSpec:
    """SDPA applies a boolean ``attn_mask`` by adding 0 / -inf to the scores (its math and CPU
    flash paths both do), not by replacing them: where a masked score is +inf or NaN, or a row
    keeping no key has a NaN query, eager SDPA gives NaN and ``where(keep, s, -inf)`` would not.
    So a proven boolean mask's step becomes the additive predicate ``where(keep, 0, -inf)`` added
    to the scores: the eager additive spelling, whose removal rule (skipping a masked key only
    where its score is proven finite) every kernel already follows."""
    ops, masks = list(spec.score_ops), list(spec.masks)
    for pos, op in enumerate(ops):
        if op.kind == "fill_not" and op.operand == "predicate" and op.value == -math.inf:
            masks[op.index] = dataclasses.replace(masks[op.index], kind="additive", dtype=op.dtype,
                                                  kept=0.0, masked=-math.inf)
            ops[pos] = ScoreOp("add", "predicate", index=op.index, dtype=op.dtype)
    return dataclasses.replace(spec, score_ops=tuple(ops), masks=tuple(masks))


def _kept_dropout(p) -> str:
    """What a kept SDPA call with dropout draws from: SDPA's own stream, so it stays bit-equal."""
    return (f"; dropout p={p}: SDPA's own dropout, as stock torch.compile runs it" if p else "")


def _sink_columns(region: Region, scores_shape, canonical, site) -> Union[int, NearMiss]:
    """The number m of sink logit columns, once proven: the cat appends them to the scores along
    the key dim without changing the scores' dtype, and the slice after the softmax keeps exactly
    the scores' columns (``probs[..., :-m]``, ``[..., :n]``; ``[..., m:]`` when they come first)."""
    sk = region.sink
    cv, tv, sv = value(sk.cat), value(sk.logits), value(sk.scores)
    if not all(isinstance(t, torch.Tensor) for t in (cv, tv, sv)):
        return NearMiss(site, sk.cat.name, "no example value recorded for the sink logits")
    if not _same_shape(scores_shape[:-2], canonical[:-2]):
        return NearMiss(site, sk.cat.name, "sink logits with an operand moved to another batch "
                        "layout: not supported")
    m = tv.shape[-1]
    if not isinstance(m, int) or m < 1:
        return NearMiss(site, sk.logits.name, f"the number of sink columns ({m}) is not a constant")
    if cv.dtype != sv.dtype or not tv.is_floating_point():
        return NearMiss(site, sk.cat.name, f"appending the sink logits ({tv.dtype}) changes the "
                        f"scores' dtype ({sv.dtype} -> {cv.dtype})")
    n, total = sv.shape[-1], cv.shape[-1]
    idx = sk.index if isinstance(sk.index, tuple) else (sk.index,)
    rank = cv.dim()
    if sum(1 for e in idx if e is Ellipsis) > 1:
        return NearMiss(site, sk.cut.name, "a slice index with two ellipses")
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx = idx[:e] + (slice(None),) * (rank - len(idx) + 1) + idx[e + 1:]
    whole = slice(None, None, None)
    ok = len(idx) == rank and all(isinstance(e, slice) and e == whole for e in idx[:-1]) \
        and isinstance(idx[-1], slice) and idx[-1].step in (None, 1)
    if ok:
        def bound(x, default):
            x = value(x)
            if x is None:
                return default
            return total + x if isinstance(x, int) and x < 0 else x
        start, stop = bound(idx[-1].start, 0), bound(idx[-1].stop, total)
        want = (m, total) if sk.first else (0, n)
        ok = _same(start, want[0]) and _same(stop, want[1])
    if not ok:
        return NearMiss(site, sk.cut.name, f"the softmax runs over the scores and {m} appended "
                        f"logit column(s), and {sk.cut.name} keeps columns "
                        f"{describe_value(sk.index)}: not provably exactly the scores'")
    return m


def _analysis(region, spec, captured, q_dtype, v_dtype, frames, lines) -> Union[Analysis, NearMiss]:
    """The Analysis of a region, once nothing inside it moves under the fused op's feet."""
    effects = _effects_inside(region, captured, spec)
    if isinstance(effects, NearMiss):
        return effects
    return Analysis(region=region, spec=spec, captured=captured.nodes, captured_kinds=captured.kinds,
                    captured_preps=captured.preps, q_dtype=q_dtype, v_dtype=v_dtype, frames=frames,
                    masks=lines)


def size_source(d, sources):
    """(node, dim) whose size is ``d`` (an int needs none), or None."""
    if isinstance(d, int):
        return ()
    for src in sources:
        sv = value(src)
        for k, sz in enumerate(sv.shape):
            if not isinstance(sz, int) and sz.node.expr == d.node.expr:
                return src, k
    return None



def _effects_inside(region: Region, captured: "_Captured", spec: AttentionSpec) -> Optional[NearMiss]:
    """The fused op runs at the P @ V product's position and reads q, k, v and the captured
    operands there; eager read q and k at the QK product (or at the head repeats), the operands at
    their steps. That is the same only if nothing writes into any of them (through any view) in
    between, and the grad mode does not change in between (it decides which results need
    gradients). Dropout's draw needs no check: the rewriter draws the seed at the dropout's own
    position (``rewrite._dropout_seed``)."""
    from .effects import StorageMap

    graph = region.pv.graph
    smap = StorageMap(graph)
    order = smap.order
    start = min([region.qk] + list(region.repeats), key=lambda n: order.get(n, 0))
    reads = [("q", region.q), ("k", region.k if region.k is not None else region.kt), ("v", region.v)]
    reads += [(f"operand {n.name}", n) for n, kind in zip(captured.nodes, captured.kinds)
              if isinstance(n, fx.Node) and kind != "symnum"]
    for what, n in reads:
        w = smap.first_writer_between(n, start, region.pv)
        if w is not None:
            return NearMiss(region.site, w.name, f"{w.name} writes into {what} in place between the "
                            "QK product and P @ V; the fused op would read the new values")
    lo, hi = order.get(start, 0), order.get(region.pv, 0)
    for n in graph.nodes:
        if lo < order.get(n, -1) < hi and n.op == "call_function" and n.target in _GRAD_MODE_SETTERS:
            return NearMiss(region.site, n.name, "the grad mode changes inside the region")
    return None


_GRAD_MODE_SETTERS = {torch._C._set_grad_enabled, torch.set_grad_enabled}


def _implies_causal(op: ScoreOp, pred, is_last: bool) -> bool:
    """keep(b, h, i, j) implies j <= i (its band's upper end is 0), nothing after this step can move
    the masked elements (it is the chain's last step), and their value is recorded. A structural
    fact: whether skipping them is exact is the kernels' one removal rule, per call and per row
    (``kernels/removal.py``); a finite fill such as -1e4 is not "removed" by itself."""
    from fusion_pass.kernels import removal

    if not is_last:
        return False
    band = pred.classify().band
    if band[1] is None or sympy.simplify(band[1]) != 0:
        return False
    if op.kind == "add" and pred.kind == "additive":
        return removal.recorded(pred.masked_value) and pred.kept_value == 0
    if op.kind in ("fill", "fill_not") and pred.kind == "bool":
        # fill: c is True where masked, so keep = ~c; fill_not: keep = c (pred.keep is c itself)
        return op.kind == "fill_not" and removal.recorded(op.value)
    return False


def _mask_predicates(spec: AttentionSpec, captured: "_Captured", score_shape):
    """Each mask operand's keep-predicate, proven from the graph that builds it
    (``masks.analyse_mask``), for the report (its class and the fraction of 128 x 128 tiles it
    leaves to compute) and for the kernels: ``preds`` maps a score-step position to the
    ``MaskSpec`` that replaces its N x N mask tensor (see ``_as_mask_spec``)."""
    from .masks import MaskPredicate, analyse_mask

    lines, causal, preds = [], False, {}
    for pos, op in enumerate(spec.score_ops):
        if op.operand != "tensor" and op.kind not in ("fill", "fill_not"):
            continue
        node = captured.nodes[op.index]
        if captured.preps[op.index]:
            continue  # moved between batch layouts: the predicate's axes would not be the scores'
        try:
            pred = analyse_mask(node, score_shape)
        except Exception as e:  # noqa: BLE001 - the report must never break compilation
            lines.append(f"mask c{op.index}: mask analysis failed ({type(e).__name__}: {e})")
            continue
        if not isinstance(pred, MaskPredicate) and op.kind == "add":
            try:
                bias = _as_bias_spec(node, score_shape)
            except Exception as e:  # noqa: BLE001 - unproven stays a tensor
                bias = f"analysis failed ({type(e).__name__}: {e})"
            if not isinstance(bias, str):
                preds[pos] = ("bias",) + bias
                lines.append(f"bias c{op.index} = {bias[0]}, computed in the kernel from the "
                             f"indices (the N x N tensor is not built)")
                continue
        if not isinstance(pred, MaskPredicate):
            if op.kind in ("fill", "fill_not") or _looks_like_mask(node):
                lines.append(f"mask c{op.index}: data, not a structural mask ({pred})")
            continue
        cls = pred.classify()
        try:
            causal = causal or _implies_causal(op, pred, pos == len(spec.score_ops) - 1)
        except Exception:  # noqa: BLE001 - unprovable stays unproven
            pass
        ms = _as_mask_spec(op, pred, node, score_shape)
        if isinstance(ms, str):
            how = f"; read as a tensor ({ms})"
        else:
            preds[pos] = (ms, pred.data)
            how = "; evaluated in the kernel as a predicate (the N x N tensor is not built)"
        text = f"mask c{op.index}: keep(b, h, i, j) = {pred.keep}  [{', '.join(cls.kinds) or 'other'}]"
        if pred.kind == "additive":
            text += f"; masked value {pred.masked_value}"
        try:
            nq, nk = (int(pred.sizes.get(x, x)) if not isinstance(x, int) else x for x in score_shape[-2:])
            tiles = pred.block_sparsity(128, 128, nq, nk)
            computed = float((tiles != 0).mean()) if tiles.size else 0.0
            text += f"; tiles computed (128 x 128) at Nq={nq}, Nk={nk}: {computed:.0%}"
            if pred.structural() != sympy.true:
                big = pred.block_sparsity(128, 128, 4096, 4096)
                text += f", at Nq = Nk = 4096: {float((big != 0).mean()):.1%}"
        except Exception:  # noqa: BLE001 - density is informative only
            pass
        lines.append(text + how)
    return lines, causal, preds


def _as_mask_spec(op: ScoreOp, pred, node: fx.Node, score_shape):
    """The ``MaskSpec`` the kernels evaluate instead of reading the mask tensor, or why not (str).

    Only masks that would be N x N tensors are replaced (a (B, 1, 1, Nk) padding mask is cheaper to
    read than to recompute); the predicate's size symbols must each be one of the scores' sizes
    (so the kernel binds them from the call's shapes), and the step must use the mask as the graph
    built it: an additive mask added, a boolean one in a fill."""
    from fusion_pass.kernels.spec import MaskSpec

    from .masks.classify import carried

    mv = value(node)
    if mv.dim() < 2 or _same(mv.shape[-1], 1) or _same(mv.shape[-2], 1):
        return "it broadcasts over queries or keys: reading it is cheap"
    if op.kind == "add" and pred.kind != "additive" or op.kind in ("fill", "fill_not") and pred.kind != "bool":
        return f"a {pred.kind} mask used by {op.kind}"
    if op.kind not in ("add", "fill", "fill_not"):
        return f"a mask used by {op.kind}"
    R = len(score_shape)
    keep = _kernel_expr(pred, score_shape)
    if isinstance(keep, str):
        return keep
    if len(pred.axes) != R:
        return "its axes are not the scores'"
    kw = {}
    if pred.kind == "additive":
        kw = dict(dtype=dtype_name(pred.dtype), kept=float(pred.kept_value),
                  masked=float(pred.masked_value) if pred.masked_value is not None else -float("inf"))
    return MaskSpec(keep=sympy.srepr(keep), axes=tuple(str(a) for a in pred.axes), kind=pred.kind,
                    text=str(keep), **kw, **carried(keep, invert=op.kind == "fill"))


def _kernel_expr(pred, score_shape):
    """The predicate's expression as the kernels read it: size symbols as the scores' sizes
    n0 .. n{R-1}, data atoms as d0, d1, ... in ``pred.data``'s order; or why not (str)."""
    rename = _size_symbols(pred, score_shape)
    if isinstance(rename, str):
        return rename
    expr = pred.keep.xreplace(rename)
    for k, f in enumerate(pred.funcs):
        fk = sympy.Function(f"d{k}")
        expr = expr.replace(lambda e, f=f: getattr(e, "func", None) == f, lambda e, fk=fk: fk(*e.args))
    return expr


def _size_symbols(pred, score_shape):
    """{size symbol: expression in the score sizes n0 .. n{R-1}} for the predicate's size symbols
    (e.g. a KV cache's past length s1 = n3 - n2 when Nk = s1 + s0 and Nq = s0), or why not."""
    needed = [sym for sym in pred.keep.free_symbols if sym not in pred.axes]
    if not needed:
        return {}
    ns, eqs = [], []
    for d, n in enumerate(score_shape):
        e = getattr(getattr(n, "node", None), "expr", None) if not isinstance(n, int) else None
        if e is not None:
            nd = sympy.Symbol(f"n{d}", integer=True, nonnegative=True)
            ns.append(nd)
            eqs.append(sympy.Eq(nd, e))
    unknowns = sorted(set().union(*[eq.rhs.free_symbols for eq in eqs]) if eqs else set(), key=str)
    if not set(needed) <= set(unknowns):
        return f"its size symbols {sorted(map(str, needed))} are not functions of the scores' sizes"
    try:
        sols = sympy.solve(eqs, unknowns, dict=True)
    except Exception as e:  # noqa: BLE001 - unsolvable is "not proven"
        return f"its size symbols could not be solved for ({e})"
    if len(sols) != 1:
        return "its size symbols are not determined by the scores' sizes"
    out = {}
    for sym in needed:
        val = sols[0].get(sym)
        if val is None or not val.free_symbols <= set(ns):
            return f"its size symbol {sym} is not determined by the scores' sizes"
        out[sym] = val
    return out


def _with_predicates(spec: AttentionSpec, captured: "_Captured", preds, score_shape):
    """The spec and captured operands with the masks in ``preds`` read as predicates: the steps
    become "predicate" steps, their data tensors are captured as "data", and captured operands no
    step reads any more are dropped (the graph's mask construction then becomes dead code)."""
    new = _Captured()
    ops, masks = [], []
    biases = []
    for pos, op in enumerate(spec.score_ops):
        if pos in preds and preds[pos][0] == "bias":
            _, bs, x_node, data = preds[pos]
            xi = new.add(x_node, "tensor")
            idx = tuple(new.add(d, "data") for d in data)
            biases.append(dataclasses.replace(bs, x=xi, y_data=idx))
            ops.append(dataclasses.replace(op, operand="bias", index=len(biases) - 1))
        elif pos in preds:
            ms, data = preds[pos]
            idx = tuple(new.add(d, "data") for d in data)
            masks.append(dataclasses.replace(ms, data=idx))
            ops.append(dataclasses.replace(op, operand="predicate", index=len(masks) - 1))
        elif op.index is not None:
            k = op.index
            ops.append(dataclasses.replace(
                op, index=new.add(captured.nodes[k], captured.kinds[k], captured.preps[k])))
        else:
            ops.append(op)
    spec = dataclasses.replace(spec, score_ops=tuple(ops), captured=new.spec_kinds, masks=tuple(masks),
                               biases=tuple(biases))
    return spec, new


_MUL = {operator.mul, torch.mul}
_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}


def _as_bias_spec(node: fx.Node, score_shape):
    """(BiasSpec, x node, y's data nodes) when the additive tensor ``node`` is ``x * y`` with x a
    float tensor that does not vary over queries or keys and y an integer index expression of both
    (ALiBi's ``slopes[:, None, None] * (j - i)``, also after ``.unsqueeze(0)``, with y converted
    implicitly or by ``.float()`` / ``.to(dtype)``); else why not (str)."""
    from fusion_pass.kernels.spec import BiasSpec

    from .masks import MaskPredicate, analyse_index

    bv = value(node)
    if not isinstance(bv, torch.Tensor) or not bv.is_floating_point() or bv.dim() < 2 \
            or _same(bv.shape[-1], 1) or _same(bv.shape[-2], 1):
        return "not an N x N float tensor"
    n = node
    while n.op == "call_method" and n.target == "unsqueeze" and n.args[1:] in ((0,), ()) \
            and n.kwargs.get("dim", 0) == 0 and isinstance(n.args[0], fx.Node):
        n = n.args[0]  # a leading size-1 dim: right-aligned broadcasting is unchanged
    is_mul = (n.op == "call_function" and n.target in _MUL) or (n.op == "call_method" and n.target == "mul")
    if not is_mul or len(n.args) != 2 or n.kwargs:
        return "not a product"
    for x, y in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
        xv = value(x) if isinstance(x, fx.Node) else None
        if not isinstance(xv, torch.Tensor) or not xv.is_floating_point() or not isinstance(y, fx.Node):
            continue
        if xv.dim() >= 2 and not (_same(xv.shape[-1], 1) and _same(xv.shape[-2], 1)) or xv.dim() == 1 \
                and not _same(xv.shape[-1], 1):
            continue  # x varies over queries or keys
        if not _broadcasts_into(tuple(xv.shape), score_shape):
            continue
        y_dtype = value(n).dtype
        src = y
        if y.op == "call_method" and y.target in _CASTS and len(y.args) == 1:
            y_dtype, src = _CASTS[y.target], y.args[0]
        elif y.op == "call_method" and y.target == "to" and len(y.args) == 2 and isinstance(y.args[1], torch.dtype):
            y_dtype, src = y.args[1], y.args[0]
        if not isinstance(src, fx.Node):
            continue
        pred = analyse_index(src, score_shape)
        if not isinstance(pred, MaskPredicate):
            continue
        names = {str(a) for a in pred.keep.free_symbols}
        if str(pred.axes[-1]) not in names or str(pred.axes[-2]) not in names:
            return "y does not depend on both queries and keys: the tensor is cheap to read"
        expr = _kernel_expr(pred, score_shape)
        if isinstance(expr, str):
            return expr
        bs = BiasSpec(x=0, y=sympy.srepr(expr), axes=tuple(str(a) for a in pred.axes),
                      y_dtype=dtype_name(y_dtype), dtype=dtype_name(value(n).dtype), text=str(expr))
        return bs, x, tuple(pred.data)
    return "not a product of a per-head factor and an index expression"


def _looks_like_mask(node: fx.Node) -> bool:
    v = value(node)
    return isinstance(v, torch.Tensor) and v.dtype == torch.bool


def describe_value(x) -> str:
    return x.name if isinstance(x, fx.Node) else repr(x)


def _baddbmm_ops(region: Region, captured: _Captured, shape, site, moved, canonical
                 ) -> Union[List[ScoreOp], NearMiss]:
    """baddbmm(input, q, k^T, beta, alpha) = alpha * (q @ k^T) + beta * input, as score steps."""
    beta, alpha, inp = region.qk_beta, region.qk_alpha, region.qk_input
    dt = dtype_name(value(region.qk).dtype)
    def symnum(x):
        return isinstance(x, fx.Node) and isinstance(value(x), (torch.SymFloat, torch.SymInt))
    if not ((_number(beta) or symnum(beta)) and (_number(alpha) or symnum(alpha))):
        return NearMiss(site, region.qk.name, "baddbmm with run-time beta or alpha")
    ops = []
    if symnum(alpha):  # 1 / sqrt(d) under dynamic shapes: a symbolic number, read per call
        ops.append(ScoreOp("mul", "scalar", index=captured.add(alpha, "symnum"), dtype=dt))
    elif alpha != 1:
        ops.append(ScoreOp("mul", "const", value=float(alpha), dtype=dt))
    if symnum(beta) or beta != 0:
        iv = value(inp)
        if not isinstance(inp, fx.Node) or not isinstance(iv, torch.Tensor) \
                or not _broadcasts_into(tuple(iv.shape), shape):
            return NearMiss(site, region.qk.name, "baddbmm's input does not broadcast into the scores")
        prep = (("mul", beta if symnum(beta) else float(beta)),) if symnum(beta) or beta != 1 else ()
        if moved:
            fp = _frame_prep(inp, shape, canonical, site, region.qk.name)
            if isinstance(fp, NearMiss):
                return fp
            prep += fp
        ops.append(ScoreOp("add", "tensor", index=captured.add(inp, "tensor", prep), dtype=dt))
    return ops


def _frame_prep(node: fx.Node, frame, canonical, site, where) -> Union[tuple, NearMiss]:
    """How an operand read in another batch layout than the canonical one gets there."""
    ov = value(node)
    batch = (1,) * (len(frame) - ov.dim()) + tuple(ov.shape[:-2]) if ov.dim() <= len(frame) \
        else None
    if batch is None:
        return NearMiss(site, where, f"operand {node.name} has more dims than the scores")
    if all(_same(b, 1) for b in batch[:len(frame) - 2]) and ov.dim() <= len(canonical):
        return ()  # broadcast over every batch dim: reads the same in any layout
    if ov.dim() == len(frame) and _same_shape(batch[:len(frame) - 2], frame[:-2]):
        return (("to_frame",),)
    return NearMiss(site, where, f"operand {node.name} {tuple(ov.shape)}{_PART_OF_A_LAYOUT}")


_PART_OF_A_LAYOUT = " broadcasts over part of a batch layout the region reshapes"


def _score_op(op, pos, dtype, captured: _Captured, score_shape, site, moved=False, canonical=None
              ) -> Union[ScoreOp, NearMiss, None]:
    dt = dtype_name(dtype)
    if dtype not in FLOAT_DTYPES:
        return NearMiss(site, op.node.name, f"the scores become {dtype}")
    name = op.name
    if name == "identity":
        return None
    if name == "tanh":
        return ScoreOp("tanh", dtype=dt)
    if name == "fn":
        return ScoreOp("fn", fn=op.kwargs["fn"], args=op.kwargs["args"], dtype=dt)
    if name in ("mul", "add") and op.args[0] is op.args[1]:
        if name == "mul":  # s * s
            return ScoreOp("fn", fn="mul_self", dtype=dt)
        return ScoreOp("mul", "const", value=2.0, dtype=dt)  # s + s == 2 * s exactly
    if name == "cast":
        return ScoreOp("cast", dtype=dt)
    if name in ("mul", "div", "add", "sub"):
        other = op.args[1 - pos]
        kind = name
        if pos == 1:
            if name == "sub":
                kind = "rsub"
            elif name == "div":
                return NearMiss(site, op.node.name, "the scores are the divisor (x / s)")
        return _operand_op(kind, other, dt, captured, score_shape, site, op.node, moved, canonical)
    if name == "masked_fill":
        mask, fill = op.args[1], op.args[2]
        return _fill_op("fill", mask, fill, dt, captured, score_shape, site, op.node, moved, canonical)
    if name == "where":
        cond = op.args[0]
        other = op.args[2] if pos == 1 else op.args[1]
        return _fill_op("fill_not" if pos == 1 else "fill", cond, other, dt, captured, score_shape,
                        site, op.node, moved, canonical)
    return NearMiss(site, op.node.name, f"{name} in the score chain")


def _operand_op(kind, other, dt, captured, score_shape, site, node, moved=False, canonical=None
                ) -> Union[ScoreOp, NearMiss]:
    if _number(other):
        return ScoreOp(kind, "const", value=float(other), dtype=dt)
    if isinstance(other, fx.Node):
        ov = value(other)
        if isinstance(ov, (torch.SymFloat, torch.SymInt)):
            src = view(other)
            if src is not None and src.name == "item" and isinstance(src.args[0], fx.Node):
                # .item() detaches: eager gives the tensor no gradient through this use, so the
                # op reads a detached view of it (("detach",): the rewriter inserts .detach())
                return ScoreOp(kind, "scalar", index=captured.add(src.args[0], "scalar", (("detach",),)),
                               dtype=dt)
            return ScoreOp(kind, "scalar", index=captured.add(other, "symnum"), dtype=dt)
        if isinstance(ov, torch.Tensor):
            if not _broadcasts_into(tuple(ov.shape), score_shape):
                return NearMiss(site, node.name, f"operand {other.name} of shape {tuple(ov.shape)} does "
                                f"not broadcast into the scores {score_shape}")
            prep = _frame_prep(other, score_shape, canonical, site, node.name) if moved else ()
            if isinstance(prep, NearMiss):
                return prep
            return ScoreOp(kind, "tensor", index=captured.add(other, "tensor", prep), dtype=dt)
    return NearMiss(site, node.name, f"operand {describe_value(other)} is neither a number nor a tensor")


def _literal(x):
    """A Python number, or the value of a 0-dim tensor built in the graph from a literal
    (``torch.tensor(finfo.min, dtype=...)``, GPT-Neo's mask value), rounded through its dtype."""
    if _number(x):
        return x
    if not isinstance(x, fx.Node):
        return None
    xv = value(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 0 or not xv.is_floating_point():
        return None  # a 0-dim float tensor: broadcasting it is reading one number
    if x.op == "call_function" and x.target in (torch.tensor, torch.scalar_tensor) \
            and x.args and _number(x.args[0]) and set(x.kwargs) <= {"dtype", "device", "requires_grad"} \
            and not x.kwargs.get("requires_grad", False):
        return torch.tensor(x.args[0], dtype=xv.dtype).item()
    if x.op == "call_function" and x.target is torch.full and len(x.args) == 2 \
            and tuple(x.args[0]) == () and _number(x.args[1]) \
            and set(x.kwargs) <= {"dtype", "device", "requires_grad", "layout", "pin_memory"} \
            and not x.kwargs.get("requires_grad", False):
        return torch.full((), x.args[1], dtype=xv.dtype).item()  # torch.full((), finfo.min, ...)
    if x.op == "get_attr" and str(x.target).startswith("_tensor_constant"):
        # a constant Dynamo lifted at trace time: private to the graph module, never written
        t = getattr(x.graph.owning_module, x.target, None)
        if isinstance(t, torch.Tensor) and t.dim() == 0 and not t.requires_grad and not _written(x):
            return t.item()
    return None


def _written(node: fx.Node) -> bool:
    from .effects import graph_writes
    ws = graph_writes(node.graph).of(node)
    return ws is None or bool(ws)  # no recorded storage: a write cannot be ruled out


def _fill_op(kind, mask, fill, dt, captured, score_shape, site, node, moved=False, canonical=None
             ) -> Union[ScoreOp, NearMiss]:
    mv = value(mask)
    if not isinstance(mask, fx.Node) or not isinstance(mv, torch.Tensor) or mv.dtype != torch.bool:
        return NearMiss(site, node.name, "the mask is not a boolean tensor")
    if not _broadcasts_into(tuple(mv.shape), score_shape):
        return NearMiss(site, node.name, f"mask of shape {tuple(mv.shape)} does not broadcast into "
                        f"the scores {score_shape}")
    value_ = _literal(fill)
    if value_ is None:
        return NearMiss(site, node.name, f"the fill value {describe_value(fill)} is not a constant")
    fill = value_
    prep = _frame_prep(mask, score_shape, canonical, site, node.name) if moved else ()
    if isinstance(prep, NearMiss):
        return prep
    return ScoreOp(kind, "none", value=float(fill), index=captured.add(mask, "tensor", prep), dtype=dt)
