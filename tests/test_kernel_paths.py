"""One kernel-correctness suite: each case (a score chain, its operands, a shape, a dtype) runs on
every kernel path that computes it, forward and backward, against float64.

Paths (``kernels/select.py`` routes between them; here each is forced, and checked to have run):

* ``tiled``: the tiled implementation (``kernels/cpu.py``), through the custom op with ATen's
  kernel turned off (``ops._flash_forward`` / ``_flash_backward`` answer "not exact");
* ``aten_flash``: ATen's CPU flash kernel, through the custom op in its static order
  (``FUSION_PASS_MEASURE=0``), for the specs ``select.route`` gives it; a case that says ATen's
  kernel refuses the call (a row keeping no key) checks that it did and that the tiled path took it;
  the backward runs on ATen's kernel unless a captured operand needs a gradient;
* ``triton``: the generated Triton kernels, launched as ``ops.py`` launches them on CUDA
  (``_triton_operands`` / ``_triton_backward``); compiled on a GPU, under ``TRITON_INTERPRET=1`` on
  CPU (conftest.py), where a case takes seconds: the default run there checks one pattern per
  kind of step on the odd shape and the other layouts in float32, ``-m slow`` the rest.

Mask predicates (``spec.masks``: causal, offsets, windows, padding read from a (B, N) data tensor,
prefix-LM, chunks, head-dependent windows; filled, kept with where, or added as 0 / finfo.min /
-inf with SDPA's safe softmax; grouped-query heads) are patterns like the others: each runs on
the paths that compute it, rows keeping no key included (ATen's kernel must then refuse the call
unless the softmax is safe). The key blocks each kernel skips for them are counted in
test_triton_kernels.py and test_predicate_kernels.py.

Tolerance by FlashAttention's rule (STYLE 11b): the kernel's error against the float64 reference is
at most twice eager PyTorch's error in the same dtype, plus a floor; NaN exactly where the
reference has NaN (a row whose every key is -inf). Shapes are odd (Nq 37, Nk 53, head dim 40) so
every tile has a ragged edge; tiles of the tiled path are forced small so it crosses them.
"""
import dataclasses
import math
from dataclasses import dataclass

import pytest
import sympy
import torch

from conftest import DEVICE, INTERPRET
from fusion_pass.kernels import cpu, ops as kops, predicate, select
from fusion_pass.kernels import triton_attention as ta
from fusion_pass.kernels.spec import AttentionSpec, MaskSpec, ScoreOp, dtype_name

from helpers import dropped

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# the floor of the 2x-eager rule per dtype (absorbs eager errors that happen to be ~0); gradients
# scale it by their size
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# ---------------------------------------------------------------------------------------------
# Patterns: the score chain as spec steps, its operands, and the same chain in plain torch.
# A factory takes the scores' shape (..., Nq, Nk) and the dtype and returns
# (steps, captured kinds, captured tensors, which of them need a gradient, chain(s, captured)).
# ---------------------------------------------------------------------------------------------

def _lead(shape):
    """Operand shape helpers: the batch dims of the scores and their rank."""
    return tuple(shape[:-2])


def _per_batch(shape, *tail):
    """(B, 1, ..., *tail): varies over the first batch dim only (a padding mask's layout)."""
    lead = _lead(shape)
    return ((lead[0],) + (1,) * (len(lead) - 1) if lead else ()) + tail


def _per_head(shape):
    """(1, H, Nq, Nk): broadcast over the first batch dim only (a learnable bias's layout)."""
    lead = _lead(shape)
    return ((1,) + lead[1:] if lead else ()) + tuple(shape[-2:])


def _no_key_row(m):
    """Make one row of the first batch entry keep no key (masked everywhere): eager gives NaN
    there with -inf, a uniform row with finfo.min."""
    m[(0,) * (m.dim() - 2) + (min(5, m.shape[-2] - 1),)] = True
    return m


def scale(shape, dtype):
    d = 0.125
    return (ScoreOp("mul", "const", value=d),), (), [], [], lambda s, c: s * d


def scalar_div(shape, dtype):
    # a 0-dim tensor read as a number at run time (Dynamo's float attributes under dynamic=True)
    return ((ScoreOp("div", "scalar", index=0),), ("scalar",), [torch.tensor(8.0, device=DEVICE)],
            [False], lambda s, c: s / c[0])


def scalar_scale_learnable(shape, dtype):
    # a learnable temperature: its gradient sums every score's
    scale_ = torch.tensor(40 ** -0.5 * 1.3, device=DEVICE)
    return ((ScoreOp("mul", "scalar", index=0),), ("scalar",), [scale_], [True],
            lambda s, c: s * c[0])


def bias_learnable(shape, dtype):
    # an additive bias broadcast over the batch, learnable (ATen's backward has no bias gradient)
    bias = torch.randn(_per_head(shape), device=DEVICE, dtype=dtype)
    return ((ScoreOp("mul", "const", value=0.25), ScoreOp("add", "tensor", index=0)), ("tensor",),
            [bias], [True], lambda s, c: s * 0.25 + c[0])


def padding_mask(shape, dtype):
    # HF's additive key padding mask, -1e9 where padded
    m = torch.where(torch.rand(_per_batch(shape, 1, shape[-1]), device=DEVICE) < 0.3, -1e9, 0.0)
    return ((ScoreOp("add", "tensor", index=0),), ("tensor",), [m.to(dtype)], [False],
            lambda s, c: s + c[0])


def bool_fill(shape, dtype):
    # masked_fill with a finite fill: the removal rule decides per row whether it removes keys
    m = torch.rand(_per_batch(shape, *shape[-2:]), device=DEVICE) < 0.4
    return ((ScoreOp("fill", "tensor", value=-1e4, index=0),), ("tensor",), [m], [False],
            lambda s, c: s.masked_fill(c[0], -1e4))


def where_keep(shape, dtype):
    # torch.where(keep, s, -3e4) with an (Nq, Nk) keep mask shared by the batch
    m = torch.rand(shape[-2:], device=DEVICE) < 0.7
    return ((ScoreOp("fill_not", "tensor", value=-3e4, index=0),), ("tensor",), [m], [False],
            lambda s, c: torch.where(c[0], s, -3e4))


def mask_inf(shape, dtype):
    # a -inf fill and one row of batch 0 keeping no key: eager's softmax gives a NaN row there
    m = _no_key_row(torch.rand(_per_batch(shape, *shape[-2:]), device=DEVICE) < 0.3)
    return ((ScoreOp("mul", "const", value=0.125), ScoreOp("fill", "tensor", value=-math.inf, index=0)),
            ("tensor",), [m], [False], lambda s, c: (s * 0.125).masked_fill(c[0], -math.inf))


def mask_finfo_min(shape, dtype):
    # HF's finfo.min fill: the row keeping no key stays finite (uniform probabilities)
    fill = torch.finfo(dtype).min
    m = _no_key_row(torch.rand(_per_batch(shape, *shape[-2:]), device=DEVICE) < 0.3)
    return ((ScoreOp("mul", "const", value=0.125), ScoreOp("fill", "tensor", value=fill, index=0)),
            ("tensor",), [m], [False], lambda s, c: (s * 0.125).masked_fill(c[0], fill))


def softcap(shape, dtype):
    # Gemma-2: cap * tanh(s * scale / cap)
    cap = 5.0
    return ((ScoreOp("mul", "const", value=0.125), ScoreOp("div", "const", value=cap),
             ScoreOp("tanh"), ScoreOp("mul", "const", value=cap)), (), [], [],
            lambda s, c: torch.tanh(s * 0.125 / cap) * cap)


def mixed(shape, dtype):
    # the remaining kinds: sub of a key-broadcast tensor, rsub, div by a learnable scalar, cast,
    # fill_not with a key-padding mask; gradients for the tensor and the scalar
    ops = (ScoreOp("div", "scalar", index=1), ScoreOp("sub", "tensor", index=0),
           ScoreOp("rsub", "const", value=1.0), ScoreOp("mul", "const", value=-1.0),
           ScoreOp("cast", dtype="float32"), ScoreOp("fill_not", "tensor", value=-1e4, index=2))
    key_bias = torch.randn(shape[-1], device=DEVICE, dtype=dtype)
    div = torch.tensor(40 ** 0.5, device=DEVICE)
    keep = torch.rand(_per_batch(shape, 1, shape[-1]), device=DEVICE) > 0.2
    return (ops, ("tensor", "scalar", "tensor"), [key_bias, div, keep], [True, True, False],
            lambda s, c: (-(1.0 - (s / c[1] - c[0]))).masked_fill(~c[2], -1e4))


# ---------------------------------------------------------------------------------------------
# Mask predicates (spec.masks, a MaskSpec each): the kernels evaluate keep(b, h, i, j) per tile
# and skip the keys no row of a tile keeps. A predicate factory returns a sixth element, the
# spec's extra fields (masks, safe_softmax) and whether some row keeps no key; its chain reads
# the dense masks predicate.materialize builds. Scores are (B, H, Nq, Nk) (axes b h i j); the
# sizes n2 = Nq, n3 = Nk.
# ---------------------------------------------------------------------------------------------

_b, _h, _i, _j = (sympy.Symbol(n, integer=True, nonnegative=True) for n in "bhij")
_n2, _n3 = (sympy.Symbol(f"n{t}", integer=True, nonnegative=True) for t in (2, 3))
_d0 = sympy.Function("d0")


def _mask(keep, kind="bool", data=(), masked=-math.inf, dtype="float32"):
    """A MaskSpec of ``keep`` (for a fill's mask: the elements it replaces); additive: where(keep,
    0, masked) of ``dtype``."""
    extra = dict(kind="additive", dtype=dtype, kept=0.0, masked=masked) if kind == "additive" else {}
    return MaskSpec(keep=sympy.srepr(keep), axes=("b", "h", "i", "j"), data=tuple(data),
                    text=str(keep), **extra)


def _pred(shape, ops, kinds, captured, needs_grad, masks, chain, safe=False):
    """The factory's result for a predicate pattern: ``chain(s, c, M)`` reads M[k], the tensor
    the graph built for mask k (predicate.materialize: a bool mask, or an additive mask's values,
    added to the scores as the graph adds them: the gradient of s + finfo.min is that of s)."""
    def dense(m, **kw):
        return predicate.materialize(dataclasses.replace(m, **kw), shape,
                                     [captured[d] for d in m.data], device=DEVICE)
    keeps = [dense(m, kind="bool") for m in masks]
    # a row keeping no key: every element of it is replaced (a fill) or not kept
    replaced = [d if op.kind == "fill" else ~d for op, d in zip(
        [o for o in ops if o.operand == "predicate"], keeps)]
    gone = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
    for r in replaced:
        gone = gone | r
    empty = bool(gone.all(-1).any())
    tensors = [dense(m) for m in masks]
    return (ops, kinds, captured, needs_grad, lambda s, c: chain(s, c, tensors),
            dict(masks=tuple(masks), safe_softmax=safe, empty_rows=empty))


def _left_padding(shape):
    """A (B, Nk) attention mask, 1 where kept: the last batch entry's first 21 keys padded (so
    its first rows keep no key under causal)."""
    am = torch.ones(shape[0], shape[-1], dtype=torch.long, device=DEVICE)
    am[-1, :min(21, shape[-1] - 1)] = 0
    return am


def pred_causal_offset(shape, dtype):
    # the KV cache's causal mask, bottom-right aligned (query i sees keys j <= i + Nk - Nq), read
    # as masked_fill(j > i + Nk - Nq, -inf); Nq > Nk: the first rows keep no key (NaN in eager)
    ops = (ScoreOp("mul", "const", value=0.125), ScoreOp("fill", "predicate", value=-math.inf, index=0))
    return _pred(shape, ops, (), [], [], [_mask(sympy.Gt(_j, _i + _n3 - _n2))],
                 lambda s, c, M: (s * 0.125).masked_fill(M[0], -math.inf))


def pred_causal_fill(shape, dtype):
    # causal as masked_fill(j > i, -inf) (top-left aligned: with Nq <= Nk every row keeps key 0;
    # Nq > Nk keeps the first Nk rows' keys)
    ops = (ScoreOp("mul", "const", value=0.125), ScoreOp("fill", "predicate", value=-math.inf, index=0))
    return _pred(shape, ops, (), [], [], [_mask(sympy.Gt(_j, _i))],
                 lambda s, c, M: (s * 0.125).masked_fill(M[0], -math.inf))


def pred_causal_additive(shape, dtype):
    # causal as HF builds it: where(j <= i, 0, finfo.min) in the model's dtype, added to scores
    # scaled by a learnable 0-dim tensor (its per-tile partial sums must be 0 on skipped tiles)
    fill = torch.finfo(dtype).min
    ops = (ScoreOp("mul", "scalar", index=0), ScoreOp("add", "predicate", index=0))
    m = _mask(sympy.Le(_j, _i), kind="additive", masked=fill, dtype=dtype_name(dtype))
    return _pred(shape, ops, ("scalar",), [torch.tensor(40 ** -0.5, device=DEVICE)], [True], [m],
                 lambda s, c, M: s * c[0] + M[0])


def pred_window(shape, dtype):
    # a one-sided sliding window, torch.where(keep, s, -inf) (fill_not), after a learnable bias (its
    # N x N gradient must be 0 on skipped tiles); Nq > Nk + 4: rows keeping no key
    keep = sympy.And(sympy.Le(_j, _i), sympy.Lt(_i - _j, 5))
    bias = torch.randn(_per_head(shape), device=DEVICE, dtype=dtype)
    ops = (ScoreOp("mul", "const", value=0.25), ScoreOp("add", "tensor", index=0),
           ScoreOp("fill_not", "predicate", value=-math.inf, index=0))
    return _pred(shape, ops, ("tensor",), [bias], [True], [_mask(keep)],
                 lambda s, c, M: torch.where(M[0], s * 0.25 + c[0], -math.inf))


def pred_window_two_sided(shape, dtype):
    # |i - j| < 4, read as masked_fill(|i - j| >= 4, -inf) (not linear: evaluated per tile)
    ops = (ScoreOp("mul", "const", value=0.125), ScoreOp("fill", "predicate", value=-math.inf, index=0))
    return _pred(shape, ops, (), [], [], [_mask(sympy.Ge(sympy.Abs(_i - _j), 4))],
                 lambda s, c, M: (s * 0.125).masked_fill(M[0], -math.inf))


def _causal_padding():
    return sympy.And(sympy.Le(_j, _i), sympy.Ne(_d0(_b, _j), 0))


def pred_padding_additive(shape, dtype):
    # causal & padding read from a (B, N) attention mask as d0[b, j], HF's additive finfo.min
    # form: left padding leaves rows keeping no key, uniform over every key in eager
    fill = torch.finfo(dtype).min
    ops = (ScoreOp("mul", "const", value=0.125), ScoreOp("add", "predicate", index=0))
    m = _mask(_causal_padding(), kind="additive", data=(0,), masked=fill, dtype=dtype_name(dtype))
    return _pred(shape, ops, ("data",), [_left_padding(shape)], [False], [m],
                 lambda s, c, M: s * 0.125 + M[0])


def pred_padding_fill(shape, dtype):
    # the same mask as masked_fill(~keep, -inf): NaN rows in eager where no key is kept
    ops = (ScoreOp("mul", "const", value=0.125), ScoreOp("fill", "predicate", value=-math.inf, index=0))
    m = _mask(sympy.Not(_causal_padding()), data=(0,))
    return _pred(shape, ops, ("data",), [_left_padding(shape)], [False], [m],
                 lambda s, c, M: (s * 0.125).masked_fill(M[0], -math.inf))


def pred_prefix_lm(shape, dtype):
    # prefix-LM: the first 7 keys seen by every row, causal after, torch.where(keep, s, finfo.min)
    fill = torch.finfo(dtype).min
    keep = sympy.Or(sympy.Le(_j, _i), sympy.Lt(_j, 7))
    ops = (ScoreOp("mul", "const", value=0.125), ScoreOp("fill_not", "predicate", value=fill, index=0))
    return _pred(shape, ops, (), [], [], [_mask(keep)],
                 lambda s, c, M: torch.where(M[0], s * 0.125, fill))


def pred_chunked(shape, dtype):
    # chunked causal (Llama-4 style chunks of 16): masked_fill(~(same chunk & j <= i), -inf)
    keep = sympy.And(sympy.Eq(sympy.floor(_i / 16), sympy.floor(_j / 16)), sympy.Le(_j, _i))
    ops = (ScoreOp("mul", "const", value=0.125), ScoreOp("fill", "predicate", value=-math.inf, index=0))
    return _pred(shape, ops, (), [], [], [_mask(sympy.Not(keep))],
                 lambda s, c, M: (s * 0.125).masked_fill(M[0], -math.inf))


def pred_sdpa_padding(shape, dtype):
    # an SDPA site: a boolean causal & padding mask, added as 0 / -inf, with SDPA's safe softmax
    # (a row keeping no key gives 0 and no gradient)
    ops = (ScoreOp("mul", "const", value=0.125), ScoreOp("add", "predicate", index=0))
    m = _mask(_causal_padding(), kind="additive", data=(0,), dtype=dtype_name(dtype))
    return _pred(shape, ops, ("data",), [_left_padding(shape)], [False], [m],
                 lambda s, c, M: s * 0.125 + M[0], safe=True)


def pred_sdpa_window(shape, dtype):
    # an SDPA site with a window mask whose first 4 rows keep no key, 0 / -inf, safe softmax
    keep = sympy.And(sympy.Le(_j, _i), sympy.Gt(_j, _i - 8), sympy.Ge(_i, 4))
    ops = (ScoreOp("mul", "const", value=0.125), ScoreOp("add", "predicate", index=0))
    return _pred(shape, ops, (), [], [], [_mask(keep, kind="additive", dtype=dtype_name(dtype))],
                 lambda s, c, M: s * 0.125 + M[0], safe=True)


def pred_head_window(shape, dtype):
    # a window whose length depends on the head (4 + 8h), filled with finfo.min: with grouped
    # K/V heads, each query head of a group keeps its own keys
    fill = torch.finfo(dtype).min
    keep = sympy.And(sympy.Le(_j, _i), sympy.Lt(_i - _j, 4 + 8 * _h))
    ops = (ScoreOp("mul", "const", value=0.125), ScoreOp("fill", "predicate", value=fill, index=0))
    return _pred(shape, ops, (), [], [], [_mask(sympy.Not(keep))],
                 lambda s, c, M: (s * 0.125).masked_fill(M[0], fill))


PATTERNS = {f.__name__: f for f in (scale, scalar_div, scalar_scale_learnable, bias_learnable,
                                     padding_mask, bool_fill, where_keep, mask_inf, mask_finfo_min,
                                     softcap, mixed, pred_causal_offset, pred_causal_fill, pred_causal_additive,
                                     pred_window, pred_window_two_sided, pred_padding_additive,
                                     pred_padding_fill, pred_prefix_lm, pred_chunked,
                                     pred_sdpa_padding, pred_sdpa_window, pred_head_window)}
PREDICATES = {n for n in PATTERNS if n.startswith("pred_")}
# ATen's kernel is routed these specs but refuses these calls (per call, cpu_flash.usable): the
# tiled path must then compute them
FLASH_REFUSES = {"mask_inf": "a row keeping no key (eager: NaN, ATen: 0)",
                 "mask_finfo_min": "a row keeping no key (eager: uniform over the masked keys)"}


# ---------------------------------------------------------------------------------------------
# Shapes: (batch dims, Nq, Nk, D, Dv) and q/k/v layout
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    lead: tuple
    nq: int
    nk: int
    d: int
    dv: int = 0            # 0: equal to d
    layout: str = "contiguous"  # "projected": (B, N, H, D) memory seen as (B, H, N, D)
    kv_heads: int = 0      # grouped-query: K/V heads (0: as many as the query heads)
    patterns: tuple = ()   # () every pattern; else only these

    @property
    def score(self):
        return self.lead + (self.nq, self.nk)


SHAPES = {
    "odd": Shape((2, 3), 37, 53, 40),
    "decode": Shape((1, 2), 1, 97, 40),               # one query row over many keys
    "short_keys": Shape((2, 2), 65, 17, 8),           # Nk < Nq, head dim 8 (Triton needs 16)
    "head_dim_16": Shape((1, 2), 37, 53, 16, patterns=("scale",)),
    "head_dim_64": Shape((1, 2), 37, 53, 64, patterns=("scale",)),
    "value_head_dim": Shape((2, 3), 37, 53, 64, dv=24, patterns=("bias_learnable",)),
    "projected": Shape((2, 3), 37, 53, 40, layout="projected", patterns=("mask_inf", "bias_learnable")),
    "rank3": Shape((3,), 37, 53, 40, patterns=("bias_learnable",)),
    "rank2": Shape((), 37, 53, 40, patterns=("bias_learnable",)),
    # grouped-query: 4 query heads on 2 K/V heads (dK/dV sum over a group)
    "gqa": Shape((2, 4), 37, 53, 40, kv_heads=2,
                 patterns=("pred_head_window", "pred_causal_additive", "pred_padding_fill")),
}


def _spec(ops, kinds, dtype, dropout_p=0.0, extra=None):
    n = dtype_name(dtype)
    ops = tuple(o if o.kind == "cast" else ScoreOp(**{**o.__dict__, "dtype": n}) for o in ops)
    fields = {k: v for k, v in (extra or {}).items() if k in ("masks", "safe_softmax")}
    return AttentionSpec(score_ops=ops, captured=kinds, qk_dtype=n, softmax_dtype=n, prob_dtype=n,
                         out_dtype=n, dropout_p=dropout_p, **fields)


def _qkv(shape: Shape, dtype):
    dv = shape.dv or shape.d
    if shape.layout == "projected":  # heads split off a (B, N, H * D) projection
        B, H = shape.lead
        q = torch.randn(B, shape.nq, H, shape.d, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, shape.nk, H, shape.d, device=DEVICE, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, H, dv, shape.nk, device=DEVICE, dtype=dtype).transpose(-1, -2)
        return q, k, v
    kv_lead = shape.lead[:-1] + (shape.kv_heads,) if shape.kv_heads else shape.lead
    return (torch.randn(shape.lead + (shape.nq, shape.d), device=DEVICE, dtype=dtype),
            torch.randn(kv_lead + (shape.nk, shape.d), device=DEVICE, dtype=dtype),
            torch.randn(kv_lead + (shape.nk, dv), device=DEVICE, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# The paths
# ---------------------------------------------------------------------------------------------

def _through_op(q, k, v, captured, needs_grad, spec, go, seed):
    """(out, lse, dq, dk, dv, [dcaptured needing one]) through the custom op and its autograd."""
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    cs = [c.detach().requires_grad_() if ng else c for c, ng in zip(captured, needs_grad)]
    out, lse, _ = torch.ops.fusion_pass.attention(qs, ks, vs, cs, spec.to_key(),
                                                   torch.tensor([seed]) if spec.dropout_p else None)
    wrt = [qs, ks, vs] + [c for c, ng in zip(cs, needs_grad) if ng]
    grads = torch.autograd.grad(out, wrt, go)
    return (out, lse) + tuple(grads[:3]) + (list(grads[3:]),)


def _triton(q, k, v, captured, needs_grad, spec, go, seed):
    """The same, launched as ops.py launches the Triton kernels on CUDA."""
    ts, tcaptured, origin = kops._triton_operands(q, k, captured, spec)
    assert ta.supports(q, k, v, ts)
    out, lse = ta.forward(q, k, v, tcaptured, ts, seed)
    dq, dk, dv, dcap = kops._triton_backward(go, q, k, v, captured, out, lse, spec, ts, tcaptured,
                                             origin, seed, needs_grad)
    assert [g is not None for g in dcap] == list(needs_grad)
    return out, lse, dq, dk, dv, [g for g in dcap if g is not None]


@pytest.fixture
def force(monkeypatch):
    """force(path) -> record: makes the op run ``path`` (tiled or aten_flash) and records which
    kernel computed the forward and the backward ("aten_flash" or "tiled")."""
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 16 * 40)  # small tiles: every call crosses them
    monkeypatch.setenv("FUSION_PASS_MEASURE", "0")      # the static order: ATen's kernel first
    record = {}

    def spy(direction, real, off):
        def run(*a):
            got = None if off else real(*a)
            record[direction] = "aten_flash" if got is not None else "tiled"
            return got
        return run

    def go(path):
        off = path == "tiled"
        monkeypatch.setattr(kops, "_flash_forward", spy("fwd", kops._flash_forward, off))
        monkeypatch.setattr(kops, "_flash_backward", spy("bwd", kops._flash_backward, off))
        return record
    return go


# ---------------------------------------------------------------------------------------------
# Reference and comparison
# ---------------------------------------------------------------------------------------------

def _eager(q, k, v, captured, needs_grad, chain, go, dtype, dropout=None, safe=False):
    """Plain torch in ``dtype`` (float64: the reference): (out, scores, dq, dk, dv, [dcaptured]).
    Grouped K/V heads are repeated (repeat_kv); ``safe``: SDPA's safe softmax (a row whose every
    score is -inf gets probabilities 0 and no gradient)."""
    def prep(t, grad):
        if t.is_floating_point():
            t = t.to(dtype if t.dim() else (torch.float64 if dtype == torch.float64 else torch.float32))
        return t.detach().requires_grad_(grad)
    qr, kr, vr = (prep(t, True) for t in (q, k, v))
    cr = [prep(c, ng) for c, ng in zip(captured, needs_grad)]
    g = q.shape[-3] // k.shape[-3] if q.dim() > 2 else 1
    kx, vx = (kr.repeat_interleave(g, -3), vr.repeat_interleave(g, -3)) if g > 1 else (kr, vr)
    s = chain(qr @ kx.transpose(-1, -2), cr)
    if safe:
        gone = torch.isneginf(s).all(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(gone, 0.0), -1).masked_fill(gone, 0.0)
    else:
        p = torch.softmax(s, -1)
    if dropout is not None:
        p = dropped(p, *dropout)
    out = p @ vx
    grads = torch.autograd.grad(out, [qr, kr, vr] + [c for c in cr if c.requires_grad], go.to(dtype))
    return (out.detach(), s.detach()) + tuple(grads[:3]) + (list(grads[3:]),)


def _err(x, ref, strict=True):
    """Max abs error over the entries finite in both; NaN and infinities must sit where the
    reference's do (not strict for eager low-precision baselines, which only set the tolerance)."""
    x, ref = x.double(), ref.double()
    if strict:
        assert torch.equal(torch.isnan(x), torch.isnan(ref)), "NaN pattern differs from the reference"
        inf = torch.isinf(ref) | torch.isinf(x)
        assert torch.equal(x[inf], ref[inf]), "an infinity differs from the reference's"
    fin = torch.isfinite(ref) & torch.isfinite(x)
    return (x[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


def _check(name, got, eager, ref, dtype, grad=False):
    assert got.shape == ref.shape, name
    e_got, e_eager = _err(got, ref), _err(eager, ref, strict=False)
    floor = ATOL[dtype] * (1 + ref.abs().nan_to_num(0, 0, 0).max().item() if grad else 1)
    assert e_got <= 2 * e_eager + floor, \
        f"{name}: kernel error {e_got:.3g} > 2 x eager {dtype} error {e_eager:.3g} + {floor:.3g}"


def _compare(got, q, k, v, captured, needs_grad, chain, go, dtype, dropout=None, safe=False):
    out, lse, *grads = got
    ref = _eager(q, k, v, captured, needs_grad, chain, go, torch.float64, dropout, safe)
    low = _eager(q, k, v, captured, needs_grad, chain, go, dtype, dropout, safe)
    assert out.dtype == dtype
    _check("out", out, low[0], ref[0], dtype)
    for name, g, e, r in zip(("dq", "dk", "dv"), grads[:3], low[2:5], ref[2:5]):
        assert g.dtype == dtype, name
        _check(name, g, e, r, dtype, grad=True)
    assert len(grads[3]) == len(ref[5]) == sum(needs_grad)
    for t, (g, e, r) in enumerate(zip(grads[3], low[5], ref[5])):
        _check(f"dcaptured[{t}]", g, e.to(g.dtype), r, dtype, grad=True)
    # lse: the log-sum-exp of the final scores, float32 (NaN on a row whose scores are all -inf)
    lse_ref = torch.logsumexp(ref[1], -1)
    gone = torch.isneginf(lse_ref)
    lse_ref[gone] = math.nan
    assert lse.dtype == torch.float32 and lse.shape == lse_ref.shape
    if safe:  # safe softmax: a row keeping no key has output 0 exactly; its lse is not eager's
        assert (out[gone] == 0).all()
        lse = lse.masked_fill(gone, math.nan)
    scale = (1e-4 if dtype == torch.float32 else ATOL[dtype]) * (1 + lse_ref.nan_to_num(0).abs().max().item())
    assert _err(lse, lse_ref) <= 2 * _err(torch.logsumexp(low[1].float(), -1), lse_ref, strict=False) + scale


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------

# one pattern per kind of step on the odd shape (under ``-m slow`` and on a GPU every pattern runs):
# a learnable tensor operand (bias_learnable), a -inf fill with a NaN row (mask_inf), a finite fill
# with a uniform row (mask_finfo_min), tanh (softcap), and mixed (a learnable scalar divisor, sub,
# rsub, cast, fill_not). Left to -m slow, each covered in the default run elsewhere: the constant
# scale (the first step of bias_learnable, mask_inf, mask_finfo_min and softcap, and the whole chain
# of the scale-p0.6 dropout case below), the learnable scalar scale (mixed's scalar gradient, and
# test_triton_kernels.py::test_scalar_operands_are_loaded_by_the_kernels[scale]
# against float64), the tensor-operand fills and padding (mask_inf's and bias's code)
TRITON_DEFAULT = {"bias_learnable", "mask_inf", "mask_finfo_min", "softcap", "mixed"}
# the other layouts, each with bias_learnable (a tensor operand and its gradient read through the
# layout): value head dim != head dim, heads split off a projection (strided), rank 3, rank 2
TRITON_DEFAULT_LAYOUTS = {"value_head_dim", "projected", "rank3", "rank2"}
# mask predicates: one per spelling (fill and additive finfo.min with rows keeping no key, fill_not,
# additive finfo.min with a learnable scale, SDPA's additive -inf with safe softmax) and
# grouped-query heads
TRITON_DEFAULT_PREDICATES = {("pred_padding_fill", "odd"), ("pred_padding_additive", "odd"),
                             ("pred_window", "odd"),
                             ("pred_causal_additive", "odd"), ("pred_sdpa_window", "odd"),
                             ("pred_head_window", "gqa")}


def _triton_takes(shape: Shape, spec: AttentionSpec, dtype) -> bool:
    kv_lead = shape.lead[:-1] + (shape.kv_heads,) if shape.kv_heads else shape.lead
    q, k, v = (torch.empty(lead + (n, d), dtype=dtype) for lead, n, d in (
        (shape.lead, shape.nq, shape.d), (kv_lead, shape.nk, shape.d), (kv_lead, shape.nk, shape.dv or shape.d)))
    return ta.supports(q, k, v, spec)


def _cases():
    slow_here = [pytest.mark.slow] if INTERPRET else []
    for shape_name, shape in SHAPES.items():
        for name in shape.patterns or PATTERNS:
            for dtype in DTYPES:
                ops, kinds, *_ = PATTERNS[name](shape.score, dtype)
                spec = _spec(ops, kinds, dtype, extra=PATTERNS[name](shape.score, dtype)[5]
                             if name in PREDICATES else None)
                paths = ["tiled"]
                if "aten_flash" in select.route(spec).cpu and not shape.dv:
                    paths.append("aten_flash")
                # under the interpreter a 16-bit Triton case off the odd shape runs in bfloat16
                # only: the layouts (decode's split-KV kernel, grouped heads, head dims, strides,
                # ranks) are read by the same code in either 16-bit dtype, and float16's own
                # rounding and range are checked on the odd shape (every pattern) and by
                # test_triton_kernels.py's float16 overflow tests; on a GPU every dtype runs
                interpreted_twin = INTERPRET and dtype == torch.float16 and shape_name != "odd"
                if _triton_takes(shape, spec, dtype) and not interpreted_twin:
                    paths.append("triton")
                for path in paths:
                    # Triton under the interpreter: seconds a case; the default run checks the
                    # patterns of TRITON_DEFAULT on the odd shape and bias_learnable on the other
                    # layouts, in float32
                    if name in PREDICATES:
                        default = (name, shape_name) in TRITON_DEFAULT_PREDICATES
                    elif shape_name == "odd":
                        default = name in TRITON_DEFAULT
                    else:
                        default = name == "bias_learnable" and shape_name in TRITON_DEFAULT_LAYOUTS
                    slow = path == "triton" and (dtype != torch.float32 or not default)
                    marks = slow_here if slow else []
                    if name in PREDICATES and dtype != torch.float32 and shape_name != "odd":
                        marks = [pytest.mark.slow]  # the other dtypes on the odd shape only
                    yield pytest.param(name, shape_name, dtype, path, marks=marks,
                                       id=f"{name}-{shape_name}-{dtype_name(dtype)}-{path}")


@pytest.mark.parametrize("pattern,shape_name,dtype,path", list(_cases()))
def test_kernel_path_matches_float64(pattern, shape_name, dtype, path, force):
    torch.manual_seed(0)
    shape = SHAPES[shape_name]
    ops, kinds, captured, needs_grad, chain, *extra = PATTERNS[pattern](shape.score, dtype)
    extra = extra[0] if extra else {}
    spec = _spec(ops, kinds, dtype, extra=extra)
    q, k, v = _qkv(shape, dtype)
    go = torch.randn(shape.lead + (shape.nq, shape.dv or shape.d), device=DEVICE, dtype=dtype)
    if path == "triton":
        got = _triton(q, k, v, captured, needs_grad, spec, go, 0)
    else:
        ran = force(path)
        got = _through_op(q, k, v, captured, needs_grad, spec, go, 0)
        if path == "tiled":
            assert "aten_flash" not in ran.values(), ran
        elif pattern in FLASH_REFUSES or extra.get("empty_rows") and not spec.safe_softmax:
            # a row keeping no key: eager gives NaN (-inf) or uniform (finite fill), ATen 0
            assert ran["fwd"] == "tiled", f"ATen's kernel took a call it cannot compute: {pattern}"
        else:
            assert ran["fwd"] == "aten_flash", ran
            # ATen's backward has no gradient for captured operands: the tiled backward then
            assert ran.get("bwd", "tiled") == ("tiled" if any(needs_grad) else "aten_flash"), ran
    _compare(got, q, k, v, captured, needs_grad, chain, go, dtype, safe=spec.safe_softmax)


def test_every_path_is_covered():
    """The table reaches each path on every pattern: a routing change that takes a path away from
    a spec shows up here, not as a silently shorter run."""
    ids = [p.id for p in _cases()]
    for name in PATTERNS:
        got = {i.rsplit("-", 1)[1] for i in ids if i.startswith(name + "-")}
        assert got >= {"tiled", "triton"}, (name, got)
    on_flash = {i.split("-")[0] for i in ids if i.endswith("-aten_flash")}
    # ATen's kernel takes is_causal and masks of one index (padding) only: not a band, an offset,
    # a prefix, chunks or a head-dependent window (the tiled path skips their empty tiles instead)
    assert on_flash == set(PATTERNS) - {"softcap", "mixed", "pred_causal_offset", "pred_window",
                                        "pred_window_two_sided", "pred_prefix_lm", "pred_chunked",
                                        "pred_sdpa_window", "pred_head_window"}, on_flash
    # every predicate spelling (fill, fill_not, additive -inf and finfo.min) in the default run of
    # each path, the interpreter's few included
    def spellings(name, shape_name, path):
        ops, *_, extra = PATTERNS[name](SHAPES[shape_name].score, torch.float32)
        if path == "aten_flash" and extra["empty_rows"] and not extra["safe_softmax"]:
            return set()  # ATen's kernel refuses the call (checked): not computed there
        return {f"add {extra['masks'][op.index].masked}" if op.kind == "add" else op.kind
                for op in ops if op.operand == "predicate"}
    want = {"fill", "fill_not", "add -inf", f"add {torch.finfo(torch.float32).min}"}
    for path in ("tiled", "aten_flash", "triton"):
        got = set().union(*(spellings(*p.values[:2], path) for p in _cases() if not p.marks
                            and p.values[3] == path and p.values[0] in PREDICATES))
        assert got >= (want - {"fill_not"} if path == "aten_flash" else want), (path, got)


# ---------------------------------------------------------------------------------------------
# Dropout: the kernels' counter-based mask (kernels/dropout.py), regenerated in the backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["tiled", "triton"])
@pytest.mark.parametrize("pattern,p,seed", [("scale", 0.6, 987654321), ("bias_learnable", 0.3, 3_000_000_000)],
                         ids=["scale-p0.6", "bias-p0.3-seed-above-2^31"])
def test_dropout_matches_float64_with_the_same_mask(pattern, p, seed, path, force):
    """Every path drops the elements kernels/dropout.py's hash drops for the seed, scales the kept
    ones by 1 / (1 - p), and regenerates that mask in the backward. (p = 0.6 puts the keep
    threshold above 2^31; a seed above 2^31 reads its low 32 bits.)"""
    torch.manual_seed(1)
    shape = SHAPES["odd"]
    ops, kinds, captured, needs_grad, chain = PATTERNS[pattern](shape.score, torch.float32)
    spec = _spec(ops, kinds, torch.float32, dropout_p=p)
    q, k, v = _qkv(shape, torch.float32)
    go = torch.randn_like(q)
    if path == "triton":
        got = _triton(q, k, v, captured, needs_grad, spec, go, seed)
    else:
        force(path)
        got = _through_op(q, k, v, captured, needs_grad, spec, go, seed)
    _compare(got, q, k, v, captured, needs_grad, chain, go, torch.float32, dropout=(seed, p))


def test_dropout_keeps_a_one_minus_p_fraction():
    """The kernel's own output, not the test's mask: with v = I the output is the dropped
    probabilities, 0 or p_ij / (1 - p); the kept fraction is 1 - p within 5 sigma (a kernel keeping
    with probability p, or 1 - p/2, is hundreds of sigma off)."""
    p, n = 0.3, 256
    q, k = torch.randn(4, 4, n, 16), torch.randn(4, 4, n, 16)
    spec = _spec((ScoreOp("mul", "const", value=0.25),), (), torch.float32, dropout_p=p)
    out = torch.ops.fusion_pass.attention(q, k, torch.eye(n).expand(4, 4, n, n), [], spec.to_key())[0]
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
    kept = out != 0
    torch.testing.assert_close(out[kept], (probs / (1 - p))[kept], rtol=1e-5, atol=1e-7)
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / kept.numel()), frac
