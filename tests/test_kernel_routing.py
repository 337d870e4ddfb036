"""Issue 11, item 1: equivalent specs reach ATen's CPU flash kernel, and only where exact.

Each routing change is checked end to end (the model compiled with the backend) against float64
eager, forward and backward, with the kernel that ran read from a profile
(``fusion_pass.measure.profile_call(kernels=True)``), on:
* ordinary inputs (the fast kernel runs),
* large-magnitude inputs (q, k ~ 30 * randn, one row's kept score far below a finite fill): a
  finite fill does not remove keys there, and the rows that fail the removal rule are recomputed
  by the tiled path,
* NaN / inf inputs (tiled, NaN where eager has NaN),
* fully masked rows (tiled: eager weighs a finite fill's keys uniformly there).
"""
import math

import pytest
import torch

import fusion_pass
from fusion_pass.kernels import cpu_flash
from fusion_pass.measure import profile_call

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py: Dynamo reset around each test

MIN32 = torch.finfo(torch.float32).min


class Gpt2(torch.nn.Module):
    """GPT-2's spelling: a registered bool tril buffer sliced to the call's lengths (data to the
    pass, not built in the graph), ``where(causal, s, torch.tensor(fill))``."""

    def __init__(self, fill=MIN32, n_max=96):
        super().__init__()
        self.fill = fill
        self.register_buffer("bias", torch.tril(torch.ones(n_max, n_max, dtype=torch.bool))
                             .view(1, 1, n_max, n_max), persistent=False)

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) / (v.size(-1) ** 0.5)
        nq, nk = q.size(-2), k.size(-2)
        causal = self.bias[:, :, nk - nq:nk, :nk]
        fill = torch.tensor(self.fill, dtype=s.dtype, device=s.device)
        s = torch.where(causal, s.to(s.dtype), fill)
        return torch.matmul(s.softmax(dim=-1), v)


class TopLeft(torch.nn.Module):
    """``where(j <= i, s, fill)`` on the score grid's own indices (top-left for Nq != Nk)."""

    def __init__(self, fill=-math.inf):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])[:, None]
        j = torch.arange(k.shape[-2])[None, :]
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        s = s.masked_fill(j > i, self.fill)
        return torch.matmul(torch.softmax(s, -1), v)


class MaskInput(torch.nn.Module):
    """A bool keep mask passed in, filled with ``fill`` where False."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, keep):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        s = s.masked_fill(~keep, self.fill)
        return torch.matmul(torch.softmax(s, -1), v)


def _qkv(nq=48, nk=48, B=1, H=2, D=16, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(B, H, nq, D, generator=g)
    k = scale * torch.randn(B, H, nk, D, generator=g)
    v = torch.randn(B, H, nk, D, generator=g)
    return q, k, v


def _err(x, ref):
    x, ref = x.double(), ref.double()
    both_nan = x.isnan() & ref.isnan()
    assert torch.equal(x.isnan(), ref.isnan()), "NaN where the reference has none (or not where it has)"
    return torch.where(both_nan, 0.0, x - ref).abs().max().item()


def _run(model, args, grads=True):
    """(compiled output, kernels the forward ran on, gradients, kernels of the backward); checked
    against float64 eager by FlashAttention's rule (at most twice eager float32's error + slack)."""
    compiled = torch.compile(model, backend="fusion_pass")
    tensors = [a.detach().clone().requires_grad_(grads and a.is_floating_point()) for a in args]
    warm = compiled(*tensors)  # compile first (the backward too): the profile sees steady calls
    if grads:
        warm.sum().backward()
    holder = {}
    _, _, fwd = profile_call(lambda: holder.setdefault("out", compiled(*tensors)), kernels=True)
    out = holder["out"]
    ref_args = [a.detach().double().requires_grad_(grads) if a.is_floating_point() else a for a in args]
    ref = model.double()(*ref_args)
    model.float()
    low_args = [a.detach().clone().requires_grad_(grads and a.is_floating_point()) for a in args]
    low = model(*low_args)
    assert _err(out, ref) <= 2 * _err(low, ref) + 1e-5, (_err(out, ref), _err(low, ref))
    bwd = ""
    if grads:
        g = torch.randn_like(out)
        qkv = [t for t in tensors if t.requires_grad]
        box = {}
        _, _, bwd = profile_call(lambda: box.setdefault("g", torch.autograd.grad(out, qkv, g)), kernels=True)
        ref_g = torch.autograd.grad(ref, [t for t in ref_args if t.requires_grad], g.double())
        low_g = torch.autograd.grad(low, [t for t in low_args if t.requires_grad], g)
        for a, r, e in zip(box["g"], ref_g, low_g):
            scale = r.abs().nan_to_num().max().item() + 1
            assert _err(a, r) <= 2 * _err(e, r) + 1e-5 * scale, (_err(a, r), _err(e, r))
    return out, fwd, bwd


def _row0_far_below(q, k, factor=100.0):
    """Query 0 whose only kept key (key 0) scores far below any finite fill: eager then weighs the
    masked keys (all of them, equally), where a kernel dropping them would return v[0]."""
    q = q.clone()
    q[..., 0, :] = -factor * k[..., 0, :]
    return q


def test_aten_is_causal_is_top_left_on_this_torch():
    """The fact ``is_causal`` routing relies on for Nq != Nk, checked on the installed kernel."""
    assert cpu_flash._causal_top_left()


@pytest.mark.parametrize("fill", [MIN32, -1e9, -1e4, -math.inf])
def test_gpt2_buffer_where_routes_to_flash_is_causal(fill):
    q, k, v = _qkv()
    _, fwd, bwd = _run(Gpt2(fill), (q, k, v))
    assert fwd == "fwd: ATen flash is_causal x1", fwd
    assert bwd == "bwd: ATen flash is_causal x1", bwd


@pytest.mark.parametrize("fill,factor", [(-1e4, 100.0), (-1e9, 1e7)])
def test_gpt2_large_scores_finite_fill_is_not_removal(fill, factor):
    """q, k ~ 30 randn and a row whose kept score is far below the fill: that row gets the masked
    keys' weight in eager; the flash call's rows check fails and the tiled path recomputes (the
    backward decides from the lse by the same rule)."""
    q, k, v = _qkv(scale=30.0)
    q = _row0_far_below(q, k, factor=factor)
    _, fwd, bwd = _run(Gpt2(fill), (q, k, v))
    assert fwd == "fwd: ATen flash is_causal then tiled x1" and bwd == "bwd: tiled x1", (fwd, bwd)


def test_gpt2_large_scores_that_keep_removal_stay_on_flash():
    """Large but ordinary scores (|s| in the thousands) against finfo.min: removal is proven."""
    q, k, v = _qkv(scale=30.0)
    _, fwd, _ = _run(Gpt2(MIN32), (q, k, v), grads=False)
    assert fwd == "fwd: ATen flash is_causal x1", fwd


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_gpt2_nan_inf_inputs_take_tiled_path(bad):
    q, k, v = _qkv()
    k = k.clone()
    k[0, 1, 30, 3] = bad  # a key masked for rows < 30, kept for the rest
    _, fwd, _ = _run(Gpt2(MIN32), (q, k, v), grads=False)
    assert fwd == "fwd: tiled x1", fwd


def test_gpt2_buffer_not_causal_takes_tiled_path():
    """The buffer is data: a row with no kept key (eager: uniform over finfo.min) and a changed
    entry are both seen per call, never assumed from an earlier call."""
    m = Gpt2(MIN32)
    q, k, v = _qkv()
    _, fwd, _ = _run(m, (q, k, v), grads=False)
    assert fwd == "fwd: ATen flash is_causal x1"
    m.bias[0, 0, 5, :] = False  # row 5 keeps nothing
    torch._dynamo.reset()
    _, fwd, _ = _run(m, (q, k, v))
    assert fwd == "fwd: tiled x1", fwd


@pytest.mark.parametrize("nq,nk,H,kernel", [(1, 40, 2, "fwd: ATen flash x1"),
                                             (8, 40, 4, "fwd: ATen flash mask x1"),
                                             (8, 40, 2, "fwd: ATen flash mask x1"),
                                             (40, 48, 1, "fwd: tiled x1")])
def test_gpt2_decode_bottom_right_slice_is_not_is_causal(nq, nk, H, kernel):
    """With a cache (Nq < Nk) GPT-2's slice keeps j <= i + Nk - Nq (bottom-right): not ATen's
    top-left is_causal. One query row keeps every key (no mask); a matrix no larger than q or k
    (decoding a few rows against a cache) becomes a -inf mask (the finite fill under the removal
    rule); a larger one (a prefill's chunk) stays on the tiled path, which reads it in tiles."""
    q, k, v = _qkv(nq=nq, nk=nk, H=H)
    with fusion_pass.configure(fuse_cpu_decode=True):  # one row: kept for Inductor by default
        _, fwd, _ = _run(Gpt2(MIN32), (q, k, v))  # checked against float64 eager there
    assert fwd == kernel, fwd


def test_gpt2_decode_slice_with_an_empty_row_takes_tiled_path():
    """The guard the -inf mask operand relies on: a decoding slice whose row keeps no key (eager:
    uniform weights under the finfo.min fill; ATen's kernel would give that row 0 or NaN) is not
    ATen's function, whatever its size; the tiled path computes eager's answer."""
    q, k, v = _qkv(nq=8, nk=40, H=2)
    m = Gpt2(MIN32)
    m.bias[0, 0, 35, :] = False  # the slice's row 3 (40 - 8 + 3) keeps nothing
    with fusion_pass.configure(fuse_cpu_decode=True):
        _, fwd, _ = _run(m, (q, k, v))  # checked against float64 eager there
    assert fwd == "fwd: tiled x1", fwd


@pytest.mark.parametrize("nq,nk", [(17, 40), (40, 17)])
def test_top_left_predicate_with_unequal_lengths_uses_is_causal(nq, nk):
    q, k, v = _qkv(nq=nq, nk=nk)
    _, fwd, bwd = _run(TopLeft(-math.inf), (q, k, v))
    assert fwd == "fwd: ATen flash is_causal x1", fwd


@pytest.mark.parametrize("fill", [-math.inf, -1e4])
def test_tril_mask_tensor_fill_uses_is_causal(fill):
    q, k, v = _qkv()
    keep = torch.tril(torch.ones(48, 48, dtype=torch.bool))
    _, fwd, bwd = _run(MaskInput(fill), (q, k, v, keep))
    assert fwd == "fwd: ATen flash is_causal x1", fwd
    # a padding mask (rows broadcast): a -inf mask operand, the finite fill under the removal rule
    pad = torch.ones(1, 1, 1, 48, dtype=torch.bool)
    pad[..., :5] = False
    torch._dynamo.reset()
    _, fwd, _ = _run(MaskInput(fill), (q, k, v, pad))
    assert fwd == "fwd: ATen flash mask x1", fwd
    # large scores, a row far below the finite fill: recomputed on the tiled path
    if fill == -1e4:
        q2 = _row0_far_below(30 * q, 30 * k)
        torch._dynamo.reset()
        _, fwd, _ = _run(MaskInput(fill), (q2, 30 * k, v, keep))
        assert "tiled" in fwd, fwd


def test_fully_masked_row_with_finite_fill_takes_tiled_path():
    q, k, v = _qkv()
    keep = torch.tril(torch.ones(48, 48, dtype=torch.bool))
    keep[7] = False
    _, fwd, _ = _run(MaskInput(-1e9), (q, k, v, keep))
    assert fwd == "fwd: tiled x1", fwd


def test_default_sdpa_llama_runs_flash_is_causal():
    """transformers' default (SDPA) Llama given an all-ones attention mask (no padding): its site
    is where((j <= i) & (mask[0, j] != 0), s, -inf) with SDPA's safe softmax; it runs ATen's flash
    kernel with is_causal, as the eager-attention Llama does. (The proof of causality comes from
    the predicate itself; the padding term is materialised per call, (B, 1, 1, Nk), all ones.)"""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                   max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaModel(cfg).eval()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 100, (1, 40))
    am = torch.ones(1, 40, dtype=torch.long)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am).last_hidden_state
        compiled = torch.compile(model, backend="fusion_pass")
        compiled(input_ids=ids, attention_mask=am)
        box = {}
        _, _, kernels = profile_call(lambda: box.setdefault(
            "out", compiled(input_ids=ids, attention_mask=am).last_hidden_state), kernels=True)
        assert kernels == "fwd: ATen flash is_causal x1", kernels
        torch.testing.assert_close(box["out"], ref, atol=2e-5, rtol=1e-5)
        # left padding: the padding term becomes a (B, 1, 1, Nk) -inf mask beside is_causal; the
        # padded query rows keep no key (SDPA's safe softmax: zeros) and take the tiled path
        am[:, :6] = 0
        ref = model(input_ids=ids, attention_mask=am).last_hidden_state
        _, _, kernels = profile_call(lambda: box.update(
            out=compiled(input_ids=ids, attention_mask=am).last_hidden_state), kernels=True)
        torch.testing.assert_close(box["out"], ref, atol=2e-5, rtol=1e-5)
        assert kernels == "fwd: ATen flash is_causal mask x1", kernels


def test_safe_softmax_empty_rows_on_flash_forward_and_backward():
    """A site that was an SDPA call (safe softmax: a row with no kept key gives 0, and no gradient)
    keeps ATen's kernel when some rows are empty: its output and gradients there are 0 too
    (``cpu_flash._empty_rows_zero``, checked once per process). Eager softmax (not safe) would give
    NaN rows: that spec still takes the tiled path."""
    from fusion_pass.kernels import AttentionSpec, ScoreOp, fused_attention
    keep = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    keep[..., :7] = False
    keep = keep & torch.ones(40, 40, dtype=torch.bool).tril_()  # rows 0..6 keep nothing
    for safe in (True, False):
        spec = AttentionSpec(score_ops=(ScoreOp("mul", "const", 0.25),
                                        ScoreOp("fill_not", "tensor", -math.inf, 0)),
                             captured=("tensor",), safe_softmax=safe)
        q, k, v = (t.requires_grad_() for t in _qkv(nq=40, nk=40))
        box = {}
        _, _, fwd = profile_call(lambda: box.setdefault("o", fused_attention(q, k, v, [keep], spec)),
                                 kernels=True)
        out = box["o"]
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        p = torch.softmax((qd @ kd.transpose(-1, -2) * 0.25).masked_fill(~keep, -math.inf), -1)
        ref = (p.nan_to_num(0.0) if safe else p) @ vd
        g = torch.randn_like(out)
        if not safe:
            assert fwd == "fwd: tiled x1" and out[..., :7, :].isnan().all()
            continue
        assert fwd == "fwd: ATen flash mask x1", fwd
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        _, _, bwd = profile_call(lambda: box.setdefault("g", torch.autograd.grad(out, (q, k, v), g)),
                                 kernels=True)
        assert bwd == "bwd: ATen flash mask x1", bwd
        for a, r in zip(box["g"], torch.autograd.grad(ref, (qd, kd, vd), g.double())):
            torch.testing.assert_close(a.double(), r, atol=1e-4, rtol=1e-4)


class Projected(torch.nn.Module):
    """q, k, v split off one (B, N, 3 H D) projection (heads-major views), causal, and the output
    merged back with ``transpose(1, 2).reshape``: the model layout the op's output follows."""

    def __init__(self, sdpa=False, H=4, D=16):
        super().__init__()
        self.sdpa, self.H, self.D = sdpa, H, D

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (t.view(B, N, self.H, self.D).transpose(1, 2) for t in x.split(self.H * self.D, -1))
        if self.sdpa:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            i = torch.arange(N)
            s = (q @ k.transpose(-1, -2) / 4.0).masked_fill(i[None, :] > i[:, None], -math.inf)
            o = s.softmax(-1) @ v
        return o.transpose(1, 2).reshape(B, N, self.H * self.D)


def test_output_follows_q_layout_without_copies():
    """Item 3 of issue 11: a heads-major q gets a heads-major output from ATen's kernel, and the op
    promises (and returns) exactly that layout, so neither the op nor the model's merge of the
    heads copies it: per-call peak equals eager SDPA's."""
    x = torch.randn(2, 256, 3 * 64)
    with torch.no_grad():
        ref = Projected(sdpa=True)(x)
        compiled = torch.compile(Projected(), backend="fusion_pass")
        compiled(x)
        box = {}
        peak, _, kernels = profile_call(lambda: box.setdefault("out", compiled(x)), kernels=True)
        anchor, _ = profile_call(lambda: Projected(sdpa=True)(x))
    assert kernels == "fwd: ATen flash is_causal x1", kernels
    torch.testing.assert_close(box["out"], ref)
    assert peak <= anchor * 1.05, (peak, anchor)
    q = x[..., :64].view(2, 256, 4, 16).transpose(1, 2)
    spec_out = torch.ops.fusion_pass.attention  # the op called directly: the same promise
    from fusion_pass.kernels import AttentionSpec
    out = spec_out(q, q, q, [], AttentionSpec().to_key())[0]
    assert out.stride() == (256 * 64, 16, 64, 1), out.stride()
    assert spec_out(q.contiguous(), q, q, [], AttentionSpec().to_key())[0].is_contiguous()


# ---------------------------------------------------------------------------------------------
# Item 2: one routing (select.route) and the measured choice (select.pick)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def choices(tmp_path, monkeypatch):
    from fusion_pass.kernels import select
    monkeypatch.setenv("FUSION_PASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(select, "MEASURE_MIN_ELEMENTS", 0)
    select.CHOICES.clear()
    yield select
    select.CHOICES.clear()


def _causal_spec():
    from fusion_pass.kernels import AttentionSpec, ScoreOp
    from fusion_pass.kernels.predicate import MaskSpec
    import sympy
    i, j = sympy.symbols("i j", integer=True)
    m = MaskSpec(keep=sympy.srepr(j <= i), axes=("b", "h", "i", "j"), text="j <= i")
    return AttentionSpec(score_ops=(ScoreOp("mul", "const", 0.25),
                                    ScoreOp("fill_not", "predicate", -math.inf, 0)), masks=(m,))


def test_first_call_measures_both_then_runs_the_choice(choices):
    from fusion_pass.kernels import fused_attention
    spec = _causal_spec()
    q, k, v = _qkv(nq=64, nk=64, H=8)  # the other candidate is timed on one head of the eight
    ref = fused_attention(q, k, v, [], spec)
    key = choices.shape_key("fwd", spec.to_key(), q, k)
    entry = choices.CHOICES.get(key)
    assert entry is not None and set(entry["ms"]) == {"aten_flash", "tiled"}, entry
    # the backward too, with its own key
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    fused_attention(qg, kg, vg, [], spec).sum().backward()
    assert choices.CHOICES.get(choices.shape_key("bwd", spec.to_key(), q, k)) is not None
    assert key in choices.cache_path().read_text()  # on disk, with the sources' hash
    # later calls: the cached choice only (one kernel ran)
    _, _, kernels = profile_call(lambda: fused_attention(q, k, v, [], spec), kernels=True)
    assert kernels in ("fwd: ATen flash is_causal x1", "fwd: tiled x1"), kernels
    # a cached "tiled" is obeyed (a new process reads it from disk), same result
    choices.CHOICES.put(key, {"kernel": "tiled", "ms": {"aten_flash": 2.0, "tiled": 1.0}})
    choices.CHOICES.mem.clear()
    choices.CHOICES.loaded = False
    box = {}
    _, _, kernels = profile_call(lambda: box.setdefault("o", fused_attention(q, k, v, [], spec)),
                                 kernels=True)
    assert kernels == "fwd: tiled x1", kernels
    torch.testing.assert_close(box["o"], ref)
    from fusion_pass.kernels.ops import kernel_summary
    text = kernel_summary(spec)
    assert "measured: " in text and "fwd bh8 q64 k64 d16 torch.float32 cpu c: tiled (aten_flash 2 ms, " \
        "tiled 1 ms)" in text, text


def test_measuring_off_uses_the_static_order(choices, monkeypatch):
    from fusion_pass.kernels import fused_attention
    monkeypatch.setenv("FUSION_PASS_MEASURE", "0")
    spec = _causal_spec()
    q, k, v = _qkv(nq=64, nk=64)
    _, _, kernels = profile_call(lambda: fused_attention(q, k, v, [], spec), kernels=True)
    assert kernels == "fwd: ATen flash is_causal x1"
    assert not choices.CHOICES.mem and not choices.cache_path().exists()


def test_a_stale_cache_is_ignored(choices):
    """Choices measured for other kernel sources (or another torch) are not used."""
    import json
    path = choices.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sources": "old", "choices": {"x": {"kernel": "tiled", "ms": {}}}}))
    assert choices.CHOICES.get("x") is None


def test_route_is_the_one_routing():
    """A sliding window never maps onto ATen's kernel: the route says so and the op does not even
    run its checks; GPT-2's buffer does, per call."""
    from fusion_pass.kernels import select
    spec = _causal_spec()
    assert select.route(spec).cpu == ("aten_flash", "tiled")
    import sympy
    from fusion_pass.kernels.predicate import MaskSpec
    i, j = sympy.symbols("i j", integer=True)
    win = MaskSpec(keep=sympy.srepr(sympy.And(j <= i, j > i - 8)), axes=("b", "h", "i", "j"))
    import dataclasses
    wspec = dataclasses.replace(spec, masks=(win,))
    # FlexAttention's forward too (the window's backward is the tiled path's, lse unread)
    assert select.route(wspec).cpu == ("tiled", "flex")
    assert "CPU: tiled implementation" in select.route(wspec).describe()
    assert "FlexAttention's compiled CPU kernel for the forward" in select.route(wspec).describe()


def test_a_compiled_candidate_is_warmed_then_timed_on_the_whole_call(choices, monkeypatch):
    """``select._measure`` with a fake clock: the first candidate runs the call (its result is the
    call's); an ordinary other one runs once on the slice, its time scaled and held to MARGIN; a
    ``warm_first`` one runs the whole call once untimed (its compile) and then twice, the faster
    counting, and needs only to beat the first."""
    clock = [0.0]
    monkeypatch.setattr(choices.time, "perf_counter", lambda: clock[0])
    calls = []

    def cand(name, ms, first_ms=None):
        def run(args):
            calls.append((name, args))
            n = sum(1 for c, _ in calls if c == name)
            clock[0] += ((first_ms if n == 1 and first_ms else ms) / 1e3)
            return name
        return run
    full, sub = ("full",), ("sub",)
    shrink = lambda a: (sub, 8.0)  # noqa: E731
    cands = {"tiled": cand("tiled", 30.0), "other": cand("other", 3.5),
             "flex": choices.warm_first(cand("flex", 27.0, first_ms=5000.0))}
    name, got = choices._measure("k1", cands, full, shrink)
    assert (name, got) == ("tiled", "tiled")  # the call's own result: the first candidate's
    assert [c for c in calls if c[0] == "other"] == [("other", sub)]
    assert [c for c in calls if c[0] == "flex"] == [("flex", full)] * 3
    entry = choices.CHOICES.get("k1")
    # other: 3.5 ms x 8 = 28 > 0.85 x 30; flex: 27 < 30, timed after its 5 s compile
    assert entry == {"kernel": "flex", "ms": {"tiled": 30.0, "other": 28.0, "flex": 27.0}}, entry


def test_an_inference_spec_measures_flex_too(choices):
    """An inference spec whose mask ATen's kernel reads as a tensor (a key padding mask) offers
    FlexAttention as the third candidate; its first call measures all three and the report names
    them (whichever wins here, all three computed the call exactly). Causal alone does not: ATen's
    is_causal always won there (``select.FLEX_DOMINATED``)."""
    import dataclasses
    from fusion_pass.kernels import AttentionSpec, ScoreOp, fused_attention
    causal = dataclasses.replace(_causal_spec(), inference=True)
    assert choices.route(causal).cpu == ("aten_flash", "tiled")
    spec = AttentionSpec(score_ops=(ScoreOp("mul", "const", 0.25), ScoreOp("add", "tensor", index=0)),
                         captured=("tensor",), inference=True)
    assert choices.route(spec).cpu == ("aten_flash", "tiled", "flex")
    q, k, v = _qkv(nq=64, nk=64, H=8, D=32)  # Flex takes head dims >= 32 (cpu_flex.MIN_HEAD_DIM)
    pad = torch.zeros(1, 1, 1, 64).masked_fill_(torch.arange(64) >= 56, -1e9)
    ref = fused_attention(q, k, v, [pad], dataclasses.replace(spec, inference=False))
    out = fused_attention(q, k, v, [pad], spec)
    torch.testing.assert_close(out, ref)
    entry = choices.CHOICES.get(choices.shape_key("fwd", spec.to_key(), q, k))
    assert entry is not None and set(entry["ms"]) == {"aten_flash", "tiled", "flex"}, entry
    from fusion_pass.kernels.ops import kernel_summary
    assert "FlexAttention" in kernel_summary(spec) and "flex " in kernel_summary(spec)
