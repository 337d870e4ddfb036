"""Side effects and aliasing in Dynamo's graph: the facts every stage needs before it moves,
merges or removes a node.

Dynamo's graph is not functional: ``x.mul_(2)``, ``cache.index_copy_(...)``, ``x[:4] = 1`` write
into storage that other nodes read, and ``torch.rand``/dropout draw from a generator whose state
is itself a side effect. FX's own ``eliminate_dead_code`` treats every ``call_method`` node as
pure, so it erases a mutation whose result is unused. The rules here are what the pass uses
instead:

* ``writes(node)``: does the node write into one of its arguments (in place, ``out=``, setitem)?
* ``is_random(node)``: does it draw random numbers?
* ``removable(node)``: may the node go once nothing reads it: no write, no RNG, nothing FX
  itself calls impure, not a module call (whose body we do not see).
* ``StorageMap``: which nodes share storage, read off the fake tensors Dynamo recorded (a view
  and its base, an in-place op and its operand share one), so a write through any view is seen.

Hands on: used by canonicalisation (functionalising in-place score updates), analysis (inputs
mutated inside a region) and the backend (cleanup after a rewrite).
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.ipow, operator.imatmul}

# names (functions and methods, without a trailing underscore) that draw random numbers
_RANDOM_NAMES = {
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli",
    "multinomial", "normal", "poisson", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "feature_dropout", "native_dropout", "rrelu",
    "uniform", "exponential", "geometric", "log_normal", "cauchy", "random", "gumbel_softmax",
    "fused_dropout", "seed", "manual_seed", "get_rng_state", "set_rng_state",
}


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


def writes(node: fx.Node) -> bool:
    """The node may write into an argument: ``x.add_()``, ``x += y``, ``x[i] = y``,
    ``torch.add(a, b, out=c)``, ``torch.relu_(x)``, ``x.copy_(y)``."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.op == "call_function" and (node.target in _INPLACE_OPERATORS or node.target is operator.setitem):
        return True
    if "out" in node.kwargs:
        return True
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverloadPacket):
        return any(getattr(node.target, o)._schema.is_mutable for o in node.target.overloads())
    name = _name(node)
    if node.op == "call_function" and node.target in (operator.and_, operator.or_):
        return False
    return name.endswith("_") and not name.startswith("__")


def is_random(node: fx.Node) -> bool:
    """The node draws from a random number generator (``F.dropout`` in training included)."""
    if node.op not in ("call_function", "call_method"):
        return False
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in t.tags
    name = _name(node).rstrip("_")
    return name in _RANDOM_NAMES or name.startswith("rand")


def removable(node: fx.Node) -> bool:
    """May ``node`` be erased once nothing uses its result? Only computations without effects."""
    if node.op not in ("call_function", "call_method"):
        return False  # placeholders, outputs, module calls (unknown bodies), attributes stay
    if writes(node) or is_random(node):
        return False
    try:
        return not node.is_impure()
    except Exception:  # noqa: BLE001 - unknown: keep it
        return False


def erase_orphans(graph: fx.Graph, candidates) -> List[str]:
    """Erase the nodes of ``candidates`` that have no users and are ``removable``, then their inputs
    that become unused in turn: the cleanup after a rewrite, which must remove only what the
    rewrite orphaned (never a mutation whose result nobody reads). Returns the erased names."""
    erased = []
    work = [n for n in candidates if isinstance(n, fx.Node)]
    seen = set()
    while work:
        n = work.pop()
        if n in seen or n.graph is not graph or n.users or not removable(n):
            continue
        seen.add(n)
        inputs = [a for a in n.all_input_nodes]
        erased.append(n.name)
        graph.erase_node(n)
        work.extend(inputs)
    return erased


def _storage(node: fx.Node):
    v = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return StorageWeakRef(v.untyped_storage())
    except Exception:  # noqa: BLE001 - tensors without storage (sparse, nested): unknown
        return None


class StorageMap:
    """Nodes grouped by the storage of their recorded value. Two nodes in one group may alias
    (a view and its base, an in-place op and its operand); nodes without a recorded storage are
    ``unknown`` and treated as aliasing everything by callers that need a proof."""

    def __init__(self, graph: fx.Graph):
        self.groups: Dict[object, List[fx.Node]] = {}
        self.of: Dict[fx.Node, object] = {}
        self.order: Dict[fx.Node, int] = {}
        for k, n in enumerate(graph.nodes):
            self.order[n] = k
            s = _storage(n)
            if s is not None:
                self.of[n] = s
                self.groups.setdefault(s, []).append(n)

    def aliases(self, node: fx.Node) -> List[fx.Node]:
        s = self.of.get(node)
        return list(self.groups.get(s, [])) if s is not None else []

    def writers(self, node: fx.Node) -> List[fx.Node]:
        """Nodes that write into ``node``'s storage (through any view): an in-place op on any alias,
        or any node passing an alias to a writing call."""
        out = []
        for a in self.aliases(node):
            if writes(a):
                out.append(a)
            for u in a.users:
                if writes(u) and u not in out and _written_arg(u) is a:
                    out.append(u)
        return out

    def first_writer_between(self, node: fx.Node, start: fx.Node, end: fx.Node) -> Optional[fx.Node]:
        """A node writing into ``node``'s storage strictly after ``start`` and before ``end`` in
        graph order, or None."""
        lo, hi = self.order.get(start, -1), self.order.get(end, -1)
        for w in self.writers(node):
            if lo < self.order.get(w, -1) < hi:
                return w
        return None


def _written_arg(node: fx.Node):
    """The argument a writing node writes into (self, the target of setitem, ``out=``)."""
    if "out" in node.kwargs:
        return node.kwargs["out"]
    return node.args[0] if node.args else None
