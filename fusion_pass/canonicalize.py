"""Stage 2, canonicalise: fold the many spellings of one op in Dynamo's graph into one vocabulary.

Dynamo hands us torch-level calls: ``torch.matmul(a, b)``, ``a @ b``, ``a.matmul(b)`` and
``torch.bmm(a, b)`` are four node shapes for one product; ``F.softmax(x, dim=-1)``,
``x.softmax(-1)`` and ``torch.softmax(x, -1, dtype=...)`` three for one softmax. ``view(node)``
reads any of them as a ``CanonicalOp``: a canonical name plus normalised arguments, so the matcher
is written once against this vocabulary. The rules are data (a table of spellings -> reader), each
reader stating the identity it relies on.

Hands on: ``view(node) -> CanonicalOp | None`` to the matcher.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F


@dataclass
class CanonicalOp:
    name: str                         # matmul, mul, div, add, sub, rsub, softmax, cast, dropout, ...
    args: Tuple[Any, ...] = ()        # canonical positional arguments
    kwargs: Dict[str, Any] = field(default_factory=dict)
    node: Optional[fx.Node] = None


def _get(node: fx.Node, i: int, name: str, default=None):
    # Not ``Node.normalized_arguments``: on Dynamo's graphs it returns None for methods
    # (``x.masked_fill``, ``x.transpose``) and operators (``operator.mul``), and None or an error for
    # overloaded torch functions without argument types (``torch.add``, ``torch.where``); measured on
    # a traced attention, it normalised only ``F.softmax`` and ``F.dropout``.
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _binary(name: str):
    """a <op> b in the spelling's own order; ``torch.add(a, b, alpha=2)`` is not plain addition."""
    def read(node: fx.Node):
        a, b = _get(node, 0, "input"), _get(node, 1, "other")
        if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None:
            return None
        if len(node.args) > 2:  # torch.div(a, b, rounding_mode) positional, or alpha positional
            return None
        return CanonicalOp(name, (a, b))
    return read


def _matmul(node: fx.Node):
    return CanonicalOp("matmul", (_get(node, 0, "input"), _get(node, 1, "other", _get(node, 1, "mat2"))))


def _softmax(node: fx.Node):
    """softmax(x, dim, dtype): dtype=None keeps x's dtype; F.softmax's _stacklevel is irrelevant."""
    x = _get(node, 0, "input")
    dim = _get(node, 1, "dim")
    dtype = node.kwargs.get("dtype")
    if dtype is None and len(node.args) > 3 and node.target is F.softmax:
        dtype = node.args[3]
    elif dtype is None and len(node.args) > 2 and node.target is not F.softmax:
        dtype = node.args[2]
    return CanonicalOp("softmax", (x, dim), {"dtype": dtype})


def _dropout(node: fx.Node):
    """dropout(x, p, training); F.dropout defaults to training=True, inplace=False."""
    x = _get(node, 0, "input")
    p = _get(node, 1, "p", 0.5)
    training = _get(node, 2, "training", True) if node.target is not torch.dropout \
        else _get(node, 2, "train", True)
    inplace = _get(node, 3, "inplace", False)
    return CanonicalOp("dropout", (x, p, training), {"inplace": inplace})


def _cast_method(node: fx.Node):
    """x.to(dtype) / x.to(device, dtype) / x.float() ...: only dtype changes matter here."""
    x = node.args[0]
    if node.target == "to":
        dtype = node.kwargs.get("dtype")
        for a in node.args[1:]:
            if isinstance(a, torch.dtype):
                dtype = a
        if dtype is None:
            # x.to(device) or x.to(other_tensor): read the result dtype off the node's value
            val = node.meta.get("example_value")
            dtype = getattr(val, "dtype", None)
            if dtype is None:
                return None
        if node.kwargs.get("copy") or node.kwargs.get("memory_format") is not None:
            return None
        return CanonicalOp("cast", (x, dtype))
    if node.target == "type_as":
        val = node.meta.get("example_value")
        return CanonicalOp("cast", (x, getattr(val, "dtype", None))) if val is not None else None
    if node.target == "type":
        if len(node.args) > 1 and isinstance(node.args[1], torch.dtype):
            return CanonicalOp("cast", (x, node.args[1]))
        return None
    return CanonicalOp("cast", (x, _CAST_METHODS[node.target]))


_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                 "double": torch.float64}


def _transpose(node: fx.Node):
    return CanonicalOp("transpose", (_get(node, 0, "input"), _get(node, 1, "dim0"), _get(node, 2, "dim1")))


def _permute(node: fx.Node):
    x = node.args[0]
    dims = node.args[1:] if node.op == "call_method" else (_get(node, 1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    if node.op == "call_method" and not dims:
        dims = node.kwargs.get("dims")
    return CanonicalOp("permute", (x, tuple(dims)))


def _masked_fill(node: fx.Node):
    return CanonicalOp("masked_fill", (_get(node, 0, "input"), _get(node, 1, "mask"), _get(node, 2, "value")))


def _where(node: fx.Node):
    if len(node.args) + len(node.kwargs) != 3:
        return None  # torch.where(cond) is nonzero(), not a select
    return CanonicalOp("where", (_get(node, 0, "condition"), _get(node, 1, "input"), _get(node, 2, "other")))


def _unary(name: str):
    def read(node: fx.Node):
        return CanonicalOp(name, (_get(node, 0, "input"),))
    return read


def _noise(node: fx.Node):
    """contiguous() and clone() change layout, never values."""
    if node.kwargs.get("memory_format") not in (None, torch.contiguous_format):
        return None
    return CanonicalOp("identity", (node.args[0],))


def _reshape(node: fx.Node):
    """x.view(*sizes) / x.reshape(sizes) / torch.reshape(x, sizes); ``x.view(dtype)`` is a bit
    cast, not a reshape."""
    x = node.args[0]
    sizes = node.args[1:] if node.op == "call_method" else (_get(node, 1, "shape"),)
    if not sizes:
        sizes = (node.kwargs.get("size", node.kwargs.get("shape")),)
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
        sizes = tuple(sizes[0])
    if any(isinstance(s, torch.dtype) for s in sizes) or not sizes:
        return None
    return CanonicalOp("reshape", (x, tuple(sizes)))


def _baddbmm(node: fx.Node):
    """baddbmm(input, b1, b2, beta=1, alpha=1) = beta * input + alpha * (b1 @ b2)."""
    inp = _get(node, 0, "input")
    b1, b2 = _get(node, 1, "batch1"), _get(node, 2, "batch2")
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    return CanonicalOp("baddbmm", (inp, b1, b2), {"beta": beta, "alpha": alpha})


def _einsum(node: fx.Node):
    """torch.einsum of two operands that is a batched product with identical batch subscripts:
    "...id,...jd->...ij" is a @ b^T (read as matmul with ``b_transposed``), "...id,...dj->...ij"
    is a @ b. Any other equation (heads moved, reductions) is not read as a product."""
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if not isinstance(eq, str) or len(ops) != 2 or "->" not in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        return None
    a, b = (p.replace("...", "*") for p in parts)
    o = out.replace("...", "*")
    if len(a) < 2 or len(a) != len(b) or len(a) != len(o) or len(set(a)) != len(a) or len(set(b)) != len(b):
        return None
    batch = a[:-2]
    if b[:-2] != batch or o[:-2] != batch:
        return None
    i, d = a[-2], a[-1]
    if len({i, d} & set(batch)) or o[-2] != i:
        return None
    j = o[-1]
    if j in (i, d) or j in batch:
        return None
    if b[-2:] == j + d:
        return CanonicalOp("matmul", (ops[0], ops[1]), {"b_transposed": True})
    if b[-2:] == d + j:
        return CanonicalOp("matmul", (ops[0], ops[1]))
    return None


def _sdpa(node: fx.Node):
    """scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
    scale=None, enable_gqa=False): a whole attention in one call."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    got = {n: _get(node, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))}
    if len(node.args) > len(names) or set(node.kwargs) - set(names):
        return None
    return CanonicalOp("sdpa", (got["query"], got["key"], got["value"]),
                       {k: got[k] for k in names[3:]})


def _fn(name: str, params=()):
    """A unary pointwise function of its first argument (``kernels/pointwise.py``'s table), with
    its constant parameters ``params`` ((name, default) pairs, positional after the input or by
    keyword); a parameter that is not a constant leaves the node outside the vocabulary."""
    def read(node: fx.Node):
        x = _get(node, 0, "input")
        args = []
        for k, (pname, default) in enumerate(params):
            a = _get(node, k + 1, pname, default)
            if isinstance(a, fx.Node) or isinstance(a, bool) and pname != "tanh_approx":
                return None
            args.append(a)
        if node.kwargs.get("inplace"):
            return None
        extra = set(node.kwargs) - {p for p, _ in params} - {"input", "inplace"}
        if extra or len(node.args) > 1 + len(params):
            return None
        return CanonicalOp("fn", (x,), {"fn": name, "args": tuple(args)})
    return read


def _gelu(node: fx.Node):
    approx = _get(node, 1, "approximate", "none")
    if approx not in ("none", "tanh") or len(node.args) > 2 or set(node.kwargs) - {"input", "approximate"}:
        return None
    return CanonicalOp("fn", (_get(node, 0, "input"),), {"fn": "gelu", "args": (approx == "tanh",)})


def _clamp(lo_default=None, hi_default=None, which=("min", "max")):
    def read(node: fx.Node):
        x = _get(node, 0, "input")
        vals = []
        for k, pname in enumerate(which):
            a = _get(node, k + 1, pname, None)
            if a is not None and not _is_number(a):
                return None
            vals.append(float(a) if a is not None else None)
        lo, hi = (vals + [None, None])[:2] if which == ("min", "max") else \
            ((vals[0], None) if which == ("min",) else (None, vals[0]))
        if lo is None and hi is None:
            return None
        return CanonicalOp("fn", (x,), {"fn": "clamp", "args": (lo, hi)})
    return read


def _is_number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _pow(node: fx.Node):
    x, c = _get(node, 0, "input"), _get(node, 1, "exponent")
    if not _is_number(c) or not isinstance(x, fx.Node) or len(node.args) + len(node.kwargs) != 2:
        return None
    return CanonicalOp("fn", (x,), {"fn": "pow", "args": (c,)})


_UNARY_FNS = ("sin", "cos", "exp", "expm1", "log", "log1p", "sqrt", "rsqrt", "reciprocal", "neg",
              "square", "abs", "sigmoid", "erf", "relu")


def _item(node: fx.Node):
    return CanonicalOp("item", (node.args[0],))


# One table of op spellings for the whole pass: canonical name -> how Dynamo's graph writes the op,
# functions and operators by object, methods by name. The readers below and the mask interpreter's
# handlers (``masks/handlers.py``) are both keyed from it; each stage reads the names it handles,
# so a spelling added here reaches every stage that reads the op. A reflected method
# (``x.__radd__(y)`` is ``y + x``) is listed only under an op that commutes, or as its own op.
SPELLINGS: Dict[str, Tuple[Any, ...]] = {
    # products
    "matmul": (torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__"),
    "baddbmm": (torch.baddbmm, "baddbmm"),
    "einsum": (torch.einsum,),
    "sdpa": (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention,
             torch.ops.aten.scaled_dot_product_attention.default),
    # arithmetic
    "add": (torch.add, operator.add, "add", "__add__", "__radd__"),
    "sub": (torch.sub, operator.sub, torch.subtract, "sub", "subtract", "__sub__"),
    "rsub": (torch.rsub, "__rsub__"),
    "mul": (torch.mul, operator.mul, torch.multiply, "mul", "multiply", "__mul__", "__rmul__"),
    "div": (torch.div, operator.truediv, torch.true_divide, torch.divide, "div", "divide", "true_divide"),
    "floordiv": (operator.floordiv, torch.floor_divide, "floor_divide", "__floordiv__"),
    "mod": (operator.mod, torch.remainder, "remainder", "__mod__"),
    "maximum": (torch.maximum, "maximum"),
    "minimum": (torch.minimum, "minimum"),
    "pow": (torch.pow, operator.pow, "pow", "__pow__"),
    # comparisons and logic
    "lt": (operator.lt, torch.lt, torch.less, "lt", "less"),
    "le": (operator.le, torch.le, "le", "less_equal"),
    "gt": (operator.gt, torch.gt, torch.greater, "gt", "greater"),
    "ge": (operator.ge, torch.ge, "ge", "greater_equal"),
    "eq": (operator.eq, torch.eq, "eq"),
    "ne": (operator.ne, torch.ne, "ne", "not_equal"),
    "and": (operator.and_, torch.bitwise_and, "bitwise_and", "__and__"),
    "or": (operator.or_, torch.bitwise_or, "bitwise_or", "__or__"),
    "xor": (operator.xor, torch.bitwise_xor, "bitwise_xor", "__xor__"),
    "logical_and": (torch.logical_and, "logical_and"),
    "logical_or": (torch.logical_or, "logical_or"),
    "logical_xor": (torch.logical_xor, "logical_xor"),
    "not": (operator.invert, torch.bitwise_not, "bitwise_not", "__invert__"),
    "logical_not": (torch.logical_not, "logical_not"),
    # selection; the method x.where(c, y) is where(c, x, y): its own argument order
    "where": (torch.where, "where"),
    "masked_fill": (torch.masked_fill, "masked_fill"),
    # softmax and dropout
    "softmax": (torch.softmax, F.softmax, "softmax"),
    "dropout": (F.dropout, torch.dropout),
    # dtypes and layouts
    "cast": ("to", "float", "half", "bfloat16", "double", "type_as", "type", "bool", "int", "long"),
    "contiguous": ("contiguous",),
    "clone": ("clone", torch.clone),
    "detach": ("detach", torch.detach),
    "reshape": (torch.reshape, "view", "reshape"),
    "squeeze": (torch.squeeze, "squeeze"),
    "unsqueeze": (torch.unsqueeze, "unsqueeze"),
    "expand": ("expand", "expand_as", "broadcast_to", torch.broadcast_to),
    "transpose": (torch.transpose, "transpose"),
    "permute": (torch.permute, "permute"),
    "t": (torch.t, "t"),
    "getitem": (operator.getitem,),
    "item": ("item",),
    # constructors
    "arange": (torch.arange,),
    "ones": (torch.ones, "new_ones", torch.ones_like),
    "zeros": (torch.zeros, "new_zeros", torch.zeros_like),
    "full": (torch.full, "new_full", torch.full_like),
    "tensor": (torch.tensor, torch.scalar_tensor),
    "tril": (torch.tril, "tril"),
    "triu": (torch.triu, "triu"),
    # pointwise functions of the score (``kernels/pointwise.py``)
    **{n: (getattr(torch, n), n) for n in _UNARY_FNS},
    "neg": (operator.neg, torch.neg, "neg", "__neg__"),
    "abs": (operator.abs, abs, torch.abs, "abs", "__abs__"),
    "tanh": (torch.tanh, F.tanh, "tanh"),
    "erf": (torch.erf, torch.special.erf, "erf"),
    "expm1": (torch.expm1, torch.special.expm1, "expm1"),
    "log1p": (torch.log1p, torch.special.log1p, "log1p"),
    "sigmoid": (torch.sigmoid, F.sigmoid, "sigmoid"),
    "relu": (torch.relu, F.relu, "relu"),
    "silu": (F.silu,),
    "gelu": (F.gelu,),
    "softplus": (F.softplus,),
    "leaky_relu": (F.leaky_relu,),
    "clamp": (torch.clamp, torch.clip, "clamp", "clip"),
    "clamp_min": (torch.clamp_min, "clamp_min"),
    "clamp_max": (torch.clamp_max, "clamp_max"),
}


def spelling_table(readers: Dict[str, Callable]) -> Tuple[Dict[Any, Callable], Dict[str, Callable]]:
    """(functions and operators by object, methods by name) -> reader, for the canonical names in
    ``readers``, from ``SPELLINGS``."""
    functions: Dict[Any, Callable] = {}
    methods: Dict[str, Callable] = {}
    for name, reader in readers.items():
        for sp in SPELLINGS[name]:
            (methods if isinstance(sp, str) else functions)[sp] = reader
    return functions, methods


# canonical name -> reader
READERS: Dict[str, Callable] = {
    "matmul": _matmul, "baddbmm": _baddbmm, "einsum": _einsum, "sdpa": _sdpa,
    "add": _binary("add"), "sub": _binary("sub"), "mul": _binary("mul"), "div": _binary("div"),
    "softmax": _softmax, "dropout": _dropout, "tanh": _unary("tanh"),
    "cast": _cast_method, "contiguous": _noise, "clone": _noise, "item": _item,
    "transpose": _transpose, "permute": _permute, "masked_fill": _masked_fill, "reshape": _reshape,
    **{n: _fn(n) for n in _UNARY_FNS + ("erf", "expm1", "log1p", "sigmoid", "relu", "silu")},
    "gelu": _gelu,
    "softplus": _fn("softplus", (("beta", 1.0), ("threshold", 20.0))),
    "leaky_relu": _fn("leaky_relu", (("negative_slope", 0.01),)),
    "pow": _pow, "clamp": _clamp(), "clamp_min": _clamp(which=("min",)), "clamp_max": _clamp(which=("max",)),
}
FUNCTIONS, METHODS = spelling_table(READERS)
# torch.where(c, x, y) only: the method's argument order differs, and no score chain spells it
FUNCTIONS[torch.where] = _where


def view(node: Any) -> Optional[CanonicalOp]:
    """The canonical reading of a graph node, or None when it is outside the vocabulary."""
    if not isinstance(node, fx.Node):
        return None
    reader = None
    if node.op == "call_function":
        try:
            reader = FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            reader = None
    elif node.op == "call_method":
        reader = METHODS.get(node.target)
    if reader is None:
        return None
    try:
        op = reader(node)
    except (IndexError, KeyError, TypeError):
        return None
    if op is not None:
        op.node = node
    return op


def value(x: Any):
    """The example value Dynamo recorded for a node (fake tensor or symbolic number), or x itself."""
    if isinstance(x, fx.Node):
        return x.meta.get("example_value", x.meta.get("val"))
    return x


def _is_unsqueeze_at(node, x, dim: int) -> bool:
    """node is x with a new size-1 axis at ``dim``: ``x[:, :, None]`` or ``x.unsqueeze(dim)``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] is x:
        idx = node.args[1]
        if not isinstance(idx, tuple):
            return False
        full = slice(None, None, None)
        pos = [i for i, it in enumerate(idx) if it is None]
        return pos == [dim] and all(it == full for i, it in enumerate(idx) if i != dim)
    if (node.op == "call_method" and node.target == "unsqueeze") or \
            (node.op == "call_function" and node.target is torch.unsqueeze):
        d = _get(node, 1, "dim")
        xv = value(x)
        return node.args[0] is x and isinstance(d, int) and xv is not None and d % (xv.dim() + 1) == dim
    return False


def repeated_heads(node) -> Optional[Tuple[fx.Node, int]]:
    """(x, G) when ``node`` is x with each head (dim -3) repeated G times in place, head h of the
    result being head h // G of x: Llama's ``repeat_kv`` (x[:, :, None].expand(..., G, N, D)
    .reshape(..., H * G, N, D), or ``.flatten(-4, -3)``) or ``x.repeat_interleave(G, dim=-3)``.
    The shapes are checked on
    the recorded values, so a look-alike that moves data differently does not qualify."""
    if not isinstance(node, fx.Node):
        return None
    out = value(node)
    if out is None or not hasattr(out, "dim") or out.dim() < 3:
        return None
    rank = out.dim()
    if node.op in ("call_method", "call_function") and (
            node.target in ("repeat_interleave",) or node.target is torch.repeat_interleave):
        x = node.args[0]
        reps = _get(node, 1, "repeats")
        dim = _get(node, 2, "dim")
        if isinstance(x, fx.Node) and isinstance(reps, int) and isinstance(dim, int) \
                and dim % rank == rank - 3 and reps >= 1:
            return x, reps
        return None
    if node.op == "call_method" and node.target == "flatten":
        # x[:, :, None].expand(...).flatten(-4, -3): the same merge of the group into the heads
        ev = value(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        dims = [_get(node, 1, "start_dim", 0), _get(node, 2, "end_dim", -1)]
        if ev is None or not all(isinstance(d, int) for d in dims) or \
                [d % ev.dim() for d in dims] != [rank - 3, rank - 2]:
            return None
    elif not (node.op == "call_method" and node.target in ("reshape", "view")):
        return None
    e = node.args[0]
    if not (isinstance(e, fx.Node) and e.op == "call_method" and e.target == "expand"):
        return None
    u = e.args[0]
    ev, uv = value(e), value(u)
    if ev is None or uv is None or ev.dim() != rank + 1 or not isinstance(u, fx.Node) or not u.args:
        return None
    x = u.args[0]
    xv = value(x)
    if not isinstance(x, fx.Node) or xv is None or xv.dim() != rank:
        return None
    if not _is_unsqueeze_at(u, x, rank - 2):
        return None
    g = ev.shape[rank - 2]
    try:
        same = list(ev.shape[:rank - 2]) == list(xv.shape[:rank - 2]) and \
            list(ev.shape[rank - 1:]) == list(xv.shape[rank - 2:]) and \
            list(out.shape[:rank - 3]) == list(xv.shape[:rank - 3]) and \
            out.shape[rank - 3] == xv.shape[rank - 3] * g and list(out.shape[-2:]) == list(xv.shape[-2:])
    except Exception:  # noqa: BLE001 - symbolic comparison that cannot be decided
        return None
    if not same or not isinstance(g, int):
        return None
    return x, g


# ---- graph rules: rewrite equivalent subgraphs into one form before matching -----------------------

def _call(node, fn=None, method=None) -> bool:
    return isinstance(node, fx.Node) and (
        (fn is not None and node.op == "call_function" and node.target in fn)
        or (method is not None and node.op == "call_method" and node.target in method))


def _last_dim(node: fx.Node, dim) -> bool:
    v = value(node)
    return isinstance(dim, int) and v is not None and hasattr(v, "dim") and dim % max(v.dim(), 1) == v.dim() - 1


def _row_max_of(m) -> Optional[fx.Node]:
    """x when m is x's row max with keepdim: amax(x, -1, True), max(x, -1, True)[0] / .values,
    optionally detached (the softmax is shift-invariant, so stopping its gradient changes nothing)."""
    if _call(m, method={"detach"}) or _call(m, fn={torch.detach}):
        m = m.args[0]
    if _call(m, fn={torch.amax}, method={"amax"}):
        x, dim = m.args[0], _get(m, 1, "dim")
        dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
        if _get(m, 2, "keepdim", False) and _last_dim(x, dim):
            return x
        return None
    if isinstance(m, fx.Node) and m.op == "call_function" and m.target is operator.getitem and m.args[1] == 0 \
            or (isinstance(m, fx.Node) and m.op == "call_function" and m.target is getattr and m.args[1] == "values"):
        mx = m.args[0]
        if _call(mx, fn={torch.max}, method={"max"}) and len(mx.args) + len(mx.kwargs) >= 2:
            x, dim = mx.args[0], _get(mx, 1, "dim")
            if _get(mx, 2, "keepdim", False) and _last_dim(x, dim):
                return x
    return None


def _is_exp(n) -> bool:
    return _call(n, fn={torch.exp}, method={"exp"})


def rule_decomposed_softmax(node: fx.Node) -> Optional[Tuple[fx.Node, int, Any, List[fx.Node]]]:
    """e / e.sum(-1, keepdim=True) with e = exp(x - rowmax(x))  ==  softmax(x, -1)."""
    op = view(node)
    if op is None or op.name != "div":
        return None
    e, total = op.args
    if not (_is_exp(e) and _call(total, fn={torch.sum}, method={"sum"}) and total.args[0] is e):
        return None
    dim = _get(total, 1, "dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if not (_get(total, 2, "keepdim", False) and _last_dim(e, dim)) or total.kwargs.get("dtype") is not None:
        return None
    if set(e.users) != {node, total} or len(total.users) != 1:
        return None
    d = view(e.args[0])
    if d is None or d.name != "sub" or len(d.node.users) != 1:
        return None
    x = _row_max_of(d.args[1])
    if x is None or x is not d.args[0]:
        return None
    dead = [total, e, d.node]
    m = d.args[1]
    while isinstance(m, fx.Node) and m is not x:
        dead.append(m)
        m = m.args[0]
    return x, -1, None, dead


def rule_exp_log_softmax(node: fx.Node) -> Optional[Tuple[fx.Node, int, Any, List[fx.Node]]]:
    """exp(log_softmax(x, dim, dtype))  ==  softmax(x, dim, dtype)."""
    if not _is_exp(node):
        return None
    ls = node.args[0]
    if not (_call(ls, fn={torch.log_softmax, F.log_softmax}, method={"log_softmax"}) and len(ls.users) == 1):
        return None
    dim = _get(ls, 1, "dim")
    dtype = ls.kwargs.get("dtype")
    if dtype is None and len(ls.args) > 2 and not (ls.target is F.log_softmax):
        dtype = ls.args[2]
    if not isinstance(dim, int):
        return None
    return ls.args[0], dim, dtype, [ls]


def rule_shifted_softmax(node: fx.Node) -> Optional[Tuple[fx.Node, int, Any, List[fx.Node]]]:
    """softmax(x - rowmax(x), -1, dtype)  ==  softmax(x, -1, dtype) (GPT-OSS's sink logits).

    The softmax subtracts the row max itself: for a row of finite values, rowmax(x - rowmax(x))
    is exactly 0 and the elements it exponentiates are x_i - max both ways (the same rounding);
    a row with +inf becomes NaN both ways (inf - inf), and one of only -inf (or with NaN) is NaN
    both ways. The shift's own rounding in a 16-bit dtype differs from float32's only where
    exp(x_i - max) is below that dtype's resolution of the row's largest weight. The gradient
    eager sends through the row max is -sum(dsoftmax), zero up to rounding."""
    op = view(node)
    if op is None or op.name != "softmax" or not _last_dim(node, op.args[1]):
        return None
    d = view(op.args[0])
    if d is None or d.name != "sub" or len(d.node.users) != 1 or not isinstance(d.args[0], fx.Node):
        return None
    x = _row_max_of(d.args[1])
    if x is None or x is not d.args[0]:
        return None
    xv, dv = value(x), value(d.node)
    if not (isinstance(xv, torch.Tensor) and isinstance(dv, torch.Tensor)) or xv.dtype != dv.dtype \
            or tuple(xv.shape) != tuple(dv.shape):
        return None
    m = d.args[1]
    dead = [d.node]
    while isinstance(m, fx.Node) and m is not x:  # erased only where nothing else reads them
        dead.append(m)
        m = m.args[0]
    return x, -1, op.kwargs.get("dtype"), dead


GRAPH_RULES = (rule_decomposed_softmax, rule_exp_log_softmax, rule_shifted_softmax)


# ---- in-place updates of a fresh tensor, as the functional ops they are ---------------------------

# in-place methods (x.name_(...)) and operators (x op= y) whose out-of-place form computes the same
# values into a new tensor: elementwise ops that keep self's shape
_INPLACE_METHODS = {"add", "sub", "mul", "div", "true_divide", "masked_fill", "tanh", "clamp",
                    "clamp_min", "clamp_max", "neg", "exp", "sigmoid", "abs", "pow", "sqrt", "rsqrt",
                    "relu", "square", "sin", "cos", "log", "log1p", "expm1", "reciprocal", "nan_to_num",
                    "fill_diagonal"} - {"fill_diagonal"}
_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv}


def _functional_form(node: fx.Node):
    """(op, target) of the out-of-place twin of an in-place node, or None."""
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.startswith("__") and node.target[:-1] in _INPLACE_METHODS:
        return "call_method", node.target[:-1]
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return "call_function", _INPLACE_OPERATORS[node.target]
    return None


# ops whose result is a view of their first operand and that write nothing (a cast to the dtype it
# already has, ``s.float()`` on float32, returns its operand itself: it is in the storage's group
# only then)
_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "flatten", "unflatten",
                 "view_as", "reshape_as", "t", "mT", "movedim", "swapaxes", "contiguous",
                 "to", "float", "double", "half", "bfloat16", "type", "type_as"}
_VIEW_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze,
                   torch.flatten, torch.movedim, torch.swapaxes, torch.t}


def _is_view_op(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in _VIEW_METHODS) or \
        (n.op == "call_function" and n.target in _VIEW_FUNCTIONS)


def _functionalize_view_chain(gm: fx.GraphModule, group: List[fx.Node], meta_fn) -> Optional[str]:
    """``s = (q @ k^T).view(B, H, N, N); s /= c``: in-place updates through views of a fresh tensor.
    Exact when the storage's nodes form one chain in graph order, base -> m1 -> ... -> mk, each
    m_t a view (``_is_view_op``) or an in-place op with an out-of-place twin, reading m_{t-1} as
    its first operand (and not as another operand), and every other reader of a member m_t reads
    it before any later view is taken, i.e. only in-place steps m_{t+1} .. m_j lie between m_t
    and the reader (uses of a shape aside: a write never changes a shape). Such a reader sees
    m_j's values (an in-place op returns its own operand, same view), so it is given m_j. Then
    applying each in-place op out of place to the previous (functional) value gives every reader
    the values it read before, and views stay views of those values. An in-place step whose
    operand would promote stays in place, now on the current value. Anything else (the base read
    after a write through a view) is left as it was, and the site that reads it is reported."""
    from .effects import writes
    from .match import shape_only

    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    chain = sorted(group, key=order.__getitem__)
    members = set(chain)

    def same_view(a, b):  # b is a, or a reached back from b through in-place steps
        while b is not a and _functional_form(b) is not None and b.args and b.args[0] in members:
            b = b.args[0]
        return b is a

    for prev, n in zip(chain, chain[1:]):
        # ``s.mul_(c)`` as a statement, then ``s += b``: both update s; the second reads the node
        # s, the same tensor as the first's result
        if not n.args or not isinstance(n.args[0], fx.Node) or not same_view(n.args[0], prev) \
                or not (_is_view_op(n) or _functional_form(n)):
            return None
        others = []
        fx.node.map_arg((n.args[1:], n.kwargs), others.append)
        if any(a in members for a in others):
            return None  # the tensor is also an operand of its own update (s.add_(s))
        if _is_view_op(n) and writes(n):
            return None
    redirect = []  # (reader, member it reads, member whose values it sees)
    for t, m in enumerate(chain):
        for u in m.users:
            if u in members or shape_only(u, m):
                continue
            j = max(k for k, c in enumerate(chain) if order[c] < order[u])
            if any(_is_view_op(c) for c in chain[t + 1:j + 1]):
                return None  # a view taken, then written through, before this reader
            if j > t:
                redirect.append((u, m, chain[j]))
    for u, m, c in redirect:
        u.replace_input_with(m, c)
    new_nodes = []
    current = chain[0]  # the value of the storage's latest view, functional from here on
    for n in chain[1:]:
        if n.args[0] is not current:
            n.replace_input_with(n.args[0], current)  # same values: see same_view
        form = _functional_form(n)
        if form is None:
            current = n
            continue
        op, target = form
        with gm.graph.inserting_before(n):
            f = gm.graph.create_node(op, target, tuple(n.args), dict(n.kwargs))
        nv = value(n)
        try:
            meta_fn(f)
            fv = value(f)
        except Exception:  # noqa: BLE001 - not computable: n stays in place (below)
            fv = None
        if not isinstance(fv, torch.Tensor) or not isinstance(nv, torch.Tensor) or fv.dtype != nv.dtype \
                or tuple(fv.shape) != tuple(nv.shape):
            # a promoting operand: not the same op out of place. n stays an in-place update of
            # the current value; later steps read n, readers were given the member before them
            gm.graph.erase_node(f)
            current = n
            continue
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in n.meta:
                f.meta[key] = n.meta[key]
        n.replace_all_uses_with(f)
        gm.graph.erase_node(n)
        new_nodes.append((n.name, f.name))
        current = f
    if not new_nodes:
        return None
    return (f"functionalised through views: {', '.join(a for a, _ in new_nodes)} on {chain[0].name} "
            f"-> {', '.join(b for _, b in new_nodes)}")


def functionalize_inplace(gm: fx.GraphModule, meta_fn=None) -> List[str]:
    """``s /= c``, ``s.masked_fill_(m, x)``, ``s += bias``: an in-place update of a tensor that
    nothing else aliases is the out-of-place op, with every later reader of the tensor reading the
    new value. Exact when (checked on Dynamo's fake tensors): the tensor's storage is shared by no
    graph node except the tensor itself and the in-place ops applied to it (no view, no graph input,
    no buffer), every such op has an out-of-place twin in ``_INPLACE_METHODS`` / ``_INPLACE_OPERATORS``
    that gives the same shape and dtype (an in-place op keeps self's dtype; a promoting operand
    would change it), and no ``out=`` or setitem writes into it. Then the storage's value over time
    is the chain of functional results, and each reader gets the one current at its position."""
    from .effects import StorageMap, writes

    if meta_fn is None:
        return []
    smap = StorageMap(gm.graph)
    applied = []
    for group in list(smap.groups.values()):
        base, rest = group[0], group[1:]
        if not rest or base.op not in ("call_function", "call_method") or writes(base):
            continue
        if any(_is_view_op(n) for n in rest):
            line = _functionalize_view_chain(gm, group, meta_fn)
            if line:
                applied.append(line)
            continue
        if not all(_functional_form(n) is not None and n.args and n.args[0] in group for n in rest):
            continue
        if any(writes(u) and u not in group for n in group for u in n.users):
            continue  # setitem / out= into it
        bv = value(base)
        new_nodes, current, ok = {}, base, True
        order = {n: k for k, n in enumerate(gm.graph.nodes)}
        for n in sorted(rest, key=order.__getitem__):
            op, target = _functional_form(n)
            with gm.graph.inserting_before(n):
                args = (current,) + tuple(n.args[1:])
                f = gm.graph.create_node(op, target, args, dict(n.kwargs))
            try:
                meta_fn(f)
            except Exception:  # noqa: BLE001 - not computable: leave the group as it was
                ok = False
            fv = value(f)
            if not ok or not isinstance(fv, torch.Tensor) or fv.dtype != bv.dtype or \
                    tuple(fv.shape) != tuple(bv.shape):
                ok = False
                gm.graph.erase_node(f)
                break
            for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                if key in n.meta:
                    f.meta[key] = n.meta[key]
            new_nodes[n] = f
            current = f
        if not ok:
            for f in new_nodes.values():
                gm.graph.erase_node(f)
            continue
        # every reader of the storage gets the value current at its own position
        timeline = [(order[base], base)] + sorted((order[n], new_nodes[n]) for n in rest)
        members = set(group)
        for n in group:
            for u in list(n.users):
                if u in members or u in new_nodes.values():
                    continue
                pos = order[u]
                cur = base
                for at, val in timeline:
                    if at < pos:
                        cur = val
                if cur is not n:
                    u.replace_input_with(n, cur)
        for n in sorted(rest, key=order.__getitem__, reverse=True):
            if not n.users:
                gm.graph.erase_node(n)
        applied.append(f"functionalised: {', '.join(n.name for n in rest)} on {base.name} "
                       f"-> {', '.join(f.name for f in new_nodes.values())}")
    return applied


def canonicalize_graph(gm: fx.GraphModule, meta_fn=None) -> List[str]:
    """Apply GRAPH_RULES until none fires; returns one line per rewrite, for the report."""
    applied = functionalize_inplace(gm, meta_fn)
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            for rule in GRAPH_RULES:
                hit = rule(node)
                if hit is None:
                    continue
                x, dim, dtype, dead = hit
                with gm.graph.inserting_before(node):
                    kwargs = {"dim": dim} if dtype is None else {"dim": dim, "dtype": dtype}
                    sm = gm.graph.call_function(F.softmax, (x,), kwargs)
                if meta_fn is not None:
                    meta_fn(sm)
                for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                    if key in node.meta:
                        sm.meta[key] = node.meta[key]
                node.replace_all_uses_with(sm)
                gm.graph.erase_node(node)
                for n in dead:
                    if not n.users:
                        gm.graph.erase_node(n)
                applied.append(f"{rule.__name__[5:]}: {node.name} -> {sm.name} = softmax({x.name}, dim={dim})")
                changed = True
                break
    return applied
