"""Stage 5, rewrite: replace each analysed region by one call of ``fusion_pass::attention``.

The region's nodes (QK product, score chain, softmax, casts, dropout, PV product) go; in their
place, right before the PV product:

    k   = kt.transpose(-2, -1)          # unless kt already was k with its last two dims swapped
    res = fusion_pass.attention(q, k, v, [captured...], "<spec key>")
    out = res[0]

Casts of q, k, v are inserted only where the original products computed in another dtype
(autocast). New nodes get ``example_value`` metadata computed under the graph's fake mode, so the
passes Inductor runs afterwards see a well-formed Dynamo graph.

Hands on: the rewritten ``GraphModule`` (in place) to the backend, which compiles it with Inductor.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx

from fusion_pass.kernels import ops as _ops  # noqa: F401  (registers torch.ops.fusion_pass.*)

from .analyze import Analysis, size_source
from .canonicalize import value

ATTENTION_OP = torch.ops.fusion_pass.attention.default


def find_fake_mode(gm: fx.GraphModule) -> Optional[object]:
    """The fake mode of Dynamo's example values (new nodes get their metadata under it)."""
    for n in gm.graph.nodes:
        v = value(n)
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    return None


def _meta(node: fx.Node, fake_mode) -> None:
    """Compute node.meta['example_value'] from its inputs' example values."""
    if fake_mode is None:
        return
    args = fx.node.map_arg(node.args, value)
    kwargs = fx.node.map_arg(node.kwargs, value)
    with fake_mode:
        if node.op == "call_method":
            v = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            v = node.target(*args, **kwargs)
    node.meta["example_value"] = v


def _cast(graph: fx.Graph, node: fx.Node, dtype: torch.dtype, fake_mode) -> fx.Node:
    if value(node).dtype == dtype:
        return node
    n = graph.call_method("to", (node, dtype))
    _meta(n, fake_mode)
    return n


def _size(graph, node, dim, fake_mode):
    n = graph.call_method("size", (node, dim))
    _meta(n, fake_mode)
    return n


def _to_frame(graph, node, sizes, fake_mode) -> fx.Node:
    """node (..., X, Y) reshaped to the canonical batch sizes, keeping its last two dims."""
    n = graph.call_method("reshape", (node, *sizes, _size(graph, node, -2, fake_mode),
                                      _size(graph, node, -1, fake_mode)))
    _meta(n, fake_mode)
    return n


def _expand_like(graph, node, other, fake_mode, keep_heads=False) -> fx.Node:
    """node expanded (a view) to other's batch dims, keeping its last two; with ``keep_heads``
    also its heads (dim -3: K/V heads not repeated, read as groups by the op)."""
    lead = value(other).dim() - (3 if keep_heads else 2)
    sizes = [_size(graph, other, d, fake_mode) for d in range(lead)]
    n = graph.call_method("expand", (node, *sizes, *([-1] * (3 if keep_heads else 2))))
    _meta(n, fake_mode)
    return n


def rewrite_region(gm: fx.GraphModule, a: Analysis, fake_mode=None) -> fx.Node:
    """Replace one region; returns the node holding the attention output."""
    r = a.region
    f = a.frames
    graph = gm.graph
    with graph.inserting_before(r.pv):
        sizes = f.sizes
        k_src = r.k if r.k is not None else r.kt
        q_src = r.q
        grouped = r.group > 1  # K/V heads read as groups: expansions keep k's and v's heads
        if f.full_q:  # the product broadcasts q into k's batch dims (queries shared by a batch)
            q_src = _expand_like(graph, q_src, k_src, fake_mode, keep_heads=grouped)
        moves = f.reshape_qk or f.reshape_v or any(st[0] == "to_frame" for p in a.captured_preps for st in p)
        if sizes is None and moves:  # canonical layout = the QK product's: read its batch sizes off q
            sizes = [_size(graph, q_src, d, fake_mode) for d in range(value(q_src).dim() - 2)]
        if f.full_k:  # the product broadcasts k into q's batch dims: expand it, then move it
            k_src = _expand_like(graph, k_src, q_src, fake_mode, keep_heads=grouped)
        if r.k is not None:
            k = _to_frame(graph, k_src, sizes, fake_mode) if f.reshape_qk else k_src
        else:
            kt = _to_frame(graph, k_src, sizes, fake_mode) if f.reshape_qk else k_src
            k = graph.call_method("transpose", (kt, -2, -1))
            _meta(k, fake_mode)
        q = _to_frame(graph, q_src, sizes, fake_mode) if f.reshape_qk else q_src
        v_src = r.v
        if f.full_v == "q":  # v broadcast by P @ V, in the op's own layout: q's batch dims there
            v_src = _expand_like(graph, v_src, q, fake_mode, keep_heads=grouped)
        elif f.full_v is not None:
            v_src = graph.call_method("expand", (v_src, *f.full_v, -1, -1))
            _meta(v_src, fake_mode)
        v = _to_frame(graph, v_src, sizes, fake_mode) if f.reshape_v else v_src
        if f.expand_k:  # one K head broadcast by the product, v has every head: k as v's heads
            k = _expand_like(graph, k, v, fake_mode)
        if f.expand_v:
            v = _expand_like(graph, v, k, fake_mode)
        q = _cast(graph, q, a.q_dtype, fake_mode)
        k = _cast(graph, k, a.q_dtype, fake_mode)
        v = _cast(graph, v, a.v_dtype, fake_mode)
        captured = []
        for node, kind, prep in zip(a.captured, a.captured_kinds, a.captured_preps):
            if kind == "symnum":  # a symbolic number becomes a 0-dim tensor the op can take
                node = graph.call_function(torch.scalar_tensor, (node,), {"dtype": torch.float64})
                _meta(node, fake_mode)
            for step in prep:
                if step[0] == "mul":
                    node = graph.call_function(operator.mul, (node, step[1]))
                    _meta(node, fake_mode)
                elif step[0] == "to_frame":
                    node = _to_frame(graph, node, sizes, fake_mode)
                elif step[0] == "inv_sqrt_size":  # SDPA's default scale 1 / sqrt(E), E symbolic
                    node = _size(graph, node, step[1], fake_mode)
                    node = graph.call_function(torch.scalar_tensor, (node,), {"dtype": torch.float64})
                    _meta(node, fake_mode)
                    node = graph.call_method("rsqrt", (node,))
                    _meta(node, fake_mode)
                elif step[0] == "detach":  # read through .item(): no gradient, as in eager
                    node = graph.call_method("detach", (node,))
                    _meta(node, fake_mode)
            captured.append(node)
        if no_gradient(a):  # the report then shows the spec the op carries
            a.spec = dataclasses.replace(a.spec, inference=True)
        args = (q, k, v, captured, a.spec.to_key())
        if a.spec.dropout_p:
            args += (_dropout_seed(graph, r, fake_mode),)
        call = graph.call_function(ATTENTION_OP, args)
        _meta(call, fake_mode)
        out = graph.call_function(operator.getitem, (call, 0))
        _meta(out, fake_mode)
        if f.reshape_out:  # back to the PV product's layout, which is v's
            vb = f.full_v if isinstance(f.full_v, list) else \
                [_size(graph, r.v, d, fake_mode) for d in range(value(r.v).dim() - 2)]
            out = graph.call_method("reshape", (out, *vb, _size(graph, out, -2, fake_mode),
                                                _size(graph, out, -1, fake_mode)))
            _meta(out, fake_mode)
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in r.pv.meta:
            call.meta[key] = r.pv.meta[key]
            out.meta[key] = r.pv.meta[key]
    r.pv.replace_all_uses_with(out)
    _rewire_shape_users(gm, a, fake_mode)
    for n in reversed(r.nodes):
        if not n.users:
            graph.erase_node(n)
    if r.k is not None and not r.kt.users and r.kt not in r.repeats:
        graph.erase_node(r.kt)
    for rep in r.repeats:  # the K/V head copies, when nothing else reads them
        _erase_unused_chain(graph, rep)
    return out


def no_gradient(a: Analysis) -> bool:
    """No input of the site requires a gradient, as Dynamo recorded the values while tracing (so
    under the grad mode each node really ran in, ``no_grad`` regions included; the compiled graph
    is guarded on the inputs' ``requires_grad`` and the grad mode): then no backward of the op
    exists and the spec may say ``inference``. An operand read through ``.item()`` (detached) or a
    number never carries one. Any value not recorded: not proven, False."""
    r = a.region
    nodes = [r.q, r.k if r.k is not None else r.kt, r.v]
    nodes += [n for n, prep in zip(a.captured, a.captured_preps)
              if not any(step[0] == "detach" for step in prep)]
    for n in nodes:
        ev = value(n)
        if isinstance(ev, torch.Tensor):
            if ev.requires_grad:
                return False
        elif isinstance(n, fx.Node) and ev is None:
            return False
    return True


def _dropout_seed(graph: fx.Graph, r, fake_mode) -> fx.Node:
    """The dropout seed, drawn by torch.randint where the model's dropout drew its mask: the
    program's random draws keep their order, compilers know the draw is random (never merged or
    dead-code eliminated), and the op stays a pure function of its inputs."""
    from fusion_pass.kernels.dropout import SEED_HIGH

    drop = next((op.node for op in r.prob_chain if op.name == "dropout"), r.pv)
    with graph.inserting_before(drop):
        seed = graph.call_function(torch.randint, (0, SEED_HIGH, (1,)),
                                   {"dtype": torch.int64, "device": torch.device("cpu")})
    _meta(seed, fake_mode)
    return seed


def _rewire_shape_users(gm: fx.GraphModule, a: Analysis, fake_mode) -> None:
    """Users outside the region that read only a region node's shape, dtype or device (the matcher
    let them stay: ``mask.expand_as(scores)``, ``scores.size(-1)``) read a stand-in instead: an
    empty 0-dim tensor of the node's dtype and device expanded to its shape (a view of one element,
    nothing allocated). Its sizes come from q, k^T and v, so it is defined wherever q and k are."""
    from .match import shape_only

    r = a.region
    graph = gm.graph
    for n in r.nodes:
        if n is r.pv:
            continue
        users = [u for u in n.users if shape_only(u, n)]
        if not users:
            continue
        val = value(n)
        with graph.inserting_before(r.qk):  # after q and k^T, before every user of the region
            sizes = [_size_arg(graph, d, [r.q, r.kt], fake_mode) for d in val.shape]
            if any(sz is None for sz in sizes):  # unreachable: the analysis checked (see below)
                raise AssertionError(f"no size source for a shape-only use of {n.name}")
            e = graph.call_function(torch.empty, ((),), {"dtype": val.dtype, "device": val.device})
            _meta(e, fake_mode)
            st = graph.call_method("expand", (e, *sizes))
            _meta(st, fake_mode)
        for u in users:
            u.replace_input_with(n, st)


def _size_arg(graph, d, sources, fake_mode):
    got = size_source(d, sources)
    if got is None:
        return None
    if got == ():
        return int(d)
    return _size(graph, got[0], got[1], fake_mode)


def _erase_unused_chain(graph: fx.Graph, node: fx.Node) -> None:
    """Erase node and then its inputs while they have no users left (view chains only)."""
    while isinstance(node, fx.Node) and not node.users and not getattr(node, "_erased", False) \
            and node.op in ("call_method", "call_function") \
            and node.target in ("reshape", "view", "flatten", "expand", "repeat_interleave", operator.getitem,
                                torch.repeat_interleave, "unsqueeze", torch.unsqueeze):
        src = node.args[0]
        graph.erase_node(node)
        node = src



def fill_meta(node: fx.Node, fake_mode) -> None:
    """example_value of a node another stage inserted (canonicalisation rules)."""
    _meta(node, fake_mode)
