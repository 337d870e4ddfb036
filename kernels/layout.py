"""Memory layouts of the fused op's outputs, shared by the op (``ops``) and the kernels that
allocate them (``cpu``): a kernel that writes its result straight into the layout the op's fake
promises saves the output-sized copy the op would otherwise make (the tiled backward's dq, dk, dv
were each copied once: three gradient-sized blocks live at once at the peak)."""

import torch
from torch import Tensor


def grad_strides(shape) -> tuple:
    """Strides of a dense (..., N, H, D)-layout tensor viewed as (..., H, N, D)."""
    if len(shape) < 3:
        return _dense(shape)
    *batch, h, n, d = shape
    inner = _dense(tuple(batch) + (n, h, d))
    return inner[:-3] + (inner[-2], inner[-3], inner[-1])


def _dense(shape) -> tuple:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def grad_empty(t: Tensor, dtype=None) -> Tensor:
    """Gradients of q, k, v come in the (..., N, H, D) memory layout (viewed as (..., H, N, D)):
    the layout ATen's CPU flash backward produces and models' own q/k/v usually have (heads split
    off a (B, N, H*D) projection), so the common path returns its result without a copy."""
    if t.dim() < 3:
        return t.new_empty(t.shape, dtype=dtype)
    shape = tuple(t.shape)
    return t.new_empty(shape[:-3] + (shape[-2], shape[-3], shape[-1]), dtype=dtype).transpose(-3, -2)


def in_grad_layout(g: Tensor) -> Tensor:
    """g itself when it already has the promised layout (strides of size-1 dims do not matter:
    they address nothing), else a copy in it."""
    want = grad_strides(tuple(g.shape))
    if g.numel() == 0 or all(a == b for a, b, n in zip(g.stride(), want, g.shape) if n > 1):
        return g
    return grad_empty(g).copy_(g)


def heads_major(q: Tensor) -> bool:
    """q in the (..., N, H, D) memory layout viewed as (..., H, N, D): heads split off a
    (B, N, H*D) projection, as most models' q is before any elementwise step (GPT-2, BERT, ...)."""
    return q.dim() >= 4 and q.stride(-3) < q.stride(-2)


def out_empty(q: Tensor, shape: tuple, dtype) -> Tensor:
    """The forward's output layout follows q's, as ATen's CPU flash kernel's does: heads-major
    ((..., N, H, Dv) memory viewed as (..., H, N, Dv)) for a heads-major q, so that the model's
    ``out.transpose(1, 2).reshape(B, N, H * Dv)`` is a view (a contiguous promise cost two
    output-sized copies there: ours, then the model's), else contiguous (a q made by RoPE; ATen's
    kernel then writes a contiguous output too, so a fixed heads-major promise would copy it)."""
    if not heads_major(q):
        return q.new_empty(shape, dtype=dtype)
    return q.new_empty(shape[:-3] + (shape[-2], shape[-3], shape[-1]), dtype=dtype).transpose(-3, -2)


def in_out_layout(out: Tensor, q: Tensor) -> Tensor:
    """out itself when it has the layout the fake promises (``out_empty``), else a copy in it."""
    return in_grad_layout(out) if heads_major(q) else out.contiguous()
