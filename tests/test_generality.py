"""Generality (issue 10): ordinary spellings that used to be refused fuse, equal eager in outputs
and gradients, with the fused op counted; static and dynamic shapes."""
import math

import pytest
import torch

from helpers import check_fused

B, H, N, D = 2, 3, 13, 8  # odd length: tiles never divide it


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py: Dynamo reset around each test


def _qkv():
    return [torch.randn(B, H, N, D, requires_grad=True) for _ in range(3)]


def _keep():
    keep = torch.rand(N, N) < 0.7
    keep[:, 0] = True
    return keep


# ---- mixed batch layouts across the two products -------------------------------------------------

@pytest.mark.parametrize("dynamic", [False, True])
def test_4d_scores_then_merged_bmm_with_v(dynamic):
    def f(q, k, v):
        p = (q @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1)
        b, h, n, d = v.shape
        return torch.bmm(p.reshape(b * h, n, n), v.reshape(b * h, n, d)).view(b, h, n, d)
    check_fused(f, *_qkv(), dynamic=dynamic)


@pytest.mark.parametrize("dynamic", [False, True])
def test_merged_baddbmm_scores_then_4d_matmul_with_v(dynamic):
    """BLOOM-style ALiBi through baddbmm on (B*H, N, D), then a 4-D P @ V."""
    def f(q, k, v, alibi):
        b, h, n, d = q.shape
        s = torch.baddbmm(alibi, q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2),
                          beta=1.0, alpha=1 / math.sqrt(d))
        return s.view(b, h, n, n).softmax(-1) @ v
    alibi = torch.randn(B * H, 1, N)
    check_fused(f, *_qkv(), alibi, dynamic=dynamic)


# ---- shape-only uses do not count as uses of the scores -------------------------------------------

@pytest.mark.parametrize("dynamic", [False, True])
def test_mask_expanded_as_the_scores(dynamic):
    def f(q, k, v, masked):
        s = q @ k.transpose(-1, -2)
        s = s.masked_fill(masked.expand_as(s), -1e9)
        return s.softmax(-1) @ v
    check_fused(f, *_qkv(), ~_keep(), dynamic=dynamic)


def test_scale_read_from_the_scores_size():
    def f(q, k, v):
        s = q @ k.transpose(-1, -2)
        s = s / math.sqrt(s.size(-1))
        p = s.softmax(-1)
        return p @ v * (p.shape[-1] / N)
    check_fused(f, *_qkv(), dynamic=True)


# ---- fills that are graph tensors ----------------------------------------------------------------

@pytest.mark.parametrize("make_fill", [
    lambda s: torch.full((), torch.finfo(s.dtype).min, dtype=s.dtype),
    lambda s: torch.tensor(-float("inf")),
    lambda s: torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float32),
], ids=["full-finfo-min", "tensor-inf", "tensor-finfo-min"])
def test_fill_value_built_in_the_graph(make_fill):
    def f(q, k, v, keep):
        s = q @ k.transpose(-1, -2)
        fill = make_fill(s)
        s = torch.where(keep, s, fill)
        return s.softmax(-1) @ v
    check_fused(f, *_qkv(), _keep())


def test_fill_value_reused_by_two_layers():
    def f(q, k, v, keep):
        fill = torch.full((), -1e4)
        a = torch.where(keep, q @ k.transpose(-1, -2), fill).softmax(-1) @ v
        return torch.where(keep, a @ k.transpose(-1, -2), fill).softmax(-1) @ v
    check_fused(f, *_qkv(), _keep(), sites=2)


# ---- inferred (-1) batch sizes --------------------------------------------------------------------

@pytest.mark.parametrize("dynamic", [False, True])
def test_views_with_inferred_batch_size(dynamic):
    def f(q, k, v):
        n = q.shape[-2]
        s = (q @ k.transpose(-1, -2)).view(-1, n, n) * 0.5
        p = s.softmax(-1).view(q.shape[0], -1, n, n)
        return p @ v
    check_fused(f, *_qkv(), dynamic=dynamic)


# ---- any pointwise score function ------------------------------------------------------------------

_POINTWISE = {
    "sin": lambda s: torch.sin(s),
    "cos-method": lambda s: s.cos(),
    "exp-scaled": lambda s: torch.exp(s * 0.1),
    "sigmoid": lambda s: torch.sigmoid(s),
    "silu": lambda s: torch.nn.functional.silu(s),
    "gelu": lambda s: torch.nn.functional.gelu(s),
    "gelu-tanh": lambda s: torch.nn.functional.gelu(s, approximate="tanh"),
    "abs": lambda s: s.abs(),
    "neg": lambda s: -s,
    "clamp": lambda s: torch.clamp(s, -1.5, 2.0),
    "clamp-min": lambda s: s.clamp(min=-0.5),
    "pow3": lambda s: s ** 3,
    "log1p-abs": lambda s: torch.log1p(s.abs()),
    "square": lambda s: s * s,
    "leaky": lambda s: torch.nn.functional.leaky_relu(s, 0.2),
    "softplus": lambda s: torch.nn.functional.softplus(s, beta=2.0),
    "relu-plus-bias": lambda s: torch.relu(s) + 0.5,
}


@pytest.mark.parametrize("name", sorted(_POINTWISE))
def test_pointwise_score_function(name):
    fn = _POINTWISE[name]

    def f(q, k, v):
        return fn(q @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ v
    expl = check_fused(f, *_qkv())
    assert "score_mod" in str(expl)


def test_pointwise_function_with_learnable_bias_and_mask():
    def f(q, k, v, bias, keep):
        s = torch.nn.functional.gelu(q @ k.transpose(-1, -2)) + bias
        s = s.masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v
    bias = torch.randn(1, H, N, N, requires_grad=True)
    check_fused(f, *_qkv(), bias, _keep())


def test_two_products_either_is_the_score():
    """(q k^T) * (q2 k2^T): both sides are products; one is the score, the other an operand."""
    def f(q, k, v, q2):
        return ((q @ k.transpose(-1, -2)) * (q2 @ k.transpose(-1, -2)) * 0.1).softmax(-1) @ v
    check_fused(f, *_qkv(), torch.randn(B, H, N, D, requires_grad=True))
