"""Side effects and aliasing in Dynamo's graph: the facts every stage needs before it moves,
merges or removes a node. One definition, used by canonicalisation (functionalising in-place score
updates), the mask interpreter (a mask written after it is built is not the mask it was), the
analysis (inputs written inside a region) and the backend (cleanup after a rewrite).

Dynamo's graph is not functional: ``x.mul_(2)``, ``cache.index_copy_(...)``, ``x[:4] = 1`` write
into storage that other nodes read, and ``torch.rand``/dropout draw from a generator whose state
is itself a side effect. FX's own ``eliminate_dead_code`` treats every ``call_method`` node as
pure, so it erases a mutation whose result is unused. The rules here are what the pass uses
instead:

* ``written_operands(node)`` / ``writes(node)``: the operands a node may write into (in place,
  ``out=``, ``inplace=``, setitem, ATen schemas, module calls and user functions: all operands);
* ``graph_writes(graph).of(node)``: every node that may write into ``node``'s storage, through
  any view, anywhere in the graph (Dynamo's fake tensors record storage sharing);
* ``is_random(node)``: does it draw random numbers?
* ``removable(node)``: may the node go once nothing reads it: no write, no RNG, nothing FX itself
  calls impure, not a module call (whose body we do not see).
"""
from __future__ import annotations

import inspect
import operator
import types
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef


def value(n):
    return n.meta.get("example_value", n.meta.get("val")) if isinstance(n, fx.Node) else None


# Dynamo's graph is not functional: ``keep[:4].fill_(True)`` or ``keep[0, 1] = False`` change ``keep``
# (and every view of it) although no edge leads from the write to ``keep``'s readers. Dynamo's fake
# tensors record storage sharing (a view and its base, an in-place op's result and its operand share
# one ``untyped_storage()``), so every node the interpreter reads is checked against the set of
# storages some node of the graph may write, wherever that write is (before or after, through any
# view). The map is built once per graph (a graph has many masks) and reused while the graph is
# unchanged.

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.ipow, operator.imatmul}
_INPLACE_DUNDERS = {f"__i{x}__" for x in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and",
                                          "or", "xor", "lshift", "rshift", "matmul")} | {"__setitem__"}
# in-place methods that rebind or exchange storage: every tensor operand counts as written
_WRITES_ALL = {"set_", "swap_"}
_PURE_MODULES = ("torch", "operator", "_operator", "math", "builtins")
_ALL = object()  # "every tensor operand": a call whose effects are not known


# Hand-written, not Inductor's ``pattern_matcher.is_mutation_op``: that answers whether a node
# mutates (schema, a name regex, ``out=``), not which operand it writes, and on Dynamo's graphs it
# says False for ``operator.setitem`` (``x[:4] = 1``), ``operator.iadd`` (``s += m``) and
# ``F.relu(x, inplace=True)`` (checked on torch 2.13), each a write this pass must see.
def written_operands(u: fx.Node):
    """The operands ``u`` may write into: a list of arguments, or ``_ALL`` when any tensor operand may
    be written (module calls, functions from outside torch, higher-order ops whose body writes its
    inputs, in-place ops that rebind storage)."""
    got = _written_operands_raw(u)
    if got is _ALL:
        return got
    out = []
    for a in got:
        if not any(a is b for b in out):
            out.append(a)
    return out


def _written_operands_raw(u: fx.Node):
    if u.op == "call_module":
        return _ALL
    if u.op not in ("call_function", "call_method"):
        return []
    t, out = u.target, []
    if "out" in u.kwargs:
        out.append(u.kwargs["out"])
    if u.kwargs.get("inplace", False) is not False:
        out.append(u.args[0] if u.args else _ALL)
    if u.op == "call_method":
        if t in _WRITES_ALL:
            return _ALL
        if t in _INPLACE_DUNDERS or (t.endswith("_") and not t.startswith("__")):
            out.append(u.args[0])
        return out
    if t in _INPLACE_OPERATORS or t is operator.setitem:
        return out + [u.args[0]]
    if isinstance(t, torch._ops.HigherOrderOperator):
        return _ALL if _body_writes_inputs(u) else out
    if isinstance(t, torch._ops.OpOverload):
        for k, a in enumerate(t._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                out.append(u.args[k] if k < len(u.args) else u.kwargs.get(a.name))
        return out
    if isinstance(t, torch._ops.OpOverloadPacket):
        return _ALL if any(getattr(t, o)._schema.is_mutable for o in t.overloads()) else out
    name = getattr(t, "__name__", "")
    if name in _WRITES_ALL:
        return _ALL
    if name.endswith("_") and not name.startswith("__") and t not in (operator.and_, operator.or_):
        out.append(u.args[0] if u.args else _ALL)
    if isinstance(t, types.FunctionType):
        mod = (getattr(t, "__module__", None) or "").split(".")[0]
        if mod not in _PURE_MODULES:
            return _ALL  # a user function allowed in the graph: its body is not seen
        try:  # F.relu(x, True): an inplace flag given by position
            bound = inspect.signature(t).bind(*u.args, **u.kwargs).arguments
        except (TypeError, ValueError):
            bound = {}
        if bound.get("inplace", False) is not False:
            out.append(u.args[0] if u.args else _ALL)
    return out


def _body_writes_inputs(u: fx.Node) -> bool:
    """A higher-order op (checkpoint, wrap...) writes its operands when one of its bodies writes
    into a placeholder or attribute of its own (unknown bodies count as writing)."""
    root = u.graph.owning_module
    for a in _flat_nodes((u.args, u.kwargs)):
        if a.op != "get_attr":
            continue
        body = getattr(root, a.target, None) if root is not None else None
        if not isinstance(body, fx.GraphModule):
            if isinstance(value(a), torch.Tensor):
                continue
            return True
        w = graph_writes(body.graph)
        if w.wild:
            return True
        for n in body.graph.nodes:
            if n.op in ("placeholder", "get_attr") and w.of(n) != []:
                return True
    return False


def _flat_nodes(x):
    out = []
    fx.node.map_arg(x, out.append)
    return out


def _storage(v):
    try:
        return StorageWeakRef(v.untyped_storage())
    except Exception:  # noqa: BLE001 - a tensor without a storage (sparse, nested): unknown
        return None


@dataclass
class Writes:
    """storage -> the nodes that may write into it; ``wild``: writers whose target is unknown."""
    by_storage: Dict[Any, List[fx.Node]]
    wild: List[fx.Node]

    def of(self, n: fx.Node) -> Optional[List[fx.Node]]:
        """The nodes that may write into ``n``'s storage; None when ``n`` has no recorded storage."""
        v = value(n)
        if not isinstance(v, torch.Tensor):
            return []
        s = _storage(v)
        if s is None:
            return None
        return self.by_storage.get(s, []) + self.wild


def _tensors_of(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors_of(x)]
    return []


def _build_writes(graph: fx.Graph) -> Writes:
    by, wild = {}, []
    for u in graph.nodes:
        ops = written_operands(u)
        if ops is _ALL or any(o is _ALL for o in ops):
            ops = [u.args, u.kwargs]
        for a in _flat_nodes(ops):
            v = value(a)
            if v is None:
                wild.append(u)  # nothing recorded for the written operand: it may be anything
                continue
            for t in _tensors_of(v):
                st = _storage(t)
                if st is None:
                    wild.append(u)
                elif u not in by.setdefault(st, []):
                    by[st].append(u)
    return Writes(by, list(dict.fromkeys(wild)))


# one entry per graph, kept on the graph itself (a cache keyed by the graph elsewhere would keep it
# alive: the entry holds its nodes), valid while the graph's nodes (their identity, target,
# arguments and recorded values) are the same objects; holding them keeps their ids from being
# reused by new nodes. Graph.__deepcopy__ builds a fresh graph, without the entry.
_WRITES_ATTR = "_fusion_pass_writes"


def _snapshot(graph: fx.Graph) -> list:
    root = graph.owning_module
    out = []
    for n in graph.nodes:
        item = (n, n.op, n.target, n.args, n.kwargs, n.meta.get("example_value", n.meta.get("val")))
        body = getattr(root, n.target, None) if n.op == "get_attr" and root is not None else None
        if isinstance(body, fx.GraphModule):  # a higher-order op's body: its facts are part of ours
            item += (body, graph_writes(body.graph))
        out.append(item)
    return out


def _same_snapshot(a: list, c: list) -> bool:
    return len(a) == len(c) and all(all(x is y for x, y in zip(p, q)) for p, q in zip(a, c))


def graph_writes(graph: fx.Graph) -> Writes:
    snap = _snapshot(graph)
    hit = getattr(graph, _WRITES_ATTR, None)
    if hit is not None and _same_snapshot(hit[0], snap):
        return hit[1]
    w = _build_writes(graph)
    setattr(graph, _WRITES_ATTR, (snap, w))
    return w


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
    """The node may write into one of its operands."""
    got = written_operands(node)
    return got is _ALL or bool(got)


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




class StorageMap:
    """Graph order plus ``graph_writes``: which nodes write into a node's storage, and where."""

    def __init__(self, graph: fx.Graph):
        self.order: Dict[fx.Node, int] = {n: k for k, n in enumerate(graph.nodes)}
        self.writes = graph_writes(graph)
        self.groups: Dict[Any, List[fx.Node]] = {}  # storage -> the nodes whose value lives in it
        for n in graph.nodes:
            v = value(n)
            st = _storage(v) if isinstance(v, torch.Tensor) else None
            if st is not None:
                self.groups.setdefault(st, []).append(n)

    def writers(self, node: fx.Node) -> Optional[List[fx.Node]]:
        """Nodes that may write into ``node``'s storage; None when no storage is recorded."""
        return self.writes.of(node)

    def first_writer_between(self, node: fx.Node, start: fx.Node, end: fx.Node) -> Optional[fx.Node]:
        """A node that may write into ``node``'s storage strictly after ``start`` and before ``end``
        in graph order (an unknown storage counts as written by ``start``'s successor), or None."""
        lo, hi = self.order.get(start, -1), self.order.get(end, -1)
        ws = self.writers(node)
        if ws is None:
            return start.next if start.next is not end else None
        for w in ws:
            if lo < self.order.get(w, -1) < hi:
                return w
        return None
