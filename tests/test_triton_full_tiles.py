"""Full tiles and skipped blocks of the Triton kernels at the real GPU tile sizes (issue 15), under
the interpreter on CPU (compiled on a GPU): the backward's full-tile fast path (``attn_bwd_dq`` over
key blocks, ``attn_bwd_dkdv`` over query blocks: tiles every row keeps whole skip the mask step and
the bounds work) and the decode kernel's block skipping over a mask's band.

Each case runs forward and backward against float64 eager (tolerance: FlashAttention's rule, twice
eager's error in the same dtype plus a small atol), with causal and sliding-window masks, d = 64 and
128, N of 300-600 with ragged last blocks; and a lying range (a partial tile reported as full) must
make the same check fail, so the cases would catch a partial tile treated as full.
"""
import math

import pytest
import sympy
import torch
import triton
import triton.language as tl

from conftest import DEVICE
from fusion_pass.kernels import predicate
from fusion_pass.kernels import triton_attention as ta
from fusion_pass.kernels.spec import AttentionSpec, ScoreOp, dtype_name
from fusion_pass.kernels.triton_attn import launch
from fusion_pass.kernels.triton_attn import ranges as tr
from fusion_pass.kernels.triton_attn.attention import (_band_key_blocks, _band_query_blocks,
                                                       _decode_key_blocks)

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
_i, _j = (sympy.Symbol(n, integer=True, nonnegative=True) for n in "ij")
_n2, _n3 = (sympy.Symbol(f"n{t}", integer=True, nonnegative=True) for t in (2, 3))
AXES = ("b", "h", "i", "j")


def _masked(kind: str, window: int = 0):
    """The masked set (a fill's predicate, true where removed)."""
    if kind == "causal":
        return sympy.Gt(_j, _i)
    if kind == "sliding":
        return sympy.Not(sympy.And(sympy.Le(_j, _i), sympy.Lt(_i - _j, window)))
    if kind == "cache":  # a KV cache: query i is at position i + Nk - Nq
        return sympy.Gt(_j, _i + _n3 - _n2)
    if kind == "cache_window":
        pos = _i + _n3 - _n2
        return sympy.Not(sympy.And(sympy.Le(_j, pos), sympy.Lt(pos - _j, window)))
    raise ValueError(kind)


def _spec(kind, d, dtype, window=0):
    keep = _masked(kind, window)
    m = predicate.MaskSpec(keep=sympy.srepr(keep), axes=AXES, data=(), text=str(keep))
    ops = (ScoreOp("mul", "const", value=d ** -0.5),
           ScoreOp("fill", "predicate", value=-math.inf, index=0))
    n = dtype_name(dtype)
    return AttentionSpec(score_ops=ops, captured=(), masks=(m,), qk_dtype=n, softmax_dtype=n,
                         prob_dtype=n, out_dtype=n)


def _eager(q, k, v, go, spec, dtype, backward=True):
    """Eager attention in ``dtype`` (K/V heads repeated for grouped-query attention)."""
    B, H, nq, d = q.shape
    nk = k.shape[2]
    masked = predicate.materialize(spec.masks[0], (B, H, nq, nk), []).to(q.device)
    qr, kr, vr = (t.detach().to(dtype).requires_grad_(backward) for t in (q, k, v))
    g = H // k.shape[1]
    kx, vx = kr.repeat_interleave(g, 1), vr.repeat_interleave(g, 1)
    s = ((qr @ kx.transpose(-1, -2)) * d ** -0.5).masked_fill(masked, -math.inf)
    out = torch.softmax(s, -1) @ vx
    if not backward:
        return (out.detach(),)
    out.backward(go.to(dtype))
    return out.detach(), qr.grad, kr.grad, vr.grad


def _errors(got, low, ref):
    """Per output: (kernel error, eager low-precision error) against float64, max abs."""
    return [((g.double() - r).abs().max().item(), (e.double() - r).abs().max().item())
            for g, e, r in zip(got, low, ref)]


def _ok(errs, dtype):
    return all(eg <= 2 * ee + ATOL[dtype] for eg, ee in errs)


def _inputs(B, H, HK, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, go = (torch.randn(B, H, nq, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    k, v = (torch.randn(B, HK, nk, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    return q, k, v, go


def _fwd_bwd(arch, kind, d, nq, nk, dtype=torch.bfloat16, window=0, B=1, H=2, HK=None):
    """(kernel results, eager low-precision, float64 reference, spec) at arch's tiles."""
    spec = _spec(kind, d, dtype, window)
    q, k, v, go = _inputs(B, H, HK or H, nq, nk, d, dtype)
    with ta.target_arch(arch):
        out, lse = ta.forward(q, k, v, [], spec)
        dq, dk, dv, _ = ta.backward(go, q, k, v, [], out, lse, spec, 0, [])
    ref = _eager(q, k, v, go, spec, torch.float64)
    low = _eager(q, k, v, go, spec, dtype)
    return (out, dq, dk, dv), low, ref, spec


def _full_tile_counts(spec, nq, nk, bm, bn):
    """(full (query block, key block) tiles of dQ, of dK/dV, visited tiles of dQ)."""
    rows, _ = tr.block_ranges(spec, [], (1, 1, nq, nk), bm, bn)
    fq = tr.full_ranges(spec, (1, 1, nq, nk), bm, bn)
    fk = launch.full_columns(fq, nq, nk, bm, bn)
    n_full_q = int((fq[..., 1] - fq[..., 0]).clamp(min=0)[..., : nq // bm].sum())
    n_full_k = int((fk[..., 1] - fk[..., 0]).sum())
    return n_full_q, n_full_k, int((rows[..., 1] - rows[..., 0]).sum())


# (arch, mask, window, d, Nq, Nk): backward tiles 64 x 64 on sm_90a (d <= 128), 64 x 64 (d = 64)
# and 64 x 32 (d = 128) on sm_80; ragged last blocks everywhere
CASES = [
    (90, "causal", 0, 128, 300, 300),
    (90, "sliding", 200, 64, 450, 450),
    (80, "causal", 0, 128, 333, 333),
    (80, "cache_window", 250, 64, 200, 517),
]


@pytest.mark.parametrize("arch,kind,window,d,nq,nk", CASES,
                         ids=[f"sm{c[0]}-{c[1]}-d{c[3]}-n{c[4]}" for c in CASES])
def test_backward_full_tiles_against_float64(arch, kind, window, d, nq, nk):
    got, low, ref, spec = _fwd_bwd(arch, kind, d, nq, nk, window=window)
    for name, (eg, ee) in zip(("out", "dq", "dk", "dv"), _errors(got, low, ref)):
        assert eg <= 2 * ee + ATOL[torch.bfloat16], f"{name}: {eg:.3g} vs eager bf16 {ee:.3g}"
    with ta.target_arch(arch):
        bm, bn = ta._blocks(d, d, True, torch.bfloat16)[:2]
    n_full_q, n_full_k, visited = _full_tile_counts(spec, nq, nk, bm, bn)
    # both paths taken in both kernels: full tiles and partial (diagonal, band edge, ragged) ones
    assert 0 < n_full_q < visited and 0 < n_full_k < visited


def test_plain_ragged_full_tiles_grouped_query():
    # no mask (every in-bounds tile full, computed in the kernels), Nq != Nk both ragged, GQA
    spec = AttentionSpec(score_ops=(ScoreOp("mul", "const", value=64 ** -0.5),), qk_dtype="bfloat16",
                         softmax_dtype="bfloat16", prob_dtype="bfloat16", out_dtype="bfloat16")
    q, k, v, go = _inputs(1, 4, 2, 201, 333, 64, torch.bfloat16, seed=3)
    with ta.target_arch(90):
        out, lse = ta.forward(q, k, v, [], spec)
        got = (out, *ta.backward(go, q, k, v, [], out, lse, spec, 0, [])[:3])

    def eager(t):
        qr, kr, vr = (x.detach().to(t).requires_grad_() for x in (q, k, v))
        o = torch.softmax((qr @ kr.repeat_interleave(2, 1).transpose(-1, -2)) * 0.125, -1) \
            @ vr.repeat_interleave(2, 1)
        o.backward(go.to(t))
        return o.detach(), qr.grad, kr.grad, vr.grad

    assert _ok(_errors(got, eager(torch.bfloat16), eager(torch.float64)), torch.bfloat16)


def _widened(fn):
    """A lying range function: every full range one block wider on the low side (a partial tile
    reported as full)."""
    def lying(*args, **kwargs):
        r = fn(*args, **kwargs)
        if r is None:
            return r
        r = r.clone()
        some = r[..., 1] > r[..., 0]
        r[..., 0] = torch.where(some & (r[..., 0] > 0), r[..., 0] - 1, r[..., 0])
        return r
    return lying


@pytest.mark.parametrize("lie", ["dq", "dkdv"])
def test_a_partial_tile_taken_as_full_is_caught(lie, monkeypatch):
    """The same check as above fails when the host reports one partial tile per block as full: the
    diagonal tile's masked keys then count. dq: the per-query-block ranges (forward and dQ);
    dkdv: only the transpose. Sliding window (200 keys at 64 x 64 tiles: two full tiles per block): the partial tile
    below the band, or the diagonal one, is the one taken."""
    args = (90, "sliding", 200, 64, 450, 450)
    # the host's tensor ranges (a band's kernels compute their own: see the lying bands below)
    monkeypatch.setattr(tr, "linear_band", lambda *a: None)
    if lie == "dq":
        monkeypatch.setattr(launch._rng, "full_ranges", _widened(tr.full_ranges))
    else:
        monkeypatch.setattr(launch, "full_columns", _widened(launch.full_columns))
    got, low, ref, _ = _fwd_bwd(*args[:2], args[3], args[4], args[5], window=args[2])
    errs = _errors(got, low, ref)
    assert not _ok(errs[1:] if lie == "dq" else errs[2:], torch.bfloat16)


def test_full_columns_is_the_transpose():
    # per key block, the query blocks whose full range holds it; only query blocks without padding
    # rows, and an interval (a non-interval set gives none)
    for kind, w in (("causal", 0), ("sliding", 200), ("cache_window", 250)):
        for nq, nk, bm, bn in ((300, 300, 64, 64), (333, 333, 64, 32), (200, 517, 64, 64)):
            spec = _spec(kind, 64, torch.float32, w)
            fq = tr.full_ranges(spec, (1, 1, nq, nk), bm, bn)
            fk = launch.full_columns(fq, nq, nk, bm, bn)
            lo, hi = fq[0, 0, :, 0], fq[0, 0, :, 1]
            for nb in range(-(-nk // bn)):
                want = [mb for mb in range(nq // bm) if lo[mb] <= nb < hi[mb]]
                got = list(range(int(fk[0, 0, nb, 0]), int(fk[0, 0, nb, 1])))
                assert got == want or (not got and bool(want)
                                       and want != list(range(want[0], want[-1] + 1)))
    fq = torch.tensor([[0, 2], [3, 4], [0, 2]], dtype=torch.int32).reshape(1, 1, 3, 2)
    fk = launch.full_columns(fq, 192, 256, 64, 64)
    assert fk[0, 0].tolist() == [[0, 0], [0, 0], [0, 0], [1, 2]]  # key blocks 0, 1: {0, 2}


# ---------------------------------------------------------------------------------------------
# Decode: key blocks outside the mask's band are not computed (only their V is checked)
# ---------------------------------------------------------------------------------------------

def _decode_case(arch, kind, window, nq=3, nk=1100, d=64, H=4, HK=2, dtype=torch.bfloat16,
                 poison=None):
    """Decode forward (and the regular backward) vs float64 eager; ``poison``: put NaN/inf into
    V or K at masked keys (outside every query's window), where eager still reads 0 * v."""
    spec = _spec(kind, d, dtype, window)
    q, k, v, go = _inputs(1, H, HK, nq, nk, d, dtype, seed=5)
    if poison == "v":
        v[0, 0, 10, 3] = math.nan
        v[0, 1, 40, 7] = math.inf
    elif poison == "k":
        k[0, 0, 20, :] = math.nan
    with ta.target_arch(arch) if arch else _nullcontext():
        plan = ta.decode_plan(1, H, H // HK, nq, nk, d, d, spec)
        band = launch._decode_host_blocks(spec, (1, H, nq, nk), plan[1])  # what the kernel skips
        out, lse = ta.forward(q, k, v, [], spec)
    ref = _eager(q, k, v, go, spec, torch.float64, backward=False)[0]
    low = _eager(q, k, v, go, spec, dtype, backward=False)[0]
    return plan, band, out, lse, low, ref


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("arch,kind,window", [(90, "cache_window", 300), (None, "cache_window", 100),
                                              (80, "cache", 0)])
def test_decode_skips_blocks_outside_the_band(arch, kind, window):
    plan, band, out, lse, low, ref = _decode_case(arch, kind, window)
    n_nb = -(-1100 // plan[1])
    assert band is not None and band[1] == n_nb
    if kind == "cache_window":  # the window's blocks only: most of the cache is not computed
        assert band[1] - band[0] <= -(-(window + 3) // plan[1]) + 1 < n_nb // 2
    (eg, ee), = _errors([out], [low], [ref])
    assert eg <= 2 * ee + ATOL[torch.bfloat16]


@pytest.mark.parametrize("poison", ["v", "k"])
def test_decode_band_keeps_eager_nan_semantics(poison):
    # a NaN/inf in V at a masked key: eager's 0 * v makes that column NaN on every row; a NaN in
    # K at a masked key is replaced by -inf and changes nothing
    plan, band, out, lse, low, ref = _decode_case(90, "cache_window", 300, poison=poison)
    assert band[0] > 1  # keys 10-40 lie in skipped blocks
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    if poison == "v":
        assert torch.isnan(out[0, 0, :, 3]).all() and torch.isnan(out[0, 2, :, 7]).all()
    fin = torch.isfinite(ref)
    assert (out.double()[fin] - ref[fin]).abs().max() <= 2 * (low.double()[fin] - ref[fin]).abs().max() + 1e-2


def test_decode_a_band_too_narrow_is_caught(monkeypatch):
    # the same check fails when the band the kernel reads leaves out a block a query keeps
    real = tr.linear_band

    def narrow(*a):
        b_lo, b_hi, k_lo, k_hi = real(*a)
        return b_lo + 64, b_hi, k_lo, k_hi
    monkeypatch.setattr(tr, "linear_band", narrow)
    plan, band, out, lse, low, ref = _decode_case(90, "cache_window", 300)
    (eg, ee), = _errors([out], [low], [ref])
    assert eg > 2 * ee + ATOL[torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# The small autotune set (launch.tune_set, TileTuner): off under the interpreter; the choice
# ---------------------------------------------------------------------------------------------

def test_autotune_is_one_config_under_the_interpreter(monkeypatch):
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "1")
    calls = []
    q = torch.zeros(1, 2, 8, 64)
    launch._autotuned(None, False, q, q, q, lambda: calls.append(launch._blocks(64, 64, False)))
    assert len(calls) == 1 and not launch.TUNER.best  # the table's tiles, nothing timed
    assert launch.tune_set(128, 128, True, torch.float32, 90) == []
    for arch in (80, 90, 100):  # candidates beside the table's entry, never a copy of it
        for bwd in (False, True):
            for d in (64, 128, 256):
                with ta.target_arch(arch):
                    default = launch._blocks(d, d, bwd, torch.bfloat16)
                cands = launch.tune_set(d, d, bwd, torch.bfloat16, arch)
                assert default not in cands and len(set(cands)) == len(cands)


def test_tile_tuner_keeps_the_fastest_launchable_candidate(monkeypatch):
    import triton.testing
    timings = {(128, 128, 8, 3): 2.0, (128, 64, 8, 3): 1.0}

    def fake_bench(fn, warmup=0, rep=0):
        fn()
        cfg = launch._TILE_OVERRIDE[-1]
        if cfg not in timings:
            raise RuntimeError("out of resources")  # a candidate this device cannot launch
        return timings[cfg]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    tuner, seen = launch.TileTuner(), []
    run = lambda: seen.append(launch._blocks(64, 64, False))  # noqa: E731
    best = tuner.choose("k", (128, 128, 8, 3), [(128, 64, 8, 3), (64, 64, 4, 2)], run)
    assert best == (128, 64, 8, 3) and seen == [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 2)]
    assert tuner.choose("k", (128, 128, 8, 3), [], run) == best and len(seen) == 3  # cached


# ---------------------------------------------------------------------------------------------
# Tensor descriptors (TMA, $FUSION_PASS_TMA=1): K, V in the forward and dQ kernels, Q, dO in dK/dV
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # TMA is opt-in ($FUSION_PASS_TMA=1) until a GPU run decides its default
def test_tma_loads_give_the_pointer_loads_results(monkeypatch):
    # same values loaded (zero outside the keys or queries and the head dim), so bitwise the same
    # forward (K, V by descriptors) and backward (the dQ kernel's K, V; the dK/dV kernel's Q,
    # dO); a ragged last block, a partial head dim (d = 40) and grouped-query heads included
    for kind, w, d, n, H, HK in (("sliding", 200, 64, 300, 2, 2), ("causal", 0, 40, 201, 4, 2)):
        spec = _spec(kind, d, torch.bfloat16, w)
        q, k, v, go = _inputs(1, H, HK, n, n, d, torch.bfloat16, seed=11)
        runs = []
        for tma in (False, True):
            with ta.target_arch(90):
                if tma:
                    monkeypatch.setenv(launch.TMA_ENV, "1")
                    if d % 8 == 0:  # 16-byte rows
                        assert launch._tma(k, v, q.device) == {"TMA": True}
                        assert launch._tma(q, go, q.device) == {"TMA": True}
                else:
                    monkeypatch.delenv(launch.TMA_ENV, raising=False)
                    assert launch._tma(k, v, q.device) == {}
                out, lse = ta.forward(q, k, v, [], spec)
                runs.append((out, lse) + tuple(ta.backward(go, q, k, v, [], out, lse, spec, 0,
                                                           [])[:3]))
        for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), runs[1], runs[0]):
            assert torch.equal(got, ref), name
    # layouts TMA cannot take: plain pointers
    monkeypatch.setenv(launch.TMA_ENV, "1")
    k = torch.randn(1, 2, 300, 64, dtype=torch.bfloat16, device=DEVICE)
    assert launch._tma(k.transpose(-1, -2).contiguous().transpose(-1, -2), k, k.device) == {}
    assert launch._tma(torch.randn(1, 2, 300, 68, dtype=torch.bfloat16, device=DEVICE)[..., :60],
                       k, k.device) == {}  # rows of 136 bytes
    assert launch._tma(k, torch.randn(1, 2, 1, 64).to(DEVICE, torch.bfloat16).expand(1, 2, 300, 64),
                       k.device) == {}  # a gradient broadcast over the rows


def _spelled(spec: AttentionSpec, spelling: str) -> AttentionSpec:
    """The same masked attention with the mask step spelled ``where(keep, s, -inf)`` (fill_not)
    or as an additive 0 / -inf predicate (SDPA's): on a full tile the skipped mask's placeholder
    must mean "kept" in each spelling, since the backward's chain reads it."""
    m = spec.masks[0]
    keep = sympy.Not(sympy.sympify(predicate.parse(m.keep))).to_nnf()
    km = predicate.MaskSpec(keep=sympy.srepr(keep), axes=m.axes, data=(), text=str(keep))
    if spelling == "fill_not":
        step = ScoreOp("fill_not", "predicate", value=-math.inf, index=0, dtype=spec.qk_dtype)
    else:
        km = predicate.MaskSpec(keep=sympy.srepr(keep), axes=m.axes, data=(), text=str(keep),
                                kind="additive", dtype=spec.qk_dtype, kept=0.0, masked=-math.inf)
        step = ScoreOp("add", "predicate", index=0, dtype=spec.qk_dtype)
    return AttentionSpec(score_ops=(spec.score_ops[0], step), captured=(), masks=(km,),
                         qk_dtype=spec.qk_dtype, softmax_dtype=spec.softmax_dtype,
                         prob_dtype=spec.prob_dtype, out_dtype=spec.out_dtype)


@pytest.mark.parametrize("spelling", ["fill_not", "additive"])
def test_full_tiles_in_every_mask_spelling(spelling):
    """A causal mask written as where(keep, s, -inf) or as an additive 0 / -inf mask, forward and
    backward at sm_90a tiles: the full-tile backward once zeroed every dS of a fill_not (its
    placeholder meant "masked")."""
    dtype = torch.float32
    base = _spec("causal", 64, dtype)
    spec = _spelled(base, spelling)
    q, k, v, go = _inputs(1, 2, 2, 300, 300, 64, dtype)
    with ta.target_arch(90):
        assert tr.full_ranges(spec, (1, 2, 300, 300), 64, 64) is not None  # full tiles exist
        out, lse = ta.forward(q, k, v, [], spec)
        got = (out,) + tuple(ta.backward(go, q, k, v, [], out, lse, spec, 0, [])[:3])
    ref = _eager(q, k, v, go, base, torch.float64)
    low = _eager(q, k, v, go, base, dtype)
    errs = _errors(got, low, ref)
    assert _ok(errs, dtype), errs


# ---------------------------------------------------------------------------------------------
# Bands (causal, windows, KV-cache offsets): block ranges and full tiles computed in the kernels
# from four integers (ranges.linear_band), no range tensor; the same blocks as the host's tensors
# ---------------------------------------------------------------------------------------------


@triton.jit
def _probe_key_blocks(OUT, B_LO, B_HI, K_LO, K_HI, N_Q, N_K, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    lo, hi, flo, fhi = _band_key_blocks(pid, B_LO, B_HI, K_LO, K_HI, N_Q, N_K, BLOCK_M, BLOCK_N)
    tl.store(OUT + pid * 4, lo)
    tl.store(OUT + pid * 4 + 1, hi)
    tl.store(OUT + pid * 4 + 2, flo)
    tl.store(OUT + pid * 4 + 3, fhi)


@triton.jit
def _probe_query_blocks(OUT, F_LO, F_HI, B_LO, B_HI, K_LO, K_HI, N_Q, N_K, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    lo, hi, flo, fhi = _band_query_blocks(pid, F_LO, F_HI, B_LO, B_HI, K_LO, K_HI, N_Q, N_K,
                                          BLOCK_M, BLOCK_N)
    tl.store(OUT + pid * 4, lo)
    tl.store(OUT + pid * 4 + 1, hi)
    tl.store(OUT + pid * 4 + 2, flo)
    tl.store(OUT + pid * 4 + 3, fhi)


def _kernel_blocks(band, nq, nk, bm, bn, fail=None, rows_seen=None):
    """(rows (n_mb, 2), full rows (n_mb, 2), cols (n_nb, 2), full cols (n_nb, 2)) as the kernels
    compute them from ``band``; ``fail``: the query blocks failing the removal rule (their hull
    widens the columns, as attn_bwd_dq hands it to attn_bwd_dkdv). ``rows_seen``: the row probe's
    results by its arguments (it does not read ``fail``), so a caller varying ``fail`` alone
    launches it once."""
    n_mb, n_nb = -(-nq // bm), -(-nk // bn)
    key = (tuple(int(b) for b in band), nq, nk, bm, bn)
    if rows_seen is None or key not in rows_seen:
        rows = torch.full((n_mb, 4), -7, dtype=torch.int32)
        _probe_key_blocks[(n_mb,)](rows, *band, nq, nk, BLOCK_M=bm, BLOCK_N=bn)
        if rows_seen is not None:
            rows_seen[key] = rows
    rows = rows if rows_seen is None else rows_seen[key]
    f = [mb for mb in range(n_mb) if fail is not None and fail[mb]]
    f_lo, f_hi = (min(f), max(f) + 1) if f else (n_mb, 0)
    cols = torch.full((n_nb, 4), -7, dtype=torch.int32)
    _probe_query_blocks[(n_nb,)](cols, f_lo, f_hi, *band, nq, nk, BLOCK_M=bm, BLOCK_N=bn)
    return rows[:, :2], rows[:, 2:], cols[:, :2], cols[:, 2:]


def _host_blocks(spec, nq, nk, bm, bn, fail=None):
    """The same from the host's tensors (ranges._block_ranges, full_ranges, launch.full_columns,
    and backward_ranges' widening by the failing blocks)."""
    rows, cols = tr._block_ranges(spec, [], (1, 1, nq, nk), bm, bn)
    if fail is not None:
        n_nb = -(-nk // bn)
        cols = tr._ranges(rows[..., 0], rows[..., 1], fail.reshape(1, 1, -1), rows.shape[2],
                          n_nb, None)[1]
    fq = tr.full_ranges(spec, (1, 1, nq, nk), bm, bn)
    fk = launch.full_columns(fq, nq, nk, bm, bn)
    return rows[0, 0], fq[0, 0], cols[0, 0], fk[0, 0]


def _band_spec(masked, polarity="fill"):
    """A mask step removing ``masked`` (fill) or keeping it (fill_not), -inf."""
    m = predicate.MaskSpec(keep=sympy.srepr(masked), axes=AXES, data=(), text=str(masked))
    return AttentionSpec(score_ops=(ScoreOp(polarity, "predicate", value=-math.inf, index=0),),
                         captured=(), masks=(m,), qk_dtype="float32", softmax_dtype="float32",
                         prob_dtype="float32", out_dtype="float32")


_d = _j - _i
# masked sets (fill): the cases of _masked plus two-sided bands, key bounds, empty and full masks
BAND_MASKS = {
    "causal": _masked("causal"),
    "sliding": _masked("sliding", 200),
    "cache": _masked("cache"),
    "cache_window": _masked("cache_window", 250),
    "two_sided": sympy.Not(sympy.And(sympy.Ge(_d, -37), sympy.Le(_d, 70))),
    "ahead": sympy.Not(sympy.And(sympy.Gt(_d, 5), sympy.Lt(_d, 140))),  # keys after the query only
    "key_bound": sympy.Or(sympy.Gt(_j, _i), sympy.Ge(_j, _n3 - 45)),     # causal, last keys masked
    "key_floor": sympy.Or(sympy.Gt(_j, _i + 3), sympy.Lt(_j, 100)),
    "empty_band": sympy.Or(sympy.Gt(_j, _i), sympy.Lt(_j, _i)),          # j == i only
    "nothing_kept": sympy.Or(sympy.Gt(_j, _i - 1000), sympy.Lt(_j, _i + 2000)),
    "cache_eq": sympy.Or(sympy.Gt(_j, _i + _n3 - _n2), sympy.Lt(_j, _i + _n3 - _n2)),
}
SHAPES = [(300, 300, 64, 64), (333, 333, 64, 32), (200, 517, 64, 64), (517, 200, 32, 64),
          (128, 128, 128, 128), (97, 1025, 16, 16), (1, 300, 16, 32), (300, 7, 32, 16),
          (450, 450, 128, 128)]


# the default run probes causal and a KV-cache window (both bounds, an offset); the others (a
# window without offset, a single diagonal, nothing kept, ...) under -m slow (each probe is seconds
# under the interpreter)
BAND_DEFAULT = {"causal", "cache_window"}


@pytest.mark.parametrize("name", [n if n in BAND_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(BAND_MASKS)])
def test_kernel_band_blocks_equal_the_host_tensors(name):
    """The kernels' ranges from the band are the host's block ranges, full tiles and their
    transposes, block for block (so the same blocks are skipped and the same tiles taken as full),
    on both polarities, ragged and tiny shapes, Nq != Nk, and with failing query blocks widening
    the columns (one block off anywhere is seen: the next test)."""
    for polarity in ("fill", "fill_not"):
        masked = BAND_MASKS[name]
        if polarity == "fill_not":
            masked = sympy.Not(masked).to_nnf()
        spec = _band_spec(masked, polarity)
        for nq, nk, bm, bn in SHAPES:
            band = tr.linear_band(spec, (1, 1, nq, nk))
            assert band is not None, (name, polarity)
            n_mb = -(-nq // bm)
            g = torch.Generator().manual_seed(nq * 7 + nk)
            rows_seen = {}  # the row probe does not read fail: launched once per shape
            for fail in (None, torch.rand(n_mb, generator=g) < 0.15,
                         torch.arange(n_mb) == n_mb // 2):
                want = _host_blocks(spec, nq, nk, bm, bn, fail)
                got = _kernel_blocks(band, nq, nk, bm, bn, fail, rows_seen)
                for what, w, k in zip(("rows", "full rows", "cols", "full cols"), want, got):
                    w = w.to(torch.int32)
                    if what == "full rows":  # an empty range is empty wherever it starts
                        w, k = _empty_at_0(w), _empty_at_0(k)
                    assert torch.equal(k, w), (name, polarity, nq, nk, bm, bn, what, k.tolist(),
                                               w.tolist())


def _empty_at_0(r):
    return torch.where((r[:, 1] > r[:, 0])[:, None], r, 0)


def test_a_kernel_bound_one_block_off_is_seen():
    # the comparison above fails for any single bound moved by one block (where it matters: a
    # bound moved inside an empty range changes nothing and is allowed to pass)
    spec = _band_spec(_masked("sliding", 200))
    nq = nk = 450
    band = tr.linear_band(spec, (1, 1, nq, nk))
    want = [w.to(torch.int32) for w in _host_blocks(spec, nq, nk, 64, 64)]
    got = _kernel_blocks(band, nq, nk, 64, 64)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    n = 0
    for g, w in zip(got, want):
        for i in range(g.numel()):
            bad = g.clone().reshape(-1)
            bad[i] += 1
            assert not torch.equal(bad.reshape(g.shape), w)
            n += 1
    assert n == sum(g.numel() for g in got)


@pytest.mark.parametrize("masked", [
    sympy.Gt(2 * _j, _i),                                        # another slope
    sympy.Or(sympy.Gt(_j, _i), sympy.Ge(_i, 100)),               # a bound on i alone
    sympy.Gt(sympy.Abs(_j - _i), 50),                            # |j - i|: evaluated per tile
    sympy.Ne(sympy.floor(_j / 64), sympy.floor(_i / 64)),        # chunks
    sympy.And(sympy.Gt(_j, _i), sympy.Ge(_j, 60)),               # prefix-LM
])
def test_other_masks_keep_the_tensor_ranges(masked):
    assert tr.linear_band(_band_spec(masked), (1, 1, 300, 300)) is None


def test_a_query_only_conjunct_gives_no_full_tiles():
    """(i < 100) & (j <= i) plans as j <= i (the conjunct on i alone is left out: a superset of
    the keys, sound for skipping); rows i >= 100 keep nothing, so a tile taken as full there
    would count masked keys. No band and no full tiles: forward and backward match float64."""
    masked = sympy.Or(sympy.Gt(_j, _i), sympy.Ge(_i, 100))
    spec = AttentionSpec(score_ops=(ScoreOp("fill", "predicate", value=-1e4, index=0),),
                         captured=(), masks=_band_spec(masked).masks, qk_dtype="float32",
                         softmax_dtype="float32", prob_dtype="float32", out_dtype="float32")
    assert tr.linear_band(spec, (1, 2, 300, 300)) is None
    assert tr.full_ranges(spec, (1, 2, 300, 300), 64, 64) is None
    q, k, v, go = _inputs(1, 2, 2, 300, 300, 64, torch.float32, seed=2)
    with ta.target_arch(90):
        out, lse = ta.forward(q, k, v, [], spec)
        got = (out,) + tuple(ta.backward(go, q, k, v, [], out, lse, spec, 0, [])[:3])
    keep = predicate.materialize(spec.masks[0], (1, 2, 300, 300), [])

    def eager(t):
        qr, kr, vr = (x.detach().to(t).requires_grad_() for x in (q, k, v))
        o = torch.softmax((qr @ kr.transpose(-1, -2)).masked_fill(keep, -1e4), -1) @ vr
        o.backward(go.to(t))
        return o.detach(), qr.grad, kr.grad, vr.grad
    errs = _errors(got, eager(torch.float32), eager(torch.float64))
    assert _ok(errs, torch.float32), errs


def _no_tensor_ranges(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a range tensor was built for a band")
    for name in ("block_ranges", "_block_ranges", "_linear_block_ranges", "full_ranges",
                 "_linear_rows", "backward_ranges", "_ranges"):
        monkeypatch.setattr(tr, name, refuse)
    monkeypatch.setattr(launch, "full_columns", refuse)


# forward and backward vs float64 at the real tiles with no range tensor built: causal, windows,
# KV-cache offsets (Nq != Nk), grouped-query heads and a batch
BAND_CASES = [
    (90, "causal", 0, 128, 300, 300, 1, 2, 2),
    (80, "causal", 0, 128, 333, 333, 1, 2, 2),
    (90, "sliding", 200, 128, 450, 450, 2, 4, 2),
    (80, "sliding", 100, 128, 300, 300, 1, 2, 1),
    (90, "cache", 0, 128, 130, 517, 1, 2, 2),
    (80, "cache_window", 250, 64, 200, 517, 1, 2, 2),
]
# default run: one case per kind of band and both architectures; the rest under -m slow
BAND_CASES_DEFAULT = {0, 3, 5}


@pytest.mark.parametrize("arch,kind,window,d,nq,nk,B,H,HK", [
    pytest.param(*c, id=f"sm{c[0]}-{c[1]}-d{c[3]}-{c[4]}x{c[5]}",
                 marks=[] if n in BAND_CASES_DEFAULT else [pytest.mark.slow])
    for n, c in enumerate(BAND_CASES)])
def test_bands_without_range_tensors_against_float64(arch, kind, window, d, nq, nk, B, H, HK,
                                                     monkeypatch):
    assert tr.linear_band(_spec(kind, d, torch.bfloat16, window), (B, H, nq, nk)) is not None
    _no_tensor_ranges(monkeypatch)
    got, low, ref, _ = _fwd_bwd(arch, kind, d, nq, nk, window=window, B=B, H=H, HK=HK)
    for name, (eg, ee) in zip(("out", "dq", "dk", "dv"), _errors(got, low, ref)):
        assert eg <= 2 * ee + ATOL[torch.bfloat16], f"{name}: {eg:.3g} vs eager bf16 {ee:.3g}"


@pytest.mark.parametrize("lie", ["narrow", "wide"])
def test_a_lying_band_is_caught(lie, monkeypatch):
    """The same check fails when the band the kernels read is one block off: narrower, the last
    kept keys' block is skipped; wider, a partial tile below the window is taken as full."""
    real = tr.linear_band

    def lying(*a):
        lo, hi, klo, khi = real(*a)
        return (lo, hi - 64, klo, khi) if lie == "narrow" else (lo - 64, hi, klo, khi)
    monkeypatch.setattr(tr, "linear_band", lying)
    got, low, ref, _ = _fwd_bwd(90, "sliding", 64, 450, 450, window=200)
    assert not _ok(_errors(got, low, ref), torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Decode: the split-KV kernel's key blocks computed in the kernel from the band's four integers
# (attention._decode_key_blocks), the host's (launch._band_blocks) block for block, no host
# torch work per call (the cache grows every generation step: a memo per shape never hits)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _probe_decode_blocks(OUT, B_LO, B_HI, K_LO, K_HI, N_Q, N_K, BLOCK_N: tl.constexpr):
    lo, hi = _decode_key_blocks(B_LO, B_HI, K_LO, K_HI, N_Q, N_K, BLOCK_N)
    tl.store(OUT, lo)
    tl.store(OUT + 1, hi)


def _kernel_decode_blocks(band, nq, nk, bn):
    out = torch.full((2,), -7, dtype=torch.int32)
    _probe_decode_blocks[(1,)](out, *band, nq, nk, BLOCK_N=bn)
    return tuple(out.tolist())


# (Nq, Nk, BLOCK_N): one query and a few (<= 16: decode_plan's bound), caches longer than the
# queries (KV-cache offsets), ragged and whole last blocks, a cache of one block, Nq > Nk
DECODE_SHAPES = [(1, 300, 16), (3, 1100, 64), (16, 1025, 32), (7, 256, 64), (1, 4096, 64),
                 (16, 17, 16), (2, 64, 64), (5, 3, 16), (12, 700, 64)]


def test_decode_kernel_blocks_equal_the_host_blocks():
    """Every band mask (both polarities) at decode shapes: the key blocks the decode kernel
    computes are the host's, including the all-blocks answer where a query keeps no key (the
    empty bands: nothing kept, the key floor above the first queries' keys)."""
    n_all = n = 0
    for name, masked in sorted(BAND_MASKS.items()):
        for polarity in ("fill", "fill_not"):
            m = masked if polarity == "fill" else sympy.Not(masked).to_nnf()
            spec = _band_spec(m, polarity)
            for nq, nk, bn in DECODE_SHAPES:
                shape = (1, 1, nq, nk)
                band = tr.linear_band(spec, shape)
                assert band is not None and launch._decode_band(spec, shape, bn) == band
                want = launch._decode_host_blocks(spec, shape, bn)
                got = _kernel_decode_blocks(band, nq, nk, bn)
                assert got == want, (name, polarity, nq, nk, bn, got, want)
                n += 1
                n_all += want == (0, -(-nk // bn))
    assert n_all < n // 2 and n_all > 5  # both kinds of answer are exercised


@pytest.mark.parametrize("masked", [
    sympy.Gt(2 * _j, _i + 2 * (_n3 - _n2)),                     # another slope
    sympy.Or(sympy.Gt(_j, _i + _n3 - _n2), sympy.Ge(_i, 2)),      # a bound on i alone
])
def test_decode_masks_without_a_band_keep_the_host_blocks(masked):
    """Conjunctions of linear conditions that are not bands: the host's blocks reach the kernel
    as key bounds, from which it computes the same blocks again."""
    spec = _band_spec(masked)
    for nq, nk, bn in DECODE_SHAPES:
        shape = (1, 1, nq, nk)
        assert tr.linear_band(spec, shape) is None
        want = launch._decode_host_blocks(spec, shape, bn)
        assert want is not None
        assert _kernel_decode_blocks(launch._decode_band(spec, shape, bn), nq, nk, bn) == want


def test_decode_band_only_for_a_replacing_minus_inf_step():
    # the soundness condition of the skipping: a fill of -inf by a predicate without data
    masked = _masked("cache_window", 100)
    assert launch._decode_band(_band_spec(masked), (1, 1, 3, 1100), 64) is not None
    finite = AttentionSpec(score_ops=(ScoreOp("fill", "predicate", value=-1e4, index=0),),
                           captured=(), masks=_band_spec(masked).masks, qk_dtype="float32",
                           softmax_dtype="float32", prob_dtype="float32", out_dtype="float32")
    assert launch._decode_band(finite, (1, 1, 3, 1100), 64) is None


# (arch, mask, window, Nq, Nk, H, HK): the decode kernel against float64 with no host range
# computation at all; grouped-query (G = 2, 4, 8), one query and a few, windows narrower than a
# block and wider than the cache
DECODE_CASES = [
    (90, "cache_window", 300, 3, 1100, 4, 2),
    (None, "cache", 0, 1, 517, 8, 1),
    (80, "cache_window", 40, 5, 700, 8, 2),
    (90, "cache_window", 2000, 16, 300, 4, 1),
]


@pytest.mark.parametrize("arch,kind,window,nq,nk,H,HK", DECODE_CASES)
def test_decode_band_without_host_work_against_float64(arch, kind, window, nq, nk, H, HK,
                                                       monkeypatch):
    spec = _spec(kind, 64, torch.bfloat16, window)
    with ta.target_arch(arch) if arch else _nullcontext():
        plan = ta.decode_plan(1, H, H // HK, nq, nk, 64, 64, spec)
        assert plan is not None
        want = launch._decode_host_blocks(spec, (1, H, nq, nk), plan[1])
        # a window skips blocks; a KV cache's causal mask keeps every key of the last queries
        assert (want != (0, -(-nk // plan[1]))) == (kind == "cache_window" and window < nk)
        assert launch._decode_band(spec, (1, H, nq, nk), plan[1]) == \
            tr.linear_band(spec, (1, H, nq, nk))
        _no_tensor_ranges(monkeypatch)
        monkeypatch.setattr(launch, "_band_blocks", lambda *a: pytest.fail("host blocks"))
        q, k, v, go = _inputs(1, H, HK, nq, nk, 64, torch.bfloat16, seed=nq + nk)
        out, lse = ta.forward(q, k, v, [], spec)
    ref = _eager(q, k, v, go, spec, torch.float64, backward=False)[0]
    low = _eager(q, k, v, go, spec, torch.bfloat16, backward=False)[0]
    (eg, ee), = _errors([out], [low], [ref])
    assert eg <= 2 * ee + ATOL[torch.bfloat16], (eg, ee)


def test_decode_mask_without_a_band_against_float64():
    # the host's blocks as key bounds, through the decode kernel, vs float64: another slope, and
    # a conjunct on i alone (true on these queries: the band's key blocks are skipped)
    for masked in (sympy.Gt(2 * _j, _i + 2 * (_n3 - _n2) - 150),
                   sympy.Or(sympy.Gt(_j, _i + _n3 - _n2 - 500), sympy.Gt(_i, 10))):
        spec = _band_spec(masked)
        assert tr.linear_band(spec, (1, 4, 3, 1100)) is None
        blocks = launch._decode_host_blocks(spec, (1, 4, 3, 1100), 64)
        assert 0 < blocks[1] < -(-1100 // 64)  # the last key blocks are skipped
        q, k, v, go = (t.float() for t in _inputs(1, 4, 2, 3, 1100, 64, torch.bfloat16, seed=3))
        with ta.target_arch(90):
            plan = ta.decode_plan(1, 4, 2, 3, 1100, 64, 64, spec)
            assert plan is not None
            out, lse = ta.forward(q, k, v, [], spec)
        masked_t = predicate.materialize(spec.masks[0], (1, 4, 3, 1100), [])
        def eager(t):
            kx, vx = (x.to(t).repeat_interleave(2, 1) for x in (k, v))
            s = (q.to(t) @ kx.transpose(-1, -2)).masked_fill(masked_t, -math.inf)
            return torch.softmax(s, -1) @ vx
        errs = _errors([out], [eager(torch.float32)], [eager(torch.float64)])
        assert _ok(errs, torch.float32), errs


def _finite_fill_spec(d, dtype, fill, kind="causal", window=0):
    masked = _masked(kind, window)
    m = predicate.MaskSpec(keep=sympy.srepr(masked), axes=AXES, data=(), text=str(masked))
    n = dtype_name(dtype)
    return AttentionSpec(score_ops=(ScoreOp("mul", "const", value=d ** -0.5),
                                    ScoreOp("fill", "predicate", value=fill, index=0)),
                         captured=(), masks=(m,), qk_dtype=n, softmax_dtype=n, prob_dtype=n,
                         out_dtype=n)


@pytest.mark.parametrize("arch,kind,rows", [(90, "causal", (70, 90)), (80, "causal", (70, 90)),
                                            (90, "sliding", (200, 215))])
def test_band_rows_failing_the_removal_rule(arch, kind, rows, monkeypatch):
    """A finite fill (-1e4) and query rows whose kept scores all lie far below it: on those rows
    eager's softmax goes to the masked keys, so their query blocks must visit every key block
    (forward: THRESH; dQ: the kernel's own check of lse; dK/dV: the hull of those blocks, handed
    over by the dQ kernel). Rows in the second query block only: the key blocks after it reach
    them only through the hull; in a window (keys i - 99 .. i), also the key blocks before it."""
    dtype, d, n = torch.float32, 64, 300
    spec = _finite_fill_spec(d, dtype, -1e4, kind, 100)
    assert tr.linear_band(spec, (1, 2, n, n)) is not None
    _no_tensor_ranges(monkeypatch)
    q, k, v, go = _inputs(1, 2, 2, n, n, d, dtype, seed=4)
    k = k.abs() + 1.0
    r0, r1 = rows
    q[:, :, r0:r1] = -2000.0  # s ~ -2000 * 64 * 1.8 / 8 ~ -3e4, far below the fill
    with ta.target_arch(arch):
        out, lse = ta.forward(q, k, v, [], spec)
        got = (out,) + tuple(ta.backward(go, q, k, v, [], out, lse, spec, 0, [])[:3])

    def eager(t):
        qr, kr, vr = (x.detach().to(t).requires_grad_() for x in (q, k, v))
        s = (qr @ kr.transpose(-1, -2)) * d ** -0.5
        masked = predicate.materialize(spec.masks[0], (1, 2, n, n), [])
        o = torch.softmax(s.masked_fill(masked, -1e4), -1) @ vr
        o.backward(go.to(t))
        return o.detach(), qr.grad, kr.grad, vr.grad
    ref = eager(torch.float64)
    # those rows average V over their masked keys (j > i), in eager as here
    r = r1 - 1
    out_masked = v.double()[0, 0, r + 1:] if kind == "causal" else \
        torch.cat([v.double()[0, 0, :r - 99], v.double()[0, 0, r + 1:]])
    assert torch.allclose(ref[0][0, 0, r], out_masked.mean(0), atol=1e-6)
    errs = _errors(got, eager(dtype), ref)
    assert _ok(errs, dtype), errs
