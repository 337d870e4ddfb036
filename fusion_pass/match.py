"""Stage 3, match: find each region softmax(f(Q @ K^T)) @ V in a Dynamo graph.

Anchor on a softmax; walk up through the elementwise score chain to the QK product and down through
casts and dropout to the PV product. Every node the region would remove must have its only user
inside the region: when the scores or the probabilities are also used elsewhere (returned as
attention weights, logged, reused), fusing would have to recompute or materialise them, so the
site is left alone. A failed match is a value (``NearMiss``) naming the node and the condition.

Hands on: ``Region`` (nodes of one site, still FX) to the analyser.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
import torch.fx as fx

from .canonicalize import CanonicalOp, repeated_heads, value, view

# ops that may sit between QK and softmax (each reads the running score and at most one operand)
SCORE_OPS = {"mul", "div", "add", "sub", "masked_fill", "where", "tanh", "cast", "identity", "reshape",
             "fn"}
# ops that may sit between softmax and PV
PROB_OPS = {"cast", "identity", "dropout", "reshape"}
# the QK product: a plain product, or baddbmm's beta * input + alpha * (q @ k^T)
PRODUCTS = {"matmul", "baddbmm"}
# a chain longer than this is not a score_mod a model writes; stop walking
MAX_CHAIN = 64


@dataclass
class NearMiss:
    """Why a softmax site was not fused: the node that stopped the match and the condition."""

    site: str
    node: str
    reason: str
    attention_like: bool = True  # False: a softmax that is not between two products at all
    kept: bool = False  # True: an attention left as it is because it already runs the fastest
                        # exact kernel (an SDPA call with nothing to skip): handled, not missed

    def __bool__(self):
        return False

    def __str__(self):
        return f"{self.reason} (at node {self.node})"


@dataclass
class Region:
    softmax: fx.Node
    qk: fx.Node                           # the Q @ K^T product
    pv: fx.Node                           # the P @ V product
    q: fx.Node
    kt: fx.Node                           # second operand of the QK product: (..., D, Nk), or k
                                          # itself when ``kt_is_k`` (einsum "...id,...jd->...ij")
    k: Optional[fx.Node]                  # kt's source when kt is exactly a transpose of its last two dims
    v: fx.Node
    group: int = 1                        # > 1: k and v are heads repeated G times (GQA / MQA)
    repeats: List[fx.Node] = field(default_factory=list)  # the repeat nodes, removed when unused
    kt_is_k: bool = False
    sdpa: Optional[CanonicalOp] = None    # the region is one scaled_dot_product_attention call
    qk_input: Optional[fx.Node] = None    # baddbmm's input (added to the scores), else None
    qk_beta: object = 1
    qk_alpha: object = 1
    score_chain: List[Tuple[CanonicalOp, int]] = field(default_factory=list)  # QK -> softmax, (op, chain arg)
    prob_chain: List[CanonicalOp] = field(default_factory=list)             # softmax -> PV
    sink: Optional["Sinks"] = None        # the softmax also runs over appended sink logits

    @property
    def nodes(self) -> List[fx.Node]:
        """The nodes the rewrite removes, in graph order."""
        if self.sdpa is not None:
            return [self.pv]
        sink = self.sink
        ns = [self.qk] + [op.node for op, _ in self.score_chain] + ([sink.cat] if sink else []) \
            + [self.softmax] + ([sink.cut] if sink else []) + [op.node for op in self.prob_chain] + [self.pv]
        return ns

    @property
    def site(self) -> str:
        return self.softmax.name


@dataclass
class Sinks:
    """Attention sinks (GPT-OSS): ``softmax(cat([scores, t], -1))[..., :n]``, the softmax over the
    scores and m more logit columns ``t``, of which only the scores' columns are kept. ``first``:
    ``t`` comes before the scores in the cat. The analysis proves that ``cut`` keeps exactly the
    scores' columns (``index`` is its getitem index)."""

    cat: fx.Node
    scores: fx.Node
    logits: fx.Node
    cut: fx.Node
    index: object
    first: bool = False


_CATS = (torch.cat, torch.concat, torch.concatenate)


def _sinks(softmax: fx.Node, site: str) -> Union[Sinks, NearMiss, None]:
    """The sink form around a softmax, when its input is a cat of two tensors along the softmax's
    dim, exactly one of which comes from the QK product; None when the input is not such a cat."""
    x = view(softmax).args[0]
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target in _CATS):
        return None
    parts = x.args[0] if x.args else x.kwargs.get("tensors")
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
    xv = value(x)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(t, fx.Node) for t in parts) \
            or not isinstance(xv, torch.Tensor) or not isinstance(dim, int) or dim % xv.dim() != xv.dim() - 1:
        return None
    lead = [_leads_to_product(t) for t in parts]
    if lead.count(True) != 1:
        return None
    first = lead[1]
    scores, logits = (parts[1], parts[0]) if first else (parts[0], parts[1])
    if len(data_users(x)) != 1:
        return NearMiss(site, x.name, f"the scores with their sink logits are also used outside the "
                        f"region (by {_users_text(x)})")
    cut = _only_user(softmax, site, "the attention probabilities")
    if isinstance(cut, NearMiss):
        return cut
    if not (cut.op == "call_function" and cut.target is operator.getitem and cut.args[0] is softmax):
        return NearMiss(site, cut.name, f"the softmax runs over the scores and appended logits "
                        f"({x.name}), and its probabilities flow into {describe(cut)}, not a slice "
                        "that drops the appended columns")
    return Sinks(cat=x, scores=scores, logits=logits, cut=cut, index=cut.args[1], first=first)


def _users_text(n: fx.Node) -> str:
    return ", ".join(u.name for u in data_users(n)) or "nothing"


# methods that read only a tensor's metadata (shape, dtype, device) from their first argument, and
# those that read it from their second (``mask.expand_as(scores)``, ``x.type_as(scores)``)
_META_SELF = {"size", "dim", "ndimension", "numel", "new_zeros", "new_ones", "new_empty", "new_full",
              "new_tensor", "get_device", "is_floating_point", "element_size"}
_META_OTHER = {"expand_as", "view_as", "reshape_as", "type_as"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


def shape_only(u: fx.Node, n: fx.Node) -> bool:
    """``u`` reads only ``n``'s shape, dtype or device, never its values: ``n.size(-1)``,
    ``n.shape``, ``mask.expand_as(n)``, ``n.new_zeros(...)``. Fusing may drop ``n``'s values if the
    rewriter gives such users a stand-in of the same metadata."""
    if u.op == "call_method" and u.target in _META_SELF and u.args and u.args[0] is n \
            and n not in u.args[1:] and n not in u.kwargs.values():
        return True
    if u.op == "call_method" and u.target in _META_OTHER and len(u.args) == 2 and u.args[1] is n \
            and u.args[0] is not n:
        return True
    if u.op == "call_function" and u.target is getattr and u.args[0] is n and u.args[1] in _META_ATTRS:
        return True
    if u.op == "call_function" and u.target in (torch.Tensor.size, torch.Tensor.dim) and u.args[0] is n \
            and n not in u.args[1:]:
        return True
    return False


def data_users(n: fx.Node) -> List[fx.Node]:
    """The users of ``n`` that read its values (all but ``shape_only`` ones)."""
    return [u for u in n.users if not shape_only(u, n)]


def describe(n) -> str:
    if not isinstance(n, fx.Node):
        return repr(n)
    t = n.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return f"{n.op} {name}"


def _only_user(n: fx.Node, site: str, what: str) -> Union[fx.Node, NearMiss]:
    users = data_users(n)
    if len(users) == 1:
        return users[0]
    if not users:
        return NearMiss(site, n.name, f"{what} are not used", attention_like=False)
    return NearMiss(site, n.name, f"{what} are also used outside the region (by {_users_text(n)}); "
                    "fusing would have to materialise them")


def _chain_arg(op: CanonicalOp) -> Tuple[int, ...]:
    """Argument positions that may carry the running score for a score-chain op."""
    if op.name in ("mul", "add"):
        return (0, 1)
    if op.name in ("div", "sub"):
        return (0, 1)
    if op.name == "where":
        return (1, 2)
    return (0,)


def _leads_to_product(n, depth=0, single_use=True) -> bool:
    """Does n reach a product upward through score-chain ops, within ``MAX_CHAIN - depth`` steps?
    With ``single_use`` every node on the way must have one user (picks the score operand of
    ``bias + scores``-style commuted spellings without guessing from shapes); without, it tells a
    missed attention from some other softmax.

    Breadth first, each node visited once: a node first reached at level d is at its shortest
    distance, so later visits cannot find a product sooner, and ``s = s + s`` chains (two paths per
    node) stay linear instead of 2^depth. Hand-written rather than networkx: the edges depend on each
    node's canonical op and the walk stops early, so building an ``nx.DiGraph`` first would cost
    more than the walk."""
    frontier, seen = [n], set()
    for _ in range(depth, MAX_CHAIN + 1):
        nxt = []
        for x in frontier:
            if not isinstance(x, fx.Node) or x in seen:
                continue
            seen.add(x)
            if single_use and len(data_users(x)) != 1:
                continue
            op = view(x)
            if op is None:
                continue
            if op.name in PRODUCTS:
                return True
            if op.name in SCORE_OPS:
                nxt.extend(op.args[i] for i in _chain_arg(op) if i < len(op.args))
        if not nxt:
            break
        frontier = nxt
    return False


def match_site(softmax: fx.Node) -> Union[Region, NearMiss]:
    op = view(softmax)
    if op is not None and op.name == "sdpa":
        return _match_sdpa(softmax, op)
    res = _match_site(softmax)
    if isinstance(res, NearMiss) and not res.attention_like:
        # "not attention" is reserved for a softmax that has no product of two tensors above it
        # and whose probabilities reach none below it, through elementwise and layout ops
        res.attention_like = attention_like(softmax)
    return res


_LAYOUT = {"view", "reshape", "transpose", "permute", "contiguous", "clone", "expand", "expand_as",
           "unsqueeze", "squeeze", "getitem", "to", "float", "half", "double", "bfloat16", "type",
           "type_as", "flatten", "unflatten", "t", "narrow", "select", "detach", "dropout",
           "repeat_interleave", "repeat", "movedim", "swapaxes", "view_as", "reshape_as"}


_INPLACE_OPERATOR_NAMES = {operator.iadd: "add", operator.isub: "sub", operator.imul: "mul",
                           operator.itruediv: "div", operator.truediv: "div", operator.neg: "neg",
                           operator.abs: "abs", operator.invert: "bitwise_not", operator.pow: "pow",
                           operator.ipow: "pow"}


def _op_name(n: fx.Node) -> str:
    t = n.target
    return (t if isinstance(t, str) else getattr(t, "__name__", "")).rstrip("_")


@functools.lru_cache(maxsize=None)
def _aten_pointwise(name: str) -> bool:
    """torch's own tag: every overload of aten.<name> is pointwise (sin, gelu, where, clamp...)."""
    packet = getattr(torch.ops.aten, name, None)
    try:
        overloads = [getattr(packet, o) for o in packet.overloads()] if packet is not None else []
    except Exception:  # noqa: BLE001 - not an operator packet
        return False
    return bool(overloads) and any(torch.Tag.pointwise in o.tags for o in overloads)


def _passes_values(n: fx.Node) -> bool:
    """n computes elementwise from its tensor inputs or only moves them (views, casts, dropout)."""
    if n.op not in ("call_function", "call_method"):
        return False
    op = view(n)
    if op is not None and op.name in PRODUCTS:
        return False
    if op is not None and (op.name in SCORE_OPS or op.name in PROB_OPS):
        return True
    name = _INPLACE_OPERATOR_NAMES.get(n.target, None) if n.op == "call_function" else None
    name = name or _op_name(n)
    return name in _LAYOUT or _aten_pointwise(name)


def _is_product(n) -> bool:
    op = view(n)
    return op is not None and op.name in PRODUCTS


def attention_like(softmax: fx.Node) -> bool:
    """The scores come from a product of two tensors (matmul, bmm, einsum, baddbmm) through
    elementwise and layout ops, or the probabilities reach a product's operand through them.
    Both walks are memoised (each node visited once), so ``s = s + s`` chains stay linear."""
    return _reaches_product(softmax.all_input_nodes, lambda n: n.all_input_nodes) or \
        _reaches_product(softmax.users, lambda n: n.users)


def _reaches_product(start, step) -> bool:
    """A product is reachable from ``start`` through value-passing ops, following ``step``."""
    seen, stack = set(), list(start)
    while stack:
        n = stack.pop()
        if n in seen or len(seen) > 10 * MAX_CHAIN:
            continue
        seen.add(n)
        if _is_product(n):
            return True
        if _passes_values(n):
            stack.extend(step(n))
    return False


def _match_site(softmax: fx.Node) -> Union[Region, NearMiss]:
    site = softmax.name
    sm = view(softmax)
    sink = _sinks(softmax, site)
    if isinstance(sink, NearMiss):
        return sink
    # -- down: softmax -> casts/dropout -> P @ V ------------------------------------------------
    prob_chain: List[CanonicalOp] = []
    cur = softmax if sink is None else sink.cut
    pv = None
    for _ in range(MAX_CHAIN):
        u = _only_user(cur, site, "the attention probabilities")
        if isinstance(u, NearMiss):
            return u
        op = view(u)
        if op is None:
            return NearMiss(site, u.name, f"the probabilities flow into {describe(u)}, which is not "
                            "a cast, a dropout or the P @ V product", attention_like=False)
        if op.name == "matmul":
            if op.args[0] is not cur:
                return NearMiss(site, u.name, "the probabilities are the right operand of the product "
                                "(V @ P form)")
            pv = u
            break
        if op.name not in PROB_OPS or op.args[0] is not cur:
            return NearMiss(site, u.name, f"the probabilities flow into {op.name} ({describe(u)}), "
                            "which is not a cast, a dropout or the P @ V product",
                            attention_like=False)
        prob_chain.append(op)
        cur = u
    if pv is None:
        return NearMiss(site, cur.name, "no P @ V product within reach", attention_like=False)

    # -- up: softmax input -> elementwise score chain -> Q @ K^T ---------------------------------
    chain: List[Tuple[CanonicalOp, int]] = []
    cur = sm.args[0] if sink is None else sink.scores
    qk = None
    for _ in range(MAX_CHAIN):
        if not isinstance(cur, fx.Node):
            return NearMiss(site, site, "the softmax input is not a graph value", attention_like=False)
        op = view(cur)
        if op is not None and op.name in PRODUCTS:
            if len(data_users(cur)) != 1:
                return NearMiss(site, cur.name, f"the raw scores Q @ K^T are also used outside the "
                                f"region (by {_users_text(cur)})")
            qk = cur
            break
        if len(data_users(cur)) != 1:
            return NearMiss(site, cur.name, f"the scores are also used outside the region "
                            f"(by {_users_text(cur)})")
        if op is None:
            return NearMiss(site, cur.name, f"the score chain reads {describe(cur)}, which is not an "
                            "elementwise op the pass can fuse", attention_like=False)
        if op.name not in SCORE_OPS:
            return NearMiss(site, cur.name, f"the score chain reads {op.name} ({describe(cur)}), "
                            "which is not an elementwise op the pass can fuse")
        positions = [i for i in _chain_arg(op) if i < len(op.args) and _leads_to_product(op.args[i])]
        if len(positions) == 2 and op.args[0] is op.args[1]:
            positions = [0]  # s * s, s + s: the score on both sides (a pointwise function of s)
        if not positions:
            return NearMiss(site, cur.name, f"no Q @ K^T product above {op.name} ({describe(cur)}) "
                            "through single-use elementwise ops", attention_like=False)
        # both operands come from products through elementwise ops ((q1 k1^T) * (q2 k2^T)): either
        # may be the score, the other is then an N x N operand; both readings are the same program
        chain.append((op, positions[0]))
        cur = op.args[positions[0]]
    if qk is None:
        return NearMiss(site, site, "no Q @ K^T product within reach", attention_like=False)
    chain.reverse()

    qk_op = view(qk)
    q, kt = qk_op.args if qk_op.name == "matmul" else qk_op.args[1:]
    pv_op = view(pv)
    v = pv_op.args[1]
    if pv_op.kwargs.get("b_transposed"):
        return NearMiss(site, pv.name, "the P @ V product multiplies by V^T (einsum)")
    for name, n in (("q", q), ("k^T", kt), ("v", v)):
        if not isinstance(n, fx.Node):
            return NearMiss(site, qk.name if name != "v" else pv.name, f"{name} is not a graph tensor")
    kt_is_k = bool(qk_op.kwargs.get("b_transposed"))
    if kt_is_k:  # einsum "...id,...jd->...ij": the operand is k itself
        k = kt
    else:
        k = _untransposed(kt)
    region = Region(softmax=softmax, qk=qk, pv=pv, q=q, kt=kt, k=k, v=v, score_chain=chain,
                    prob_chain=prob_chain, sink=sink)
    region.kt_is_k = kt_is_k
    if qk_op.name == "baddbmm":
        region.qk_input = qk_op.args[0]
        region.qk_beta, region.qk_alpha = qk_op.kwargs["beta"], qk_op.kwargs["alpha"]
    # grouped heads: read each K/V head once instead of the repeated copies
    rk, rv = (repeated_heads(k) if k is not None else None), repeated_heads(v)
    if rk is not None and rv is not None and rk[1] == rv[1] and rk[1] > 1:
        region.repeats = [k, v]
        region.k, region.v, region.group = rk[0], rv[0], rk[1]
    return region


def _match_sdpa(node: fx.Node, op: CanonicalOp) -> Union[Region, NearMiss]:
    """An SDPA call is a whole region: q, k (not transposed), v; the analysis reads its mask,
    scale, causality and dropout. Heads repeated before the call (``repeat_kv``) are read once."""
    q, k, v = op.args
    for name, n in (("q", q), ("k", k), ("v", v)):
        if not isinstance(n, fx.Node):
            return NearMiss(node.name, node.name, f"{name} is not a graph tensor")
    region = Region(softmax=node, qk=node, pv=node, q=q, kt=k, k=k, v=v, kt_is_k=True, sdpa=op)
    rk, rv = repeated_heads(k), repeated_heads(v)
    if rk is not None and rv is not None and rk[1] == rv[1] and rk[1] > 1 and not op.kwargs.get("enable_gqa"):
        region.repeats = [k, v]
        region.k, region.v, region.group = rk[0], rv[0], rk[1]
    return region


def _untransposed(kt: fx.Node) -> Optional[fx.Node]:
    """k when kt is exactly k with its last two dims swapped (transpose or permute), else None.

    Only an exact swap of the last two dims qualifies: a permute that also moves heads or batch
    is *not* a transpose (an Inductor bug once took one for the other and returned wrong results).
    """
    op = view(kt)
    val = value(kt)
    if op is None or val is None:
        return None
    rank = val.dim()
    if op.name == "transpose":
        dims = sorted(d % rank for d in op.args[1:3] if isinstance(d, int))
        if dims == [rank - 2, rank - 1]:
            return op.args[0]
    if op.name == "permute":
        dims = [d % rank for d in op.args[1]] if all(isinstance(d, int) for d in op.args[1]) else None
        if dims == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return op.args[0]
    return None


def find_sites(gm: fx.GraphModule) -> List[fx.Node]:
    """Every softmax and every scaled_dot_product_attention call in the graph, in order: each is a
    candidate attention site."""
    return [n for n in gm.graph.nodes if (op := view(n)) is not None and op.name in ("softmax", "sdpa")]
