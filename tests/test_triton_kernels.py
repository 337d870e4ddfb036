"""The generated Triton attention kernels against a float64 PyTorch reference, forward and backward.

Runs compiled on a GPU and under TRITON_INTERPRET=1 on CPU (conftest.py sets the switch), the same
tests in both modes. Tolerances follow FlashAttention's rule: the kernel's error against the
float64 reference is at most twice the error of eager PyTorch in the same dtype, plus a small atol.
Shapes are odd on purpose (Nq=37, Nk=53, head dim 40) so every tile has a ragged edge.

The score chains x shapes x dtypes that every kernel path computes (tiled, ATen flash, Triton),
dropout included, are checked once for all paths in test_kernel_paths.py; this file keeps what is
Triton's own: mask predicates and block skipping, decode split-KV, GPU tile tables, generated source.
"""
import contextlib
import math

import pytest
import sympy
import torch

from conftest import DEVICE, INTERPRET
from fusion_pass.kernels import cpu, predicate
from fusion_pass.kernels import triton_attention as ta
from fusion_pass.kernels.triton_attn import ranges as tr
from fusion_pass.kernels.dropout import keep_mask
from fusion_pass.kernels.spec import AttentionSpec, ScoreOp, dtype_name

# Under the interpreter (CPU) a case takes seconds: the default run checks a few, `python -m pytest
# -m slow` the rest; on a GPU every case runs by default.
_SLOW_HERE = [pytest.mark.slow] if INTERPRET else []
slow_here = pytest.mark.slow if INTERPRET else (lambda test: test)
# the "+ small atol" of the 2x-eager rule, per dtype (absorbs eager errors that happen to be ~0)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# ---------------------------------------------------------------------------------------------
# Patterns: the spec, its captured operands, and the same score chain in plain torch
# ---------------------------------------------------------------------------------------------

def _pattern_plain(B, H, nq, nk, d, dtype):
    ops = (ScoreOp("mul", "const", value=d ** -0.5),)
    return ops, (), [], [], lambda s, c: s * d ** -0.5


def _pattern_scalar_scale(B, H, nq, nk, d, dtype):
    # a 0-dim tensor read as a number at run time, with its own gradient
    ops = (ScoreOp("mul", "scalar", index=0),)
    scale = torch.tensor(d ** -0.5 * 1.3, device=DEVICE)
    return ops, ("scalar",), [scale], [True], lambda s, c: s * c[0]


def _pattern_bias(B, H, nq, nk, d, dtype):
    # additive bias broadcast over the batch, learnable
    ops = (ScoreOp("mul", "const", value=d ** -0.5), ScoreOp("add", "tensor", index=0))
    bias = torch.randn(1, H, nq, nk, device=DEVICE, dtype=dtype)
    return ops, ("tensor",), [bias], [True], lambda s, c: s * d ** -0.5 + c[0]


def _mask(B, nq, nk, fully_masked_row):
    m = torch.rand(B, 1, nq, nk, device=DEVICE) < 0.3
    if fully_masked_row:
        m[0, 0, 5, :] = True
    return m


def _pattern_mask_inf(B, H, nq, nk, d, dtype):
    # one row of batch 0 is fully masked: eager softmax gives a NaN row there
    ops = (ScoreOp("mul", "const", value=d ** -0.5),
           ScoreOp("fill", "none", value=-math.inf, index=0))
    m = _mask(B, nq, nk, fully_masked_row=True)
    return ops, ("tensor",), [m], [False], \
        lambda s, c: (s * d ** -0.5).masked_fill(c[0], -math.inf)


def _pattern_mask_min(B, H, nq, nk, d, dtype):
    # HF-style finfo.min fill: a fully masked row stays finite (uniform probabilities)
    fill = torch.finfo(dtype).min
    ops = (ScoreOp("mul", "const", value=d ** -0.5),
           ScoreOp("fill", "none", value=fill, index=0))
    m = _mask(B, nq, nk, fully_masked_row=True)
    return ops, ("tensor",), [m], [False], lambda s, c: (s * d ** -0.5).masked_fill(c[0], fill)


def _pattern_softcap(B, H, nq, nk, d, dtype):
    # Gemma-2 style: cap * tanh(s * scale / cap)
    cap = 5.0
    ops = (ScoreOp("mul", "const", value=d ** -0.5), ScoreOp("div", "const", value=cap),
           ScoreOp("tanh"), ScoreOp("mul", "const", value=cap))
    return ops, (), [], [], lambda s, c: torch.tanh(s * d ** -0.5 / cap) * cap


def _pattern_mixed(B, H, nq, nk, d, dtype):
    # the remaining kinds: sub of a key-broadcast tensor, rsub, div by a scalar, cast, fill_not
    # with a key-padding mask; gradients for the tensor and the scalar
    ops = (ScoreOp("div", "scalar", index=1), ScoreOp("sub", "tensor", index=0),
           ScoreOp("rsub", "const", value=1.0), ScoreOp("mul", "const", value=-1.0),
           ScoreOp("cast", dtype="float32"), ScoreOp("fill_not", "none", value=-1e4, index=2))
    key_bias = torch.randn(nk, device=DEVICE, dtype=dtype)
    div = torch.tensor(d ** 0.5, device=DEVICE)
    keep = torch.rand(B, 1, 1, nk, device=DEVICE) > 0.2
    return (ops, ("tensor", "scalar", "tensor"), [key_bias, div, keep], [True, True, False],
            lambda s, c: (-(1.0 - (s / c[1] - c[0]))).masked_fill(~c[2], -1e4))


PATTERNS = {
    "plain": _pattern_plain, "scalar_scale": _pattern_scalar_scale, "bias": _pattern_bias,
    "mask_inf": _pattern_mask_inf, "mask_finfo_min": _pattern_mask_min,
    "softcap": _pattern_softcap, "mixed": _pattern_mixed,
}


def _spec(ops, captured, dtype, dropout_p=0.0):
    n = dtype_name(dtype)
    return AttentionSpec(score_ops=ops, captured=captured, qk_dtype=n, softmax_dtype=n,
                         prob_dtype=n, out_dtype=n, dropout_p=dropout_p)


# ---------------------------------------------------------------------------------------------
# Reference and comparison
# ---------------------------------------------------------------------------------------------

def _reference(q, k, v, captured, needs_grad, chain, grad_out, dtype):
    """Eager attention with plain torch ops in ``dtype``: (out, dq, dk, dv, dcaptured)."""
    def prep(t, grad):
        if t.is_floating_point() and t.dim() > 0:
            t = t.to(dtype)
        elif t.is_floating_point():
            t = t.to(torch.float64 if dtype == torch.float64 else torch.float32)
        return t.detach().requires_grad_(grad)
    qr, kr, vr = (prep(t, True) for t in (q, k, v))
    cr = [prep(c, ng) for c, ng in zip(captured, needs_grad)]
    s = qr @ kr.transpose(-1, -2)
    p = torch.softmax(chain(s, cr), dim=-1)
    out = p @ vr
    out.backward(grad_out.to(dtype))
    return out.detach(), qr.grad, kr.grad, vr.grad, [c.grad for c in cr if c.requires_grad]


def _err(x, ref, strict=True):
    """Max abs error over the reference's finite entries; NaNs must sit where the reference's do.
    Not strict for eager low-precision baselines (eager bf16 on CPU gives an extra NaN row on the
    fully masked pattern), which only set the tolerance."""
    x, ref = x.double(), ref.double()
    if strict:
        assert torch.equal(torch.isnan(x), torch.isnan(ref)), "NaN pattern differs from the reference"
    fin = torch.isfinite(ref) & torch.isfinite(x)
    return (x[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


def _check_close(name, got, eager, ref, dtype, relative=False):
    """``relative``: the absolute slack scales with the reference's magnitude (a captured
    operand's gradient is a sum over every score it reaches; its rounding grows with it)."""
    assert got.shape == ref.shape, name
    assert got.dtype == eager.dtype, name
    e_got, e_eager = _err(got, ref), _err(eager, ref, strict=False)
    atol = ATOL[dtype]
    if relative:
        fin = ref[torch.isfinite(ref)]
        atol *= max(1.0, fin.abs().max().item() if fin.numel() else 1.0)
    assert e_got <= 2 * e_eager + atol, \
        f"{name}: kernel error {e_got:.3g} > 2 x eager {dtype} error {e_eager:.3g} + {atol:.3g}"


def _run(pattern, dtype, B=2, H=3, nq=37, nk=53, d=40, dv=None, make_qkv=None):
    torch.manual_seed(0)
    dv = dv or d
    pattern = PATTERNS[pattern] if isinstance(pattern, str) else pattern
    ops, kinds, captured, needs_grad, chain = pattern(B, H, nq, nk, d, dtype)
    spec = _spec(ops, kinds, dtype)
    if make_qkv is None:
        q = torch.randn(B, H, nq, d, device=DEVICE, dtype=dtype)
        k = torch.randn(B, H, nk, d, device=DEVICE, dtype=dtype)
        v = torch.randn(B, H, nk, dv, device=DEVICE, dtype=dtype)
    else:
        q, k, v = make_qkv(dtype)
    assert ta.supports(q, k, v, spec)
    grad_out = torch.randn(q.shape[:-1] + (dv,), device=DEVICE, dtype=dtype)

    out, lse = ta.forward(q, k, v, captured, spec, seed=0)
    dq, dk, dv_, dcap = ta.backward(grad_out, q, k, v, captured, out, lse, spec, 0, needs_grad)

    ref = _reference(q, k, v, captured, needs_grad, chain, grad_out, torch.float64)
    eager = _reference(q, k, v, captured, needs_grad, chain, grad_out, dtype)
    got = (out, dq, dk, dv_, [g for g in dcap if g is not None])
    for name, g, e, r in zip(("out", "dq", "dk", "dv"), got[:4], eager[:4], ref[:4]):
        _check_close(name, g, e, r, dtype)
    assert len(got[4]) == len(ref[4]) == sum(needs_grad)
    for i, (g, e, r) in enumerate(zip(got[4], eager[4], ref[4])):
        _check_close(f"dcaptured[{i}]", g, e.to(g.dtype), r, dtype, relative=True)
    assert [g is None for g in dcap] == [not n for n in needs_grad]

    # lse: the log-sum-exp of the final scores (NaN on a fully masked row, as in cpu.py)
    s = chain(q.double() @ k.double().transpose(-1, -2),
              [c.double() if c.is_floating_point() else c for c in captured])
    lse_ref = torch.logsumexp(s, -1)
    lse_ref[torch.isneginf(lse_ref)] = math.nan
    assert lse.dtype == torch.float32 and lse.shape == lse_ref.shape
    assert _err(lse, lse_ref) <= 1e-4 * (1 + lse_ref[torch.isfinite(lse_ref)].abs().max().item()) \
        + 2 * _err(torch.logsumexp(chain(q @ k.transpose(-1, -2), captured).float(), -1)
                   .masked_fill(torch.isnan(lse_ref), math.nan), lse_ref, strict=False)
    return out


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def test_decode_single_query():
    _run("bias", torch.float16, nq=1, nk=53, d=64)


def _dropout_case(p=0.3, B=2, H=3, nq=37, nk=53, d=40, dv=40, pattern=_pattern_bias):
    torch.manual_seed(1)
    ops, kinds, captured, needs_grad, _ = pattern(B, H, nq, nk, d, torch.float32)
    spec = _spec(ops, kinds, torch.float32, dropout_p=p)
    q = torch.randn(B, H, nq, d, device=DEVICE)
    k = torch.randn(B, H, nk, d, device=DEVICE)
    v = torch.randn(B, H, nk, dv, device=DEVICE)
    return spec, q, k, v, captured, needs_grad


@pytest.mark.parametrize("seed", [0, 12345, 3_000_000_000])  # the last one is above 2^31
def test_dropout_mask_is_the_cpu_mask(seed):
    # with V = identity the output is the dropped probability matrix itself: an element is zero
    # exactly where the kernel dropped it, so the mask is compared bit for bit
    spec, q, k, _, captured, _ = _dropout_case(nk=37)
    v = torch.eye(37, 40, device=DEVICE).expand(2, 3, 37, 40)
    out, _ = ta.forward(q, k, v, captured, spec, seed)
    idx = torch.arange(2 * 3 * 37 * 37, device=DEVICE).reshape(2, 3, 37, 37)
    keep = keep_mask(seed, idx, spec.dropout_p)
    assert torch.equal(out[..., :37] != 0, keep)
    assert 0.6 < keep.float().mean().item() < 0.8


@slow_here  # ~10 s under the interpreter; grouped heads stay in the default run through decode
def test_grouped_query_matches_cpu():
    # Llama's repeat_kv without the copies: query head h reads K/V head h // G; dK/dV sum over
    # the group. With dropout and a learnable bias, against the CPU reference implementation.
    torch.manual_seed(2)
    B, H, HK, nq, nk, d = 2, 4, 2, 37, 53, 40
    ops, kinds, captured, needs_grad, chain = _pattern_bias(B, H, nq, nk, d, torch.float32)
    spec = _spec(ops, kinds, torch.float32, dropout_p=0.3)
    q = torch.randn(B, H, nq, d, device=DEVICE)
    k = torch.randn(B, HK, nk, d, device=DEVICE)
    v = torch.randn(B, HK, nk, d, device=DEVICE)
    assert ta.supports(q, k, v, spec)
    out, lse = ta.forward(q, k, v, captured, spec, 11)
    out_c, lse_c = cpu.attention_forward(q, k, v, captured, spec, 11)
    torch.testing.assert_close(out, out_c, atol=2e-5, rtol=1e-4)
    go = torch.randn_like(out)
    got = ta.backward(go, q, k, v, captured, out, lse, spec, 11, needs_grad)
    exp = cpu.attention_backward(go, q, k, v, captured, out_c, lse_c, spec, 11, needs_grad)
    assert got[1].shape == k.shape and got[2].shape == v.shape
    for g, e in zip(got[:3] + tuple(got[3]), exp[:3] + tuple(exp[3])):
        torch.testing.assert_close(g, e, atol=5e-5, rtol=1e-4)
    # and against float64 repeat_kv without dropout
    spec0 = _spec(ops, kinds, torch.float32)
    out, lse = ta.forward(q, k, v, captured, spec0)
    dq, dk, dv, _ = ta.backward(go, q, k, v, captured, out, lse, spec0, 0, [False])
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref = torch.softmax(chain(qr @ kr.repeat_interleave(2, 1).transpose(-1, -2),
                              [captured[0].double()]), -1) @ vr.repeat_interleave(2, 1)
    ref.backward(go.double())
    for g, r in ((out, ref), (dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        torch.testing.assert_close(g.double(), r.detach(), atol=2e-5, rtol=1e-4)


@slow_here
def test_backward_is_deterministic():
    spec, q, k, v, captured, needs_grad = _dropout_case()
    out, lse = ta.forward(q, k, v, captured, spec, 7)
    go = torch.randn_like(out)
    a = ta.backward(go, q, k, v, captured, out, lse, spec, 7, needs_grad)
    b = ta.backward(go, q, k, v, captured, out, lse, spec, 7, needs_grad)
    for x, y in zip(a[:3] + tuple(a[3]), b[:3] + tuple(b[3])):
        assert torch.equal(x, y)


def test_supports_refuses_cleanly():
    q = torch.randn(1, 2, 8, 32, device=DEVICE)
    spec = _spec((ScoreOp("mul", "const", value=0.5),), (), torch.float32)
    assert ta.supports(q, q, q, spec)
    assert not ta.supports(q.double(), q.double(), q.double(), spec)  # float64
    assert not ta.supports(q, q.half(), q, spec)  # mixed dtypes
    small = torch.randn(1, 2, 8, 8, device=DEVICE)
    assert not ta.supports(small, small, small, spec)  # head dim < 16
    big = torch.randn(1, 1, 4, 512, device=DEVICE)
    assert not ta.supports(big, big, big, spec)  # head dim > 256
    five = torch.randn(1, 1, 2, 8, 32, device=DEVICE)
    assert not ta.supports(five, five, five, spec)  # rank 5
    kv1 = torch.randn(1, 1, 8, 32, device=DEVICE)
    assert ta.supports(q, kv1, kv1, spec)  # grouped-query: 2 query heads per K/V head
    kv3 = torch.randn(1, 3, 8, 32, device=DEVICE)
    assert not ta.supports(q, kv3, kv3, spec)  # K/V heads must divide the query heads
    empty = torch.randn(1, 2, 0, 32, device=DEVICE)
    assert not ta.supports(empty, q, q, spec)  # cpu.py owns empty softmax
    huge_fill = _spec((ScoreOp("fill", "none", value=-1e300, index=0),), ("tensor",), torch.float32)
    assert not ta.supports(q, q, q, huge_fill)  # not representable in fp32


def test_generated_source_reads_like_the_spec():
    ops, kinds, *_ = _pattern_mixed(1, 1, 4, 4, 16, torch.float32)
    src = ta.generate_source(_spec(ops, kinds, torch.float32, dropout_p=0.1))
    assert src.startswith("# generated by fusion_pass.kernels.triton_attention")
    assert "def score_mod(s, T):" in src and "    c0 = T[0]\n    c1 = T[1]\n    c2 = T[2]\n" in src
    # fill_not, inline; after the (last nonlinear) cast the chain is in base-2 units, so the
    # fill value carries log2(e) (the kernels take exp2)
    assert f"s = tl.where(c2 != 0, s, {-10000.0 * ta.LOG2E!r})" in src
    assert "dc1 = -ds * s0 / (c1 * c1)" in src  # d/d(divisor) of s / c1
    assert "    c1 = tl.load(C1).to(tl.float32)\n" in src  # the scalar, loaded by operand_values
    assert "tl.atomic" not in src  # deterministic backward
    compile(src, "<generated>", "exec")


# ---------------------------------------------------------------------------------------------
# Mask predicates evaluated in the kernels (predicate.MaskSpec), with block skipping
# ---------------------------------------------------------------------------------------------

MIN32 = torch.finfo(torch.float32).min
_b, _h, _i, _j = (sympy.Symbol(n, integer=True, nonnegative=True) for n in "bhij")
_n = [sympy.Symbol(f"n{t}", integer=True, nonnegative=True) for t in range(4)]
_d0, _d1 = sympy.Function("d0"), sympy.Function("d1")
AXES = ("b", "h", "i", "j")


def _mask_spec(keep, kind="bool", data=(), masked=-math.inf, dtype="float32"):
    if kind == "bool":
        return predicate.MaskSpec(keep=sympy.srepr(keep), axes=AXES, data=tuple(data), text=str(keep))
    return predicate.MaskSpec(keep=sympy.srepr(keep), axes=AXES, data=tuple(data), kind="additive",
                              dtype=dtype, kept=0.0, masked=masked, text=str(keep))


class _Masks:
    """The dense masks of a spec, for the references. ``ref``: the float64 reference, where an
    additive mask's masked value replaces the score (what eager fp32 computes: s + finfo.min is
    finfo.min for every |s| < 2^103); else eager's own s + mask."""

    def __init__(self, spec, captured, score_shape, ref):
        self.spec, self.ref = spec, ref
        self.dense = [predicate.materialize(m, score_shape, [captured[d] for d in m.data])
                      for m in spec.masks]

    def add(self, s, k):
        m, t = self.spec.masks[k], self.dense[k]
        if m.kind == "bool":
            return s + t
        if self.ref:
            return torch.where(t == m.kept, s + m.kept, torch.tensor(m.masked, dtype=s.dtype))
        return s + t

    def __getitem__(self, k):  # a bool mask, as masked_fill / where read it
        return self.dense[k]


def _pred_reference(q, k, v, captured, needs_grad, chain, grad_out, dtype, masks):
    """Eager attention in ``dtype`` (float64: the reference); K/V heads repeated for GQA."""
    def prep(t, grad):
        return t.detach().to(dtype).requires_grad_(grad)
    qr, kr, vr = (prep(t, True) for t in (q, k, v))
    cr = [prep(c, ng) if c.is_floating_point() else c for c, ng in zip(captured, needs_grad)]
    g = q.shape[1] // k.shape[1]
    kx, vx = kr.repeat_interleave(g, 1), vr.repeat_interleave(g, 1)
    s = chain(qr @ kx.transpose(-1, -2), cr, masks)
    out = torch.softmax(s, dim=-1) @ vx
    out.backward(grad_out.to(dtype))
    return (out.detach(), qr.grad, kr.grad, vr.grad,
            [c.grad for c, ng in zip(cr, needs_grad) if ng], s.detach())


def _pred_run(ops, kinds, captured, needs_grad, masks, chain, dtype=torch.float32, B=2, H=3, HK=None,
              nq=75, nk=75, d=32, dropout_p=0.0, skips=True):
    """Kernel vs float64 reference (tolerance: twice eager's error in ``dtype``), forward and
    backward; returns (spec, q, k, v, out, lse) for further checks."""
    HK = HK or H
    n = dtype_name(dtype)
    spec = AttentionSpec(score_ops=ops, captured=kinds, masks=tuple(masks), qk_dtype=n,
                         softmax_dtype=n, prob_dtype=n, out_dtype=n, dropout_p=dropout_p)
    q = torch.randn(B, H, nq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(B, HK, nk, d, device=DEVICE, dtype=dtype)
    v = torch.randn(B, HK, nk, d, device=DEVICE, dtype=dtype)
    assert ta.supports(q, k, v, spec) and ta.predicates_supported(spec, captured)
    assert (ta.block_ranges(spec, captured, (B, H, nq, nk), 16, 16) is not None) == skips
    go = torch.randn(B, H, nq, d, device=DEVICE, dtype=dtype)
    out, lse = ta.forward(q, k, v, captured, spec)
    dq, dk, dv, dcap = ta.backward(go, q, k, v, captured, out, lse, spec, 0, needs_grad)
    shape = (B, H, nq, nk)
    ref = _pred_reference(q, k, v, captured, needs_grad, chain, go, torch.float64,
                          _Masks(spec, captured, shape, ref=True))
    eager = _pred_reference(q, k, v, captured, needs_grad, chain, go, dtype,
                            _Masks(spec, captured, shape, ref=False))
    for name, g, e, r in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), eager[:4], ref[:4]):
        _check_close(name, g, e, r, dtype)
    got_c = [g for g in dcap if g is not None]
    assert len(got_c) == len(ref[4]) == sum(needs_grad)
    for t, (g, e, r) in enumerate(zip(got_c, eager[4], ref[4])):
        # a scalar's gradient sums B*H*Nq*Nk terms in fp32 partials: atol relative to its size
        e_got, e_eager = _err(g, r), _err(e, r, strict=False)
        assert e_got <= 2 * e_eager + ATOL[dtype] * (1 + r.abs().max().item()), f"dcaptured[{t}]"
    lse_ref = torch.logsumexp(ref[5], -1)
    lse_ref[torch.isneginf(lse_ref)] = math.nan
    assert torch.equal(torch.isnan(lse), torch.isnan(lse_ref))
    fin = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[fin].double(), lse_ref[fin], rtol=1e-5, atol=1e-3)
    return spec, q, k, v, out, lse


def _visited(spec, captured, shape, bm=16, bn=16):
    """(key blocks the forward visits, all key blocks), over every (b, h, query block)."""
    rows, cols = ta.block_ranges(spec, captured, shape, bm, bn)
    B, H, nq, nk = shape
    n_mb, n_nb = -(-nq // bm), -(-nk // bn)
    span = (rows[..., 1] - rows[..., 0]).expand(B, H, n_mb)
    # the dK/dV kernel's tiles include every tile the forward visits
    tspan = (cols[..., 1] - cols[..., 0]).expand(B, H, n_nb)
    assert tspan.sum() >= span.sum()
    return int(span.sum()), B * H * n_mb * n_nb


def _causal_additive(dtype=torch.float32):
    # in the model's dtype, as HF builds it
    return _mask_spec(sympy.Le(_j, _i), kind="additive", masked=torch.finfo(dtype).min,
                      dtype=dtype_name(dtype))


def _pred_spec(ops, kinds, masks, dtype=torch.float32):
    """The spec _pred_run builds, for the block-range checks (no kernel run)."""
    n = dtype_name(dtype)
    return AttentionSpec(score_ops=ops, captured=kinds, masks=tuple(masks), qk_dtype=n,
                         softmax_dtype=n, prob_dtype=n, out_dtype=n)


# The kernels' results on these masks (causal, windows, left padding with rows keeping no key,
# grouped-query heads; fill, fill_not and additive spellings) are checked forward and backward
# against float64 on every kernel path in test_kernel_paths.py (its pred_* patterns); here, the
# key blocks the kernels visit for them.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_predicate_causal_additive_visits_the_lower_blocks(dtype):
    """causal as HF builds it: where(j <= i, 0, finfo.min) added to the scaled scores (a learnable
    0-dim scale): the forward visits the key blocks at or below the diagonal only."""
    ops = (ScoreOp("mul", "scalar", index=0), ScoreOp("add", "predicate", index=0))
    scale = torch.tensor(32 ** -0.5, device=DEVICE)
    spec = _pred_spec(ops, ("scalar",), [_causal_additive(dtype)], dtype)
    seen, total = _visited(spec, [scale], (2, 3, 75, 75))
    assert seen == 15 * 6 and seen < total  # 1 + 2 + ... + 5 key blocks per (b, h)


@pytest.mark.parametrize("two_sided", [False, True], ids=["one_sided", "two_sided"])
def test_predicate_sliding_window_visits_the_band(two_sided):
    """Sliding windows as bool masks filled with -inf, after a learnable additive bias: the
    forward visits the key blocks of the band only."""
    if two_sided:
        masked = sympy.Ge(sympy.Abs(_i - _j), 4)
    else:
        masked = sympy.Not(sympy.And(sympy.Ge(_i - _j, 0), sympy.Lt(_i - _j, 5)))
    ops = (ScoreOp("mul", "const", value=32 ** -0.5), ScoreOp("add", "tensor", index=0),
           ScoreOp("fill", "predicate", value=-math.inf, index=0))
    bias = torch.randn(1, 3, 75, 75, device=DEVICE)
    spec = _pred_spec(ops, ("tensor",), [_mask_spec(masked)])
    seen, total = _visited(spec, [bias], (2, 3, 75, 75))
    assert seen == (13 if two_sided else 9) * 6 and seen < total * 0.6


@pytest.mark.parametrize("fill", ["finfo_min", "neg_inf"])
def test_predicate_causal_left_padding_ranges(fill):
    """causal & padding read from a (B, N) attention mask with left padding: the first rows of
    batch 1 keep no key, and the kernels must not skip there (eager: uniform over every key with
    finfo.min, NaN with -inf); the ranges are per batch entry, shared by the heads."""
    am = torch.ones(2, 75, dtype=torch.long, device=DEVICE)
    am[1, :21] = 0  # rows 0..20 of batch 1 keep nothing: query block 0 and part of block 1
    keep = sympy.And(sympy.Le(_j, _i), sympy.Ne(_d0(_b, _j), 0))
    if fill == "finfo_min":
        m = _mask_spec(keep, kind="additive", data=(0,), masked=MIN32)
        ops = (ScoreOp("mul", "const", value=32 ** -0.5), ScoreOp("add", "predicate", index=0))
    else:
        m = _mask_spec(sympy.Not(keep), data=(0,))
        ops = (ScoreOp("mul", "const", value=32 ** -0.5),
               ScoreOp("fill", "predicate", value=-math.inf, index=0))
    spec = _pred_spec(ops, ("data",), [m])
    rows, _ = ta.block_ranges(spec, [am], (2, 3, 75, 75), 16, 16)
    assert rows.shape == (2, 1, 5, 2)  # per batch entry, shared by the heads
    assert rows[1, 0, 0].tolist() == [0, 5] and rows[1, 0, 1].tolist() == [0, 5]  # rows with no key
    assert rows[0, 0, 0].tolist() == [0, 1]


def test_predicate_document_ids():
    """Block-diagonal attention from per-token document ids, d0(b, i) == d0(b, j), read as
    torch.where(same_doc, s, -inf): fill_not of a bool predicate, every row keeps itself."""
    torch.manual_seed(13)
    doc = torch.sort(torch.randint(0, 5, (2, 75), device=DEVICE), dim=1)[0]
    m = _mask_spec(sympy.Eq(_d0(_b, _i), _d0(_b, _j)), data=(0,))
    ops = (ScoreOp("mul", "const", value=32 ** -0.5),
           ScoreOp("fill_not", "predicate", value=-math.inf, index=0))
    spec, *_ = _pred_run(ops, ("data",), [doc], [False], [m],
                         lambda s, c, M: torch.where(M[0], s * 32 ** -0.5, -math.inf))
    seen, total = _visited(spec, [doc], (2, 3, 75, 75))
    assert seen < total


def test_predicate_codegen_semantics():
    """A bool predicate that is not the last step (no skipping) using every construct of the
    printer, with Python's integer semantics on negative values: floor division and Mod of i - j,
    Abs, Max/Min, Piecewise, Xor, Not, a size symbol, a (B, N) int data tensor read at j - 1
    (index -1 wraps as in torch), a (N,) bool data tensor. Added as 0/1 and scaled by 8, so one
    wrong element moves the output far beyond the tolerance."""
    torch.manual_seed(14)
    B, H, N = 2, 3, 45
    keep = sympy.Or(
        sympy.And(sympy.Eq(sympy.Mod(_j - _i, 3), 1), sympy.Lt(sympy.floor((_j - _i) / 4), -2)),
        sympy.Ge(sympy.Abs(_i - _j), sympy.Max(_n[2] - 10, 30)),
        # divisors that are expressions of the sizes (n2 - 42 = 3, n3 - 40 = 5): j - i == -13
        sympy.And(sympy.Eq(sympy.floor((_j - _i) / (_n[3] - 40)), -3),
                  sympy.Eq(sympy.Mod(_j - _i, _n[2] - 42), 2)),
        sympy.Eq(_d0(_b, _j - 1), sympy.Min(_h, 1)),
        sympy.Xor(sympy.Not(sympy.Eq(_d1(_i), 0)),
                  sympy.Lt(_j, sympy.Piecewise((_i + 2, sympy.Gt(_h, 0)), (_i - 2, True)))))
    m = _mask_spec(keep, data=(1, 2))
    ops = (ScoreOp("mul", "const", value=0.25), ScoreOp("add", "predicate", index=0),
           ScoreOp("mul", "const", value=8.0))
    ids = torch.randint(0, 3, (B, N), device=DEVICE)
    flags = torch.rand(N, device=DEVICE) < 0.5
    scale = torch.tensor(1.0, device=DEVICE)  # a scalar before the data: positions 1, 2
    captured = [scale, ids, flags]
    dense = predicate.materialize(m, (B, H, N, N), [ids, flags])
    assert 0.2 < dense.float().mean() < 0.8
    src = ta.generate_source(AttentionSpec(score_ops=ops, masks=(m,), captured=("scalar", "data", "data")))
    for helper in ("_fdiv_pos(", "_mod_pos(", "_fdiv(", "_mod(", "_dload2(", "_dload1("):
        assert helper in src.split("def attn_fwd")[0].split("def mask0")[1], helper
    ops = (ScoreOp("mul", "scalar", index=0),) + ops
    _pred_run(ops, ("scalar", "data", "data"), captured, [False, False, False], [m],
              lambda s, c, M: M.add(s * c[0] * 0.25, 0) * 8.0, nq=N, nk=N, skips=False)


def test_predicate_grouped_query_ranges():
    """GQA (4 query heads on 2 K/V heads) with a head-dependent predicate: each head's window
    length differs, so the ranges are per (b, h) and the dK/dV kernel reads one per query head."""
    masked = sympy.Not(sympy.And(sympy.Le(_j, _i), sympy.Lt(_i - _j, 4 + 8 * _h)))
    ops = (ScoreOp("mul", "const", value=32 ** -0.5),
           ScoreOp("fill", "predicate", value=MIN32, index=0))
    spec = _pred_spec(ops, (), [_mask_spec(masked)])
    rows, cols = ta.block_ranges(spec, [], (2, 4, 75, 75), 16, 16)
    assert rows.shape == (1, 4, 5, 2) and cols.shape == (1, 4, 5, 2)
    assert rows[0, 0, 2].tolist() == [1, 3] and rows[0, 3, 4].tolist() == [2, 5]


def test_predicate_with_dropout_matches_cpu():
    """Dropout: no skipping (its mask is indexed by key), the predicate still evaluated in-kernel;
    the CPU implementation draws the same dropout mask."""
    torch.manual_seed(16)
    am = torch.ones(2, 53, dtype=torch.long, device=DEVICE)
    am[0, :7] = 0
    m = _mask_spec(sympy.And(sympy.Le(_j, _i), sympy.Ne(_d0(_b, _j), 0)), kind="additive",
                   data=(0,), masked=MIN32)
    spec = AttentionSpec(score_ops=(ScoreOp("mul", "const", value=40 ** -0.5),
                                    ScoreOp("add", "predicate", index=0)),
                         captured=("data",), masks=(m,), dropout_p=0.3)
    assert ta.block_ranges(spec, [am], (2, 3, 37, 53), 16, 16) is None
    q = torch.randn(2, 3, 37, 40, device=DEVICE)
    k = torch.randn(2, 3, 53, 40, device=DEVICE)
    v = torch.randn(2, 3, 53, 40, device=DEVICE)
    out, lse = ta.forward(q, k, v, [am], spec, 5)
    out_c, lse_c = cpu.attention_forward(q, k, v, [am], spec, 5)
    torch.testing.assert_close(out, out_c, atol=2e-5, rtol=1e-4)
    go = torch.randn_like(out)
    got = ta.backward(go, q, k, v, [am], out, lse, spec, 5, [False])
    exp = cpu.attention_backward(go, q, k, v, [am], out_c, lse_c, spec, 5, [False])
    for g, e in zip(got[:3], exp[:3]):
        torch.testing.assert_close(g, e, atol=5e-5, rtol=1e-4)


def test_skipped_key_blocks_are_never_read(monkeypatch):
    """The kernels really skip, and only where the removal rule allows it. Ranges that (wrongly)
    leave out a key block some rows keep change exactly those query blocks' output and dQ: the
    kernels read nothing outside their ranges. NaN in K and V is no longer a way to see that: a
    call whose inputs are not finite skips nothing, so NaN spreads as in eager (0 * NaN)."""
    torch.manual_seed(17)
    m = _mask_spec(sympy.Not(sympy.And(sympy.Le(_j, _i), sympy.Lt(_i - _j, 8))))
    spec = AttentionSpec(score_ops=(ScoreOp("mul", "const", value=0.25),
                                    ScoreOp("fill", "predicate", value=-math.inf, index=0)),
                         masks=(m,))
    q, k, v = (torch.randn(1, 2, 64, 16, device=DEVICE) for _ in range(3))
    rows, _ = ta.block_ranges(spec, [], (1, 2, 64, 64), 16, 16)
    assert rows[0, 0, :, 0].tolist() == [0, 0, 1, 2]  # query blocks 2, 3 skip key block 0
    out, lse = ta.forward(q, k, v, [], spec)
    go = torch.randn_like(out)
    dq = ta.backward(go, q, k, v, [], out, lse, spec)[0]
    real = tr._block_ranges

    def lying(*a, **kw):  # query block 3 (rows 48-63) told to start at key block 3
        rows, cols = real(*a, **kw)
        rows = rows.clone()
        rows[..., 3, 0] = 3
        return rows, ta._ranges(rows[..., 0], rows[..., 1], torch.zeros_like(rows[..., 0], dtype=torch.bool),
                                rows.shape[-2], 4, rows.device)[1]

    monkeypatch.setattr(tr, "_block_ranges", lying)
    # the host's tensor ranges (for this band the kernels compute theirs: they are lied to in
    # test_triton_full_tiles.test_a_lying_band_is_caught)
    monkeypatch.setattr(tr, "linear_band", lambda *a: None)
    out_l, lse_l = ta.forward(q, k, v, [], spec)
    dq_l = ta.backward(go, q, k, v, [], out_l, lse_l, spec)[0]
    assert torch.equal(out_l[:, :, :48], out[:, :, :48]) and torch.equal(dq_l[:, :, :48], dq[:, :, :48])
    assert not torch.allclose(out_l[:, :, 48:56], out[:, :, 48:56])  # rows 48-55 keep keys 41-47
    monkeypatch.setattr(tr, "_block_ranges", real)
    kp, vp = k.clone(), v.clone()
    vp[:, :, :16] = math.nan
    out_p, _ = ta.forward(q, kp, vp, [], spec)
    assert torch.isnan(out_p).all()  # eager: p = 0 times NaN in every row


def test_forward_without_skipping_allocates_no_threshold(monkeypatch):
    """Nothing to skip (no mask): no removal threshold is computed, and the THRESH the kernel
    gets is the shared dummy (made once per device, never written), so the forward allocates
    its outputs only."""
    from fusion_pass.kernels.triton_attn import launch
    monkeypatch.setattr(launch, "_threshold32", lambda *a, **kw: pytest.fail("threshold computed"))
    spec = AttentionSpec(score_ops=(ScoreOp("mul", "const", value=0.25),))
    q, k, v = (torch.randn(1, 2, 37, 16, device=DEVICE) for _ in range(3))
    mod = ta.kernels(spec)
    real, seen = mod.attn_fwd, []

    class Recorder:
        def __getitem__(self, grid):
            def launch_(*args, **kwargs):
                seen.append(args[12])  # THRESH
                return real[grid](*args, **kwargs)
            return launch_
    monkeypatch.setattr(mod, "attn_fwd", Recorder())
    dummy = tr.dummy(q.device, torch.float32)
    for _ in range(2):
        out, lse = ta.forward(q, k, v, [], spec)
    assert len(seen) == 2 and all(t is dummy for t in seen) and not dummy.any()
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * 0.25, -1) @ v.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_backward_buffers_it_does_not_write_are_the_shared_dummy(monkeypatch):
    """INV_R without ROW_STATS and the gradient buffer of a captured scalar that needs no
    gradient are never written by the kernels: the shared dummy, not an allocation per call;
    the gradients still match the CPU reference."""
    spec = AttentionSpec(score_ops=(ScoreOp("mul", "scalar", index=0),), captured=("scalar",))
    scale = torch.tensor(0.25, device=DEVICE)
    q, k, v, go = (torch.randn(1, 2, 37, 16, device=DEVICE) for _ in range(4))
    assert not ta._needs_row_stats(spec, torch.float32)
    mod = ta.kernels(spec)
    real, seen = mod.attn_bwd_dq, []

    class Recorder:
        def __getitem__(self, grid):
            def launch_(*args, **kwargs):
                seen.append((args[6], args[9]))  # INV_R, the gradient buffers DC
                return real[grid](*args, **kwargs)
            return launch_
    monkeypatch.setattr(mod, "attn_bwd_dq", Recorder())
    dummy = tr.dummy(q.device, torch.float32)
    out, lse = ta.forward(q, k, v, [scale], spec)
    got = ta.backward(go, q, k, v, [scale], out, lse, spec, 0, [False])
    (inv_r, dc), = seen
    assert inv_r is dummy and len(dc) == 1 and dc[0] is dummy
    assert not dummy.any() and got[3] == [None]
    exp = cpu.attention_backward(go, q, k, v, [scale], out, lse, spec, 0, [False])
    for g, e in zip(got[:3], exp[:3]):
        torch.testing.assert_close(g, e, atol=5e-5, rtol=1e-4)


def _pattern_scalar_softcap(B, H, nq, nk, d, dtype):
    # a learnable soft-cap: tanh(s * scale / c) * c, c a float64 0-dim tensor read twice
    ops = (ScoreOp("mul", "const", value=d ** -0.5), ScoreOp("div", "scalar", index=0),
           ScoreOp("tanh"), ScoreOp("mul", "scalar", index=0))
    cap = torch.tensor(2.5, dtype=torch.float64, device=DEVICE)
    return ops, ("scalar",), [cap], [True], lambda s, c: torch.tanh(s * d ** -0.5 / c[0]) * c[0]


@contextlib.contextmanager
def _no_item():
    """Tensor.item raises inside: a scalar read to the host (a device sync per call on a GPU)."""
    real = torch.Tensor.item

    def item(self):
        raise AssertionError("Tensor.item() called in a Triton launch")
    torch.Tensor.item = item
    try:
        yield
    finally:
        torch.Tensor.item = real


@pytest.mark.parametrize("pattern", [_pattern_scalar_scale, _pattern_scalar_softcap],
                         ids=["scale", "softcap"])
def test_scalar_operands_are_loaded_by_the_kernels(pattern, monkeypatch):
    """A scalar operand reaches the kernels as its 0-dim tensor (they load it once per program),
    never through .item(); out, lse and the gradients of q, k, v and the scalar follow the
    float64 reference (_run's 2x-eager rule)."""
    import fusion_pass.kernels.triton_attn.launch as launch
    real_ops, real_fwd, real_bwd, seen = launch._operands, ta.forward, ta.backward, []

    def record(*args, **kwargs):
        seen.append(real_ops(*args, **kwargs))
        return seen[-1]

    def guarded(fn):
        def run(*args, **kwargs):
            with _no_item():
                return fn(*args, **kwargs)
        return run
    monkeypatch.setattr(launch, "_operands", record)
    monkeypatch.setattr(ta, "forward", guarded(real_fwd))
    monkeypatch.setattr(ta, "backward", guarded(real_bwd))
    _run(pattern, torch.float32, B=1, H=2, nq=21, nk=37, d=16)
    assert len(seen) == 2  # forward, backward
    for ops in seen:
        assert isinstance(ops[0], torch.Tensor) and ops[0].dim() == 0 and ops[0].dtype == \
            (torch.float64 if pattern is _pattern_scalar_softcap else torch.float32)


@pytest.mark.parametrize("value, dtype", [
    (1 + 2 ** -24 + 2 ** -40, torch.float64),  # to nearest: 1 + 2^-23 (truncated: 1)
    (0.1, torch.float64), (0.3, torch.bfloat16), (0.3, torch.float16),
    (2 ** 24 + 1, torch.int64),  # a tie, to even: 2^24 (float(int), then fp32)
    (-3, torch.int32), (True, torch.bool)], ids=str)
def test_scalar_operand_value_is_its_fp32_rounding(value, dtype):
    """What the kernels compute with is the scalar rounded once to fp32, as before, when
    float(c.item()) went to them as an fp32 argument: the same bits as an fp32 0-dim tensor
    holding that rounding, forward and backward."""
    torch.manual_seed(3)
    spec = AttentionSpec(score_ops=(ScoreOp("mul", "scalar", index=0),), captured=("scalar",))
    c = torch.tensor(value, dtype=dtype, device=DEVICE)
    c32 = torch.tensor(float(c.item()), dtype=torch.float32, device=DEVICE)  # the old argument
    q, k, v, go = (torch.randn(1, 2, 17, 16, device=DEVICE) for _ in range(4))
    got, exp = [], []
    for cap, res in ((c, got), (c32, exp)):
        out, lse = ta.forward(q, k, v, [cap], spec)
        res += [out, lse, *ta.backward(go, q, k, v, [cap], out, lse, spec, 0, [False])[:3]]
    for g, e in zip(got, exp):
        assert torch.equal(g, e)
    if dtype == torch.float64 and value > 1:
        assert c32.item() == 1 + 2 ** -23
        trunc = ta.forward(q, k, v, [torch.tensor(1.0, device=DEVICE)], spec)
        assert not (torch.equal(trunc[0], got[0]) and torch.equal(trunc[1], got[1]))


def test_scalar_operand_placement():
    """launch._scalar: the tensor itself on the kernels' device; a CPU scalar with inputs
    elsewhere (torch.tensor(8.0) with CUDA inputs, eager allows it) a 0-dim tensor there (here
    the meta device); bool as its uint8 bytes; int64 through float64; complex refused, as float()
    refused it."""
    import fusion_pass.kernels.triton_attn.launch as launch
    c = torch.tensor(8.0)
    assert launch._scalar(c, c.device) is c
    moved = launch._scalar(c, torch.device("meta"))
    assert moved.device.type == "meta" and moved.dtype == torch.float32 and moved.dim() == 0
    b = launch._scalar(torch.tensor(True), torch.device("cpu"))
    assert b.dtype == torch.uint8 and int(b) == 1
    assert launch._scalar(torch.tensor(5, dtype=torch.int64), torch.device("cpu")).dtype == torch.float64
    with pytest.raises(TypeError):
        launch._scalar(torch.tensor(1 + 2j), torch.device("cpu"))


def test_predicate_support_and_fallback():
    """supports() is accurate: generated predicates run in-kernel; what the printer cannot write
    (a power, a rational factor) or a data tensor of the wrong rank goes back to materialising."""
    q = torch.randn(1, 2, 8, 32, device=DEVICE)
    ops = (ScoreOp("fill", "predicate", value=-math.inf, index=0),)
    ok = AttentionSpec(score_ops=ops, masks=(_mask_spec(sympy.Gt(_j, _i)),))
    assert ta.supports(q, q, q, ok) and ta.predicates_supported(ok, [])
    bad = AttentionSpec(score_ops=ops, masks=(_mask_spec(sympy.Gt(_j, _i ** 2)),))
    assert not ta.supports(q, q, q, bad) and not ta.predicates_supported(bad)  # no Pow
    # a float64 additive mask whose masked value fp32 cannot hold: materialised instead
    huge = AttentionSpec(score_ops=(ScoreOp("add", "predicate", index=0),), masks=(
        _mask_spec(sympy.Gt(_j, _i), kind="additive", masked=-1e300, dtype="float64"),))
    assert not ta.predicates_supported(huge)
    data = AttentionSpec(score_ops=ops, captured=("data",),
                         masks=(_mask_spec(sympy.Eq(_d0(_b, _j), 0), data=(0,)),))
    assert ta.predicates_supported(data, [torch.zeros(1, 8, dtype=torch.long)])
    assert not ta.predicates_supported(data, [torch.zeros(8, dtype=torch.long)])
    additive_fill = AttentionSpec(score_ops=ops, masks=(_mask_spec(sympy.Gt(_j, _i), kind="additive"),))
    assert not ta.supports(q, q, q, additive_fill)  # masked_fill reads a bool mask only
    from fusion_pass.kernels import ops as kops
    assert kops._triton_operands(q, q, [], ok)[0] is ok  # no materialised N x N mask
    spec_t, caps, _ = kops._triton_operands(q, q, [], huge)
    assert spec_t.masks == () and caps[0].shape[-2:] == (8, 8)


@pytest.mark.parametrize("nq,nk", [(75, 75), (40, 75), (64, 48)])
def test_linear_block_ranges_match_the_dense_evaluation(nq, nk, monkeypatch):
    """Causal, windows and KV-cache offsets (conjunctions of linear conditions) get their block
    ranges from per-row intervals in O(Nq), without evaluating the Nq x Nk predicate; they must
    equal the dense evaluation's (rows that keep no key included)."""
    n2, n3 = sympy.Symbol("n2", integer=True, nonnegative=True), sympy.Symbol("n3", integer=True, nonnegative=True)
    keeps = [sympy.Le(_j, _i), sympy.And(sympy.Le(_j, _i), sympy.Gt(_j, _i - 9)),
             sympy.Le(sympy.Abs(_j - _i), 5), sympy.Le(_j, _i + n3 - n2),
             sympy.And(sympy.Ge(_j, _i + 20), sympy.Le(_j, _i + 30))]  # rows near the end keep none
    for keep in keeps:
        for kind in ("add", "fill_not", "fill"):
            if kind == "add":
                m = _mask_spec(keep, kind="additive", masked=torch.finfo(torch.float32).min)
                op = ScoreOp("add", "predicate", index=0)
            else:
                m = _mask_spec(keep if kind == "fill_not" else sympy.Not(keep))
                op = ScoreOp(kind, "predicate", value=-math.inf, index=0)
            spec = AttentionSpec(score_ops=(ScoreOp("mul", "const", 0.25), op), masks=(m,))
            fast = ta.block_ranges(spec, [], (2, 3, nq, nk), 16, 16)
            monkeypatch.setattr(tr, "_linear_block_ranges", lambda *a, **k: None)
            dense = ta.block_ranges(spec, [], (2, 3, nq, nk), 16, 16)
            monkeypatch.undo()
            if isinstance(keep, sympy.Le) and keep.has(sympy.Abs):
                continue  # |j - i| <= 5 is not linear: the dense path served both
            assert torch.equal(fast[0].expand_as(dense[0]), dense[0]), (keep, kind)
            assert torch.equal(fast[1].expand_as(dense[1]), dense[1]), (keep, kind)


def test_biases_from_indices_reach_triton_materialised_with_the_slopes_gradient():
    """A spec with a bias x * y(i, j) (hand-written ALiBi, learnable slopes) and a causal predicate:
    on CUDA the Triton kernels get the dense x * y (their tensor operand) and the predicate; the
    backward maps the dense bias's gradient back to the slopes (sum of d dense * y). Checked here
    under the interpreter against the tiled CPU path, which computes the bias per tile."""
    from fusion_pass.kernels import cpu as cpu_path, ops as kops
    i_, j_ = _i, _j
    y = j_ - i_
    bias = predicate.BiasSpec(x=0, y=sympy.srepr(y), axes=AXES, text=str(y))
    m = _mask_spec(sympy.Le(j_, i_), kind="additive", masked=torch.finfo(torch.float32).min)
    spec = AttentionSpec(score_ops=(ScoreOp("mul", "const", 0.25), ScoreOp("add", "bias", index=0),
                                    ScoreOp("add", "predicate", index=0)),
                         captured=("tensor",), biases=(bias,), masks=(m,))
    torch.manual_seed(3)
    B, H, N, D = 2, 3, 40, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    slopes = torch.rand(H, 1, 1) * 0.5
    ts, tcap, origin = kops._triton_operands(q, k, [slopes], spec)
    assert not ts.biases and [o[0] for o in origin] == ["captured", "bias"]
    out, lse = ta.forward(q, k, v, tcap, ts, 0)
    ref_out, _ = cpu_path.attention_forward(q, k, v, [slopes], spec)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out)
    dq, dk, dv, dcap = kops._triton_backward(g, q, k, v, [slopes], out, lse, spec, ts, tcap, origin, 0,
                                             [True])
    rq, rk, rv, rcap = cpu_path.attention_backward(g, q, k, v, [slopes], ref_out, lse, spec, 0, [True])
    for a, b in ((dq, rq), (dk, rk), (dv, rv), (dcap[0], rcap[0])):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_block_ranges_from_data_are_shared_until_the_data_changes():
    """Layers reading the same padding mask share one evaluation; an in-place change of the mask
    (its version counter) or another tensor recomputes it."""
    m = _mask_spec(sympy.And(sympy.Le(_j, _i), sympy.Ne(_d0(_b, _j), 0)), data=(0,))
    spec = AttentionSpec(score_ops=(ScoreOp("fill_not", "predicate", value=-math.inf, index=0),),
                         captured=("data",), masks=(m,))
    am = torch.ones(2, 50, dtype=torch.long)
    am[0, 40:] = 0
    first = ta.block_ranges(spec, [am], (2, 3, 50, 50), 16, 16)
    assert ta.block_ranges(spec, [am], (2, 3, 50, 50), 16, 16) is first
    am[1, 30:] = 0  # in place: a new version
    again = ta.block_ranges(spec, [am], (2, 3, 50, 50), 16, 16)
    assert again is not first and not torch.equal(again[0], first[0])
    other = am.clone()
    assert ta.block_ranges(spec, [other], (2, 3, 50, 50), 16, 16) is not again


@pytest.mark.skipif(not INTERPRET, reason="conftest.py's patch skip is for the interpreter only")
def test_interpreter_patch_skip_gives_the_same_bits(monkeypatch):
    """conftest.py skips the interpreter's repeated patching of triton.language by the helpers a
    launch calls (it halves an interpreted kernel's time): a kernel computes the same bits with
    the skip as with every patch made, forward and backward, on a chain reaching the helpers of
    tl and tl.core (sum, max, cdiv, zeros: a cast, a fill_not, a scalar and a tensor gradient)."""
    from triton.runtime import interpreter as ti
    fast = ti._patch_lang
    if not getattr(fast, "skips_repeats", False):
        pytest.skip("this Triton's interpreter is not the one conftest.py's skip reads")
    patched = []
    real_builtin = ti._patch_builtin
    monkeypatch.setattr(ti, "_patch_builtin", lambda *a: patched.append(1) or real_builtin(*a))
    B, H, nq, nk, d = 1, 2, 21, 29, 16
    runs = []
    for patch in (fast, fast.real):
        monkeypatch.setattr(ti, "_patch_lang", patch)
        torch.manual_seed(0)
        ops, kinds, captured, needs_grad, _ = _pattern_mixed(B, H, nq, nk, d, torch.float32)
        spec = _spec(ops, kinds, torch.float32)
        q, k, v, go = (torch.randn(B, H, n, d, device=DEVICE) for n in (nq, nk, nk, nq))
        n0 = len(patched)
        out, lse = ta.forward(q, k, v, captured, spec, seed=0)
        dq, dk, dv, dcap = ta.backward(go, q, k, v, captured, out, lse, spec, 0, needs_grad)
        runs.append(([out, lse, dq, dk, dv] + [g for g in dcap if g is not None], len(patched) - n0))
    (skipped, n_skip), (full, n_full) = runs
    assert len(skipped) == len(full) == 7 and n_skip < n_full / 10  # the skip is in effect
    for a, b in zip(skipped, full):
        assert a.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


# ---------------------------------------------------------------------------------------------
# Pointwise score functions and SDPA's safe softmax: the Triton kernels against cpu.py
# ---------------------------------------------------------------------------------------------

def _against_cpu(spec, captured, needs_grad, B=2, H=2, nq=21, nk=29, d=16, atol=2e-5):
    torch.manual_seed(1)
    q, k, v = (torch.randn(B, H, n, d, device=DEVICE) for n in (nq, nk, nk))
    grad_out = torch.randn(B, H, nq, d, device=DEVICE)
    assert ta.supports(q, k, v, spec)
    out, lse = ta.forward(q, k, v, captured, spec, seed=0)
    got = ta.backward(grad_out, q, k, v, captured, out, lse, spec, 0, needs_grad)
    ref_out, ref_lse = cpu.attention_forward(q.cpu(), k.cpu(), v.cpu(), [c.cpu() for c in captured], spec)
    want = cpu.attention_backward(grad_out.cpu(), q.cpu(), k.cpu(), v.cpu(), [c.cpu() for c in captured],
                                  ref_out, ref_lse, spec, 0, needs_grad)
    assert torch.allclose(out.cpu(), ref_out, atol=atol, equal_nan=True)
    for g, w in zip(got[:3], want[:3]):
        assert torch.allclose(g.cpu(), w, atol=10 * atol, equal_nan=True)
    for g, w in zip(got[3], want[3]):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.allclose(g.cpu(), w, atol=10 * atol, rtol=1e-4)
    return out


@pytest.mark.parametrize("fn,args", [("gelu", (False,)), ("gelu", (True,)), ("sin", ()),
                                     ("clamp", (-1.0, 1.5)), ("softplus", (2.0, 20.0)),
                                     ("mul_self", ()), ("sigmoid", ()), ("abs", ())],
                         ids=lambda a: str(a))
def test_pointwise_score_functions_match_cpu(fn, args):
    """The forward printed from the function's sympy form and the backward from its sympy
    derivative agree with the CPU path (the model's own op, its derivative evaluated on tiles),
    including the gradient of a learnable bias added after the function."""
    ops = (ScoreOp("mul", "const", value=0.3), ScoreOp("fn", fn=fn, args=args),
           ScoreOp("add", "tensor", index=0))
    spec = AttentionSpec(score_ops=ops, captured=("tensor",))
    bias = torch.randn(1, 2, 21, 29, device=DEVICE)
    _against_cpu(spec, [bias], [True])
    assert f"{fn}(" in ta.generate_source(spec) or fn in ("mul_self",) or "tl." in ta.generate_source(spec)


def test_safe_softmax_rows_of_only_minus_inf_are_zero():
    """SDPA's safe softmax: a fully masked row gives 0 (and no gradient), not NaN."""
    keep = torch.rand(2, 1, 21, 29, device=DEVICE) < 0.6
    keep[0, 0, 3] = False  # one fully masked row
    ops = (ScoreOp("mul", "const", value=0.25), ScoreOp("fill_not", "none", value=-math.inf, index=0))
    spec = AttentionSpec(score_ops=ops, captured=("tensor",), safe_softmax=True)
    out = _against_cpu(spec, [keep], [False])
    assert (out[0, :, 3] == 0).all() and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# The real GPU tiles under the interpreter (issue 15): target_arch makes the launchers choose the
# architecture's tile table (128 x 128 / 128 x 64 forward, 64 x 64 / 32 x 32 backward) instead of
# the interpreter's 16 x 16, so tiling bugs that only show with large tiles (full-tile path, the
# causal split, d = 256, ragged last blocks of 128 rows) are caught without a GPU.
# ---------------------------------------------------------------------------------------------

def _run_at_gpu_tiles(arch, pattern, d, n, dtype=torch.bfloat16):
    with ta.target_arch(arch):
        bm, bn = ta._blocks(d, d, False, dtype)[:2]
        bbm, bbn = ta._blocks(d, d, True, dtype)[:2]
        assert bm >= 32 and n > bm  # several query blocks, a ragged last one
        if pattern == "causal":
            torch.manual_seed(23)
            ops = (ScoreOp("mul", "const", value=d ** -0.5),
                   ScoreOp("fill", "predicate", value=-math.inf, index=0))
            spec, *_ = _pred_run(ops, (), [], [], [_mask_spec(sympy.Gt(_j, _i))],
                                 lambda s, c, M: (s * d ** -0.5).masked_fill(M[0], -math.inf),
                                 dtype=dtype, B=1, H=2, nq=n, nk=n, d=d)
            rows, _ = ta.block_ranges(spec, [], (1, 2, n, n), bm, bn)
            assert rows[0, 0, 0].tolist() == [0, bm // bn]  # the first query block skips the rest
        else:
            _run(pattern, dtype, B=1, H=2, nq=n, nk=n + 7, d=d)
    return (bm, bn), (bbm, bbn)


def test_gpu_tiles_causal_hopper_d128():
    # default run: one case at Hopper's forward tiles (128 x 128), d = 128
    fwd, bwd = _run_at_gpu_tiles(90, "causal", 128, 300)
    assert fwd == (128, 128) and bwd == (64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("arch,pattern,d,n", [
    (90, "plain", 128, 577),     # N > 512, ragged
    (90, "causal", 256, 600),    # d = 256: 128 x 64 forward
    (80, "softcap", 128, 520),   # Ampere's 128 x 64 forward, 32 x 32 backward
    (90, "bias", 256, 530),      # learnable bias gradient at 128 x 64 backward tiles
    (80, "bias", 256, 300),      # Ampere's d = 256: 32 x 64 forward, 16 x 32 backward
])
def test_gpu_tiles_large(arch, pattern, d, n):
    _run_at_gpu_tiles(arch, pattern, d, n)


# ---------------------------------------------------------------------------------------------
# Decode: the split-KV kernels (attn_decode + attn_decode_combine) for Nq <= 16 over a long cache
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["plain"] + [
    pytest.param(p, marks=_SLOW_HERE) for p in ("mixed", "bias", "mask_inf", "softcap")])
def test_decode_split_kv_patterns(pattern):
    # 6 queries over 300 keys: 19 key blocks of 16 in 10 splits (the last one short); the
    # backward (the regular kernels) reads the lse the decode kernels combined
    B, H, nq, nk, d = 2, 3, 6, 300, 40
    assert ta.decode_plan(B, H, 1, nq, nk, d, d, _spec((), (), torch.float32)) is not None
    out = _run(pattern, torch.float32, B=B, H=H, nq=nq, nk=nk, d=d)
    if pattern == "mask_inf":  # row 5 of batch 0 keeps no key
        assert torch.isnan(out[0, :, 5]).all() and not torch.isnan(out[1]).any()


@slow_here  # seconds under the interpreter; GQA decode stays in the default run via "plain"
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_decode_grouped_query_reads_each_kv_head_once(dtype):
    """GQA decode: the 4 query heads x 2 queries of a K/V head are one tile of 8 rows; against
    float64 repeat_kv, with the KV-cache's causal offset as a predicate (query i sees keys
    j <= i + Nk - Nq) and a per-head bias (ALiBi-like: the rows of a tile belong to different
    heads), forward and backward."""
    torch.manual_seed(31)
    B, H, HK, nq, nk, d = 1, 8, 2, 2, 517, 64
    n2, n3 = _n[2], _n[3]
    m = _mask_spec(sympy.Gt(_j, _i + n3 - n2))
    ops = (ScoreOp("mul", "const", value=d ** -0.5), ScoreOp("add", "tensor", index=0),
           ScoreOp("fill", "predicate", value=-math.inf, index=0))
    n = dtype_name(dtype)
    spec = AttentionSpec(score_ops=ops, captured=("tensor",), masks=(m,), qk_dtype=n,
                         softmax_dtype=n, prob_dtype=n, out_dtype=n)
    slopes = torch.arange(1, H + 1, device=DEVICE, dtype=torch.float32).reshape(1, H, 1, 1) / 512
    bias = (-slopes * (nk - 1 - torch.arange(nk, device=DEVICE)).reshape(1, 1, 1, nk)).expand(1, H, nq, nk)
    bias = bias.to(dtype).contiguous()
    q = torch.randn(B, H, nq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(B, HK, nk, d, device=DEVICE, dtype=dtype)
    v = torch.randn(B, HK, nk, d, device=DEVICE, dtype=dtype)
    assert ta.supports(q, k, v, spec)
    plan = ta.decode_plan(B, H, H // HK, nq, nk, d, d, spec)
    assert plan is None or plan[0] == 16  # 4 heads x 2 queries, padded
    out, lse = ta.forward(q, k, v, [bias], spec)
    go = torch.randn_like(out)
    dq, dk, dv, _ = ta.backward(go, q, k, v, [bias], out, lse, spec, 0, [False])
    keep = predicate.materialize(m, (B, H, nq, nk), [])

    def eager(t):
        qr, kr, vr = (x.detach().to(t).requires_grad_() for x in (q, k, v))
        s = (qr @ kr.repeat_interleave(H // HK, 1).transpose(-1, -2)) * d ** -0.5 + bias.to(t)
        o = torch.softmax(s.masked_fill(keep, -math.inf), -1) @ vr.repeat_interleave(H // HK, 1)
        o.backward(go.to(t))
        return o.detach(), qr.grad, kr.grad, vr.grad

    ref, low = eager(torch.float64), eager(dtype)
    for name, g, e, r in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), low, ref):
        _check_close(name, g, e, r, dtype)
    s = (q.double() @ k.double().repeat_interleave(H // HK, 1).transpose(-1, -2)) * d ** -0.5 + bias.double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(s.masked_fill(keep, -math.inf), -1),
                               rtol=1e-5, atol=1e-3)


def test_decode_fully_masked_rows_follow_eager_and_safe_softmax():
    # a row whose every key is masked: NaN as eager's softmax (lse NaN), or SDPA's safe softmax
    # (0 and lse +inf), across splits that all hold only -inf
    q = torch.randn(1, 2, 2, 32, device=DEVICE)
    k = torch.randn(1, 2, 400, 32, device=DEVICE)
    m = _mask_spec(sympy.Eq(_i, 0))  # query 0 keeps nothing
    ops = (ScoreOp("fill", "predicate", value=-math.inf, index=0),)
    for safe in (False, True):
        spec = AttentionSpec(score_ops=ops, masks=(m,), safe_softmax=safe)
        assert ta.decode_plan(1, 2, 1, 2, 400, 32, 32, spec) is not None
        out, lse = ta.forward(q, k, k, [], spec)
        ref = torch.softmax((q @ k.transpose(-1, -2)), -1) @ k
        torch.testing.assert_close(out[:, :, 1], ref[:, :, 1], atol=1e-5, rtol=1e-5)
        if safe:
            assert (out[:, :, 0] == 0).all() and torch.isposinf(lse[:, :, 0]).all()
        else:
            assert torch.isnan(out[:, :, 0]).all() and torch.isnan(lse[:, :, 0]).all()


# ---------------------------------------------------------------------------------------------
# float16 overflow: eager's float16 scores past 65504 are +-inf (then NaN rows); the kernels'
# fp32 scores must become the same +-inf (codegen: qk_round and the chain's overflow tests)
# ---------------------------------------------------------------------------------------------

def _fp16_case(case, nq=24, nk=40, d=16):
    """(spec, captured, eager chain, q, k, v) of a float16 case whose raw scores (or a chain
    step's float16 result) pass 65520 in some entries: every third query row is ~90x larger,
    keys ~90x (|q.k| up to ~2e5), the other rows stay moderate."""
    torch.manual_seed(0)
    f16, scale = torch.float16, d ** -0.5
    rs = torch.ones(nq)
    rs[::3] = 90.0
    q = (torch.randn(1, 2, nq, d) * rs[:, None]).to(f16)
    k = (torch.randn(1, 2, nk, d) * 90.0).to(f16)
    v = torch.randn(1, 2, nk, d).to(f16)
    mul = ScoreOp("mul", "const", value=scale, dtype="float16")
    masks, captured = (), []
    if case == "scale":
        ops, chain = (mul,), lambda s, c: s * scale
    elif case == "causal":
        ops = (mul, ScoreOp("fill", "predicate", value=-math.inf, index=0, dtype="float16"))
        masks = (_mask_spec(sympy.Not(sympy.Le(_j, _i))),)
        tri = torch.ones(nq, nk, dtype=torch.bool).triu(1)
        chain = lambda s, c: (s * scale).masked_fill(tri, -math.inf)
    elif case == "scale8":
        # q.k itself stays below 65520 (keys ~9x): the step s * 8 overflows (its threshold is
        # tested on the raw product, before log2(e) is folded into 8)
        k = (k.float() / 10).to(f16)
        ops, chain = (ScoreOp("mul", "const", value=8.0, dtype="float16"),), lambda s, c: s * 8.0
    else:  # "bias": a float16 bias near the ends of the range; s * scale + bias overflows
        k = (k.float() / 10).to(f16)
        bias = torch.zeros(1, 2, nq, nk)
        bias[..., 1::4], bias[..., 3::4] = 65000.0, -65000.0
        bias = bias.to(f16)
        ops = (mul, ScoreOp("add", "tensor", index=0, dtype="float16"))
        captured, chain = [bias], lambda s, c: s * scale + c[0]
    spec = AttentionSpec(score_ops=ops, captured=("tensor",) if captured else (), masks=masks,
                         qk_dtype="float16", softmax_dtype="float16", prob_dtype="float16",
                         out_dtype="float16")
    return spec, captured, chain, q, k, v


def _fp16_eager(q, k, v, captured, chain, go):
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    s = chain(qr @ kr.transpose(-1, -2), captured)
    out = torch.softmax(s, -1) @ vr
    out.backward(go)
    return out.detach(), s.detach(), qr.grad, kr.grad, vr.grad


@pytest.mark.parametrize("case", ["scale", "causal", "scale8", "bias"])
def test_float16_scores_overflow_as_in_eager(case):
    """Scores past float16's range: +-inf as eager float16 holds them, so the rows eager turns into
    NaN (a +inf score: inf - inf) are NaN here too, and a -inf one (alone) only drops its key.
    Forward out and lse, backward dq/dk/dv: NaN/inf pattern identical to eager's."""
    spec, captured, chain, q, k, v = _fp16_case(case)
    go = torch.randn(q.shape, dtype=torch.float16)
    out_e, s_e, dq_e, dk_e, dv_e = _fp16_eager(q, k, v, captured, chain, go)
    assert s_e.isposinf().any() and s_e.isneginf().any()  # the case overflows both ways
    assert out_e.isnan().any() and not out_e.isnan().all()
    # the values: eager's +-inf entries, elsewhere the chain on fp32 scores (eager's float16
    # rounding of scores in the thousands moves the probabilities by more than any tolerance)
    s_ref = chain(q.float() @ k.float().transpose(-1, -2), [c.float() for c in captured])
    s_ref = torch.where(s_e.isinf(), s_e.float(), s_ref)
    out_ref = torch.softmax(s_ref, -1) @ v.float()
    out, lse = ta.forward(q, k, v, captured, spec, seed=0)
    assert torch.equal(out.isnan(), out_e.isnan())
    torch.testing.assert_close(out.float(), out_ref, equal_nan=True, atol=1e-2, rtol=1e-2)
    # lse: NaN on the rows with a +inf score (as cpu.py's), else the log-sum-exp
    nan_rows = out_e.isnan().all(-1)
    assert torch.equal(lse.isnan(), nan_rows)
    torch.testing.assert_close(lse[~nan_rows], torch.logsumexp(s_ref, -1)[~nan_rows],
                               rtol=1e-4, atol=1e-3)
    dq, dk, dv, _ = ta.backward(go, q, k, v, captured, out, lse, spec, 0, [False] * len(captured))
    for name, g, e in (("dq", dq, dq_e), ("dk", dk, dk_e), ("dv", dv, dv_e)):
        assert torch.equal(g.isnan(), e.isnan()), name
        assert torch.equal(g.isinf(), e.isinf()), name
    # one query row (the split-KV decode kernel): a +inf row and a finite one (causal: the one
    # row would be query 0 of its own call)
    for row in (0, 1) if case != "causal" else ():
        o1, l1 = ta.forward(q[:, :, row:row + 1], k, v, [c[:, :, row:row + 1] for c in captured],
                            spec, seed=0)
        assert torch.equal(o1.isnan(), out_e[:, :, row:row + 1].isnan()), row
        torch.testing.assert_close(o1.float(), out_ref[:, :, row:row + 1], equal_nan=True,
                                   atol=1e-2, rtol=1e-2)


def test_float16_scores_just_below_the_overflow_stay_finite():
    """Scores up to 65024 (exact in float16, below the 65520 rounding threshold): finite, as in
    eager, and close to eager's (integer-valued q and k, so eager's float16 scores are exact)."""
    torch.manual_seed(0)
    nq, nk, d = 24, 40, 16
    q = (8 * torch.randint(-8, 9, (1, 2, nq, d))).to(torch.float16)
    k = (8 * torch.randint(-8, 9, (1, 2, nk, d))).to(torch.float16)
    q[0, 0, 0] = 64.0
    k[0, 0, 5] = 64.0
    k[0, 0, 5, 0] = 56.0  # q0 . k5 = 64 * (64 * 15 + 56) = 65024
    v = torch.randn(1, 2, nk, d).to(torch.float16)
    s = q.float() @ k.float().transpose(-1, -2)
    assert s.abs().max() == 65024.0
    spec = AttentionSpec(score_ops=(ScoreOp("mul", "const", value=0.25, dtype="float16"),),
                         qk_dtype="float16", softmax_dtype="float16", prob_dtype="float16",
                         out_dtype="float16")
    go = torch.randn(q.shape, dtype=torch.float16)
    out_e, _, dq_e, dk_e, dv_e = _fp16_eager(q, k, v, [], lambda s, c: s * 0.25, go)
    out, lse = ta.forward(q, k, v, [], spec, seed=0)
    dq, dk, dv, _ = ta.backward(go, q, k, v, [], out, lse, spec, 0, [])
    for g, e in ((out, out_e), (dq, dq_e), (dk, dk_e), (dv, dv_e)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.float(), e.float(), rtol=1e-2, atol=2e-2 * e.abs().max().item())
