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

Tolerance by FlashAttention's rule (STYLE 11b): the kernel's error against the float64 reference is
at most twice eager PyTorch's error in the same dtype, plus a floor; NaN exactly where the
reference has NaN (a row whose every key is -inf). Shapes are odd (Nq 37, Nk 53, head dim 40) so
every tile has a ragged edge; tiles of the tiled path are forced small so it crosses them.
"""
import math
from dataclasses import dataclass

import pytest
import torch

from conftest import DEVICE, INTERPRET
from fusion_pass.kernels import cpu, ops as kops, select
from fusion_pass.kernels import triton_attention as ta
from fusion_pass.kernels.spec import AttentionSpec, ScoreOp, dtype_name

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


PATTERNS = {f.__name__: f for f in (scale, scalar_div, scalar_scale_learnable, bias_learnable,
                                     padding_mask, bool_fill, where_keep, mask_inf, mask_finfo_min,
                                     softcap, mixed)}
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
}


def _spec(ops, kinds, dtype, dropout_p=0.0):
    n = dtype_name(dtype)
    ops = tuple(o if o.kind == "cast" else ScoreOp(**{**o.__dict__, "dtype": n}) for o in ops)
    return AttentionSpec(score_ops=ops, captured=kinds, qk_dtype=n, softmax_dtype=n, prob_dtype=n,
                         out_dtype=n, dropout_p=dropout_p)


def _qkv(shape: Shape, dtype):
    dv = shape.dv or shape.d
    if shape.layout == "projected":  # heads split off a (B, N, H * D) projection
        B, H = shape.lead
        q = torch.randn(B, shape.nq, H, shape.d, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, shape.nk, H, shape.d, device=DEVICE, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, H, dv, shape.nk, device=DEVICE, dtype=dtype).transpose(-1, -2)
        return q, k, v
    return (torch.randn(shape.lead + (shape.nq, shape.d), device=DEVICE, dtype=dtype),
            torch.randn(shape.lead + (shape.nk, shape.d), device=DEVICE, dtype=dtype),
            torch.randn(shape.lead + (shape.nk, dv), device=DEVICE, dtype=dtype))


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

def _eager(q, k, v, captured, needs_grad, chain, go, dtype, dropout=None):
    """Plain torch in ``dtype`` (float64: the reference): (out, scores, dq, dk, dv, [dcaptured])."""
    def prep(t, grad):
        if t.is_floating_point():
            t = t.to(dtype if t.dim() else (torch.float64 if dtype == torch.float64 else torch.float32))
        return t.detach().requires_grad_(grad)
    qr, kr, vr = (prep(t, True) for t in (q, k, v))
    cr = [prep(c, ng) for c, ng in zip(captured, needs_grad)]
    s = chain(qr @ kr.transpose(-1, -2), cr)
    p = torch.softmax(s, -1)
    if dropout is not None:
        p = dropped(p, *dropout)
    out = p @ vr
    grads = torch.autograd.grad(out, [qr, kr, vr] + [c for c in cr if c.requires_grad], go.to(dtype))
    return (out.detach(), s.detach()) + tuple(grads[:3]) + (list(grads[3:]),)


def _err(x, ref, strict=True):
    """Max abs error over the entries finite in both; NaN must sit where the reference's does (not
    strict for eager low-precision baselines, which only set the tolerance)."""
    x, ref = x.double(), ref.double()
    if strict:
        assert torch.equal(torch.isnan(x), torch.isnan(ref)), "NaN pattern differs from the reference"
    fin = torch.isfinite(ref) & torch.isfinite(x)
    return (x[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


def _check(name, got, eager, ref, dtype, grad=False):
    assert got.shape == ref.shape, name
    e_got, e_eager = _err(got, ref), _err(eager, ref, strict=False)
    floor = ATOL[dtype] * (1 + ref.abs().nan_to_num(0, 0, 0).max().item() if grad else 1)
    assert e_got <= 2 * e_eager + floor, \
        f"{name}: kernel error {e_got:.3g} > 2 x eager {dtype} error {e_eager:.3g} + {floor:.3g}"


def _compare(got, q, k, v, captured, needs_grad, chain, go, dtype, dropout=None):
    out, lse, *grads = got
    ref = _eager(q, k, v, captured, needs_grad, chain, go, torch.float64, dropout)
    low = _eager(q, k, v, captured, needs_grad, chain, go, dtype, dropout)
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
    lse_ref[torch.isneginf(lse_ref)] = math.nan
    assert lse.dtype == torch.float32 and lse.shape == lse_ref.shape
    scale = (1e-4 if dtype == torch.float32 else ATOL[dtype]) * (1 + lse_ref.nan_to_num(0).abs().max().item())
    assert _err(lse, lse_ref) <= 2 * _err(torch.logsumexp(low[1].float(), -1), lse_ref, strict=False) + scale


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------

# one pattern per kind of step (the tensor-operand fills and padding run the same code as mask_inf
# and bias; under ``-m slow`` and on a GPU every pattern runs)
TRITON_DEFAULT = {"scale", "scalar_scale_learnable", "bias_learnable", "mask_inf", "mask_finfo_min",
                  "softcap", "mixed"}
TRITON_DEFAULT_SHAPES = {"odd", "value_head_dim", "projected", "rank3", "rank2"}


def _triton_takes(shape: Shape, spec: AttentionSpec, dtype) -> bool:
    q, k, v = (torch.empty(shape.lead + (n, d), dtype=dtype)
               for n, d in ((shape.nq, shape.d), (shape.nk, shape.d), (shape.nk, shape.dv or shape.d)))
    return ta.supports(q, k, v, spec)


def _cases():
    slow_here = [pytest.mark.slow] if INTERPRET else []
    for shape_name, shape in SHAPES.items():
        for name in shape.patterns or PATTERNS:
            for dtype in DTYPES:
                ops, kinds, *_ = PATTERNS[name](shape.score, dtype)
                spec = _spec(ops, kinds, dtype)
                paths = ["tiled"]
                if "aten_flash" in select.route(spec).cpu and not shape.dv:
                    paths.append("aten_flash")
                if _triton_takes(shape, spec, dtype):
                    paths.append("triton")
                for path in paths:
                    # Triton under the interpreter: seconds a case; the default run checks the
                    # patterns of TRITON_DEFAULT on the odd shape and the layouts, in float32
                    slow = path == "triton" and (dtype != torch.float32 or name not in TRITON_DEFAULT
                                                 or shape_name not in TRITON_DEFAULT_SHAPES)
                    marks = slow_here if slow else []
                    yield pytest.param(name, shape_name, dtype, path, marks=marks,
                                       id=f"{name}-{shape_name}-{dtype_name(dtype)}-{path}")


@pytest.mark.parametrize("pattern,shape_name,dtype,path", list(_cases()))
def test_kernel_path_matches_float64(pattern, shape_name, dtype, path, force):
    torch.manual_seed(0)
    shape = SHAPES[shape_name]
    ops, kinds, captured, needs_grad, chain = PATTERNS[pattern](shape.score, dtype)
    spec = _spec(ops, kinds, dtype)
    q, k, v = _qkv(shape, dtype)
    go = torch.randn(shape.lead + (shape.nq, shape.dv or shape.d), device=DEVICE, dtype=dtype)
    if path == "triton":
        got = _triton(q, k, v, captured, needs_grad, spec, go, 0)
    else:
        ran = force(path)
        got = _through_op(q, k, v, captured, needs_grad, spec, go, 0)
        if path == "tiled":
            assert "aten_flash" not in ran.values(), ran
        elif pattern in FLASH_REFUSES:
            assert ran["fwd"] == "tiled", f"ATen's kernel took a call it cannot compute: {FLASH_REFUSES[pattern]}"
        else:
            assert ran["fwd"] == "aten_flash", ran
            # ATen's backward has no gradient for captured operands: the tiled backward then
            assert ran.get("bwd", "tiled") == ("tiled" if any(needs_grad) else "aten_flash"), ran
    _compare(got, q, k, v, captured, needs_grad, chain, go, dtype)


def test_every_path_is_covered():
    """The table reaches each path on every pattern: a routing change that takes a path away from
    a spec shows up here, not as a silently shorter run."""
    ids = [p.id for p in _cases()]
    for name in PATTERNS:
        got = {i.rsplit("-", 1)[1] for i in ids if i.startswith(name + "-")}
        assert got >= {"tiled", "triton"}, (name, got)
    on_flash = {i.split("-")[0] for i in ids if i.endswith("-aten_flash")}
    assert on_flash == set(PATTERNS) - {"softcap", "mixed"}, on_flash


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
