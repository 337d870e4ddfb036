"""The CPU paths of fusion_pass::attention beyond the shared kernel suite (test_kernel_paths.py,
which runs every score chain x shape x dtype on each kernel path): exact float64, grouped heads,
determinism, dropout's mask regeneration, the custom ops checked with opcheck, the tiled path's
skipping and bitwise fills. Tiles are forced small so every test crosses tile boundaries."""
import math

import pytest
import torch

import fusion_pass

from fusion_pass.kernels import AttentionSpec, ScoreOp, cpu, cpu_flash, fused_attention
from fusion_pass.kernels.ops import kernel_summary
from fusion_pass.kernels.dropout import keep_mask, threshold

@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 16 * 40)


@pytest.fixture(params=["fast-path", "tiled"])
def cpu_path(request, monkeypatch):
    """Run a test on ATen's flash kernel where the spec allows it, and again on the tiled path."""
    if request.param == "tiled":
        monkeypatch.setattr(cpu_flash, "usable", lambda *a, **k: None)
    return request.param


@pytest.fixture
def tiled_small_spans(monkeypatch):
    """The tiled path only (ATen's kernel refused), with 32-row query blocks and 32 x 40 span
    tiles, so a mask's key spans cross tile boundaries."""
    monkeypatch.setattr(cpu_flash, "usable", lambda *a, **k: None)
    monkeypatch.setattr(cpu, "Q_BLOCK", 32)
    monkeypatch.setattr(cpu, "SPAN_TILE_ELEMENTS", 32 * 40)


def _spec(ops, captured, dtype, **kw):
    n = str(dtype).replace("torch.", "")
    ops = tuple(ScoreOp(**{**o, "dtype": n}) for o in ops)
    return AttentionSpec(score_ops=ops, captured=captured, qk_dtype=n, softmax_dtype=n,
                         prob_dtype=n, out_dtype=n, **kw)


def test_float64_is_exact_and_bias_gradient():
    q, k, v = (torch.randn(2, 3, 29, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(3, 29, 29, dtype=torch.float64, requires_grad=True)   # broadcast over batch
    scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)       # learnable temperature
    spec = _spec([dict(kind="mul", operand="scalar", index=0), dict(kind="add", operand="tensor", index=1)],
                 ("scalar", "tensor"), torch.float64)
    out = fused_attention(q, k, v, [scale, bias], spec)
    ref = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, -1) @ v
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias, scale), g)
    want = torch.autograd.grad(ref, (q, k, v, bias, scale), g)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10)


def test_empty_sequences():
    spec = _spec([dict(kind="mul", operand="const", value=0.5)], (), torch.float32)
    q, k, v = torch.randn(2, 3, 0, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    assert fused_attention(q, k, v, [], spec).shape == (2, 3, 0, 8)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 0, 8), torch.randn(2, 3, 0, 8)
    out = fused_attention(q, k, v, [], spec)
    assert torch.equal(out, torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


def test_bad_inputs_are_clear_errors():
    spec = _spec([dict(kind="add", operand="tensor", index=0)], ("tensor",), torch.float32)
    q = torch.randn(2, 3, 4, 8)
    with pytest.raises(ValueError, match="broadcast"):
        fused_attention(q, q, q, [torch.randn(5, 4, 4)], spec)
    with pytest.raises(ValueError, match="equal batch dims"):
        fused_attention(q, torch.randn(2, 1, 4, 8), q, [torch.randn(4, 4)], spec)
    with pytest.raises(ValueError, match="captured"):
        fused_attention(q, q, q, [], spec)
    with pytest.raises(ValueError, match="dropout probability"):
        AttentionSpec(dropout_p=1.0)


def test_dropout_statistics_and_mask_regeneration():
    torch.manual_seed(0)
    p = 0.3
    idx = torch.arange(200_000)
    kept = keep_mask(1234, idx, p).float().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / idx.numel())
    assert threshold(0.0) == 0  # p = 0 keeps everything
    # the backward regenerates the forward's mask: compare with autograd through that same mask
    q, k, v = (torch.randn(2, 3, 21, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    spec = _spec([dict(kind="mul", operand="const", value=0.35)], (), torch.float64, dropout_p=p)
    out, lse, seed = torch.ops.fusion_pass.attention(q, k, v, [], spec.to_key())
    flat = torch.arange(2 * 3 * 21 * 21).view(2, 3, 21, 21)
    keep = keep_mask(int(seed), flat, p)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.35, -1)
    ref = (probs * keep / (1 - p)) @ v
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-10)
    # a new call draws a new seed (from torch's generator), so a different mask
    _, _, seed2 = torch.ops.fusion_pass.attention(q, k, v, [], spec.to_key())
    assert int(seed2) != int(seed)


def test_backward_is_deterministic(cpu_path):
    q, k, v = (torch.randn(2, 2, 45, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 45, 45, requires_grad=True)
    spec = _spec([dict(kind="add", operand="tensor", index=0)], ("tensor",), torch.float32)
    g = torch.randn(2, 2, 45, 16)
    first = torch.autograd.grad(fused_attention(q, k, v, [bias], spec), (q, k, v, bias), g)
    for _ in range(3):
        again = torch.autograd.grad(fused_attention(q, k, v, [bias], spec), (q, k, v, bias), g)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_opcheck():
    q, k, v = (torch.randn(2, 3, 11, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 11, 11, requires_grad=True)
    spec = _spec([dict(kind="mul", operand="const", value=0.5), dict(kind="add", operand="tensor", index=0)],
                 ("tensor",), torch.float32)
    torch.library.opcheck(torch.ops.fusion_pass.attention.default, (q, k, v, [bias], spec.to_key()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads_major", [False, True])
def test_tiled_path_writes_the_op_layout_without_a_copy(dtype, heads_major):
    """The tiled forward's output and backward's gradients are allocated in the layouts the op
    promises (``layout``), so the op returns them as they are: a copy there cost three
    gradient-sized blocks at the backward's peak (window fwd+bwd, N = 2048: 42 -> 30 MiB)."""
    from fusion_pass.kernels import layout
    B, H, N, D = 2, 3, 37, 16
    if heads_major:  # heads split off a (B, N, H * D) projection, as models' q, k, v are
        q, k, v = (torch.randn(B, N, H, D, dtype=dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, H, N, D, dtype=dtype) for _ in range(3))
    bias = torch.randn(1, H, N, N, dtype=dtype)
    spec = _spec([dict(kind="mul", operand="const", value=0.25), dict(kind="add", operand="tensor", index=0)],
                 ("tensor",), dtype)
    out, lse = cpu.attention_forward(q, k, v, [bias], spec)
    assert layout.in_out_layout(out, q) is out
    g = torch.randn(out.shape, dtype=dtype)
    dq, dk, dv, _ = cpu.attention_backward(g, q, k, v, [bias], out, lse, spec)
    for grad in (dq, dk, dv):
        assert layout.in_grad_layout(grad) is grad and grad.dtype == dtype
    # the same values as eager
    ref_q, ref_k, ref_v = (t.double().requires_grad_() for t in (q, k, v))
    ref = torch.softmax(ref_q @ ref_k.transpose(-1, -2) * 0.25 + bias.double(), -1) @ ref_v
    want = torch.autograd.grad(ref, (ref_q, ref_k, ref_v), g.double())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    for got, w in zip((dq, dk, dv), want):
        torch.testing.assert_close(got.double(), w, **tol)


def test_tiles_never_hold_the_full_score_matrix(monkeypatch):
    """O(N * block) memory: no tile is Nq x Nk once the problem is larger than one tile."""
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 1 << 19)
    seen = []
    for h0, h1, q0, q1 in cpu._tiles(12, 4096, 4096):
        seen.append((h1 - h0) * (q1 - q0) * 4096)
    assert max(seen) <= cpu.TILE_ELEMENTS and max(seen) < 4096 * 4096


def test_fast_path_is_taken_only_for_its_exact_function():
    f32 = torch.float32
    q = torch.randn(2, 3, 8, 16)
    scale_bias = _spec([dict(kind="mul", operand="const", value=0.25),
                        dict(kind="add", operand="tensor", index=0)], ("tensor",), f32)
    assert cpu_flash.usable(scale_bias, q, q, q, [torch.zeros(2, 1, 1, 8)]) is not None
    # a mask that removes every key of a row: eager gives NaN, ATen's kernel 0 -> tiled path
    assert cpu_flash.usable(scale_bias, q, q, q, [torch.full((8,), -math.inf)]) is None
    # ... and one whose keys all carry finfo.min (HF's left padding): ATen's forward is exact, but
    # its saved lse loses its log-sum next to 1e38 and its backward would go wrong -> tiled backward
    padded = torch.zeros(2, 1, 8, 8)
    padded[1, :, :3] = torch.finfo(torch.float32).min
    call = cpu_flash.usable(scale_bias, q, q, q, [padded])
    _, lse = cpu_flash.forward(q, q, q, call.scale, call.mask, call.causal)
    assert cpu_flash.rows_ok(call, lse, 8) and not cpu_flash.rows_ok(call, lse, 8, backward=True)
    # inputs that are not finite: the tiled path, which applies the model's steps as eager does
    assert cpu_flash.usable(scale_bias, q.masked_fill(q > 2, math.nan), q, q, [padded]) is None
    # bias after a soft-cap, dropout: not ATen's function
    softcap = _spec([dict(kind="tanh"), dict(kind="add", operand="tensor", index=0)], ("tensor",), f32)
    drop = _spec([], (), f32, dropout_p=0.1)
    for spec, caps in ((softcap, [torch.zeros(8, 8)]), (drop, [])):
        assert cpu_flash.usable(spec, q, q, q, caps) is None
    # a finite replacing fill: ATen's kernel under the removal rule (dropped elements at most -1e4,
    # rows checked on the lse), the tiled path when the inputs are not finite
    fill = _spec([dict(kind="fill", index=0, value=-1e4)], ("tensor",), f32)
    some = torch.ones(8, 8, dtype=torch.bool).triu_(3)  # every row keeps a key
    call = cpu_flash.usable(fill, q, q, q, [some])
    assert call is not None and call.removal is not None and call.worst == -1e4
    assert cpu_flash.usable(fill, q, q, q * math.inf, [some]) is None
    # a call whose mask masks nothing (a decoding row against its whole cache): ATen's kernel with
    # no mask is the model's function whatever the fill; no bound, no row check but the lse's
    # finiteness; inputs that are not finite still go to the tiled path
    none = torch.zeros(8, 8, dtype=torch.bool)
    call = cpu_flash.usable(fill, q, q, q, [none])
    assert (call.scale, call.mask, call.causal, call.removal) == (1.0, None, False, None), call
    assert call.rows_certain, call
    assert cpu_flash.usable(fill, q, q, q * math.inf, [none]) is None
    assert cpu_flash.usable(fill, q, q, q, [none], grad_out=q.masked_fill(q > 1, math.nan)) is None
    assert "ATen flash" in kernel_summary(scale_bias) and "tiled" in kernel_summary(softcap)


@pytest.mark.parametrize("magnitude", [1.0, 1e3, 1e18, 1e19, 1e30])
@pytest.mark.parametrize("fill", [-1e4, float(torch.finfo(torch.float32).min), -math.inf])
def test_a_call_that_masks_nothing_is_eager_at_any_magnitude(magnitude, fill):
    """A decoding row against its whole cache: the model's where(keep, s, fill) keeps every score,
    so ATen's kernel runs with no mask and no bound; scores that overflow (|q| |k| d > 3.4e38 from
    1e19 on) give a non-finite lse, and the call is recomputed by the tiled path: eager's NaN /
    values either way, and the same gradients."""
    g = torch.Generator().manual_seed(int(math.log10(magnitude)) + 7)
    q = (torch.randn(1, 4, 1, 16, generator=g) * magnitude).requires_grad_()
    k = (torch.randn(1, 4, 40, 16, generator=g) * magnitude).requires_grad_()
    v = torch.randn(1, 4, 40, 16, generator=g).requires_grad_()
    masked = torch.zeros(1, 40, dtype=torch.bool)  # masked where True: nothing
    spec = _spec([dict(kind="mul", operand="const", value=0.25),
                  dict(kind="fill", index=0, value=fill)], ("tensor",), torch.float32)
    out = fused_attention(q, k, v, [masked], spec)
    ref = torch.softmax((q @ k.transpose(-1, -2) * 0.25).masked_fill(masked, fill), -1) @ v
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-5, atol=1e-5)
    go = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-4, atol=1e-4 * magnitude)


@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e19), (torch.float32, 1e18),
                                             (torch.float16, 150.0), (torch.float16, 20.0)])
@pytest.mark.parametrize("chain", ["scale", "scale_then_mask", "pow2_scale"])
def test_scores_that_overflow_in_the_models_steps_are_eager(chain, dtype, magnitude):
    """q @ k^T past the dtype's largest value (float32 ~1e19 * 1e19 * d; float16 past 65504) is
    inf in the model (then NaN), while ATen's kernel (float32 inside, its own scaling) and a query
    tile scaled first would stay finite: those calls take the model's order; below the bound
    they keep the fast routes. Plain scale, a scale and an additive mask, and a power-of-two
    scale (the tiled path's prescale)."""
    g = torch.Generator().manual_seed(3)
    q, k = ((torch.randn(1, 2, n, 16, generator=g) * magnitude).to(dtype) for n in (24, 24))
    v = torch.randn(1, 2, 24, 16, generator=g).to(dtype)
    value = 0.25 if chain == "pow2_scale" else 0.3
    ops = [dict(kind="mul", operand="const", value=value)]
    caps, captured = (), []
    if chain == "scale_then_mask":
        ops.append(dict(kind="add", operand="tensor", index=0))
        caps, captured = ("tensor",), [torch.zeros(1, 1, 1, 24, dtype=dtype)]
    spec = _spec(ops, caps, dtype)
    out = fused_attention(q, k, v, captured, spec)
    s = (q @ k.transpose(-1, -2)) * value
    if captured:
        s = s + captured[0]
    ref = torch.softmax(s, -1) @ v
    assert torch.isnan(ref).any() == (magnitude in (1e19, 150.0))  # the case is what it says
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_fully_padded_16bit_row_is_eager(dtype):
    """A 16-bit model adds finfo.min (left padding) to its scores in that dtype: s + M past the
    largest value is -inf there, finite in ATen's float32, so a row whose every key is padding has
    other weights in ATen's kernel (float16: 2.1 off) than in eager. Such rows (|lse| past half
    the dtype's largest value) are recomputed; rows with a kept key stay on the kernel."""
    g = torch.Generator().manual_seed(1)
    q, k, v = ((torch.randn(1, 2, 8, 16, generator=g) * 3).expand(2, 2, 8, 16).contiguous().to(dtype)
               for _ in range(3))
    m = torch.zeros(2, 1, 1, 8, dtype=dtype)
    m[1] = torch.finfo(dtype).min  # batch element 1: every key padding
    spec = _spec([dict(kind="mul", operand="const", value=0.25),
                  dict(kind="add", operand="tensor", index=0)], ("tensor",), dtype)
    out = fused_attention(q, k, v, [m], spec)
    ref = torch.softmax((q @ k.transpose(-1, -2)) * 0.25 + m, -1) @ v
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    call = cpu_flash.usable(spec, q, k, v, [m])
    _, lse = cpu_flash.forward(q, k, v, call.scale, call.mask, call.causal)
    assert not cpu_flash.rows_ok(call, lse, 8) and cpu_flash.rows_ok(call, lse[:1], 8)


def test_fast_path_with_learnable_bias_uses_tiled_backward():
    """ATen's backward has no bias gradient: the tiled backward takes over, same function."""
    q, k, v = (torch.randn(2, 3, 19, 8, dtype=torch.float32, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 19, 19, requires_grad=True)
    spec = _spec([dict(kind="div", operand="const", value=3.0), dict(kind="add", operand="tensor", index=0)],
                 ("tensor",), torch.float32)
    out = fused_attention(q, k, v, [bias], spec)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 3.0 + bias.double(), -1) @ v.double()
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), g)
    want = torch.autograd.grad(ref, (q, k, v, bias), g.double())
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_heads_read_each_kv_head_once(kv_heads, cpu_path):
    """k, v with fewer heads than q: head h reads kv head h // G, as after repeat_kv."""
    B, H, N, D = 2, 4, 23, 8
    q = torch.randn(B, H, N, D, requires_grad=True)
    k, v = (torch.randn(B, kv_heads, N, D, requires_grad=True) for _ in range(2))
    pad = torch.where(torch.rand(B, 1, 1, N) < 0.2, -1e9, 0.0)
    spec = _spec([dict(kind="mul", operand="const", value=0.3), dict(kind="add", operand="tensor", index=0)],
                 ("tensor",), torch.float32)
    out = fused_attention(q, k, v, [pad], spec)
    G = H // kv_heads
    kr, vr = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    ref = torch.softmax(q.double() @ kr.transpose(-1, -2) * 0.3 + pad.double(), -1) @ vr
    assert (out.double() - ref).abs().max().item() < 1e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(got, want):
        assert a.shape == b.shape and (a.double() - b).abs().max().item() < 1e-4


def test_chain_backward_is_the_symbolic_derivative():
    """The reverse walk of the score chain (what the backward evaluates) equals d score_mod / ds
    obtained by sympy from the spec, on soft-capping with scaling."""
    import sympy
    spec = _spec([dict(kind="mul", operand="const", value=0.125), dict(kind="div", operand="const", value=30.0),
                  dict(kind="tanh"), dict(kind="mul", operand="const", value=30.0)], (), torch.float64)
    s = (torch.randn(1, 8, 8, dtype=torch.float64) * 200)
    ops = cpu._Operands(spec, [], (1, 8, 8))
    where = ((), 0, 1, 0, 8, 0, 8)
    out, inputs = cpu._score_chain(spec, ops, s, where, keep_inputs=True)
    ds = cpu._chain_backward(spec, ops, inputs, out, torch.ones_like(out), where, [])
    sym = [x for x in spec.score_mod_grad_expr().free_symbols if x.name == "s"][0]
    deriv = sympy.lambdify(sym, spec.score_mod_grad_expr(), "math")
    want = torch.tensor([deriv(x) for x in s.flatten().tolist()], dtype=torch.float64).view_as(s)
    assert torch.allclose(ds, want, rtol=1e-10, atol=1e-14)
    assert "tanh" in str(spec.score_mod_expr())


@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, -math.inf])
def test_tiled_path_skips_keys_above_the_diagonal_of_a_proven_causal_mask(fill, monkeypatch):
    """spec.causal (the pass proved keep => j <= i): query tiles read only keys j < their last row;
    rows that keep no key (left padding) are recomputed over every key, as eager does."""
    monkeypatch.setattr(cpu_flash, "usable", lambda *a, **k: None)
    seen = []
    real = cpu._tile_scores
    monkeypatch.setattr(cpu, "_tile_scores", lambda *a, **k: seen.append(a[5][-1]) or real(*a, **k))
    B, H, N, D = 2, 2, 70, 8
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.ones(B, N, dtype=torch.bool)
    if fill == -math.inf:
        pad[1, 60:] = False  # right padding: every row keeps a key (-inf rows would be NaN)
    else:
        pad[1, :9] = False  # left padding: the first 9 queries of batch 1 keep no key
    keep = torch.ones(N, N, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    mask = torch.where(keep, 0.0, fill).double()
    spec = _spec([dict(kind="mul", operand="const", value=0.3), dict(kind="add", operand="tensor", index=0)],
                 ("tensor",), torch.float64, causal=True)
    out = fused_attention(q, k, v, [mask], spec)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.3 + mask, -1) @ v
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert min(seen) < N  # some tiles skipped keys
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_repository_kernels_folder_imported_top_level_is_inert(monkeypatch):
    """transformers probes for PyPI's `kernels` by importing it; from the repository root that finds
    this folder. It must not register the custom ops again from a second copy of the modules (that
    silently re-bound fusion_pass::attention to the copy)."""
    import importlib
    import sys
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    mod = importlib.import_module("kernels")
    assert mod.__version__ == "0.0.0" and not hasattr(mod, "fused_attention")
    assert "kernels.ops" not in sys.modules


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("poison", ["finite", "nan_inf"])
def test_predicate_fill_by_bits_is_masked_fill_bit_for_bit(dtype, poison, monkeypatch, fresh_dynamo,
                                                          tiled_small_spans):
    """A window + left-padding mask written ``where(keep, s, -inf)`` (a predicate fill) is applied
    on the tiled path by bitwise ops on the scores' bits (``_Operands.fill_bits``): the same bits
    as the boolean masked_fill_ it replaces, NaN/+-inf scores and rows keeping no key included,
    and the forward equals eager's (NaN rows where eager has them). (SDPA's own boolean mask is
    additive: ``test_sdpa_bool_mask_over_nonfinite_scores_matches_eager``.)"""
    B, H, N, D = 2, 3, 150, 8

    def f(q, k, v, am):
        i, j = torch.arange(q.shape[-2])[:, None], torch.arange(q.shape[-2])[None, :]
        keep = (j <= i) & (j > i - 40) & am[:, None, None, :].bool()
        s = torch.where(keep, q @ k.transpose(-1, -2) * D ** -0.5, -math.inf)
        return torch.softmax(s, -1) @ v

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    am = torch.ones(B, N, dtype=torch.long)
    am[1, :45] = 0  # left padding longer than the window: rows 0-44 of batch 1 keep no key
    if poison == "nan_inf":
        q[0, 1, 70, 3] = math.nan        # a NaN row of scores inside the window
        k[0, 0, 100, 2] = math.inf       # +inf/-inf/NaN scores in one key column, kept and masked
        k[1, 2, 20, 0] = math.nan        # a NaN key inside the padding (masked for every row)
        q[1, 0, 120, 5] = -math.inf
        q[1, 1, 10, 0] = math.nan        # a NaN row that keeps no key
    calls = []
    real = cpu._fill_by_bits
    monkeypatch.setattr(cpu, "_fill_by_bits", lambda s, b: calls.append(1) or real(s, b))
    grad = torch.randn(B, H, N, D, generator=g).to(dtype)

    def run():
        torch._dynamo.reset()
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        out = torch.compile(f, backend="fusion_pass")(qs, ks, vs, am)
        return (out,) + torch.autograd.grad(out, (qs, ks, vs), grad)
    got_all = run()
    got = got_all[0]
    assert calls, "the predicate fill did not take the bitwise path"
    if poison == "finite":
        ref = f(q, k, v, am)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol, equal_nan=True)
    # the bitwise fill keeps the masked_fill_ path's bits, +-inf/NaN scores included
    monkeypatch.setattr(cpu, "FILL_BY_BITS", False)
    ib = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    for a, b in zip(got_all, run()):  # output and gradients bit for bit, NaN payloads included
        assert torch.equal(a.view(ib), b.view(ib))


@pytest.mark.parametrize("kind", ["fill", "fill_not"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [-math.inf, math.inf, math.nan, 0.0, -0.0, -1e4, 3.5])
def test_fill_bits_equals_masked_fill_on_special_scores(kind, dtype, value):
    """``_fill_by_bits`` against masked_fill_ on tiles holding NaN, +-inf, -0.0 and subnormals,
    with a mask that broadcasts over heads."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 16, 24, generator=g).to(dtype)
    flat = s.view(-1)
    specials = [math.nan, math.inf, -math.inf, -0.0, 0.0, torch.finfo(dtype).tiny / 4]
    for n, x in enumerate(specials * 20):
        flat[(n * 37) % flat.numel()] = x
    mask = torch.rand(1, 16, 24, generator=g) < 0.5
    op = ScoreOp(kind=kind, operand="predicate", index=0, value=value, dtype=str(dtype).replace("torch.", ""))

    class Ops(cpu._Operands):
        def __init__(self):
            self._cache = {}

        def mask(self, op, where):
            return mask

        def _head_free(self, mi):
            return True

    bits = Ops().fill_bits(op, ((), 0, 3, 0, 16, 0, 24), dtype)
    assert bits is not None
    got = s.clone()
    assert cpu._fill_by_bits(got, bits)
    want = s.clone().masked_fill_(mask if kind == "fill" else ~mask, value)
    ib = cpu._INT_TWIN[dtype]
    assert torch.equal(got.view(ib), want.view(ib))


@pytest.mark.parametrize("poison", ["inf_key", "nan_query_in_empty_row", "nan_key"])
def test_sdpa_bool_mask_over_nonfinite_scores_matches_eager(monkeypatch, poison, fresh_dynamo):
    """SDPA adds 0 / -inf for a boolean mask (it does not replace): a masked +inf or NaN score, or
    a NaN query in a row keeping no key, gives NaN in eager SDPA; the fused site (tiled path, the
    flash route turned off) gives the same NaN pattern and equal values elsewhere, forward and
    backward."""
    import torch.nn.functional as F
    monkeypatch.setattr(cpu_flash, "usable", lambda *a, **k: None)
    B, H, N, D = 2, 2, 40, 8

    def f(q, k, v, am):
        i, j = torch.arange(q.shape[-2])[:, None], torch.arange(q.shape[-2])[None, :]
        keep = (j <= i) & (j > i - 8) & am[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    am = torch.ones(B, N, dtype=torch.long)
    am[1, :20] = 0  # rows 0-19 of batch 1 keep no key
    if poison == "inf_key":
        k[0, 0, 30, 2] = math.inf  # masked for rows < 30 and >= 38
    elif poison == "nan_key":
        k[0, 1, 12, 3] = math.nan
    else:
        q[1, 0, 5, 1] = math.nan
    for t in (q, k, v):
        t.requires_grad_(True)
    expl = fusion_pass.explain(f, q, k, v, am)
    assert len(expl.fused) == 1
    got = torch.compile(f, backend="fusion_pass")(q, k, v, am)
    ref = f(q, k, v, am)
    assert torch.equal(got.isnan(), ref.isnan()) and ref.isnan().any()
    ok = ~ref.isnan()
    torch.testing.assert_close(got[ok], ref[ok])
    grad = torch.randn_like(ref)
    g_got = torch.autograd.grad(got, (q, k, v), grad)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(g_got, g_ref):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a[~b.isnan()], b[~b.isnan()])


@pytest.mark.parametrize("site", ["sdpa", "eager_where"])
@pytest.mark.parametrize("poison", ["finite", "nan_inf"])
def test_rows_keeping_no_key_are_not_recomputed_and_keep_their_bits(site, poison, monkeypatch,
                                                                     tiled_small_spans):
    """Left padding longer than the window: rows that keep no key. Under a -inf fill their scores
    over every key are -inf whatever q and k hold, so ``_tile_parts`` builds that tile instead of
    recomputing it; forward and gradients bit for bit those of the recomputation (SDPA's safe
    softmax: zeros; eager softmax: NaN rows, NaN gradients), and equal to eager."""
    import torch.nn.functional as F
    B, H, N, D = 2, 3, 130, 8

    def f(q, k, v, am):
        i, j = torch.arange(q.shape[-2])[:, None], torch.arange(q.shape[-2])[None, :]
        keep = (j <= i) & (j > i - 24) & am[:, None, None, :].bool()
        if site == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        s = torch.where(keep, q @ k.transpose(-1, -2) * 0.5, -math.inf)
        return torch.softmax(s, -1) @ v

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    am = torch.ones(B, N, dtype=torch.long)
    am[1, :70] = 0  # rows 0-69 of batch 1 keep no key; 46-69 see padded keys only inside the window
    if poison == "nan_inf":
        q[1, 0, 50, 1] = math.nan     # a row keeping no key, NaN scores
        k[1, 2, 60, 0] = math.inf     # a padded key, +-inf scores
        q[0, 1, 90, 2] = math.inf
    grad = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    results = {}
    real = cpu._tile_scores
    for shortcut in (True, False):
        monkeypatch.setattr(cpu, "NO_KEY_SHORTCUT", shortcut)
        full = []
        monkeypatch.setattr(cpu, "_tile_scores",
                            lambda *a, **kw: full.append(a[5][-1] - a[5][-2] == N) or real(*a, **kw))
        torch._dynamo.reset()
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        out = torch.compile(f, backend="fusion_pass")(qs, ks, vs, am)
        grads = torch.autograd.grad(out, (qs, ks, vs), grad)
        results[shortcut] = (out,) + grads, sum(full)
    (got, n_short), (want, n_full) = results[True], results[False]
    for a, b in zip(got, want):
        assert torch.equal(a.view(torch.int64), b.view(torch.int64))
    if poison == "finite":
        assert n_short < n_full  # the shortcut replaced all-key recomputations
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        ref = f(qs, ks, vs, am)
        torch.testing.assert_close(got[0], ref, rtol=1e-12, atol=1e-12, equal_nan=True)
        for a, b in zip(got[1:], torch.autograd.grad(ref, (qs, ks, vs), grad)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True)

