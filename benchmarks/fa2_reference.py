"""A minimal FlashAttention-2 forward in Triton, the yardstick of ``gpu_static.py``.

Written for this project from the FlashAttention-2 algorithm (Dao, 2023): one program per
(query block, batch*head), Q resident, an online softmax over key blocks in base 2 with the
softmax scale and log2(e) folded into one multiplier, the normalisation deferred to the end.
It does only what every attention kernel must do, so the instruction count of its inner loop is
the floor ours is compared against (non-MMA instructions per key block, per thread).

Deliberately minimal: no bounds checks (N a multiple of the blocks, D == BLOCK_D), no score
function, no dropout. ``CAUSAL`` splits the key range as FA2 does: the blocks strictly below the
diagonal run a loop without any mask (the "full tiles"), the diagonal block a second loop with the
mask; ``inner_loop`` figures in ``gpu_static.py`` are taken from the first.

Not used by the product; ``forward`` runs it (on a GPU, or under TRITON_INTERPRET=1) so that a
test can check it computes attention.
"""
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def fa2_fwd(
    Q, K, V, Out, LSE, qk_scale,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    H, N_Q, N_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + off_b * sqb + off_h * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :])
    k_base = K + off_b * skb + off_h * skh + offs_d[None, :]
    v_base = V + off_b * svb + off_h * svh + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # full tiles: every key of the block is kept by every row
    hi = pid_m * BLOCK_M if CAUSAL else N_K
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skn)
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if CAUSAL:
        # the diagonal blocks: masked (BLOCK_M is a multiple of BLOCK_N)
        for start_n in range(pid_m * BLOCK_M, (pid_m + 1) * BLOCK_M, BLOCK_N):
            offs_n = start_n + offs_n0
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * skn)
            s = tl.dot(q, tl.trans(k))
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * svn)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + off_b * sob + off_h * soh + offs_m[:, None].to(tl.int64) * som + offs_d[None, :],
             out.to(Out.dtype.element_ty))
    # natural-log lse, as the product's kernels save it
    tl.store(LSE + off_bh * N_Q + offs_m, (m_i + tl.math.log2(l_i)) / 1.4426950408889634)


def launch_args(q, k, v, causal: bool, block_m: int, block_n: int):
    """(grid, args, constexpr kwargs) of ``fa2_fwd`` for (B, H, N, D) tensors, outputs allocated."""
    B, H, nq, d = q.shape
    nk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, nq), dtype=torch.float32, device=q.device)
    scale = d ** -0.5 * LOG2E
    args = (q, k, v, out, lse, scale, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
            k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0),
            out.stride(1), out.stride(2), H, nq, nk)
    grid = (triton.cdiv(nq, block_m), B * H)
    return grid, args, dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d, CAUSAL=causal), (out, lse)


def forward(q, k, v, causal=False, block_m=64, block_n=64, num_warps=4, num_stages=2):
    """Attention with scale d**-0.5; requires N % block_m == 0 == N % block_n, D a power of 2."""
    assert q.shape[2] % block_m == 0 and k.shape[2] % block_n == 0 and block_m % block_n == 0
    assert q.shape[-1] == triton.next_power_of_2(q.shape[-1])
    grid, args, kw, (out, lse) = launch_args(q, k, v, causal, block_m, block_n)
    fa2_fwd[grid](*args, **kw, num_warps=num_warps, num_stages=num_stages)
    return out, lse
