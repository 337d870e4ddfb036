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

import numbers
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fusion_pass.kernels.spec import AttentionSpec, ScoreOp, dtype_name

from .canonicalize import value, view
from .match import NearMiss, Region

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Analysis:
    region: Region
    spec: AttentionSpec
    captured: List[fx.Node]            # operand nodes, in the spec's order
    captured_kinds: List[str]          # "tensor", "scalar" or "symnum" (see _Captured)
    q_dtype: torch.dtype               # dtypes the products compute in (cast q/k/v to these)
    v_dtype: torch.dtype


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
    """Operands of the score chain, deduplicated by node (one mask read by two steps is one input).

    kind "tensor": a tensor node; "scalar": a 0-dim tensor node read as a number; "symnum": a
    symbolic number node (e.g. ``math.sqrt(q.size(-1))`` under dynamic shapes), which the rewriter
    wraps into a 0-dim float64 tensor and the spec reads as a "scalar".
    """

    def __init__(self):
        self.nodes: List[fx.Node] = []
        self.kinds: List[str] = []

    def add(self, node: fx.Node, kind: str) -> int:
        for i, (n, k) in enumerate(zip(self.nodes, self.kinds)):
            if n is node and k == kind:
                return i
        self.nodes.append(node)
        self.kinds.append(kind)
        return len(self.nodes) - 1

    @property
    def spec_kinds(self):
        return tuple("scalar" if k == "symnum" else k for k in self.kinds)


def _number(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def analyse(region: Region) -> Union[Analysis, NearMiss]:
    site = region.site
    qv, ktv, vv = value(region.q), value(region.kt), value(region.v)
    if region.group > 1:  # the checks below are on the products' own (repeated) operands
        vv = value(region.repeats[1])
    sv, pvv = value(region.softmax), value(region.pv)
    for name, t in (("q", qv), ("k^T", ktv), ("v", vv), ("softmax", sv), ("P @ V", pvv)):
        if not isinstance(t, torch.Tensor):
            return NearMiss(site, region.qk.name, f"no example value recorded for {name}")
    rank = qv.dim()
    if rank < 2 or ktv.dim() != rank or vv.dim() != rank:
        return NearMiss(site, region.qk.name, f"q, k^T, v have ranks {qv.dim()}, {ktv.dim()}, "
                        f"{vv.dim()}; the fused op needs equal ranks >= 2 (no broadcasting products)")
    if not (_same_shape(qv.shape[:-2], ktv.shape[:-2]) and _same_shape(qv.shape[:-2], vv.shape[:-2])):
        return NearMiss(site, region.qk.name, f"batch dims of q {tuple(qv.shape)}, k^T "
                        f"{tuple(ktv.shape)} and v {tuple(vv.shape)} are not provably equal "
                        "(the products would broadcast)")
    if not (_same(qv.shape[-1], ktv.shape[-2]) and _same(ktv.shape[-1], vv.shape[-2])):
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

    # -- the score chain ---------------------------------------------------------------------------
    qk_dtype = value(region.qk).dtype
    score_shape = tuple(value(region.qk).shape)
    captured = _Captured()
    ops: List[ScoreOp] = []
    for op, pos in region.score_chain:
        out = value(op.node)
        if not isinstance(out, torch.Tensor) or not _same_shape(out.shape, score_shape):
            return NearMiss(site, op.node.name, f"{op.name} changes the scores' shape")
        res = _score_op(op, pos, out.dtype, captured, score_shape, site)
        if isinstance(res, NearMiss):
            return res
        if res is not None:
            ops.append(res)

    # -- softmax -> PV ---------------------------------------------------------------------------
    softmax_dtype = sv.dtype
    prob_dtype = softmax_dtype
    dropout_p = 0.0
    for op in region.prob_chain:
        if op.name == "cast":
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
    return Analysis(region=region, spec=spec, captured=captured.nodes, captured_kinds=captured.kinds, q_dtype=qk_dtype, v_dtype=v_dtype)


def describe_value(x) -> str:
    return x.name if isinstance(x, fx.Node) else repr(x)


def _score_op(op, pos, dtype, captured: _Captured, score_shape, site) -> Union[ScoreOp, NearMiss, None]:
    dt = dtype_name(dtype)
    if dtype not in FLOAT_DTYPES:
        return NearMiss(site, op.node.name, f"the scores become {dtype}")
    name = op.name
    if name == "identity":
        return None
    if name == "tanh":
        return ScoreOp("tanh", dtype=dt)
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
        return _operand_op(kind, other, dt, captured, score_shape, site, op.node)
    if name == "masked_fill":
        mask, fill = op.args[1], op.args[2]
        return _fill_op("fill", mask, fill, dt, captured, score_shape, site, op.node)
    if name == "where":
        cond = op.args[0]
        other = op.args[2] if pos == 1 else op.args[1]
        return _fill_op("fill_not" if pos == 1 else "fill", cond, other, dt, captured, score_shape,
                        site, op.node)
    return NearMiss(site, op.node.name, f"{name} in the score chain")


def _operand_op(kind, other, dt, captured, score_shape, site, node) -> Union[ScoreOp, NearMiss]:
    if _number(other):
        return ScoreOp(kind, "const", value=float(other), dtype=dt)
    if isinstance(other, fx.Node):
        ov = value(other)
        if isinstance(ov, (torch.SymFloat, torch.SymInt)):
            src = view(other)
            if src is not None and src.name == "item" and isinstance(src.args[0], fx.Node):
                return ScoreOp(kind, "scalar", index=captured.add(src.args[0], "scalar"), dtype=dt)
            return ScoreOp(kind, "scalar", index=captured.add(other, "symnum"), dtype=dt)
        if isinstance(ov, torch.Tensor):
            if not _broadcasts_into(tuple(ov.shape), score_shape):
                return NearMiss(site, node.name, f"operand {other.name} of shape {tuple(ov.shape)} does "
                                f"not broadcast into the scores {score_shape}")
            return ScoreOp(kind, "tensor", index=captured.add(other, "tensor"), dtype=dt)
    return NearMiss(site, node.name, f"operand {describe_value(other)} is neither a number nor a tensor")


def _fill_op(kind, mask, fill, dt, captured, score_shape, site, node) -> Union[ScoreOp, NearMiss]:
    mv = value(mask)
    if not isinstance(mask, fx.Node) or not isinstance(mv, torch.Tensor) or mv.dtype != torch.bool:
        return NearMiss(site, node.name, "the mask is not a boolean tensor")
    if not _broadcasts_into(tuple(mv.shape), score_shape):
        return NearMiss(site, node.name, f"mask of shape {tuple(mv.shape)} does not broadcast into "
                        f"the scores {score_shape}")
    if not _number(fill):
        return NearMiss(site, node.name, f"the fill value {describe_value(fill)} is not a constant")
    return ScoreOp(kind, "none", value=float(fill), index=captured.add(mask, "tensor"), dtype=dt)
