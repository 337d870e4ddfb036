"""The attention spec: the one hand-off between the pass (`fusion_pass/`) and the kernels.

A spec describes one fused attention region without naming any FX node and without any shape, so
one spec (and one generated kernel) serves every sequence length of a dynamically shaped graph:

    out = dropout(softmax(score_mod(q @ k^T))) @ v

`score_mod` is the chain of elementwise steps the model wrote between the QK product and the
softmax, kept *in the model's own order and dtypes* (``score_ops``), so that the CPU
implementation reproduces eager rounding step by step and the Triton kernels can evaluate it
inline. Each step reads the running score ``s`` and at most one operand:

* ``const``:  a Python number baked into the graph (``scores * 0.125``);
* ``scalar``: a 0-dim tensor read as a Python number at run time (Dynamo turns float module
  attributes into these under ``dynamic=True``: ``scores * scaling.item()``);
* ``tensor``: a tensor broadcastable to the scores, ``(..., Nq, Nk)`` (bias, float or bool mask);
* ``predicate``: a mask the pass proved equal to a predicate ``keep(b, h, i, j)`` (``spec.masks``,
  a ``MaskSpec``; ``predicate.py`` generates its code): the kernels evaluate it per tile instead
  of reading an N x N tensor, and skip the keys no row of a tile keeps.
  ``index`` is then the position in ``spec.masks``;
* ``bias``: a bias the pass proved to be ``x * y(i, j)`` with ``x`` a captured tensor that does not
  vary over queries or keys and ``y`` an integer index expression (ALiBi): ``spec.biases[index]``.

The spec is frozen and hashable; ``to_key``/``from_key`` serialise it to a string that is passed to
the custom op, so a compiled graph carries everything its kernels need (Inductor's cache can reuse
a graph in a new process without any registry).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Optional

import sympy
import torch

from .pointwise import FUNCTIONS as POINTWISE_FUNCTIONS, expr as pointwise_expr

# The elementwise steps a score chain may contain, with the identity each one computes.
SCORE_OP_KINDS = {
    "mul": "s * x",
    "div": "s / x",
    "add": "s + x",
    "sub": "s - x",
    "rsub": "x - s",
    "fill": "where(m, x, s)   (masked_fill; m is a bool tensor)",
    "fill_not": "where(m, s, x)   (torch.where keeping s where m holds)",
    "tanh": "tanh(s)",
    "cast": "s.to(dtype)",
    "fn": "f(s, *args)   (a pointwise function from pointwise.FUNCTIONS: sin, gelu, clamp...)",
}
OPERAND_KINDS = ("none", "const", "scalar", "tensor", "predicate", "bias")
# what each captured operand of the op is: a tensor broadcastable to the scores, a 0-dim tensor read
# as a number, a data tensor a mask predicate indexes (``MaskSpec``), or the sink logits of
# ``AttentionSpec.sink`` (the last operand)
CAPTURED_KINDS = ("tensor", "scalar", "data", "sink")

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def to_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


# ---------------------------------------------------------------------------------------------------
# masks and biases computed from indices (see predicate.py for their code generation)

MASK_KINDS = ("bool", "additive")


@dataclass(frozen=True)
class MaskSpec:
    """One mask, as a predicate. ``kind`` "bool": the mask tensor *is* ``keep`` (a boolean tensor,
    used by masked_fill / where as the graph used it); "additive": the tensor is
    ``where(keep, kept, masked)`` of ``dtype`` (added to the scores by the graph)."""

    keep: str                 # sympy.srepr of the expression
    axes: tuple               # score axis names, left to right
    data: tuple = ()          # captured-operand positions of the data tensors d0, d1, ...
    kind: str = "bool"
    dtype: str = "bool"
    kept: float = 0.0
    masked: float = -math.inf
    text: str = ""            # str() of the expression, for people
    # What the pass proved about the elements this mask's step keeps (fusion_pass/masks/classify.py,
    # for a fill: not keep, so a kernel reading it must take the step's polarity, op.kind == "fill",
    # as the pass did), so kernels read it instead of re-deriving it from ``keep``: ``kinds``
    # such as "causal", "sliding_window", "band", "prefix_lm", "chunked", "document", "padding",
    # "other", "full" (empty: not classified); ``band`` (lo, hi): every kept element has
    # lo <= j - i <= hi, each an srepr of an expression in the sizes n0 .. (None: unbounded),
    # except for "prefix_lm", whose hi bounds only the causal side of (j - i <= hi) | (j < P).
    # ``whole_band`` says when the band describes the mask whole.
    kinds: tuple = ()
    band: tuple = (None, None)

    def __post_init__(self):
        if self.kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}")
        # from a key: JSON lists
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "band", tuple(self.band))

    def band_exprs(self):
        """(lo, hi) of the proven band lo <= j - i <= hi as sympy expressions (None: unbounded)."""
        return tuple(None if x is None else parse(x) for x in self.band)

    def whole_band(self):
        """(lo, hi) as ``band_exprs`` when the classification describes the mask's kept elements
        whole: its kinds are only a band ("causal", "sliding_window", "band"), "padding" and
        "full", so the conjuncts of the kept expression that read both i and j (the last two
        axes) are exactly the band's, lo <= j - i <= hi together, and every other conjunct reads
        one of i, j; lo and hi read the sizes n0 .. only. None otherwise: not classified (kinds
        empty: a part of a mask, an older key), a prefix (its band is not a bound on every kept
        element), chunks, documents or unrecognised conjuncts (the spec does not carry them), or
        bounds that read data."""
        return _whole_band(self.kinds, self.band, self.axes)

    @property
    def expr(self):
        return parse(self.keep)

    def uses_axis(self, name: str) -> bool:
        return name in _free_names(self.keep)

    def __str__(self):
        body = self.text or str(self.expr)
        if self.kind == "additive":
            return f"where({body}, {self.kept!r}, {self.masked!r})"
        return body


_SREPR_NS = {k: getattr(sympy, k) for k in dir(sympy) if not k.startswith("_")}
# srepr of a Piecewise names its pieces' class, which sympy does not export at the top level
_SREPR_NS["ExprCondPair"] = sympy.functions.elementary.piecewise.ExprCondPair


@dataclass(frozen=True)
class BiasSpec:
    """An additive bias the graph builds as ``x * y``: ``x`` a float tensor that does not vary over
    queries or keys (ALiBi's per-head slopes), passed to the op as it is (captured operand ``x``,
    learnable: it gets its gradient), and ``y`` an integer expression of the indices (``j - i``,
    ``-abs(j - i)``) the kernels compute per tile instead of reading an N x N tensor. ``y`` is
    converted to ``y_dtype`` and multiplied in ``dtype`` exactly as the graph's own ops do: an
    integer-to-float conversion and one IEEE multiplication, both exactly rounded whatever the
    element's position, so every element is the graph's to the bit."""

    x: int                    # captured-operand position of x
    y: str                    # sympy.srepr of the integer expression
    axes: tuple
    y_data: tuple = ()        # captured-operand positions of the data tensors y reads (d0, ...)
    y_dtype: str = "float32"
    dtype: str = "float32"
    text: str = ""

    def index_spec(self) -> "MaskSpec":
        """y as a MaskSpec-shaped expression, for the code generators (they evaluate any
        expression, integer-valued ones included)."""
        return MaskSpec(keep=self.y, axes=self.axes, data=self.y_data, text=self.text)

    def __str__(self):
        return f"c{self.x}[b, h, i, j] * ({self.text})"


@functools.lru_cache(maxsize=None)
def parse(srepr: str):
    """The sympy expression of a ``MaskSpec.keep`` (sympy's own srepr, read back)."""
    return sympy.sympify(eval(srepr, dict(_SREPR_NS)))  # noqa: S307 - our own srepr output


@functools.lru_cache(maxsize=None)
def _free_names(srepr: str) -> frozenset:
    return frozenset(s.name for s in parse(srepr).free_symbols)


# the kinds whose conjuncts a MaskSpec's band and its one-index (padding) conjuncts describe whole
_WHOLE_BAND_KINDS = frozenset({"causal", "sliding_window", "band", "padding", "full"})


@functools.lru_cache(maxsize=None)
def _whole_band(kinds: tuple, band: tuple, axes: tuple):
    if not kinds or not set(kinds) <= _WHOLE_BAND_KINDS or tuple(axes[-2:]) != ("i", "j"):
        return None
    out = tuple(None if x is None else parse(x) for x in band)
    for x in out:
        if x is not None and (x.atoms(sympy.core.function.AppliedUndef) or any(
                not (s.name[:1] == "n" and s.name[1:].isdigit()) for s in x.free_symbols)):
            return None
    return out


# ---------------------------------------------------------------------------------------------------
# the score chain and the spec

@dataclass(frozen=True)
class ScoreOp:
    """One elementwise step of the score chain.

    ``operand`` is "none", "const", "scalar" or "tensor"; ``value`` is the constant (for "const"
    and the fill value of "fill"/"fill_not" when the fill is a constant), ``index`` the position
    of the operand in the op's captured-tensor list, ``dtype`` the dtype of the step's result in
    the original graph.
    """

    kind: str
    operand: str = "none"
    value: Optional[float] = None
    index: Optional[int] = None
    dtype: str = "float32"
    fn: Optional[str] = None      # kind "fn": the function's name in pointwise.FUNCTIONS
    args: tuple = ()              # kind "fn": its constant arguments after the score

    def __post_init__(self):
        if self.kind not in SCORE_OP_KINDS:
            raise ValueError(f"unknown score op kind {self.kind!r}")
        object.__setattr__(self, "args", tuple(self.args))  # from a key: a JSON list
        if self.kind == "fn":
            if self.fn not in POINTWISE_FUNCTIONS:
                raise ValueError(f"unknown pointwise score function {self.fn!r}")
        if self.operand not in OPERAND_KINDS:
            raise ValueError(f"unknown operand kind {self.operand!r}")

    def __str__(self) -> str:
        return self.apply_str("s")

    def apply_str(self, s: str) -> str:
        """The step written as an expression of the score expression ``s``."""
        x = self.operand_str()
        return {
            "mul": f"{s} * {x}", "div": f"{s} / {x}", "add": f"{s} + {x}", "sub": f"{s} - {x}",
            "rsub": f"{x} - {s}", "tanh": f"tanh({s})", "cast": f"{s}.to({self.dtype})",
            "fill": f"where({self.mask_name()}, {_fmt(self.value)}, {s})",
            "fill_not": f"where({self.mask_name()}, {s}, {_fmt(self.value)})",
            "fn": f"{self.fn}({', '.join([s] + [repr(a) for a in self.args])})",
        }[self.kind]

    def operand_str(self) -> str:
        if self.operand == "const":
            return _fmt(self.value)
        if self.operand == "scalar":
            return f"c{self.index}.item()"
        if self.operand == "tensor":
            return f"c{self.index}[b, h, i, j]"
        if self.operand == "predicate":
            return f"m{self.index}[b, h, i, j]"
        if self.operand == "bias":
            return f"a{self.index}[b, h, i, j]"
        return ""

    def mask_name(self) -> str:
        return f"m{self.index}" if self.operand == "predicate" else f"c{self.index}"

    @property
    def captured_index(self) -> Optional[int]:
        """The position in the op's captured list this step reads, if any (a predicate reads none
        directly: its data tensors are listed by its MaskSpec)."""
        return None if self.operand in ("predicate", "bias") else self.index


def _fmt(v: Optional[float]) -> str:
    return repr(v)


@dataclass(frozen=True)
class AttentionSpec:
    """softmax(score_mod(q @ k^T)) @ v, with dropout on the probabilities.

    dtypes are those of the original graph: ``qk_dtype`` of the QK product, ``softmax_dtype`` the
    softmax's output (its ``dtype=`` argument, or its input's dtype), ``prob_dtype`` the
    probabilities as they enter the PV product (after any cast), ``out_dtype`` the PV product.
    ``captured`` names each captured operand's kind ("tensor" or "scalar") in op-argument order.
    """

    score_ops: tuple = ()
    captured: tuple = ()
    qk_dtype: str = "float32"
    softmax_dtype: str = "float32"
    prob_dtype: str = "float32"
    out_dtype: str = "float32"
    dropout_p: float = 0.0
    # proven from the mask operand that ends the score chain: every kept element has key index
    # j <= query index i (causal, possibly with padding or a window), and that step's masked value
    # is recorded (the fill's constant, the additive predicate's masked value, or the mask tensor's
    # values). A structural fact only: whether a kernel may skip the elements above the diagonal
    # is decided per call and per row by the one removal rule (removal.py), which also covers
    # finite fills (-1e4, -1e9, finfo.min) that eager still weighs when scores are large.
    causal: bool = False
    # masks proven equal to predicates, read by "predicate" steps (see predicate.py)
    masks: tuple = ()
    # biases computed from indices, read by "bias" steps (``BiasSpec``)
    biases: tuple = ()
    # SDPA's softmax: a row whose every final score is -inf gives probabilities 0 (output 0, no
    # gradient) instead of eager softmax's NaN row. Set for sites that were SDPA calls.
    safe_softmax: bool = False
    # proven by the rewrite from the graph: no input of the site requires a gradient (an
    # inference graph, ``torch.no_grad``, frozen weights), so no backward of this call exists and
    # the forward's lse is never read. Kernels that cannot return an lse may then compute the
    # forward (``cpu_flex.py``: FlexAttention's CPU kernel, which is inference-only).
    inference: bool = False
    # attention sinks (GPT-OSS): the softmax runs over the scores with ``sink`` more logit columns
    # appended (the last captured operand, of kind "sink", broadcastable to (..., Nq, sink)), and
    # only the scores' columns of its probabilities are kept, so a row's weights sum to less than
    # one. The kernels compute the attention without them; ``ops.py`` rescales each row by
    # exp(lse - logaddexp(lse, logsumexp(sinks))) and gives the sinks their gradient.
    sink: int = 0

    def __post_init__(self):
        for kind in self.captured:
            if kind not in CAPTURED_KINDS:
                raise ValueError(f"unknown captured operand kind {kind!r}")
        if self.captured.count("sink") != (1 if self.sink else 0) or \
                self.sink and self.captured[-1] != "sink" or self.sink < 0:
            raise ValueError(f"a spec with {self.sink} sink columns captures its sink logits as the "
                             f"last operand (and only then), got {self.captured}")
        for op in self.score_ops:
            if op.operand == "predicate":
                if op.index is None or not (0 <= op.index < len(self.masks)):
                    raise ValueError(f"score op {op} reads mask {op.index}, but the spec has "
                                     f"{len(self.masks)}")
            elif op.operand == "bias":
                if op.kind != "add" or op.index is None or not (0 <= op.index < len(self.biases)):
                    raise ValueError(f"score op {op} reads bias {op.index}, but the spec has "
                                     f"{len(self.biases)} (and a bias is added)")
            elif op.index is not None and not (0 <= op.index < len(self.captured)):
                raise ValueError(f"score op {op} reads captured operand {op.index}, "
                                 f"but the spec captures {len(self.captured)}")
        for m in self.masks:
            if any(not (0 <= d < len(self.captured)) or self.captured[d] != "data" for d in m.data):
                raise ValueError(f"mask {m} reads data operands {m.data}, not all captured as data")
        for bi in self.biases:
            if not (0 <= bi.x < len(self.captured)) or self.captured[bi.x] != "tensor" or any(
                    not (0 <= d < len(self.captured)) or self.captured[d] != "data" for d in bi.y_data):
                raise ValueError(f"bias {bi} reads operands that are not captured as it needs")
        if not (0.0 <= self.dropout_p < 1.0):
            raise ValueError(f"dropout probability must be in [0, 1), got {self.dropout_p}")

    # -- readable form (FlexAttention's vocabulary) ---------------------------------------------
    def score_mod_str(self) -> str:
        expr = "s"
        for op in self.score_ops:
            expr = op.apply_str(expr if op.kind in ("fill", "fill_not", "tanh", "cast", "fn")
                                else f"({expr})" if expr != "s" else expr)
        return expr

    def __str__(self) -> str:
        parts = [f"score_mod(s) = {self.score_mod_str()}",
                 f"dtypes: qk={self.qk_dtype} softmax={self.softmax_dtype} "
                 f"probs={self.prob_dtype} out={self.out_dtype}"]
        if self.dropout_p:
            parts.append(f"dropout p={self.dropout_p}")
        if self.causal:
            parts.append("causal (proven from the mask)")
        if self.safe_softmax:
            parts.append("safe softmax (SDPA's: a row of only -inf scores gives zeros)")
        if self.inference:
            parts.append("inference (no input requires a gradient)")
        if self.sink:
            parts.append(f"attention sinks: {self.sink} logit column{'s' if self.sink > 1 else ''} "
                         f"c{len(self.captured) - 1} in the softmax, dropped from its output")
        for k, m in enumerate(self.masks):
            parts.append(f"m{k}[b, h, i, j] = {m}")
        for k, bi in enumerate(self.biases):
            parts.append(f"a{k}[b, h, i, j] = {bi}")
        return "; ".join(parts)

    # -- serialisation: the string the custom op carries ----------------------------------------
    def to_key(self) -> str:
        # written once per spec object (it is frozen): launches ask for it on every call
        key = self.__dict__.get("_key")
        if key is None:
            d = dataclasses.asdict(self)
            if not d["sink"]:  # (absent where 0: the keys of specs without sinks stay as they were)
                del d["sink"]
            key = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=True)
            object.__setattr__(self, "_key", key)
        return key

    @staticmethod
    def from_key(key: str) -> "AttentionSpec":
        return _from_key(key)

    # -- symbolic form (sympy): what the chain computes, and its derivative in s --------------------
    def score_mod_expr(self):
        """The score chain as a sympy expression of the score ``s``, the indices ``b, h, i, j`` and
        the captured operands (``c0`` ... as numbers, ``c0(b, h, i, j)`` as tensors, masks as
        Piecewise conditions). Casts are identities here: they change rounding, not the function."""
        return _symbolic(self)[0]

    def score_mod_grad_expr(self):
        """d score_mod / d s, obtained symbolically (what the backward kernels evaluate per step)."""
        expr, s = _symbolic(self)
        return sympy.simplify(sympy.diff(expr, s))



def with_operands(spec: AttentionSpec, order, added=(), **fields) -> AttentionSpec:
    """The one renumbering of captured operands: ``spec`` (with ``fields`` replaced first) reading
    old operands ``order`` (positions, in their new order) followed by new ones of kinds ``added``,
    which the replaced fields address as ``len(spec.captured) + t``. Every position a step, a
    mask's data or a bias reads is renumbered; reading a dropped operand raises KeyError."""
    n = len(spec.captured)
    new = {k: t for t, k in enumerate(order)}
    new.update({n + a: len(new) + a for a in range(len(added))})
    f = {"score_ops": spec.score_ops, "masks": spec.masks, "biases": spec.biases, **fields}
    ops = tuple(dataclasses.replace(op, index=new[op.index]) if op.captured_index is not None else op
                for op in f["score_ops"])
    masks = tuple(dataclasses.replace(m, data=tuple(new[d] for d in m.data)) for m in f["masks"])
    biases = tuple(dataclasses.replace(b, x=new[b.x], y_data=tuple(new[d] for d in b.y_data))
                   for b in f["biases"])
    rest = {k: v for k, v in fields.items() if k not in ("score_ops", "masks", "biases")}
    return dataclasses.replace(spec, captured=tuple(spec.captured[k] for k in order) + tuple(added),
                               score_ops=ops, masks=masks, biases=biases, **rest)


def _symbolic(spec: "AttentionSpec"):
    s, b, h, i, j = sympy.symbols("s b h i j", real=True)
    expr = s
    for op in spec.score_ops:
        if op.operand == "const":
            x = sympy.Float(op.value) if op.value not in (math.inf, -math.inf) else \
                (sympy.oo if op.value > 0 else -sympy.oo)
        elif op.operand == "scalar":
            x = sympy.Symbol(f"c{op.index}", real=True)
        elif op.operand == "tensor":
            x = sympy.Function(f"c{op.index}", real=True)(b, h, i, j)
        elif op.operand == "predicate" and op.kind not in ("fill", "fill_not"):
            x = sympy.Function(f"m{op.index}", real=True)(b, h, i, j)
        elif op.operand == "bias":
            x = sympy.Function(f"a{op.index}", real=True)(b, h, i, j)
        else:
            x = None
        k = op.kind
        if k == "mul":
            expr = expr * x
        elif k == "div":
            expr = expr / x
        elif k == "add":
            expr = expr + x
        elif k == "sub":
            expr = expr - x
        elif k == "rsub":
            expr = x - expr
        elif k == "tanh":
            expr = sympy.tanh(expr)
        elif k == "fn":
            expr = pointwise_expr(op.fn, expr, op.args)
        elif k in ("fill", "fill_not"):
            m = sympy.Function(op.mask_name())(b, h, i, j)
            fill = sympy.Float(op.value) if math.isfinite(op.value) else (
                sympy.oo if op.value > 0 else -sympy.oo)
            cond = sympy.Eq(m, 1) if k == "fill" else sympy.Eq(m, 0)
            expr = sympy.Piecewise((fill, cond), (expr, True))
    return expr, s


@functools.lru_cache(maxsize=None)
def _from_key(key: str) -> AttentionSpec:
    d = json.loads(key)
    d["score_ops"] = tuple(ScoreOp(**op) for op in d["score_ops"])
    d["captured"] = tuple(d["captured"])
    d["masks"] = tuple(MaskSpec(**{**m, "axes": tuple(m["axes"]), "data": tuple(m["data"])})
                       for m in d.get("masks", ()))
    d["biases"] = tuple(BiasSpec(**{**a, "axes": tuple(a["axes"]), "y_data": tuple(a["y_data"])})
                        for a in d.get("biases", ()))
    return AttentionSpec(**d)
