"""Issue 11, item 1: a scale written after the mask (``s.masked_fill(m, -inf) / sqrt(d)``) reaches
the same kernels as the scale-first spelling, only where the two orders give the same bits.

End to end: the model compiled with the backend, the kernel that ran read from a profile, output
and gradients against float64 eager; inputs include NaN / inf and huge scores, where an unsound
move would show. Unit: the cases that must not move (a finite fill, an additive mask with a
scale that could overflow, a scale read from a tensor) stay where they were."""
import math

import pytest
import torch

from fusion_pass import explain
from fusion_pass.kernels.spec import AttentionSpec, MaskSpec, ScoreOp
from fusion_pass.measure import profile_call
from fusion_pass.normalize import scales_before_masks

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class CausalThenScale(torch.nn.Module):
    """Mask first, scale after (the order some models write)."""

    def __init__(self, fill=-math.inf, div=True, window=None):
        super().__init__()
        self.fill, self.div, self.window = fill, div, window

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])[:, None]
        j = torch.arange(k.shape[-2])[None, :]
        masked = j > i
        if self.window is not None:
            masked = masked | (j <= i - self.window)
        s = torch.matmul(q, k.transpose(-1, -2)).masked_fill(masked, self.fill)
        s = s / math.sqrt(q.shape[-1]) if self.div else s * (1.0 / math.sqrt(q.shape[-1]))
        return torch.matmul(torch.softmax(s, -1), v)


def _qkv(n=48, H=2, D=16, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(1, H, n, D, generator=g) for _ in range(3))


def _same(x, ref, tol):
    assert torch.equal(x.isnan(), ref.isnan()), "NaN where the reference has none (or the reverse)"
    d = torch.where(x.isnan(), 0.0, (x.double() - ref.double()).nan_to_num(0.0, 0.0, 0.0)).abs().max()
    assert d.item() <= tol, d.item()


def _run(model, args):
    compiled = torch.compile(model, backend="fusion_pass")
    xs = [a.clone().requires_grad_(True) for a in args]
    compiled(*xs).sum().backward()  # compile forward and backward first
    box = {}
    _, _, fwd = profile_call(lambda: box.setdefault("out", compiled(*xs)), kernels=True)
    g = torch.randn_like(box["out"])
    _, _, bwd = profile_call(lambda: box.setdefault("g", torch.autograd.grad(box["out"], xs, g)),
                             kernels=True)
    refs = [a.double().requires_grad_(True) for a in args]
    ref = model(*refs)
    _same(box["out"], ref, 1e-5)
    for got, want in zip(box["g"], torch.autograd.grad(ref, refs, g.double())):
        _same(got, want, 1e-4 * (want.abs().nan_to_num(0.0, 0.0, 0.0).max().item() + 1))
    return fwd, bwd


@pytest.mark.parametrize("div", [True, False])
def test_scale_after_causal_fill_runs_flash_is_causal(div):
    model = CausalThenScale(div=div)
    q, k, v = _qkv()
    expl = explain(model, q, k, v)
    spec = expl.fused[0].spec
    assert [op.kind for op in spec.score_ops][-1] == "fill", spec.score_ops  # the mask is last
    fwd, bwd = _run(model, (q, k, v))
    assert fwd == "fwd: ATen flash is_causal x1", fwd
    assert bwd == "bwd: ATen flash is_causal x1", bwd


def test_scale_after_window_fill_skips_tiles():
    """A sliding window written mask-first: the removal rule reads the last step, so with the scale
    moved the tiled path skips the tiles no row keeps."""
    model = CausalThenScale(window=8)
    q, k, v = _qkv(n=64)
    spec = explain(model, q, k, v).fused[0].spec
    from fusion_pass.kernels import select
    assert select.route(spec).span_skip
    _run(model, (q, k, v))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_scale_after_fill_with_nonfinite_inputs(bad):
    q, k, v = _qkv()
    k = k.clone()
    k[0, 1, 30, 3] = bad  # masked for rows < 30, kept after
    _run(CausalThenScale(), (q, k, v))


def test_scale_after_fill_huge_scores():
    q, k, v = _qkv(scale=1e3)
    _run(CausalThenScale(div=False), (q, k, v))


def _spec(mask_op, scale_op, masks=(), dtype="float32"):
    return AttentionSpec(score_ops=(mask_op, scale_op), captured=("tensor",), qk_dtype=dtype,
                         softmax_dtype=dtype, prob_dtype=dtype, out_dtype=dtype, masks=tuple(masks))


_ADDITIVE = MaskSpec(keep="Symbol('i') >= Symbol('j')", axes=("b", "h", "i", "j"), kind="additive",
                     dtype="float32", kept=0.0, masked=-math.inf)


@pytest.mark.parametrize("mask_op,scale_op,masks,moves", [
    (ScoreOp("fill", "tensor", value=-math.inf, index=0), ScoreOp("div", "const", value=8.0), (), True),
    (ScoreOp("fill_not", "tensor", value=-math.inf, index=0), ScoreOp("mul", "const", value=3.0), (), True),
    # a finite fill's product rounds in the step's dtype: not moved
    (ScoreOp("fill", "tensor", value=-1e4, index=0), ScoreOp("div", "const", value=8.0), (), False),
    # a non-positive or non-finite scale flips or breaks -inf
    (ScoreOp("fill", "tensor", value=-math.inf, index=0), ScoreOp("mul", "const", value=-1.0), (), False),
    (ScoreOp("fill", "tensor", value=-math.inf, index=0), ScoreOp("mul", "const", value=math.inf), (), False),
    # a scale read from a tensor: its sign is data
    (ScoreOp("fill", "tensor", value=-math.inf, index=0), ScoreOp("mul", "scalar", index=0), (), False),
    # an additive mask tensor: its values are data
    (ScoreOp("add", "tensor", index=0), ScoreOp("mul", "const", value=0.5), (), False),
    # an additive 0 / -inf predicate: moved only where s * c cannot overflow to +inf
    (ScoreOp("add", "predicate", index=0), ScoreOp("mul", "const", value=0.125), (_ADDITIVE,), True),
    (ScoreOp("add", "predicate", index=0), ScoreOp("div", "const", value=8.0), (_ADDITIVE,), True),
    (ScoreOp("add", "predicate", index=0), ScoreOp("mul", "const", value=2.0), (_ADDITIVE,), False),
    (ScoreOp("add", "predicate", index=0), ScoreOp("div", "const", value=0.5), (_ADDITIVE,), False),
])
def test_what_moves(mask_op, scale_op, masks, moves):
    spec = _spec(mask_op, scale_op, masks)
    got = scales_before_masks(spec).score_ops
    assert got == ((scale_op, mask_op) if moves else (mask_op, scale_op))


def test_a_dtype_change_does_not_move():
    spec = _spec(ScoreOp("fill", "tensor", value=-math.inf, index=0, dtype="float16"),
                 ScoreOp("div", "const", value=8.0, dtype="float32"), dtype="float16")
    assert scales_before_masks(spec) is spec


def test_additive_overflow_is_why_large_scales_stay():
    """The fact behind c <= 1: for finite s, (s - inf) * c is -inf but s * c - inf is NaN when
    s * c overflows."""
    s = torch.tensor([3e38])
    assert ((s + -math.inf) * 2.0).item() == -math.inf
    assert math.isnan((s * 2.0 + -math.inf).item())
