"""Spec normalisation: equivalent score chains written in another order reach the same kernels.

A model may scale its scores after masking them (``s.masked_fill(m, -inf) / sqrt(d)``) where
others scale first. Every kernel routes on the chain's *last* step being the mask: ATen's flash
kernel computes ``softmax(s * scale + mask)``, and the removal rule that lets the tiled and Triton
kernels skip masked keys reads the last step (``kernels/removal.py``). So a positive constant
scale written after a mask step is moved before it, when the two orders give the same bits for
every input (not merely the same real number):

* a replacing fill with -inf (``where(keep, s, -inf) * c``, ``masked_fill(~keep, -inf) / c``),
  any c > 0 finite: a kept element is ``s * c`` either way (the same op on the same value in the
  same dtype), a masked one ``-inf * c = -inf`` (``-inf / c = -inf``), whatever s is (NaN, inf);
* an additive predicate whose kept value is 0 and masked value -inf (``(s + m) * c``), with
  0 < c <= 1 for a product and c >= 1 for a quotient: kept ``(s + 0) * c`` and ``s * c + 0`` are
  the same bits (``-0.0 + 0 = +0.0`` on both sides); masked, ``(s - inf) * c`` is -inf for finite
  s, NaN for s = +inf or NaN, and so is ``s * c - inf`` because ``s * c`` cannot overflow to
  +inf when |c| <= 1 (a c > 1 could: then the orders differ, and nothing moves).

Nothing else moves: a finite fill (its product ``fill * c`` rounds in the step's dtype, through
float32 opmath for half types), an additive mask tensor (its values are data), a scale read from
a tensor (its sign is data), or any step whose dtype differs from its neighbour's.
"""
from __future__ import annotations

import dataclasses
import math

from fusion_pass.kernels.spec import AttentionSpec, ScoreOp


def _positive_const(op: ScoreOp) -> bool:
    return (op.kind in ("mul", "div") and op.operand == "const" and op.value is not None
            and math.isfinite(op.value) and op.value > 0)


def _moves_past(spec: AttentionSpec, mask: ScoreOp, scale: ScoreOp, in_dtype: str) -> bool:
    """Whether ``mask`` then ``scale`` gives the same bits as ``scale`` then ``mask`` for every
    input of dtype ``in_dtype`` (see the module's docstring)."""
    if not _positive_const(scale) or not (mask.dtype == scale.dtype == in_dtype):
        return False
    if mask.kind in ("fill", "fill_not"):
        return mask.value is not None and mask.value == -math.inf
    if mask.kind == "add" and mask.operand == "predicate":
        m = spec.masks[mask.index]
        if not (m.kind == "additive" and m.dtype == mask.dtype and m.kept == 0.0
                and m.masked == -math.inf):
            return False
        return scale.value <= 1.0 if scale.kind == "mul" else scale.value >= 1.0
    return False


def scales_before_masks(spec: AttentionSpec) -> AttentionSpec:
    """``spec`` with each positive constant scale that directly follows a mask step (and gives
    the same bits before it) moved before that step; the spec itself when nothing moves."""
    ops = list(spec.score_ops)
    moved = True
    while moved:
        moved = False
        for pos in range(1, len(ops)):
            before = ops[pos - 2].dtype if pos >= 2 else spec.qk_dtype
            if _moves_past(spec, ops[pos - 1], ops[pos], before):
                ops[pos - 1], ops[pos] = ops[pos], ops[pos - 1]
                moved = True
    if ops == list(spec.score_ops):
        return spec
    return dataclasses.replace(spec, score_ops=tuple(ops))
