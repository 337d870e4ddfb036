"""Stage 1b, expand: open the attention calls Dynamo leaves closed.

Dynamo puts a few whole attention functions into its graph as one call, whose body the matcher
never sees:

* ``F.multi_head_attention_forward``, what every ``nn.MultiheadAttention`` (and so every
  ``nn.Transformer*`` layer outside its inference fast path) calls: Dynamo lists it among the
  functions it keeps in the graph unexamined (``trace_rules``), so its softmax, its product with V,
  its masks and its dropout are one opaque node;
* the inference fast paths ``torch._native_multi_head_attention`` and
  ``torch._transformer_encoder_layer_fwd``: PyTorch's own fused native kernels, taken by
  ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode without gradients.

``expand_attention_calls`` replaces each ``multi_head_attention_forward`` call by the torch-level
calls its own Python body makes, recorded while that body runs on the node's example values: the
real function, so every branch (packed or separate projections, key padding and attention masks,
``bias_k``, ``add_zero_attn``, unbatched input, ``need_weights``) is the installed torch's, and the
graph computes what the opaque call computed (the compiler traces the same body when it meets the
call). The recorded graph is what Dynamo would have produced had it traced the body: functions as
``call_function``, tensor methods as ``call_method``, Python operators as ``operator.*``. The
matcher then sees the attention like any other. Shape facts the body checks (``key.shape ==
value.shape``...) are evaluated on Dynamo's symbolic sizes, which records them as guards, exactly as
the compiler's own trace of the body does.

A call that cannot be recorded (an operand the recorder cannot name in the graph, a value read off a
tensor's data) stays as it was, and the report lists it as an attention site not fused, with why.
The fast-path kernels stay too: they are PyTorch's fused inference kernels, reported as kept.
"""
from __future__ import annotations

import contextlib
import operator
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dispatch.python import enable_python_dispatcher
from torch.overrides import TorchFunctionMode

from .effects import value

# Why a fast-path call is left alone (reported, kept): its own fused kernel already runs.
FAST_PATH_REASON = (
    "kept: PyTorch's native inference fast path ({name}), which nn.MultiheadAttention / "
    "nn.TransformerEncoderLayer take in eval mode without gradients; one fused native call whose "
    "body the pass does not see (torch.backends.mha.set_fastpath_enabled(False) makes the module "
    "take its Python path, which the pass fuses)")

_FAST_PATHS = {}
for _name in ("_native_multi_head_attention", "_transformer_encoder_layer_fwd"):
    _f = getattr(torch, _name, None)
    if _f is not None:
        _FAST_PATHS[_f] = "torch." + _name
    _f = getattr(torch.ops.aten, _name, None)
    if _f is not None:
        _FAST_PATHS[_f] = "torch.ops.aten." + _name
        _FAST_PATHS[_f.default] = "torch.ops.aten." + _name


class NotRecorded(Exception):
    """The body did something the recorder cannot write as graph nodes: the call stays closed."""


@dataclass
class Closed:
    """An attention call left as one node: the report lists it with ``reason``."""
    node: fx.Node
    reason: str
    kept: bool


def closed_call(node: fx.Node) -> Optional[str]:
    """The name of the closed attention call ``node`` makes, or None: for the report of bodies the
    pass does not rewrite."""
    if node.op == "call_function" and node.target is F.multi_head_attention_forward:
        return "F.multi_head_attention_forward"
    return fast_path_name(node)


def fast_path_name(node: fx.Node) -> Optional[str]:
    if node.op != "call_function":
        return None
    try:
        return _FAST_PATHS.get(node.target)
    except TypeError:  # an unhashable target
        return None


# Tensor methods that read metadata only: run, never recorded (their results are Python values, and
# symbolic sizes among them are found again in the graph when an op takes them; see _SymNodes).
_METADATA = {"size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex",
             "element_size", "stride", "storage_offset", "is_contiguous", "get_device",
             "__len__", "is_nested"}

_DATA_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__",
               "numpy", "data_ptr"}

# Python operators on tensors, written as Dynamo writes them (``a * b`` is ``operator.mul(a, b)``).
_OPERATORS = {
    "__add__": (operator.add, False), "__radd__": (operator.add, True),
    "__sub__": (operator.sub, False), "__rsub__": (operator.sub, True),
    "__mul__": (operator.mul, False), "__rmul__": (operator.mul, True),
    "__truediv__": (operator.truediv, False), "__rtruediv__": (operator.truediv, True),
    "__matmul__": (operator.matmul, False), "__rmatmul__": (operator.matmul, True),
    "__getitem__": (operator.getitem, False), "__neg__": (operator.neg, False),
    "__and__": (operator.and_, False), "__or__": (operator.or_, False),
    "__invert__": (operator.invert, False), "__eq__": (operator.eq, False),
    "__ne__": (operator.ne, False), "__lt__": (operator.lt, False), "__le__": (operator.le, False),
    "__gt__": (operator.gt, False), "__ge__": (operator.ge, False), "__pow__": (operator.pow, False),
}


def _is_tensor_method(func) -> Optional[str]:
    name = getattr(func, "__name__", None)
    if name is None:
        return None
    own = getattr(torch.Tensor, name, None)
    if own is func or getattr(own, "__get__", None) is func:
        return name
    return None


def _is_property_getter(func) -> bool:
    """``x.shape``, ``x.dtype``, ``x.device``... reach ``__torch_function__`` as a getter."""
    owner = getattr(func, "__self__", None)
    return isinstance(owner, (property, type(torch.Tensor.shape))) or \
        getattr(func, "__name__", "") == "__get__"


class _SymNodes:
    """Graph nodes for symbolic sizes: the recorded body computes sizes in Python (``bsz *
    num_heads``), and an op that takes one needs a node. Each free symbol is found among the graph's
    own symbolic values (Dynamo's ``s0`` placeholders, ``item`` nodes) or as a size of a tensor
    node; sums, products and floor divisions of them are written as ``operator`` nodes."""

    def __init__(self, graph: fx.Graph, before: fx.Node, emit: Callable[..., fx.Node]):
        self.emit = emit
        self.known: Dict[Any, fx.Node] = {}
        self.tensors: List[fx.Node] = []
        for n in graph.nodes:
            if n is before:
                break
            v = value(n)
            if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                self.known.setdefault(v.node.expr, n)
            elif isinstance(v, torch.Tensor):
                self.tensors.append(n)

    def node(self, v):
        expr = sympy.sympify(v.node.expr)
        return self._build(expr)

    def _build(self, expr):
        if expr in self.known:
            return self.known[expr]
        if expr.is_Integer:
            return int(expr)
        if isinstance(expr, sympy.Symbol):
            for n in self.tensors:
                t = value(n)
                for d, s in enumerate(t.shape):
                    if isinstance(s, torch.SymInt) and s.node.expr == expr:
                        got = self.emit("call_method", "size", (n, d), {}, s)
                        self.known[expr] = got
                        return got
            raise NotRecorded(f"no graph value holds the size {expr}")
        if isinstance(expr, (sympy.Add, sympy.Mul)):
            op = operator.add if isinstance(expr, sympy.Add) else operator.mul
            parts = [self._build(a) for a in expr.args]
            acc = parts[0]
            for p in parts[1:]:
                acc = self.emit("call_function", op, (acc, p), {}, None)
            self.known[expr] = acc
            return acc
        if type(expr).__name__ == "FloorDiv":
            a, b = (self._build(x) for x in expr.args)
            got = self.emit("call_function", operator.floordiv, (a, b), {}, None)
            self.known[expr] = got
            return got
        raise NotRecorded(f"the size {expr} is not a sum, product or floor division of known sizes")


class _Recorder(TorchFunctionMode):
    """Runs a Python function on fake values and writes each torch call it makes into the graph."""

    def __init__(self, graph: fx.Graph, at: fx.Node, env: Dict[int, fx.Node]):
        super().__init__()
        self.graph, self.at, self.env = graph, at, env
        self.keep: List[Any] = []      # the fake values whose ids ``env`` holds stay alive
        self.nodes: List[fx.Node] = []
        self.syms = _SymNodes(graph, at, self._emit)

    def _emit(self, op, target, args, kwargs, example):
        with self.graph.inserting_before(self.at):
            n = self.graph.create_node(op, target, args, kwargs)
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in self.at.meta:
                n.meta[key] = self.at.meta[key]
        if example is not None:
            n.meta["example_value"] = example
        self.nodes.append(n)
        return n

    def _arg(self, a):
        if isinstance(a, torch.Tensor):
            n = self.env.get(id(a))
            if n is None:
                raise NotRecorded("the body reads a tensor that is not in the graph")
            return n
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            if a.node.is_constant() or not a.node.expr.free_symbols:
                return a.node.pytype(a.node.expr) if a.node.expr.is_number else a
            return self.syms.node(a)
        if isinstance(a, torch.Size):
            return tuple(self._arg(x) for x in a)
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self._arg(x) for k, x in a.items()}
        if isinstance(a, slice):
            return slice(self._arg(a.start), self._arg(a.stop), self._arg(a.step))
        return a

    def _bind(self, out, node):
        if isinstance(out, torch.Tensor):
            self.env[id(out)] = node
            self.keep.append(out)
            node.meta.setdefault("example_value", out)
        elif isinstance(out, (tuple, list)):
            node.meta.setdefault("example_value", out)
            for k, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    self._bind(o, self._emit("call_function", operator.getitem, (node, k), {}, o))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        method = _is_tensor_method(func)
        if _is_property_getter(func) or (method in _METADATA):
            return func(*args, **kwargs)
        if method in _DATA_READS:
            # a Python value read off a tensor's data would be frozen into the graph as a constant
            raise NotRecorded(f"the body reads a tensor's data (Tensor.{method})")
        out = func(*args, **kwargs)
        if not _has_tensor(out):
            return out
        a, kw = self._arg(tuple(args)), self._arg(dict(kwargs))
        if method in _OPERATORS:
            target, swap = _OPERATORS[method]
            if swap:
                a = (a[1], a[0]) + tuple(a[2:])
            node = self._emit("call_function", target, a, kw, None)
        elif method is not None:
            node = self._emit("call_method", method, a, kw, None)
        else:
            node = self._emit("call_function", func, a, kw, None)
        if method is not None and method.endswith("_") and not method.startswith("__") \
                and isinstance(out, torch.Tensor) and out is args[0]:
            # an in-place method: later readers of the tensor read the written value, so they
            # read this node (the order of the write and its readers is then an edge)
            self.env[id(out)] = node
            node.meta["example_value"] = out
            return out
        self._bind(out, node)
        return out


def _has_tensor(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (tuple, list)):
        return any(_has_tensor(y) for y in x)
    return False


def _record(graph: fx.Graph, node: fx.Node, fake_mode) -> List[fx.Node]:
    """Write the body of ``node``'s call before it; replace its results; return the new nodes."""
    env: Dict[int, fx.Node] = {}
    keep = []

    def fake(a):
        if isinstance(a, fx.Node):
            v = value(a)
            if isinstance(v, torch.Tensor):
                env[id(v)] = a
                keep.append(v)
            elif v is None and "example_value" not in a.meta:
                raise NotRecorded(f"operand {a.name} has no example value")
            return v
        return a

    args = fx.node.map_arg(node.args, fake)
    kwargs = fx.node.map_arg(node.kwargs, fake)
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
               and not u.kwargs for u in users):
        raise NotRecorded("its result is used other than by taking its outputs")
    rec = _Recorder(graph, node, env)
    rec.keep.extend(keep)
    try:
        # the Python dispatcher, as Dynamo and the compiler run fake code: meta functions then take
        # symbolic sizes (baddbmm's meta expands its bias to sizes that may be symbols)
        with enable_python_dispatcher(), fake_mode, _contexts_at(graph, node), rec:
            out = _body(node.target)(*args, **kwargs)
    except NotRecorded:
        _drop(graph, rec.nodes)
        raise
    except Exception as e:  # noqa: BLE001 - the body's own error: leave the call as it was
        _drop(graph, rec.nodes)
        raise NotRecorded(f"recording its body failed ({type(e).__name__}: {e})") from None
    outs = out if isinstance(out, tuple) else (out,)
    repl = []
    for u in users:
        o = outs[u.args[1]]
        if o is None:
            if u.users:
                _drop(graph, rec.nodes)
                raise NotRecorded("a None output of it is read")
            repl.append((u, None))
            continue
        n = env.get(id(o)) if isinstance(o, torch.Tensor) else None
        if n is None:
            _drop(graph, rec.nodes)
            raise NotRecorded("an output of its body is not a recorded value")
        repl.append((u, n))
    for u, n in repl:
        if n is not None:
            u.replace_all_uses_with(n)
        graph.erase_node(u)
    graph.erase_node(node)
    return rec.nodes


@contextlib.contextmanager
def _contexts_at(graph: fx.Graph, at: fx.Node):
    """The autocast and grad modes in force at ``at``: Dynamo writes them into the graph as calls
    (``_enter_autocast`` / ``_exit_autocast``, ``_set_grad_enabled``), and the body must be recorded
    under them, or its example values would carry other dtypes than the ones it computes in."""
    active, grad = [], None
    for n in graph.nodes:
        if n is at:
            break
        if n.op != "call_function":
            continue
        if n.target is torch.amp.autocast_mode._enter_autocast:
            active.append(n)
        elif n.target is torch.amp.autocast_mode._exit_autocast and n.args and n.args[0] in active:
            active.remove(n.args[0])
        elif n.target is torch._C._set_grad_enabled and n.args:
            grad = bool(n.args[0])
    with contextlib.ExitStack() as stack:
        for n in active:
            device, dtype, enabled, cache = (list(n.args) + [None] * 4)[:4]
            kw = {"dtype": dtype, "enabled": bool(enabled)}
            if cache is not None:
                kw["cache_enabled"] = cache
            stack.enter_context(torch.autocast(device, **kw))
        if grad is not None:
            stack.enter_context(torch.set_grad_enabled(grad))
        yield


def _body(fn):
    """``fn`` itself, except that its opening ``has_torch_function`` check says no: with the
    recorder's mode on, that check would hand the whole call to the mode as one call again. The
    helpers it calls (``linear``, ``softmax``, ``_in_projection_packed``...) are the module's own."""
    g = dict(fn.__globals__)
    g["has_torch_function"] = lambda *a, **k: False
    copy = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _drop(graph: fx.Graph, nodes: List[fx.Node]) -> None:
    for n in reversed(nodes):
        if n.graph is graph and not n.users:
            graph.erase_node(n)


def expand_attention_calls(gm: fx.GraphModule, fake_mode) -> tuple:
    """Open each ``F.multi_head_attention_forward`` call of ``gm`` in place. Returns (lines for the
    report, the calls left closed with why, the recorded nodes)."""
    lines: List[str] = []
    closed: List[Closed] = []
    recorded: List[fx.Node] = []
    for node in list(gm.graph.nodes):
        name = fast_path_name(node)
        if name is not None:
            closed.append(Closed(node, FAST_PATH_REASON.format(name=name), kept=True))
            continue
        if not (node.op == "call_function" and node.target is F.multi_head_attention_forward):
            continue
        if fake_mode is None:
            closed.append(Closed(node, "not fused: F.multi_head_attention_forward is one call in "
                                 "Dynamo's graph, and the graph carries no example values to "
                                 "record its body on", kept=False))
            continue
        label = node.name
        try:
            new = _record(gm.graph, node, fake_mode)
        except NotRecorded as e:
            closed.append(Closed(node, "not fused: F.multi_head_attention_forward is one call in "
                                 f"Dynamo's graph, and its body could not be opened: {e}", kept=False))
            continue
        recorded += new
        lines.append(f"expand: {label} (F.multi_head_attention_forward) -> its body, {len(new)} nodes")
    return lines, closed, recorded
