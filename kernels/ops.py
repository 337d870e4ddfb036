"""The custom ops the pass rewrites attention into, with their fake implementations and autograd.

Grouped-query attention: k and v may have fewer heads (dim -3) than q, G = Hq / Hkv; query head h
reads key/value head h // G, as after Llama's ``repeat_kv``, without the repeated copies.

    fusion_pass::attention(q, k, v, captured, spec, seed=None) -> (out, lse, seed)
    fusion_pass::attention_backward(grad_out, q, k, v, captured, out, lse, seed, spec, needs_grad)
        -> (dq, dk, dv, dcaptured)

``spec`` is ``AttentionSpec.to_key()``. ``captured`` are the tensors the score chain reads (bias,
masks, 0-dim scale tensors), in the spec's order. ``seed`` is the dropout seed, an input the rewriter
draws with ``torch.randint`` where the model's dropout drew (see ``attention``); the forward returns
it and the backward regenerates the same mask from it.

Shapes: q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv) with equal batch dims "...";
captured tensors broadcastable to (..., Nq, Nk). Results: out (..., Nq, Dv), lse (..., Nq) float32.

Which kernel runs (one routing: ``select.route``, which the report prints too): on CUDA tensors
the generated Triton kernels (``triton_attention.py``); on CPU, ATen's fused flash kernel when the
normalised spec is exactly its function in this call (``cpu_flash.py`` says when); everywhere else
the tiled implementation of ``cpu.py`` (device-agnostic torch ops, never an N x N buffer), which
covers every spec. Where more than one is exact, ``select.pick`` runs the faster, measured once per
shape bucket and cached. The output follows q's layout and the gradients are heads-major, as ATen's
kernel writes them (``layout``); the tiled path writes both in place, so neither is copied.
Forward and backward decide independently and consistently:
both compute the same function, and the tiled backward does not read the forward's lse. Every
path skips a masked key only under the one rule of ``removal.py`` (exact zero probability, NaN and
inf propagating as in eager), checked per call and per row.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import cpu, cpu_flash, cpu_flex, layout, predicate, select
from .dropout import new_seed
from .spec import AttentionSpec, to_dtype

log = logging.getLogger("fusion_pass.kernels")


def _check(q: Tensor, k: Tensor, v: Tensor, captured: Sequence[Tensor], spec: AttentionSpec):
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"fusion_pass::attention expects q, k, v of equal rank >= 2, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:-2] != v.shape[:-2] or not _grouped(q.shape[:-2], k.shape[:-2]):
        raise ValueError(f"fusion_pass::attention expects equal batch dims (k and v may have fewer "
                         f"heads, dim -3, dividing q's), got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"fusion_pass::attention: q @ k^T needs equal head dims and k, v equal "
                         f"lengths; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if len(captured) != len(spec.captured):
        raise ValueError(f"spec expects {len(spec.captured)} captured operands, got {len(captured)}")
    score_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
    for kind, c in zip(spec.captured, captured):
        if kind == "scalar":
            if c.numel() != 1:
                raise ValueError(f"scalar operand must have one element, got shape {tuple(c.shape)}")
        elif kind == "data":
            if c.is_floating_point() or c.is_complex():
                raise ValueError(f"a mask predicate's data tensor must be integer or boolean, got {c.dtype}")
        elif kind == "sink":
            if not c.is_floating_point() or not _broadcasts(tuple(c.shape), score_shape[:-1] + (spec.sink,)):
                raise ValueError(f"sink logits of shape {tuple(c.shape)} and dtype {c.dtype} do not "
                                 f"broadcast to {score_shape[:-1] + (spec.sink,)} as floating point")
        elif not _broadcasts(tuple(c.shape), score_shape):
            raise ValueError(f"captured tensor of shape {tuple(c.shape)} does not broadcast to the "
                             f"scores' shape {score_shape}")


def _grouped(qb, kb) -> bool:
    """Equal batch dims, except that the last (heads) may be a divisor of q's (grouped-query)."""
    if len(qb) != len(kb):
        return False
    if not qb:
        return True
    return tuple(qb[:-1]) == tuple(kb[:-1]) and kb[-1] > 0 and qb[-1] % kb[-1] == 0 \
        or (kb[-1] == 0 and qb[-1] == 0 and tuple(qb[:-1]) == tuple(kb[:-1]))


def _broadcasts(shape, target) -> bool:
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(shape[::-1], target[::-1]))


def _use_triton(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> bool:
    if q.device.type != "cuda":
        return False
    from . import triton_attention
    return triton_attention.supports(q, k, v, spec)


def _triton_operands(q, k, captured, spec: AttentionSpec):
    """(spec, captured, origin) as the Triton kernels take them. They evaluate mask predicates per
    tile (and skip key blocks no row keeps); predicates they cannot generate code for are handed
    over materialised, and so are biases computed from indices (``spec.biases``: the dense x * y
    the graph built). ``origin[t]`` says where operand t comes from: ("captured", k), ("bias", b)
    or ("mask", m), so that the backward can map gradients back."""
    origin = [("captured", t) for t in range(len(captured))]
    score_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
    if spec.biases:
        if any(b.y_data for b in spec.biases):
            return spec, list(captured), origin  # the tiled path takes it (supports() refuses)
        n, dense, ops = len(spec.captured), [], []
        for op in spec.score_ops:
            if op.operand == "bias":  # read as the dense tensor appended after the captured ones
                dense.append(_bias_dense(spec.biases[op.index], captured, score_shape))
                origin.append(("bias", op.index))
                op = dataclasses.replace(op, operand="tensor", index=n + len(dense) - 1)
            ops.append(op)
        spec = predicate.with_operands(spec, range(n), ["tensor"] * len(dense), score_ops=tuple(ops),
                                       biases=())
        captured = list(captured) + dense
    if not spec.masks:
        return spec, list(captured), origin
    from . import triton_attention
    if triton_attention.predicates_supported(spec, captured):
        return spec, list(captured), origin
    # with_tensor_masks keeps the operands that are not mask data, in order, then appends the masks
    origin = [origin[t] for t in predicate.tensor_mask_order(spec)] + \
        [("mask", mi) for mi in range(len(spec.masks))]
    ts, tcaptured = predicate.with_tensor_masks(spec, captured, score_shape)
    assert len(origin) == len(tcaptured)
    return ts, tcaptured, origin


def _bias_y(b, captured, score_shape):
    ys = dataclasses.replace(b.index_spec(), kind="bool")  # evaluated as is: the integer y
    return predicate.materialize(ys, score_shape, [], device=captured[b.x].device).to(to_dtype(b.y_dtype))


def _bias_dense(b, captured, score_shape):
    out = torch.mul(captured[b.x], _bias_y(b, captured, score_shape))
    return out if out.dtype == to_dtype(b.dtype) else out.to(to_dtype(b.dtype))


def _triton_backward(grad_out, q, k, v, captured, out, lse, s, ts, tcaptured, origin, seed, needs_grad):
    """Triton's backward on the operands ``_triton_operands`` built, its gradients mapped back to
    ``captured`` by ``origin``: data and masks never need one; a bias's x gets sum(d dense * y)
    over the dims where it broadcasts (d(x * y)/dx = y)."""
    from . import triton_attention
    score_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
    read = {op.captured_index for op in ts.score_ops}
    tneeds = []
    for t, (kind, i) in enumerate(origin):
        if kind == "captured":
            tneeds.append(bool(needs_grad[i]) and s.captured[i] != "data" and t in read)
        elif kind == "bias":
            tneeds.append(bool(needs_grad[s.biases[i].x]))
        else:
            tneeds.append(False)
    dq, dk, dv, dcap = triton_attention.backward(grad_out, q, k, v, tcaptured, out, lse, ts, seed, tneeds)
    grads = [None] * len(captured)
    for t, ng in enumerate(tneeds):  # dcap is aligned with tcaptured, None where not needed
        g = dcap[t] if ng else None
        if g is None:
            continue
        kind, i = origin[t]
        if kind == "bias":
            b = s.biases[i]
            x = captured[b.x]
            g = g.float() * _bias_y(b, captured, score_shape).float()
            g = cpu._reduce_to(g, (1,) * (g.dim() - x.dim()) + tuple(x.shape)).reshape(x.shape)
            i = b.x
        g = g.to(captured[i].dtype)
        grads[i] = g if grads[i] is None else grads[i] + g
    # aligned with captured, as the other paths return them
    return dq, dk, dv, [None if not ng else g if g is not None else torch.zeros_like(c)
                        for c, g, ng in zip(captured, grads, needs_grad)]


# Dropout's randomness is an input: the rewriter draws ``seed`` with torch.randint at the position
# of the model's own dropout (so the program's order of random draws is kept), and the op is a pure
# function of its inputs. Two dropout sites have two randint nodes, which no compiler pass merges
# (they are ATen random ops), so their calls differ; activation checkpointing recomputes the op with
# the saved seed, so the recomputed mask is the forward's; and nothing about the op is effectful, so
# calls without dropout are merged, reordered and recomputed like any pure op. Called directly (not
# from a rewritten graph) without a seed, a dropout spec draws one here: the eager convenience.
@torch.library.custom_op("fusion_pass::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, captured: List[Tensor], spec: str,
              seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    s = AttentionSpec.from_key(spec)
    _check(q, k, v, captured, s)
    if s.sink:
        return _sink_forward(q, k, v, captured, s, seed)
    seed = _own_seed(s, seed, q.device)
    out, lse = _forward(q, k, v, captured, s, spec, seed)
    return out, lse, seed


def _forward(q, k, v, captured, s: AttentionSpec, spec: str, seed: Tensor, need_lse: bool = False):
    """(out, lse) from the route's kernel; ``need_lse``: only kernels that return the lse (not
    FlexAttention's CPU forward, whose lse is NaN)."""
    ts, tcaptured, _ = _triton_operands(q, k, captured, s) if q.device.type == "cuda" else (s, captured, None)
    if _use_triton(q, k, v, ts):
        from . import triton_attention
        out, lse = triton_attention.forward(q, k, v, tcaptured, ts, int(seed.item()))
    else:
        every = {"aten_flash": lambda a: _flash_forward(s, *a),
                 "flex": select.warm_first(lambda a: cpu_flex.forward(s, *a)),
                 "tiled": lambda a: cpu.attention_forward(*a, s, int(seed.item()))}
        # the route's static order; ATen's and FlexAttention's kernels run on CPU tensors only
        cands = {name: every[name] for name in select.route(s).cpu
                 if (name == "tiled" or q.device.type == "cpu") and not (need_lse and name == "flex")}
        _, (out, lse) = select.pick(_choice_key("fwd_lse" if need_lse else "fwd", spec, q, k, cands), cands,
                                    (q, k, v, captured), lambda a: select.head_slice(*a, s.captured))
    return layout.in_out_layout(out, q), lse.contiguous()


def _own_seed(s: AttentionSpec, seed: Optional[Tensor], device) -> Tensor:
    """The seed output: zeros without dropout, a new draw when none was given, else the given one
    copied (an output may not alias an input)."""
    if not s.dropout_p:
        return torch.zeros(1, dtype=torch.int64)
    if seed is None:
        return new_seed(device)
    return seed.reshape(1).to("cpu", torch.int64, copy=True)


def _choice_key(direction: str, spec: str, q, k, cands) -> str:
    return select.shape_key(direction, spec, q, k) if len(cands) > 1 else ""


def _flash_forward(s: AttentionSpec, q, k, v, captured):
    """ATen's flash kernel when it computes this call exactly (``cpu_flash.usable``), its rows
    checked on the lse it returns (``cpu_flash.rows_ok``); None: the tiled path computes it."""
    fast = cpu_flash.usable(s, q, k, v, captured)
    if fast is None:
        return None
    out, lse = cpu_flash.forward(q, k, v, fast.scale, fast.mask, fast.causal)
    return (out, lse) if fast.rows_certain or cpu_flash.rows_ok(fast, lse, k.shape[-2]) else None


@attention.register_fake
def _attention_fake(q, k, v, captured, spec, seed=None):
    s = AttentionSpec.from_key(spec)
    out = layout.out_empty(q, tuple(q.shape[:-1]) + (v.shape[-1],), to_dtype(s.out_dtype))
    # (a spec with sinks keeps a float64 call's lse in float64: ``_sink_forward``)
    lse = q.new_empty(tuple(q.shape[:-1]), dtype=torch.float64 if s.sink and q.dtype == torch.float64
                      else torch.float32)
    seed = torch.empty(1, dtype=torch.int64, device="cpu")
    return out, lse, seed


@torch.library.custom_op("fusion_pass::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, captured: List[Tensor],
                       out: Tensor, lse: Tensor, seed: Tensor, spec: str, needs_grad: List[bool]
                       ) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    s = AttentionSpec.from_key(spec)
    if s.sink:
        return _sink_backward(grad_out, q, k, v, captured, out, lse, seed, s, needs_grad)
    ts, tcaptured, origin = _triton_operands(q, k, captured, s) if q.device.type == "cuda" \
        else (s, captured, None)
    if _use_triton(q, k, v, ts):
        dq, dk, dv, dcap = _triton_backward(grad_out, q, k, v, captured, out, lse, s, ts, tcaptured,
                                            origin, int(seed.item()), needs_grad)
    else:
        cands = {}
        if "aten_flash" in select.route(s).cpu and q.device.type == "cpu" and not any(needs_grad):
            cands["aten_flash"] = lambda a: _flash_backward(s, *a)
        cands["tiled"] = lambda a: cpu.attention_backward(*a, s, int(seed.item()), needs_grad)

        def shrink(a):  # a = (grad_out, q, k, v, captured, out, lse)
            got = select.head_slice(a[1], a[2], a[3], a[4], s.captured, (a[0], a[5]), (a[6],))
            if got is None:
                return None
            (q1, k1, v1, c1, g1, o1, l1), factor = got
            return (g1, q1, k1, v1, c1, o1, l1), factor
        _, (dq, dk, dv, dcap) = select.pick(_choice_key("bwd", spec, q, k, cands), cands,
                                            (grad_out, q, k, v, captured, out, lse), shrink, q, k)
    # the fake promises a layout; keep that promise whatever the path returned
    return (layout.in_grad_layout(dq), layout.in_grad_layout(dk), layout.in_grad_layout(dv),
            [g.contiguous() for g in dcap if g is not None])


def _flash_backward(s: AttentionSpec, grad_out, q, k, v, captured, out, lse):
    """ATen's flash backward when it computes this call exactly (``cpu_flash.usable`` with dO, the
    forward's lse checked by ``cpu_flash.rows_ok``); None: the tiled backward computes it."""
    fast = cpu_flash.usable(s, q, k, v, captured, grad_out)
    if fast is None or not cpu_flash.rows_ok(fast, lse, k.shape[-2], backward=True):
        return None
    dq, dk, dv = cpu_flash.backward(grad_out, q, k, v, out, lse, fast.scale, fast.mask, fast.causal)
    return dq, dk, dv, []


# -- attention sinks (``AttentionSpec.sink``) -----------------------------------------------------
# With sink logits t_1..t_m appended to a row's scores s_1..s_n, the softmax over the row and its m
# sinks, cut back to the n scores, is P'_j = exp(s_j - L') with L' = logaddexp(lse, t'), where
# lse = logsumexp(s) and t' = logsumexp(t). So the forward is out' = c * out with c = exp(lse - L'),
# where (out, lse) is the attention without sinks: every kernel computes it unchanged. Rows whose
# every score is -inf have P' = 0 on the scores (the sinks take the row): the kernels run with
# SDPA's safe softmax (zeros there), and eager's 0 * v (NaN where v is not finite) is restored
# below. Rows eager makes NaN stay NaN: c is NaN when lse is +inf or NaN, when the sinks are NaN,
# or when everything is -inf; a +inf sink is set NaN.
# The backward is eager's: the tiled backward appends the sinks to each tile's scores, takes the
# softmax of both and cuts it (P' normalised with the sinks, as eager's, so its float32 rounding
# and cancellation are eager's, and no lse is read), and writes dt = -P'_t rowsum(dP * P').

def _sink_parts(s: AttentionSpec):
    base = dataclasses.replace(s, sink=0, captured=s.captured[:-1], safe_softmax=True, inference=False)
    return base, base.to_key()


def _sink_scale(lse: Tensor, sinks: Tensor, m: int):
    """(c, L' = logaddexp(lse, t'), t' = logsumexp(t)) per row, in lse's dtype and shape."""
    t = torch.logsumexp(sinks.to(lse.dtype), -1)
    total = torch.logaddexp(lse, t)
    c = torch.exp(lse - total)
    c = torch.where(torch.isposinf(t), float("nan"), c)
    return c, total, t


def _sink_forward(q, k, v, captured, s: AttentionSpec, seed):
    base, key = _sink_parts(s)
    if q.dtype == torch.float64:
        # float64 runs on the tiled path (``cpu_flash``); its lse in float64 too, so that the
        # rescaling is as exact as eager's (a float32 lse would leave errors of 1e-7)
        seed = _own_seed(s, seed, q.device)
        out, lse = cpu.attention_forward(q, k, v, list(captured[:-1]), base, int(seed.item()),
                                         lse_dtype=torch.float64)
        out = layout.in_out_layout(out, q)
    else:
        seed = _own_seed(s, seed, q.device)
        out, lse = _forward(q, k, v, list(captured[:-1]), base, key, seed, need_lse=True)
    # under the safe softmax a row of only -inf scores has lse -inf (tiled) or +inf (Triton); no
    # other row has an infinite lse (a +inf or NaN score makes it NaN): both read as -inf
    lse = lse.masked_fill(torch.isinf(lse), float("-inf"))
    c, _, t = _sink_scale(lse, captured[-1], s.sink)
    out.mul_(c.unsqueeze(-1))
    empty = torch.isneginf(lse) & (t > float("-inf"))
    if bool(empty.any()) and not bool(torch.isfinite(v).all()):
        # eager multiplies these rows' zero weights by every v_j: NaN where one is inf or NaN
        bad = (~torch.isfinite(v)).any(-2, keepdim=True)
        if bad.shape[-3] != out.shape[-3]:
            bad = bad.repeat_interleave(out.shape[-3] // bad.shape[-3], dim=-3)
        out.masked_fill_(empty.unsqueeze(-1) & bad, float("nan"))
    return out, lse, seed


def _sink_backward(grad_out, q, k, v, captured, out, lse, seed, s: AttentionSpec, needs_grad):
    base, _ = _sink_parts(s)
    sinks = captured[-1]
    shape = tuple(q.shape[:-1]) + (s.sink,)
    dsinks = torch.zeros(shape, dtype=torch.promote_types(sinks.dtype, torch.float32), device=q.device)
    # the tiled backward (device-agnostic torch ops) appends the sinks to each tile's scores
    dq, dk, dv, dcap = cpu.attention_backward(grad_out, q, k, v, list(captured[:-1]), out, lse, base,
                                              int(seed.item()), list(needs_grad[:-1]),
                                              sinks=sinks.expand(shape), dsinks=dsinks)
    dcap = [x for x in dcap if x is not None]
    if needs_grad[-1]:
        dcap.append(dsinks.sum_to_size(sinks.shape).to(sinks.dtype))
    return (layout.in_grad_layout(dq), layout.in_grad_layout(dk), layout.in_grad_layout(dv),
            [x.contiguous() for x in dcap])


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, captured, out, lse, seed, spec, needs_grad):
    dcap = [c.new_empty(c.shape) for c, ng in zip(captured, needs_grad) if ng]
    return layout.grad_empty(q), layout.grad_empty(k), layout.grad_empty(v), dcap


def _setup_context(ctx, inputs, output):
    q, k, v, captured, spec = inputs[:5]
    # the dispatcher drops an argument equal to its default, and the backward must return one
    # gradient per argument it kept: seed=None is dropped
    ctx.n_grads = 5 if inputs[5] is None else 6
    out, lse, seed = output
    ctx.spec = spec
    ctx.n_captured = len(captured)
    ctx.save_for_backward(q, k, v, out, lse, seed, *captured)


def _backward(ctx, grad_out, grad_lse, grad_seed):
    q, k, v, out, lse, seed, *captured = ctx.saved_tensors
    # which captured operands want a gradient: floating tensors that autograd asks about
    needs = list(ctx.needs_input_grad[3]) if isinstance(ctx.needs_input_grad[3], (list, tuple)) \
        else [bool(ctx.needs_input_grad[3])] * ctx.n_captured
    needs = [bool(n) and c.is_floating_point() for n, c in zip(needs, captured)]
    dq, dk, dv, dcap = torch.ops.fusion_pass.attention_backward(
        grad_out, q, k, v, captured, out, lse, seed, ctx.spec, needs)
    it = iter(dcap)
    dcaptured = [next(it) if n else None for n in needs]
    return (dq, dk, dv, dcaptured, None, None)[:ctx.n_grads]  # spec and seed have no gradient


attention.register_autograd(_backward, setup_context=_setup_context)


def kernel_summary(spec: AttentionSpec) -> str:
    """Which kernels a spec runs on, in words, for the report: the one routing (``select.route``),
    with the choices measured for it so far."""
    if spec.sink:
        base, key = _sink_parts(spec)
        r = select.route(base)
        r = dataclasses.replace(r, cpu=tuple(n for n in r.cpu if n != "flex"))
        return (r.describe(key) + "; with sinks: each row rescaled after the kernel by its lse "
                "(FlexAttention, whose forward returns none, not offered), the backward on the "
                "tiled path")
    return select.route(spec).describe(spec.to_key())


def fused_attention(q: Tensor, k: Tensor, v: Tensor, captured: Sequence[Tensor],
                    spec: AttentionSpec) -> Tensor:
    """Eager entry point: the attention output of ``spec`` (what a rewritten graph computes)."""
    return torch.ops.fusion_pass.attention(q, k, v, list(captured), spec.to_key())[0]
