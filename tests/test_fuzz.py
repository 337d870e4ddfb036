"""Property test: random attention programs, written the way models write them, are fused into
exactly one fusion_pass::attention and compute what eager computes, forward and backward.

A hypothesis strategy draws a ``Program``: the spelling of the QK product (torch.matmul, @,
.matmul, torch.bmm on (B*H, N, D) tensors), of K's transpose (transpose(-1, -2), transpose(2, 3),
.mT, permute), a scale (multiply or divide by a float or by a 0-dim buffer, or none), an additive
bias (per head, per key, per (query, key); either operand order; learnable), a boolean mask
(masked_fill with -1e9 or finfo.min, or torch.where(keep, s, -1e9); never a row without a key),
the softmax spelling (torch.softmax, F.softmax, .softmax, or F.softmax(dtype=float32).to(q.dtype)),
a dropout that is a no-op (training=False, or p=0), and the shapes and dtype. The program is
written out as Python source (printed by hypothesis when an example fails) and run as an
nn.Module's forward, so Dynamo sees exactly what a model would give it.
"""
from __future__ import annotations

import linecache
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import fusion_pass

from helpers import max_rel_error, profiled_op_counts

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

RTOL = {torch.float32: 1e-5, torch.float64: 1e-5}


@dataclass(frozen=True)
class Program:
    B: int
    H: int
    Nq: int
    Nk: int
    D: int
    dtype: torch.dtype
    product: str            # matmul | operator | method | bmm
    transpose: str          # last_two | dims_2_3 | mT | permute
    scale: str              # none | mul | div
    scale_by: str           # const | buffer
    scale_value: float      # the factor (mul) or divisor (div)
    bias: Optional[str]     # None | head (1,H,Nq,Nk) | key (B,1,1,Nk) | qk (Nq,Nk)
    bias_first: bool        # bias + s rather than s + bias
    mask: Optional[str]     # None | fill_1e9 | fill_min | where
    softmax: str            # torch | functional | method | float32_then_cast
    dropout: Optional[str]  # None | eval | p0
    kv_rep: int = 1         # query heads per K/V head (GQA/MQA when > 1): K/V have H heads, q H*kv_rep
    repeat: str = "repeat_kv"  # repeat_kv (expand + reshape) | repeat_interleave

    @property
    def flat(self) -> bool:
        """bmm spelling: q, k, v are (B*H, N, D), as BART-era models reshape them."""
        return self.product == "bmm"

    # ---- shapes of the inputs --------------------------------------------------------------------

    def qkv_shapes(self):
        if self.flat:
            lead = (self.B * self.H,)
            return [lead + (n, self.D) for n in (self.Nq, self.Nk, self.Nk)]
        q = (self.B, self.H * self.kv_rep, self.Nq, self.D)
        return [q] + [(self.B, self.H, self.Nk, self.D)] * 2

    def bias_shape(self):
        B, H, Nq, Nk = self.B, self.H * self.kv_rep, self.Nq, self.Nk
        if self.flat:  # the same three kinds, for (B*H, Nq, Nk) scores
            return {"head": (1, Nq, Nk), "key": (B * H, 1, Nk), "qk": (Nq, Nk)}[self.bias]
        return {"head": (1, H, Nq, Nk), "key": (B, 1, 1, Nk), "qk": (Nq, Nk)}[self.bias]

    def mask_shape(self):
        return (self.Nq, self.Nk) if self.flat else (self.B, 1, self.Nq, self.Nk)

    # ---- the program -----------------------------------------------------------------------------

    def source(self) -> str:
        dims = "1, 2" if self.flat else "2, 3"
        kt = {"last_two": "k.transpose(-1, -2)", "dims_2_3": f"k.transpose({dims})",
              "mT": "k.mT", "permute": "k.permute(0, 2, 1)" if self.flat else "k.permute(0, 1, 3, 2)"}
        prod = {"matmul": "torch.matmul({}, {})", "operator": "{} @ {}",
                "method": "{}.matmul({})", "bmm": "torch.bmm({}, {})",
                "einsum": "torch.einsum('bhij,bhjd->bhid', {}, {})"}[self.product]
        args = ["q", "k", "v"] + (["bias"] if self.bias else []) + (["mask"] if self.mask else [])
        lines = [f"def forward(self, {', '.join(args)}):"]
        if self.kv_rep > 1:
            r = self.kv_rep
            if self.repeat == "repeat_kv":
                for t in "kv":
                    lines.append(f"    b_, h_, n_, d_ = {t}.shape")
                    lines.append(f"    {t} = {t}[:, :, None, :, :].expand(b_, h_, {r}, n_, d_)"
                                 f".reshape(b_, h_ * {r}, n_, d_)")
            else:
                lines += [f"    k = k.repeat_interleave({r}, dim=1)", f"    v = v.repeat_interleave({r}, dim=1)"]
        if self.product == "einsum":
            lines.append("    s = torch.einsum('bhid,bhjd->bhij', q, k)")
        else:
            lines.append(f"    s = {prod.format('q', kt[self.transpose])}")
        if self.scale != "none":
            by = "self.scale" if self.scale_by == "buffer" else repr(self.scale_value)
            lines.append(f"    s = s {'*' if self.scale == 'mul' else '/'} {by}")
        if self.bias:
            lines.append("    s = bias + s" if self.bias_first else "    s = s + bias")
        if self.mask == "fill_1e9":
            lines.append("    s = s.masked_fill(mask, -1e9)")
        elif self.mask == "fill_min":
            lines.append("    s = s.masked_fill(mask, torch.finfo(s.dtype).min)")
        elif self.mask == "where":
            lines.append("    s = torch.where(mask, s, -1e9)")  # here mask means keep
        if self.softmax == "decomposed":
            lines += ["    e = torch.exp(s - s.amax(dim=-1, keepdim=True))",
                      "    p = e / e.sum(dim=-1, keepdim=True)"]
        else:
            lines.append("    p = " + {
                "torch": "torch.softmax(s, dim=-1)",
                "functional": "F.softmax(s, dim=-1)",
                "method": "s.softmax(-1)",
                "float32_then_cast": "F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)",
                "log_softmax_exp": "torch.log_softmax(s, dim=-1).exp()",
            }[self.softmax])
        if self.dropout == "eval":
            lines.append("    p = F.dropout(p, p=0.1, training=False)")
        elif self.dropout == "p0":
            lines.append("    p = F.dropout(p, p=0.0, training=self.training)")
        lines.append(f"    return {prod.format('p', 'v')}")
        return "\n".join(lines) + "\n"

    def module(self) -> torch.nn.Module:
        return Attention(self)

    def inputs(self):
        qkv = [torch.randn(s, dtype=self.dtype, requires_grad=True) for s in self.qkv_shapes()]
        extra = []
        if self.bias:
            extra.append(torch.randn(self.bias_shape(), dtype=self.dtype, requires_grad=True))
        if self.mask:
            masked = torch.rand(self.mask_shape()) < 0.3
            masked[..., 0] = False  # every query keeps key 0: no fully masked row
            extra.append(~masked if self.mask == "where" else masked)
        return qkv + extra


class Attention(torch.nn.Module):
    """One program as a module: its forward is compiled from the program's source."""

    _count = 0

    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        if program.scale != "none" and program.scale_by == "buffer":
            self.register_buffer("scale", torch.tensor(program.scale_value, dtype=program.dtype))
        Attention._count += 1
        filename = f"<fuzz program {Attention._count}>"
        source = program.source()
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        scope = {"torch": torch, "F": F}
        exec(compile(source, filename, "exec"), scope)
        self._forward = scope["forward"]

    def forward(self, *args):
        return self._forward(self, *args)


def _gradient_error(got, want) -> float:
    """max_rel_error, except that a gradient which eager computes as exactly zero (q's and k's when
    Nk = 1: a softmax over one key is constant) is measured against the largest gradient overall,
    since any summation order gives rounding noise there, not zero."""
    scale = max(w.abs().max().item() for w in want)
    worst = 0.0
    for g, w in zip(got, want):
        if w.any():
            worst = max(worst, max_rel_error([g], [w]))
        else:
            worst = max(worst, g.abs().max().item() / max(scale, 1e-30))
    return worst


@st.composite
def programs(draw):
    product = draw(st.sampled_from(["matmul", "operator", "method", "bmm", "einsum"]))
    scale = draw(st.sampled_from(["none", "mul", "div"]))
    bias = draw(st.sampled_from([None, "head", "key", "qk"]))
    D = draw(st.sampled_from([8, 16]))
    return Program(
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 3)),
        Nq=draw(st.integers(1, 20)), Nk=draw(st.integers(1, 20)),
        D=D,
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float32, torch.float64])),
        product=product,
        transpose=draw(st.sampled_from(["last_two", "dims_2_3", "mT", "permute"])),
        scale=scale,
        scale_by=draw(st.sampled_from(["const", "buffer"])) if scale != "none" else "const",
        scale_value=draw(st.sampled_from(
            {"mul": [1 / math.sqrt(D), 0.3], "div": [math.sqrt(D), 3.0], "none": [1.0]}[scale])),
        bias=bias,
        bias_first=draw(st.booleans()) if bias else False,
        mask=draw(st.sampled_from([None, "fill_1e9", "fill_min", "where"])),
        softmax=draw(st.sampled_from(["torch", "functional", "method", "float32_then_cast",
                                      "decomposed", "log_softmax_exp"])),
        dropout=draw(st.sampled_from([None, "eval", "p0"])),
        kv_rep=1 if product == "bmm" else draw(st.sampled_from([1, 1, 2, 3])),
        repeat=draw(st.sampled_from(["repeat_kv", "repeat_interleave"])),
    )


@pytest.mark.slow  # 25 programs, each compiled forward and backward: `python -m pytest -m slow`
@settings(max_examples=25, deadline=None, derandomize=True)
@given(programs(), st.booleans())
def test_random_attention_program_is_fused_and_equal_to_eager(program, training):
    torch._dynamo.reset()  # each example compiles afresh: no recompile limit, no stale guards
    torch.manual_seed(0)
    model = program.module().train(training)
    inputs = program.inputs()
    diff = [x for x in inputs if x.requires_grad]  # q, k, v and the bias when there is one

    expl = fusion_pass.explain(model, *inputs)
    assert len(expl.fused) == 1 and not expl.missed, f"{program.source()}\n{expl}"

    ref = model(*inputs)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, diff, g)

    compiled = torch.compile(model, backend="fusion_pass")
    torch.autograd.grad(compiled(*inputs), diff, g)  # compile forward and backward first
    out, n_fwd, _ = profiled_op_counts(lambda: compiled(*inputs))
    grads, _, n_bwd = profiled_op_counts(lambda: torch.autograd.grad(out, diff, g))

    rtol = RTOL[program.dtype]
    assert (n_fwd, n_bwd) == (1, 1), program.source()
    assert max_rel_error([out], [ref]) < rtol, program.source()
    assert _gradient_error(grads, ref_grads) < rtol * 10, program.source()
    torch._dynamo.reset()
