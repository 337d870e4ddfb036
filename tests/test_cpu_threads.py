"""The tiled path's forward and backward give the same bits on one intra-op thread and on two.

Why it matters: both run on one thread while other processes keep the cores busy
(``kernels/cpu.py`` ``_threads_for_share``) and on the caller's count otherwise, so a result that
changed with the thread count would change with the machine's load (run-to-run determinism). The
load check is replaced by a fixed answer here so that both counts really run, and ATen's flash
kernel (whose thread count never follows the load) is switched off. Cases cover the
reductions the path makes: odd key spans (a sliding window), a plain odd length, learnable
tensor and scalar operands (their gradients summed over broadcast dims), dropout, half types,
grouped heads and one query row against a long cache."""
import math

import pytest
import torch

import fusion_pass
from fusion_pass.kernels import cpu, cpu_flash

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Attn(torch.nn.Module):
    def __init__(self, kind, n_heads=2, dropout=0.0):
        super().__init__()
        self.kind, self.dropout = kind, dropout
        self.temp = torch.nn.Parameter(torch.tensor(0.7))
        self.slopes = torch.nn.Parameter(torch.linspace(0.1, 0.9, n_heads).view(n_heads, 1, 1))

    def forward(self, q, k, v, bias=None):
        s = torch.matmul(q, k.transpose(-1, -2))
        i = torch.arange(q.shape[-2])[:, None] + (k.shape[-2] - q.shape[-2])
        j = torch.arange(k.shape[-2])[None, :]
        if self.kind == "window":
            s = (s / 8).masked_fill((j > i) | (j <= i - 37), float("-inf"))
        elif self.kind == "finfo_causal":
            s = torch.where(j <= i, s * 0.125, torch.finfo(s.dtype).min)
        elif self.kind == "bias":
            s = s * 0.125 + bias
        elif self.kind == "temperature":
            s = s * self.temp
        elif self.kind == "alibi":
            s = s * 0.125 + self.slopes * (j - i).to(s.dtype)
        else:
            s = s * 0.125
        p = torch.softmax(s, -1, dtype=torch.float32).to(q.dtype)
        p = torch.nn.functional.dropout(p, self.dropout, training=self.dropout > 0)
        return torch.matmul(p, v)


CASES = [  # (kind, B, H, Hk, nq, nk, dtype, dropout, bias shape)
    ("window", 1, 2, 2, 300, 300, torch.float32, 0.0, None),
    ("plain", 1, 3, 3, 383, 383, torch.float32, 0.0, None),
    ("finfo_causal", 2, 2, 2, 129, 129, torch.float32, 0.0, None),
    ("bias", 1, 2, 2, 200, 200, torch.float32, 0.0, (1, 2, 200, 200)),
    ("bias", 2, 2, 2, 150, 150, torch.float32, 0.0, (2, 1, 1, 150)),
    ("temperature", 1, 2, 2, 257, 257, torch.float32, 0.0, None),
    ("alibi", 1, 2, 2, 190, 190, torch.float32, 0.0, None),
    ("plain", 1, 2, 2, 160, 160, torch.float32, 0.25, None),
    ("plain", 1, 2, 2, 150, 150, torch.bfloat16, 0.0, None),
    ("plain", 1, 4, 2, 1, 40000, torch.float32, 0.0, None),  # decode, grouped heads
    ("plain", 1, 1, 1, 1, 40000, torch.float32, 0.0, None),  # one row, one head
]


def _run(model, args, threads, monkeypatch):
    monkeypatch.setattr(cpu._SHARE, "others_busy", lambda: False)
    monkeypatch.setattr(cpu_flash, "usable", lambda *a, **k: None)  # the tiled path, always
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        xs = [a.clone().requires_grad_(True) for a in args]
        out = model(*xs)
        g = torch.randn_like(out)
        params = [p for p in model.parameters()]
        grads = torch.autograd.grad(out, xs + params, g, allow_unused=True)
        return [out] + [x for x in grads if x is not None]
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[4]}x{c[5]}-h{c[2]}/{c[3]}-{c[6]}-p{c[7]}")
def test_same_bits_on_one_and_two_threads(case, monkeypatch):
    kind, B, H, Hk, nq, nk, dtype, p, bias_shape = case
    if torch.get_num_threads() < 2:
        torch.set_num_threads(2)  # the comparison needs two threads to exist
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, nq, 32, generator=gen).to(dtype)
    k = torch.randn(B, Hk, nk, 32, generator=gen).to(dtype)
    v = torch.randn(B, Hk, nk, 32, generator=gen).to(dtype)
    args = [q, k, v]
    model = Attn(kind, H, p)
    if Hk != H:
        kv = Attn(kind, H, p)
        model = _Grouped(kv, H // Hk)
    if bias_shape is not None:
        args.append(torch.randn(bias_shape, generator=gen))
    # the decode cases (one query row) test the tiled path: fused on purpose (kept by default)
    compiled = torch.compile(model, backend=fusion_pass.Backend(fuse_cpu_decode=True))
    expl_ok = compiled(*args)  # compile once; both runs below use the same graph
    assert expl_ok.shape[-2] == nq
    one = _run(compiled, args, 1, monkeypatch)
    two = _run(compiled, args, 2, monkeypatch)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert torch.equal(a, b), (a - b).abs().max()
    # and the fused path ran (an unfused graph would also give equal bits)
    from helpers import profiled_op_counts
    _, nf, _ = profiled_op_counts(lambda: compiled(*args))
    assert nf == 1


class _Grouped(torch.nn.Module):
    """Grouped-query attention as Llama writes it: K/V heads repeated by expand + reshape."""

    def __init__(self, inner, rep):
        super().__init__()
        self.inner, self.rep = inner, rep

    def forward(self, q, k, v):
        B, Hk, N, D = k.shape
        k = k[:, :, None].expand(B, Hk, self.rep, N, D).reshape(B, Hk * self.rep, N, D)
        v = v[:, :, None].expand(B, Hk, self.rep, N, D).reshape(B, Hk * self.rep, N, D)
        return self.inner(q, k, v)


def test_sum_helpers_match_torch():
    t = torch.randn(3, 5000)
    assert torch.allclose(cpu._sum_all(t), t.sum(), rtol=1e-5)
    got = cpu._sum_dims(torch.randn(1, 1, 70000), [2])
    assert got.shape == (1, 1, 1)
    x = torch.randn(2, 3, 4, 5)
    assert torch.allclose(cpu._sum_dims(x, [0, 2]), x.sum((0, 2), keepdim=True), atol=1e-6)
