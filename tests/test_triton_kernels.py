"""The generated Triton attention kernels against a float64 PyTorch reference, forward and backward.

Runs compiled on a GPU and under TRITON_INTERPRET=1 on CPU (conftest.py sets the switch), the same
tests in both modes. Tolerances follow FlashAttention's rule: the kernel's error against the
float64 reference is at most twice the error of eager PyTorch in the same dtype, plus a small atol.
Shapes are odd on purpose (Nq=37, Nk=53, head dim 40) so every tile has a ragged edge.
"""
import math

import pytest
import torch

from conftest import DEVICE
from fusion_pass.kernels import cpu
from fusion_pass.kernels import triton_attention as ta
from fusion_pass.kernels.dropout import keep_mask
from fusion_pass.kernels.spec import AttentionSpec, ScoreOp, dtype_name

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
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


def _check_close(name, got, eager, ref, dtype):
    assert got.shape == ref.shape, name
    assert got.dtype == eager.dtype, name
    e_got, e_eager = _err(got, ref), _err(eager, ref, strict=False)
    assert e_got <= 2 * e_eager + ATOL[dtype], \
        f"{name}: kernel error {e_got:.3g} > 2 x eager {dtype} error {e_eager:.3g} + {ATOL[dtype]}"


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
        _check_close(f"dcaptured[{i}]", g, e.to(g.dtype), r, dtype)
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

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_patterns(pattern, dtype):
    out = _run(pattern, dtype)
    if pattern == "mask_inf":
        assert torch.isnan(out[0, :, 5]).all() and not torch.isnan(out[1]).any()
    if pattern == "mask_finfo_min":
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("d", [16, 64])  # 40 runs in test_patterns
def test_head_dims(d):
    _run("plain", torch.float16, d=d)


def test_value_head_dim_differs():
    _run("bias", torch.float32, d=64, dv=24)


def test_decode_single_query():
    _run("bias", torch.float16, nq=1, nk=53, d=64)


def test_noncontiguous_inputs():
    # q, k, v as the (B, N, H, D) projections most models transpose into (B, H, N, D)
    def make(dtype):
        q = torch.randn(2, 37, 3, 40, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(2, 53, 3, 40, device=DEVICE, dtype=dtype).transpose(1, 2)
        v = torch.randn(2, 3, 40, 53, device=DEVICE, dtype=dtype).transpose(-1, -2)
        return q, k, v
    _run("mask_inf", torch.float32, make_qkv=make)


@pytest.mark.parametrize("rank", [2, 3])
def test_low_rank_inputs(rank):
    shape = (3,) * (rank - 2)

    def make(dtype):
        return (torch.randn(*shape, 37, 40, device=DEVICE, dtype=dtype),
                torch.randn(*shape, 53, 40, device=DEVICE, dtype=dtype),
                torch.randn(*shape, 53, 40, device=DEVICE, dtype=dtype))
    def bias_2d(B, H, nq, nk, d, dtype):  # (Nq, Nk): broadcasts over every batch dim
        ops = (ScoreOp("mul", "const", value=d ** -0.5), ScoreOp("add", "tensor", index=0))
        bias = torch.randn(nq, nk, device=DEVICE, dtype=dtype)
        return ops, ("tensor",), [bias], [True], lambda s, c: s * d ** -0.5 + c[0]
    _run(bias_2d, torch.float32, make_qkv=make)


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


# plain: delta from dO * O; bias: the backward's row-statistics pass (a tensor operand);
# p = 0.6 puts the keep threshold above 2^31
@pytest.mark.parametrize("pattern,p", [(_pattern_plain, 0.6), (_pattern_bias, 0.3)],
                         ids=["plain-p0.6", "bias-p0.3"])
def test_dropout_matches_cpu(pattern, p):
    spec, q, k, v, captured, needs_grad = _dropout_case(p=p, pattern=pattern)
    seed = 987654321
    out, lse = ta.forward(q, k, v, captured, spec, seed)
    out_c, lse_c = cpu.attention_forward(q, k, v, captured, spec, seed)
    torch.testing.assert_close(out, out_c, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, lse_c, atol=2e-5, rtol=1e-5)
    go = torch.randn_like(out)
    got = ta.backward(go, q, k, v, captured, out, lse, spec, seed, needs_grad)
    exp = cpu.attention_backward(go, q, k, v, captured, out_c, lse_c, spec, seed, needs_grad)
    for g, e in zip(got[:3] + tuple(got[3]), exp[:3] + tuple(exp[3])):
        torch.testing.assert_close(g, e, atol=5e-5, rtol=1e-4)
    # another seed draws another mask
    assert not torch.allclose(ta.forward(q, k, v, captured, spec, seed + 1)[0], out)


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
    assert "def score_mod(s, c0, c1, c2):" in src
    assert "s = tl.where(c2 != 0, s, -10000.0)" in src  # fill_not, inline
    assert "dc1 = -ds * s0 / (c1 * c1)" in src  # d/d(divisor) of s / c1
    assert "tl.atomic" not in src  # deterministic backward
    compile(src, "<generated>", "exec")
