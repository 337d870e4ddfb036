"""Generate stage, Triton half: from an ``AttentionSpec``, the source of FlashAttention-2 style
forward and backward kernels with the spec's score chain written inline, and the launchers that
``ops.py`` calls on CUDA tensors (or, under ``TRITON_INTERPRET=1``, on CPU tensors in the tests).

Hands on to ``ops.py``: ``supports(q, k, v, spec)``, ``forward(...) -> (out, lse)`` and
``backward(...) -> (dq, dk, dv, dcaptured)``, with the semantics of ``cpu.py`` (the reference):

    out = dropout(softmax(score_mod(q @ k^T))) @ v,   lse = logsumexp(score_mod(q @ k^T), -1)

Kernels (one generated module per spec; ``generate_source(spec)`` returns its text):

* ``attn_fwd``: one program per (query block, batch*head); online softmax over key blocks with
  fp32 accumulators; saves the row log-sum-exp for the backward.
* ``attn_bwd_preprocess``: ``delta = rowsum(dO * O)`` (equals rowsum(dP * P) even with dropout).
* ``attn_bwd_dq``: one program per query block, looping over key blocks; then ``attn_bwd_dkdv``:
  one program per key block, looping over query blocks. Neither uses atomics, so gradients are
  bitwise deterministic; the price is recomputing the scores twice in the backward.
* Grouped-query attention: K/V may have fewer heads (G query heads per K/V head, as after
  Llama's ``repeat_kv``); the forward and dq kernels read K/V head h // G, and each dK/dV
  program loops over its G query heads, so no repeated K/V copy and no atomics.
* ``ROW_STATS`` (a constexpr of both backward kernels, chosen by ``_needs_row_stats``): instead of
  the preprocess kernel, the dq kernel first takes one more pass over the keys for exact per-row
  statistics, needed when O is stored in 16 bits or when a row's maximum can be huge (a fully
  masked row filled with finfo.min, where lse = m + log(l) loses log(l)); see ``attn_bwd_dq``.
* Mask predicates (``spec.masks``, see ``predicate.py``): each mask's keep(b, h, i, j) is written
  as Triton code (``mask{k}``, from the sympy expression by ``_TritonPrinter``: Python integer
  semantics, data tensors read with torch's indexing rules) and evaluated per tile, giving the
  tensor the graph's mask held (bool, or where(keep, kept, masked) read as fp32); no N x N mask.
* Block skipping (``SKIP``, a constexpr of the forward, dq and dkdv kernels): when the chain ends
  in a predicate step whose masked keys the removal rule lets a kernel skip (``removal.py``,
  ``skip_op``), the host computes per (b, h, query block) the range of key blocks holding a kept
  key, exactly (``block_ranges``; a block with a row that keeps no key visits every key block, so
  such rows are eager's uniform or NaN rows), and the transposed ranges for the dK/dV kernel. The
  rule's run-time half stays on the device: a call whose inputs are not finite (or whose scores
  have no finite bound) visits every block; the forward kernel checks each row's max against
  THRESH and recomputes its query block over every key block when a row fails; the backward
  widens the ranges of the query blocks whose saved lse fails the same rule.

The score chain is emitted as ``score_mod(s, c0, ..., m0, ...)`` and its reverse-mode derivative as
``score_mod_backward(ds, s, c0, ...)``. Everything in the kernels is fp32 except the dot operands
(the inputs' dtype); the chain's intermediate dtypes are not re-created step by step, only its
explicit ``cast`` steps are (as an fp32 -> dtype -> fp32 round trip).

Known cost: the gradient of a captured *tensor* (a learnable bias) is written element-wise into an
fp32 buffer of the full scores' shape (B, H, Nq, Nk) and summed over the operand's broadcast dims
with torch; that N x N buffer exists only while such an operand requires grad. Gradients of scalar
operands are reduced per tile in the kernel (one fp32 partial per tile pair). Block skipping's
ranges cost one evaluation of keep per score element (Bm * Hm * Nq * Nk, Bm/Hm = 1 when keep does
not depend on the batch index / head) with torch ops, in chunks, per forward and per backward.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import linecache
import math
import os
import stat
import sys
import tempfile
import types
import weakref
from typing import List, Optional, Sequence

import sympy
import torch
import triton

from . import pointwise, predicate, removal
from .dropout import threshold
from .spec import AttentionSpec, ScoreOp, to_dtype

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HANDLED_KINDS = {"mul", "div", "add", "sub", "rsub", "fill", "fill_not", "tanh", "cast", "fn"}
_ARITH_KINDS = {"mul", "div", "add", "sub", "rsub"}
_TL_DTYPES = {"float16": "tl.float16", "bfloat16": "tl.bfloat16"}
_FP32_MAX = float(torch.finfo(torch.float32).max)

# ---------------------------------------------------------------------------------------------
# Source generation
# ---------------------------------------------------------------------------------------------

# Helpers and kernels shared by every spec. The markers @@...@@ are filled per spec; everything
# else is plain Triton, kept in one string so the generated file reads top to bottom on its own.
_TEMPLATE = '''\
# generated by fusion_pass.kernels.triton_attention from an AttentionSpec; regenerate with
# triton_attention.generate_source(AttentionSpec.from_key(KEY)); do not edit.
# KEY = @@KEY@@
# @@SPEC_STR@@
import triton
import triton.language as tl

# the forward has a full-tile path (tiles every row keeps whole skip the mask and bounds work)
HAS_FULL_TILES = @@HAS_FULL@@


@triton.jit
def _dot(a, b, UPCAST_DOT: tl.constexpr, ALLOW_TF32: tl.constexpr):
    # Under the interpreter a bf16 tl.dot returns garbage, so operands go up to fp32 there.
    # fp32 operands use IEEE products unless torch itself allows TF32 matmuls.
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ALLOW_TF32:
        r = tl.dot(a, b)
    elif a.dtype == tl.float32:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _mix32(x):
    # lowbias32 (Chris Wellons), the same mixer as kernels/dropout.py, in wrapping uint32
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _dropout_keep(seed, off_bh, offs_m, offs_n, N_Q, N_K):
    # keep decision of element (bh, i, j): hash of its flat index in (..., Nq, Nk), so the CPU
    # implementation and these kernels draw the same mask for one seed
    idx = (off_bh * N_Q + offs_m[:, None].to(tl.int64)) * N_K + offs_n[None, :].to(tl.int64)
    lo = idx.to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    h = _mix32(_mix32(lo ^ seed.to(tl.uint32, bitcast=True)) ^ hi)
    return h.to(tl.int64) >= @@DROP_THRESHOLD@@


@triton.jit
def score_mod(s@@CPARAMS@@):
    # score_mod(s) = @@SCORE_MOD_STR@@
@@CHAIN@@
    return s


@triton.jit
def score_mod_backward(ds, s0@@CPARAMS@@):
    # recompute the chain's intermediates (the compiler shares them with score_mod's)
@@CHAIN_KEEP@@
    # reverse walk of the chain: d(score_mod)/ds and the captured operands' gradients
@@CHAIN_BWD@@
    return ds@@DC_RETURN@@


@triton.jit
def _load_tile(P, rows, s_r, n_r, cols, s_c, n_c):
    # a (rows x cols) tile of a strided tensor, zero outside [0, n_r) x [0, n_c)
    return tl.load(P + rows[:, None] * s_r + cols[None, :] * s_c,
                   mask=(rows[:, None] < n_r) & (cols[None, :] < n_c), other=0.0)


@triton.jit
def _block_range(RANGES, off, pid, SKIP: tl.constexpr, N, BLOCK: tl.constexpr):
    # [lo, hi) of the blocks this program visits: with SKIP the precomputed range of block pid
    # (block_ranges), else all cdiv(N, BLOCK)
    if SKIP:
        lo = tl.load(RANGES + off + pid * 2)
        hi = tl.load(RANGES + off + pid * 2 + 1)
    else:
        lo = 0
        hi = tl.cdiv(N, BLOCK)
    return lo, hi


@triton.jit
def _fdiv_pos(a, c):
    # floor(a / c) for a constant c > 0, whatever the sign convention of integer // is
    q = a // c
    return tl.where(a - q * c < 0, q - 1, q)


@triton.jit
def _mod_pos(a, c):
    # Python's a % c (sign of c) for a constant c > 0
    r = a - (a // c) * c
    return tl.where(r < 0, r + c, r)


@triton.jit
def _fdiv(a, b):
    # floor(a / b) for integer tensors of any signs (Python semantics)
    b = tl.cast(b, tl.int64)
    q = a // b
    r = a - q * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), q - 1, q)


@triton.jit
def _mod(a, b):
    # Python's a % b: the remainder takes the sign of b
    b = tl.cast(b, tl.int64)
    r = a - (a // b) * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@@MASK_FUNCS@@
@triton.jit
def _load_rows(P, rows, s_r, cols, s_c, n_c, EVEN_D: tl.constexpr):
    # a tile whose rows are all in bounds (a full tile): only the head dim may need a mask
    ptrs = P + rows[:, None] * s_r + cols[None, :] * s_c
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=cols[None, :] < n_c, other=0.0)


@triton.jit
def _program_ids(N, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    # one 1-D grid of cdiv(N, BLOCK) * (batch*heads) programs (no 65535 limit on any axis);
    # with REVERSE the last blocks (a causal mask's heaviest query blocks) are scheduled first
    n_blocks = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    blk = pid % n_blocks
    if REVERSE:
        blk = n_blocks - 1 - blk
    return blk, (pid // n_blocks).to(tl.int64)


@triton.jit(do_not_specialize=["seed"])
def attn_fwd(
    Q, K, V, Out, LSE,@@OPERAND_ARGS@@ RANGES, r_sb, r_sh, FULL, f_sb, f_sh, THRESH,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    H, G, N_Q, N_K, D, DV, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST_DOT: tl.constexpr, ALLOW_TF32: tl.constexpr, SKIP: tl.constexpr,
    FULL_TILES: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid_m, off_bh = _program_ids(N_Q, BLOCK_M, True)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // G  # grouped-query: the K/V head this query head reads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < N_Q
    q = _load_tile(Q + off_b * sqb + off_h * sqh + tl.cast(pid_m * BLOCK_M, tl.int64) * sqm,
                   tl.arange(0, BLOCK_M), sqm, N_Q - pid_m * BLOCK_M, offs_d, sqd, D)
    K_bh = K + off_b * skb + off_hk * skh
    V_bh = V + off_b * svb + off_hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # key blocks [lo, hi): all, or with SKIP those holding a key some row of this block keeps
    lo, hi = _block_range(RANGES, off_b * r_sb + off_h * r_sh, pid_m, SKIP, N_K, BLOCK_N)
    n_blocks = tl.cdiv(N_K, BLOCK_N)
    # full tiles [flo, fhi) within [lo, hi): every row keeps every key and no key is out of
    # bounds, so the mask step and the bounds checks are left out there (FlexAttention's full
    # blocks); the tiles before and after take the masked path
    if FULL_TILES:
        if SKIP:
            flo = tl.load(FULL + off_b * f_sb + off_h * f_sh + pid_m * 2)
            fhi = tl.load(FULL + off_b * f_sb + off_h * f_sh + pid_m * 2 + 1)
        else:
            flo = lo
            fhi = N_K // BLOCK_N
        flo = tl.minimum(tl.maximum(flo, lo), hi)
        fhi = tl.minimum(tl.maximum(fhi, flo), hi)
    else:
        flo = lo
        fhi = lo
    # with SKIP, a last pass over every key block for a block with a row on which skipping is
    # not exact (kernels/removal.py: its max not finite, or less than THRESH): no host round trip
    for phase in tl.static_range(4 if SKIP else 3):
        if phase == 0:
            b0 = lo
            b1 = flo
        elif phase == 1:
            b0 = flo
            b1 = fhi
        elif phase == 2:
            b0 = fhi
            b1 = hi
        else:
            # removal.rows_ok: m finite and m - THRESH >= |m| 2^-20 (THRESH: worst + margin)
            m_nat = m_i * @@TO_NATURAL@@
            ok = (m_nat - tl.load(THRESH) >= tl.abs(m_nat) * 9.5367431640625e-07) \
                & (m_nat < float("inf")) & (m_nat > float("-inf"))
            bad = tl.sum((m_valid & ~ok).to(tl.int32), 0)
            redo = (bad > 0) & ((lo > 0) | (hi < n_blocks))
            m_i = tl.where(redo, float("-inf"), m_i)
            l_i = tl.where(redo, 0.0, l_i)
            acc = tl.where(redo, 0.0, acc)
            b0 = 0
            b1 = tl.where(redo, n_blocks, 0)
        for blk_n in range(b0, b1):
            start_n = blk_n * BLOCK_N
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if phase == 1:
@@FWD_FULL_BODY@@
            else:
@@FWD_MASKED_BODY@@
            l_i = l_i * alpha + tl.sum(p, 1)
@@FWD_DROPOUT_12@@
            if phase == 1:
                v = _load_rows(V_bh + tl.cast(start_n, tl.int64) * svn, tl.arange(0, BLOCK_N), svn,
                               offs_dv, svd, DV, EVEN_D)
            else:
                v = _load_tile(V_bh + tl.cast(start_n, tl.int64) * svn, tl.arange(0, BLOCK_N), svn,
                               N_K - start_n, offs_dv, svd, DV)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT, ALLOW_TF32)
            m_i = m_new
    # a fully masked row (all -inf) has l_i = 0: 0/0 gives eager's NaN row, and lse is NaN as in
    # cpu.py (max - log(max p) with p NaN)
    out = acc / l_i[:, None]
    lse = tl.where(l_i == 0.0, float("nan"), @@LSE_EXPR@@)
    tl.store(Out + off_b * sob + off_h * soh + offs_m[:, None].to(tl.int64) * som + offs_dv[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_valid[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + off_bh * N_Q + offs_m, lse, mask=m_valid)


@triton.jit
def attn_bwd_preprocess(
    Out, DO, DELTA, sob, soh, som, sod, sdob, sdoh, sdom, sdod, H, N_Q, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, off_bh = _program_ids(N_Q, BLOCK_M, False)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < N_Q) & (offs_dv[None, :] < DV)
    o = tl.load(Out + off_b * sob + off_h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * sdob + off_h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + off_bh * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)


@triton.jit(do_not_specialize=["seed"])
def attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, INV_R, DK, DV_,@@OPERAND_ARGS@@ RANGES, r_sb, r_sh,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    H, G, N_Q, N_K, D, DV, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST_DOT: tl.constexpr, ALLOW_TF32: tl.constexpr, ROW_STATS: tl.constexpr,
    SKIP: tl.constexpr,
):
    pid_n, off_bk = _program_ids(N_K, BLOCK_N, False)
    off_b = off_bk // (H // G)
    off_hk = off_bk % (H // G)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_valid = offs_n < N_K
    k = _load_tile(K + off_b * skb + off_hk * skh, offs_n, skn, N_K, offs_d, skd, D)
    v = _load_tile(V + off_b * svb + off_hk * svh, offs_n, svn, N_K, offs_dv, svd, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # grouped-query attention: the G query heads that share this K/V head add into one dK/dV,
    # in a fixed order (no atomics)
    for g in range(0, G):
        off_h = off_hk * G + g
        off_bh = off_b * H + off_h
        # query blocks [lo, hi): all, or with SKIP those some of whose rows keep a key here
        lo, hi = _block_range(RANGES, off_b * r_sb + off_h * r_sh, pid_n, SKIP, N_Q, BLOCK_M)
        for blk_m in range(lo, hi):
            start_m = blk_m * BLOCK_M
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < N_Q
            valid = m_valid[:, None] & n_valid[None, :]
            q = _load_tile(Q + off_b * sqb + off_h * sqh, offs_m, sqm, N_Q, offs_d, sqd, D)
            do = _load_tile(DO + off_b * sdob + off_h * sdoh, offs_m, sdom, N_Q, offs_dv, sdod, DV).to(v.dtype)
            lse = tl.load(LSE + off_bh * N_Q + offs_m, mask=m_valid, other=0.0) * @@TO_LOG@@
            delta = tl.load(DELTA + off_bh * N_Q + offs_m, mask=m_valid, other=0.0)
            s0 = _dot(q, tl.trans(k), UPCAST_DOT, ALLOW_TF32)
@@LOAD_OPERANDS_12@@
            s = score_mod(s0@@CARGS@@)
            # padding is zeroed by where, not by a 0/1 product: a fully masked row's NaN must reach
            # dV as in eager, while the padding's must not
            p = tl.where(valid, @@EXP@@(s - lse[:, None]), 0.0)
            if ROW_STATS:
                p = p * tl.load(INV_R + off_bh * N_Q + offs_m, mask=m_valid, other=1.0)[:, None]
            dp = _dot(do, tl.trans(v), UPCAST_DOT, ALLOW_TF32)
@@BWD_DROPOUT_12@@
            dv += _dot(tl.trans(pd).to(do.dtype), do, UPCAST_DOT, ALLOW_TF32)
            ds = p * (dp - delta[:, None])
            ds@@DC_UNPACK@@ = score_mod_backward(ds, s0@@CARGS@@)
            ds = tl.where(valid, ds, 0.0)
            dk += _dot(tl.trans(ds).to(q.dtype), q, UPCAST_DOT, ALLOW_TF32)
    tl.store(DK + off_b * sdkb + off_hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=n_valid[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + off_b * sdvb + off_hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV_.dtype.element_ty), mask=n_valid[:, None] & (offs_dv[None, :] < DV))


@triton.jit(do_not_specialize=["seed"])
def attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, INV_R, DQ,@@OPERAND_ARGS@@@@DC_ARGS@@ RANGES, r_sb, r_sh,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    H, G, N_Q, N_K, D, DV, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST_DOT: tl.constexpr, ALLOW_TF32: tl.constexpr, ROW_STATS: tl.constexpr,
    SKIP: tl.constexpr,@@GRAD_FLAGS@@
):
    pid_m, off_bh = _program_ids(N_Q, BLOCK_M, True)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // G  # grouped-query: the K/V head this query head reads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < N_Q
    q = _load_tile(Q + off_b * sqb + off_h * sqh, offs_m, sqm, N_Q, offs_d, sqd, D)
    do = _load_tile(DO + off_b * sdob + off_h * sdoh, offs_m, sdom, N_Q, offs_dv, sdod, DV).to(V.dtype.element_ty)
    # in the units of the exponential (base 2 when log2(e) is folded into the chain)
    lse = tl.load(LSE + off_bh * N_Q + offs_m, mask=m_valid, other=0.0) * @@TO_LOG@@
    # the forward's key blocks (skipped ones hold only masked keys: their p is exactly 0)
    lo, hi = _block_range(RANGES, off_b * r_sb + off_h * r_sh, pid_m, SKIP, N_K, BLOCK_N)
    if ROW_STATS:
        # One extra pass over the keys for two per-row statistics:
        # * r = sum_j exp(s - lse), normally 1: when the row max is huge (a fully masked row
        #   filled with finfo.min or -1e9), log(l) vanishes in lse = m + log(l) and
        #   exp(s - lse) alone would not sum to 1; p = exp(s - lse) / r is then exact;
        # * delta = rowsum(dP * P) from fp32 P and dP, instead of rowsum(dO * O) with O rounded
        #   to fp16/bf16: that rounding is shared by a whole row and adds up in a learnable
        #   scalar's gradient (2% off in bf16) where eager's errors cancel.
        r = tl.zeros([BLOCK_M], tl.float32)
        delta = tl.zeros([BLOCK_M], tl.float32)
        for blk_n in range(lo, hi):
            start_n = blk_n * BLOCK_N
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_valid = offs_n < N_K
            valid = m_valid[:, None] & n_valid[None, :]
            k = _load_tile(K + off_b * skb + off_hk * skh, offs_n, skn, N_K, offs_d, skd, D)
            v = _load_tile(V + off_b * svb + off_hk * svh, offs_n, svn, N_K, offs_dv, svd, DV)
            s0 = _dot(q, tl.trans(k), UPCAST_DOT, ALLOW_TF32)
@@LOAD_OPERANDS_12@@
            s = score_mod(s0@@CARGS@@)
            p = tl.where(valid, @@EXP@@(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), UPCAST_DOT, ALLOW_TF32)
@@BWD_DROPOUT_12@@
            r += tl.sum(p, 1)
            delta += tl.sum(p * dp, 1)
        inv_r = 1.0 / tl.where(m_valid, r, 1.0)  # padding rows have r = 0
        delta = delta * inv_r
        tl.store(DELTA + off_bh * N_Q + offs_m, delta, mask=m_valid)
        tl.store(INV_R + off_bh * N_Q + offs_m, inv_r, mask=m_valid)
    else:
        delta = tl.load(DELTA + off_bh * N_Q + offs_m, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    num_n_blocks = tl.cdiv(N_K, BLOCK_N)
    for blk_n in range(lo, hi):
        start_n = blk_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N_K
        valid = m_valid[:, None] & n_valid[None, :]
        k = _load_tile(K + off_b * skb + off_hk * skh, offs_n, skn, N_K, offs_d, skd, D)
        v = _load_tile(V + off_b * svb + off_hk * svh, offs_n, svn, N_K, offs_dv, svd, DV)
        s0 = _dot(q, tl.trans(k), UPCAST_DOT, ALLOW_TF32)
@@LOAD_OPERANDS@@
        s = score_mod(s0@@CARGS@@)
        p = tl.where(valid, @@EXP@@(s - lse[:, None]), 0.0)
        if ROW_STATS:
            p = p * inv_r[:, None]
        dp = _dot(do, tl.trans(v), UPCAST_DOT, ALLOW_TF32)
@@BWD_DROPOUT@@
        ds = p * (dp - delta[:, None])
        ds@@DC_UNPACK@@ = score_mod_backward(ds, s0@@CARGS@@)
        ds = tl.where(valid, ds, 0.0)
        dq += _dot(ds.to(k.dtype), k, UPCAST_DOT, ALLOW_TF32)
@@STORE_DC@@
    tl.store(DQ + off_b * sdqb + off_h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=m_valid[:, None] & (offs_d[None, :] < D))
'''

_FWD_DROPOUT = '''\
        # l_i sums the probabilities before dropout: softmax normalises, dropout then scales
        keep = _dropout_keep(seed, off_bh, offs_m, offs_n, N_Q, N_K)
        p = tl.where(keep, p * @@DROP_SCALE@@, 0.0)'''

_BWD_DROPOUT = '''\
        keep = _dropout_keep(seed, off_bh, offs_m, offs_n, N_Q, N_K)
        pd = tl.where(keep, p * @@DROP_SCALE@@, 0.0)
        dp = tl.where(keep, dp * @@DROP_SCALE@@, 0.0)'''


# The forward's loop body, masked (partial tiles: bounds, the whole chain) and full (tiles every row
# keeps whole: no bounds checks, the skipped predicate's step left out). In both, ``s`` ends in
# the units of the exponential the kernel takes (base 2 with log2(e) folded into the chain when
# ``_log2_chain`` proves that safe, else natural units and tl.exp).
_FWD_MASKED = """\
n_valid = offs_n < N_K
valid = m_valid[:, None] & n_valid[None, :]
k = _load_tile(K_bh + tl.cast(start_n, tl.int64) * skn, tl.arange(0, BLOCK_N), skn, N_K - start_n,
               offs_d, skd, D)
s = _dot(q, tl.trans(k), UPCAST_DOT, ALLOW_TF32)
@@LOADS@@
s = score_mod(s@@CARGS@@)
s = tl.where(n_valid[None, :], s, float("-inf"))
m_new = tl.maximum(m_i, tl.max(s, 1))
# a row whose keys so far are all -inf keeps m = -inf; subtracting 0 instead avoids
# -inf - -inf = NaN, so a later block with finite scores still counts
m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
p = @@EXP@@(s - m_safe[:, None])
alpha = @@EXP@@(m_i - m_safe)"""

_FWD_FULL = """\
valid = m_valid[:, None]
k = _load_rows(K_bh + tl.cast(start_n, tl.int64) * skn, tl.arange(0, BLOCK_N), skn, offs_d, skd, D,
               EVEN_D)
s = _dot(q, tl.trans(k), UPCAST_DOT, ALLOW_TF32)
@@LOADS@@
@@FULL_SCORES@@
m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
p = @@FULL_P@@
alpha = @@EXP@@(m_i - m_safe)"""

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_NONLINEAR = {"tanh", "fn", "cast"}


def _log2_chain(spec: AttentionSpec, ops) -> Optional[List[str]]:
    """The chain ``ops`` as lines computing s * log2(e) (so that exp(s - m) = exp2(s' - m')),
    with log2(e) folded into its first constant scale (no extra multiply, and a division by a
    constant becomes a product), or None where that is not exact up to rounding: an operand
    whose values are unknown added after the scale point (a bias tensor may hold finfo.min, whose
    product with log2(e) overflows to -inf and would turn eager's uniform fully masked row into
    NaN), or a constant whose scaled value overflows. Nonlinear steps (tanh, pointwise functions,
    casts) stay in natural units: the scale goes after the last of them."""
    last_nl = max((p for p, op in enumerate(ops) if op.kind in _NONLINEAR), default=-1)
    lines = [f"s = {_step(op, spec, 's')}" for op in ops[:last_nl + 1]]
    folded = False

    def scaled(v):
        v = float(v)
        if math.isnan(v) or math.isinf(v):
            return v
        w = v * LOG2E
        return w if abs(w) <= _FP32_MAX else None  # an fp32 literal in the kernel

    for op in ops[last_nl + 1:]:
        k = op.kind
        if k in ("mul", "div"):
            if not folded and op.operand == "const":
                c = scaled(op.value) if k == "mul" else (LOG2E / op.value if op.value else None)
                if c is None or not abs(c) <= _FP32_MAX:
                    return None
                lines.append(f"s = s * {_lit(c)}")
                folded = True
            else:  # products commute with the scale
                lines.append(f"s = {_step(op, spec, 's')}")
            continue
        if not folded:
            lines.append(f"s = s * {_lit(LOG2E)}")
            folded = True
        if k in ("add", "sub", "rsub"):
            if op.operand == "const":
                v = scaled(op.value)
                if v is None:
                    return None
                x = _lit(v)
            elif op.operand == "predicate":
                m = spec.masks[op.index]
                if m.kind == "additive":
                    if scaled(_mask_value(m, m.kept)) is None or scaled(_mask_value(m, m.masked)) is None:
                        return None
                x = f"({_operand_expr(op, spec)} * {_lit(LOG2E)})"
            else:
                return None
            lines.append(f"s = {dict(add=f's + {x}', sub=f's - {x}', rsub=f'{x} - s')[k]}")
        elif k in ("fill", "fill_not"):
            v = scaled(op.value)
            if v is None:
                return None
            lines.append(f"s = {_step(dataclasses.replace(op, value=v), spec, 's')}")
        else:
            return None
    if not folded:
        lines.append(f"s = s * {_lit(LOG2E)}")
    return lines


def _full_ops(spec: AttentionSpec):
    """The chain on a full tile (every row keeps every key): the skipped predicate's step is the
    identity there (a fill whose mask is false, a where keeping s) or adds the kept value; None
    when the last step is another kind (no full-tile path)."""
    op = skip_op(spec)
    if op is None:
        return spec.score_ops
    if op.kind in ("fill", "fill_not"):
        return spec.score_ops[:-1]
    m = spec.masks[op.index]
    if op.kind == "add" and m.kind == "additive":
        kept = _mask_value(m, m.kept)
        if kept == 0.0:
            return spec.score_ops[:-1]
        return spec.score_ops[:-1] + (ScoreOp("add", "const", value=kept),)
    return None


def _scale_only(lines: Sequence[str]) -> Optional[float]:
    """The constant c > 0 when a log2 chain is just ``s = s * c``."""
    if len(lines) == 1 and lines[0].startswith("s = s * "):
        with contextlib.suppress(ValueError):
            c = float(lines[0][len("s = s * "):])
            if c > 0 and math.isfinite(c):
                return c
    return None


def _lit(x: float) -> str:
    """A Python float literal Triton reads as fp32 (inf and nan through float())."""
    x = float(x)
    if math.isnan(x):
        return 'float("nan")'
    if math.isinf(x):
        return 'float("inf")' if x > 0 else 'float("-inf")'
    return repr(x)


def _operand_expr(op: ScoreOp, spec: AttentionSpec) -> str:
    if op.operand == "const":
        return _lit(op.value)
    if op.operand == "predicate":
        # the additive mask is already fp32 (see _mask_function); a bool mask adds as 0/1
        return f"m{op.index}" if spec.masks[op.index].kind == "additive" else f"m{op.index}.to(tl.float32)"
    if spec.captured[op.index] == "scalar":
        return f"c{op.index}"
    return f"c{op.index}.to(tl.float32)"


def _step(op: ScoreOp, spec: AttentionSpec, s: str) -> str:
    """The expression of one chain step applied to the expression ``s``."""
    k = op.kind
    if k in _ARITH_KINDS:
        x = _operand_expr(op, spec)
        return {"mul": f"{s} * {x}", "div": f"{s} / {x}", "add": f"{s} + {x}",
                "sub": f"{s} - {x}", "rsub": f"{x} - {s}"}[k]
    if k == "tanh":
        # tanh via exp (tl has no tanh in every version): 1 - 2 / (exp(2s) + 1) is exact at
        # +-inf and does not overflow to NaN
        return f"1.0 - 2.0 / (tl.exp(2.0 * {s}) + 1.0)"
    if k == "cast":
        # the model's explicit cast, kept as a round trip so its rounding/overflow is eager's
        tl_dtype = _TL_DTYPES.get(op.dtype)
        return f"{s}.to({tl_dtype}).to(tl.float32)" if tl_dtype else s
    if k == "fill":
        return f"tl.where({_mask_var(op)} != 0, {_lit(op.value)}, {s})"
    if k == "fill_not":
        return f"tl.where({_mask_var(op)} != 0, {s}, {_lit(op.value)})"
    if k == "fn":  # printed from the function's sympy form (pointwise.py)
        return pointwise.triton_source(op.fn, op.args, s)[0]
    raise AssertionError(k)


def _mask_var(op: ScoreOp) -> str:
    """The kernel variable holding the boolean mask a fill step reads."""
    return f"m{op.index}" if op.operand == "predicate" else f"c{op.index}"


def _grad_indices(spec: AttentionSpec) -> List[int]:
    """Captured operands the chain is differentiable in (masks of fills are not)."""
    return sorted({op.index for op in spec.score_ops
                   if op.kind in _ARITH_KINDS and op.operand in ("scalar", "tensor")})


def _chain_backward_lines(spec: AttentionSpec) -> List[str]:
    n = len(spec.score_ops)
    lines, started = [], set()

    def acc(i: int, expr: str):
        if i in started:
            lines.append(f"dc{i} = dc{i} + {expr}")
        else:
            lines.append(f"dc{i} = {expr}")
            started.add(i)

    for pos in reversed(range(n)):
        op = spec.score_ops[pos]
        s_in, s_out = f"s{pos}", f"s{pos + 1}"
        has_operand = op.operand in ("scalar", "tensor")
        k = op.kind
        if k in _ARITH_KINDS:
            x = _operand_expr(op, spec)
            if k == "mul":
                if has_operand:
                    acc(op.index, f"ds * {s_in}")
                lines.append(f"ds = ds * {x}")
            elif k == "div":
                if has_operand:
                    acc(op.index, f"-ds * {s_in} / ({x} * {x})")
                lines.append(f"ds = ds / {x}")
            elif k == "add":
                if has_operand:
                    acc(op.index, "ds")
            elif k == "sub":
                if has_operand:
                    acc(op.index, "-ds")
            elif k == "rsub":
                if has_operand:
                    acc(op.index, "ds")
                lines.append("ds = -ds")
        elif k == "tanh":
            lines.append(f"ds = ds * (1.0 - {s_out} * {s_out})")
        elif k == "fn":  # d f / d s from sympy (pointwise.derivative), evaluated at the step's input
            lines.append(f"ds = ds * {pointwise.triton_source(op.fn, op.args, s_in)[1]}")
        elif k == "fill":
            lines.append(f"ds = tl.where({_mask_var(op)} != 0, 0.0, ds)")
        elif k == "fill_not":
            lines.append(f"ds = tl.where({_mask_var(op)} != 0, ds, 0.0)")
        # cast: identity (the reference only rounds ds to the step's input dtype)
    return lines


def _reindent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.split("\n"))


def _indent(lines: Sequence[str], n: int) -> str:
    return "\n".join(" " * n + line for line in lines) if lines else " " * n + "pass"

# ---------------------------------------------------------------------------------------------
# Mask predicates (predicate.MaskSpec): keep(b, h, i, j) written as Triton code, per tile
# ---------------------------------------------------------------------------------------------

class _TritonPrinter(predicate.ExprPrinter):
    """Triton source evaluating a predicate on a tile. ``names`` maps the expression's symbols to
    kernel variables (int64 scalars for b, h and the sizes; int64 (BLOCK_M, 1) / (1, BLOCK_N) index
    tiles for i and j); ``data`` maps a data atom's name (d0, ...) to the kernel argument prefix of
    its tensor. Integer semantics are Python's (floor division and modulo on negative values), as
    in ``predicate.ExprPrinter``'s torch code, which is the reference."""

    def __init__(self, names: dict, data: dict):
        self.names, self.data = names, data
        self.arities = set()  # data-load helpers the code calls (_dload<arity>)

    def symbol(self, e) -> str:
        if e.name not in self.names:
            raise ValueError(f"unknown symbol {e.name}")
        return self.names[e.name]

    def floor_div(self, num, den) -> str:
        if den.is_Integer and int(den) < 0:
            num, den = -num, -den
        if den == 1:
            return self(num)
        if den.is_Integer:
            return f"_fdiv_pos({self(num)}, {int(den)})"
        return f"_fdiv({self(num)}, {self(den)})"

    def mod(self, a, m) -> str:
        if m.is_Integer and int(m) > 0:
            return f"_mod_pos({self(a)}, {int(m)})"
        return f"_mod({self(a)}, {self(m)})"

    def abs(self, x: str) -> str:
        return f"tl.where({x} < 0, -{x}, {x})"

    def max_min(self, is_max: bool, a: str, b: str) -> str:
        return f"tl.where({a} {'>' if is_max else '<'} {b}, {a}, {b})"

    def where(self, c: str, a: str, b: str) -> str:
        return f"tl.where({c}, {a}, {b})"

    def rel(self, a: str, b: str, op: str) -> str:
        return f"({a} {op} {b})"

    def logic(self, op: str, xs) -> str:
        return "(" + f" {dict(zip(('and', 'or', 'xor'), '&|^'))[op]} ".join(xs) + ")"

    def not_(self, x: str) -> str:
        return f"({x} == 0)"

    def load(self, e) -> str:
        name = e.func.__name__
        if name not in self.data:
            raise ValueError(f"unknown data atom {name}")
        prefix, n = self.data[name], len(e.args)
        self.arities.add(n)
        sizes = ", ".join(f"{prefix}_n{t}" for t in range(n))
        strides = ", ".join(f"{prefix}_s{t}" for t in range(n))
        idx = ", ".join(self(a) for a in e.args)
        return f"_dload{n}({prefix}, {', '.join(x for x in (sizes, strides, idx) if x)})"


def _dload_source(n: int) -> str:
    """A helper reading a data tensor at n integer index tiles, as torch's t[idx] does: negative
    indices count from the end; out-of-range ones (padding lanes of a tile) read 0."""
    xs = [f"x{t}" for t in range(n)]
    params = ", ".join(["P"] + [f"n{t}" for t in range(n)] + [f"s{t}" for t in range(n)] + xs)
    lines = ["@triton.jit", f"def _dload{n}({params}):", "    ok = True"]
    off = []
    for t in range(n):
        lines.append(f"    x{t} = tl.cast(x{t}, tl.int64)")
        lines.append(f"    x{t} = tl.where(x{t} < 0, x{t} + n{t}, x{t})")
        lines.append(f"    ok = ok & (x{t} >= 0) & (x{t} < n{t})")
        off.append(f"x{t} * s{t}")
    lines.append(f"    return tl.load(P + {' + '.join(off) if off else '0'}, mask=ok, other=0).to(tl.int64)")
    return "\n".join(lines)


def _axis_var(back: int) -> str:
    """The kernel variable of the score axis ``back`` places from the right (1: keys)."""
    return {1: "j", 2: "i", 3: "off_h", 4: "off_b"}[back]


def _data_arities(spec: AttentionSpec) -> dict:
    """captured index of each data tensor -> the number of indices its atoms take."""
    out = {}
    for m in spec.masks:
        for a in m.expr.atoms(sympy.core.function.AppliedUndef):
            name = a.func.__name__
            if not (name.startswith("d") and name[1:].isdigit() and int(name[1:]) < len(m.data)):
                raise ValueError(f"data atom {name} of {m} has no data tensor")
            pos = m.data[int(name[1:])]
            if out.setdefault(pos, len(a.args)) != len(a.args):
                raise ValueError(f"data tensor {pos} indexed with {out[pos]} and {len(a.args)} indices")
    return out


def _mask_value(m, x: float) -> float:
    """x in the mask's dtype, read back as fp32: what the tensor path loads from the graph's mask."""
    return float(torch.tensor(x, dtype=to_dtype(m.dtype)).to(torch.float32).item())


def _mask_function(spec: AttentionSpec, k: int, arities: dict):
    """(source of ``mask{k}``, its parameters after the tile's coordinates, data-load arities):
    the tensor the graph's mask held on one tile: the bool keep, or where(keep, kept, masked) as
    fp32 (the values rounded to the mask's dtype first, as a loaded mask tensor would be)."""
    m = spec.masks[k]
    R = len(m.axes)
    if R > 4:
        raise ValueError("a mask over more than 4 score axes")
    names = {}
    for t, name in enumerate(m.axes):
        names[name] = _axis_var(R - t)
        names[f"n{t}"] = f"n{t}"
    data, params = {}, [f"n{t}" for t in range(R)]
    for t, pos in enumerate(m.data):
        data[f"d{t}"] = f"C{pos}"
        a = arities.get(pos, 0)
        params += [f"C{pos}"] + [f"C{pos}_n{u}" for u in range(a)] + [f"C{pos}_s{u}" for u in range(a)]
    pr = _TritonPrinter(names, data)
    e = m.expr
    if e is sympy.true or e is sympy.false:
        keep = f"offs_m[:, None] {'>=' if e is sympy.true else '<'} 0"
    else:
        keep = pr(e)
    lines = ["@triton.jit",
             f"def mask{k}(off_b, off_h, offs_m, offs_n, {', '.join(params)}):",
             f"    # {m}",
             "    i = offs_m[:, None].to(tl.int64)",
             "    j = offs_n[None, :].to(tl.int64)"]
    used = {x.name for x in e.free_symbols}
    lines += [f"    n{t} = tl.cast(n{t}, tl.int64)" for t in range(R) if f"n{t}" in used]
    lines.append(f"    keep = {keep}")
    if m.kind == "additive":
        lines.append(f"    return tl.where(keep, {_lit(_mask_value(m, m.kept))}, "
                     f"{_lit(_mask_value(m, m.masked))})")
    else:
        lines.append("    return keep")
    return "\n".join(lines), params, pr.arities


def _mask_sources(spec: AttentionSpec):
    """(top-level source of the mask functions and their helpers, per mask the call's argument
    list after the tile's coordinates)."""
    if not spec.masks:
        return "", []
    arities = _data_arities(spec)
    funcs, calls, used = [], [], set()
    for k in range(len(spec.masks)):
        src, params, ar = _mask_function(spec, k, arities)
        funcs.append(src)
        used |= ar
        # in the kernels the sizes are arguments M{k}_n{t}; the data arguments keep their names
        calls.append([p.replace("n", f"M{k}_n", 1) if p.startswith("n") else p for p in params])
    helpers = [_dload_source(n) for n in sorted(used)]
    return "\n\n\n".join(helpers + funcs) + "\n\n", calls


def predicates_supported(spec: AttentionSpec, captured: Optional[Sequence[torch.Tensor]] = None) -> bool:
    """Whether the kernels evaluate every mask predicate of ``spec`` in-kernel (with ``captured``:
    also whether each data tensor has as many dims as its atoms take indices); otherwise
    ``ops.py`` hands them over materialised (``predicate.with_tensor_masks``)."""
    arities = _generated_arities(spec)
    if arities is None:
        return False
    if captured is not None:
        if len(captured) != len(spec.captured):
            return False
        for pos, a in arities.items():
            c = captured[pos]
            if c.dim() != a or c.is_floating_point() or c.is_complex():
                return False
    return True


@functools.lru_cache(maxsize=None)
def _generated_arities(spec: AttentionSpec) -> Optional[dict]:
    """The spec-only part of ``predicates_supported`` (cached per spec): the data arities when every
    mask can be generated and is used in a way the kernels support, else None."""
    try:
        arities = _data_arities(spec)
        for k in range(len(spec.masks)):
            _mask_function(spec, k, arities)
    except (ValueError, TypeError, KeyError):
        return None
    for m in spec.masks:
        if m.kind == "additive":
            if m.dtype not in ("float32", "float16", "bfloat16", "float64"):
                return None
            if not (_fits_fp32(_mask_value(m, m.kept)) and _fits_fp32(_mask_value(m, m.masked))):
                return None
            for x in (m.kept, m.masked):
                if m.dtype == "float64" and _mask_value(m, x) != x and not math.isnan(x):
                    return None  # a float64 mask value that fp32 would change
    for op in spec.score_ops:
        if op.operand != "predicate":
            continue
        m = spec.masks[op.index]
        if op.kind in ("fill", "fill_not") and m.kind != "bool":
            return None
        if op.kind not in ("fill", "fill_not") and op.kind not in _ARITH_KINDS:
            return None
    return arities



def generate_source(spec: AttentionSpec) -> str:
    """The Triton source of the forward and backward kernels of ``spec``."""
    cap = spec.captured
    grads = _grad_indices(spec)
    # score_mod's operands: scalars and tensor tiles, then each mask's tile (data tensors are
    # read by the mask functions only)
    cparams = "".join(f", c{i}" for i in range(len(cap)) if cap[i] != "data") \
        + "".join(f", m{k}" for k in range(len(spec.masks)))
    mask_funcs, mask_calls = _mask_sources(spec)
    arities = _data_arities(spec) if spec.masks else {}
    lchain = _log2_chain(spec, spec.score_ops)
    fold = lchain is not None
    chain = lchain if fold else [f"s = {_step(op, spec, 's')}" for op in spec.score_ops]
    keep = [f"s{p + 1} = {_step(op, spec, f's{p}')}" for p, op in enumerate(spec.score_ops)]
    bwd = _chain_backward_lines(spec)

    operand_args, loads = [], []
    for i, kind in enumerate(cap):
        if kind == "scalar":
            operand_args.append(f"c{i},")
        elif kind == "data":
            a = arities.get(i, 0)
            operand_args.append(" ".join([f"C{i},"] + [f"C{i}_n{u}," for u in range(a)]
                                         + [f"C{i}_s{u}," for u in range(a)]))
        else:
            operand_args.append(f"C{i}, C{i}_sb, C{i}_sh, C{i}_sm, C{i}_sn,")
            # row/col offsets in int64: an N x N bias can pass 2^31 elements
            loads.append(f"c{i} = tl.load(C{i} + off_b * C{i}_sb + off_h * C{i}_sh"
                         f" + offs_m[:, None].to(tl.int64) * C{i}_sm"
                         f" + offs_n[None, :].to(tl.int64) * C{i}_sn, mask=valid, other=0)")
    skip = skip_op(spec)
    full_loads = list(loads)
    for k, m in enumerate(spec.masks):
        operand_args.append(" ".join(f"M{k}_n{t}," for t in range(len(m.axes))))
        loads.append(f"m{k} = mask{k}(off_b, off_h, offs_m, offs_n, {', '.join(mask_calls[k])})")
        if skip is None or skip.index != k or skip.operand != "predicate":
            full_loads.append(loads[-1])
    exp = "tl.math.exp2" if fold else "tl.exp"
    masked_body = _FWD_MASKED.replace("@@LOADS@@", "\n".join(loads) if loads else "pass")
    fops = _full_ops(spec)
    full_chain = None
    if fops is not None:
        full_chain = _log2_chain(spec, fops) if fold else [f"s = {_step(op, spec, 's')}" for op in fops]
    if full_chain is None:
        full_body = masked_body
    else:
        c = _scale_only(full_chain) if fold else None
        if c is not None:  # FlashAttention-2's form: the max of the raw products, one FMA per score
            scores = f"m_new = tl.maximum(m_i, tl.max(s, 1) * {_lit(c)})"
            full_p = f"tl.math.exp2(s * {_lit(c)} - m_safe[:, None])"
        else:
            scores = "\n".join(full_chain + ["m_new = tl.maximum(m_i, tl.max(s, 1))"])
            full_p = f"{exp}(s - m_safe[:, None])"
        full_body = _FWD_FULL.replace("@@LOADS@@", "\n".join(full_loads) if full_loads else "pass") \
            .replace("@@FULL_SCORES@@", scores).replace("@@FULL_P@@", full_p)
    dc_args = "".join(f" DC{i}," for i in grads)
    grad_flags = "".join(f" GRAD_C{i}: tl.constexpr," for i in grads)
    store = []
    for i in grads:
        store.append(f"if GRAD_C{i}:")
        if cap[i] == "tensor":
            # element-wise into the (B, H, Nq, Nk) fp32 buffer; torch sums the broadcast dims
            store.append(f"    tl.store(DC{i} + (off_bh * N_Q + offs_m[:, None].to(tl.int64)) * N_K"
                         f" + offs_n[None, :], dc{i}, mask=valid)")
        else:
            # one partial sum per (bh, query block, key block): deterministic, no atomics
            store.append(f"    tl.store(DC{i} + (off_bh * tl.cdiv(N_Q, BLOCK_M) + pid_m) * num_n_blocks"
                         f" + blk_n, tl.sum(tl.sum(tl.where(valid, dc{i}, 0.0), 1), 0))")

    src = _TEMPLATE
    drop = spec.dropout_p > 0
    subs = {
        "@@KEY@@": spec.to_key(),
        "@@SPEC_STR@@": str(spec),
        "@@DROP_THRESHOLD@@": str(threshold(spec.dropout_p)),
        "@@CPARAMS@@": cparams,
        "@@MASK_FUNCS@@": mask_funcs,
        "@@SCORE_MOD_STR@@": spec.score_mod_str(),
        "@@CHAIN@@": _indent(chain, 4),
        "@@HAS_FULL@@": str(full_chain is not None),
        "@@FWD_FULL_BODY@@": _reindent(full_body, 16),
        "@@FWD_MASKED_BODY@@": _reindent(masked_body, 16),
        "@@EXP@@": exp,
        "@@TO_LOG@@": _lit(LOG2E) if fold else "1.0",
        "@@TO_NATURAL@@": _lit(LN2) if fold else "1.0",
        "@@LSE_EXPR@@": f"(m_i + tl.math.log2(l_i)) * {_lit(LN2)}" if fold else "m_i + tl.log(l_i)",
        "@@CHAIN_KEEP@@": _indent(keep, 4),
        "@@CHAIN_BWD@@": _indent(bwd, 4),
        "@@DC_RETURN@@": "".join(f", dc{i}" for i in grads),
        "@@DC_UNPACK@@": "".join(f", dc{i}" for i in grads),
        "@@OPERAND_ARGS@@": "".join(" " + a for a in operand_args),
        "@@DC_ARGS@@": dc_args,
        "@@GRAD_FLAGS@@": grad_flags,
        "@@LOAD_OPERANDS@@": _indent(loads, 8) if loads else "",
        "@@LOAD_OPERANDS_12@@": _indent(loads, 12) if loads else "",
        "@@BWD_DROPOUT_12@@": _reindent(_BWD_DROPOUT, 4) if drop else "            pd = p",
        "@@CARGS@@": cparams,
        "@@FWD_DROPOUT@@": _FWD_DROPOUT if drop else "",
        "@@FWD_DROPOUT_12@@": _reindent(_FWD_DROPOUT, 4) if drop else "",
        "@@BWD_DROPOUT@@": _BWD_DROPOUT if drop else "        pd = p",
        "@@STORE_DC@@": _indent(store, 8) if store else "",
        "@@DROP_SCALE@@": _lit(1.0 / (1.0 - spec.dropout_p)) if drop else "1.0",
    }
    # the markers that expand to code lines sit alone on their line; drop the line when empty
    out = []
    for line in src.split("\n"):
        stripped = line.strip()
        if stripped.startswith("@@") and stripped.endswith("@@") and stripped.count("@@") == 2:
            rep = subs[stripped]
            if rep:
                out.append(rep)
            continue
        out.append(line)
    src = "\n".join(out)
    # markers inside lines, and @@DROP_SCALE@@ inside the dropout snippets just inserted
    for marker, rep in subs.items():
        src = src.replace(marker, rep)
    if spec.safe_softmax:
        src = _safe_softmax(src)
    return src


# SDPA's safe softmax (spec.safe_softmax): a row whose every score is -inf (l = 0 after the online
# softmax) gives output 0 and lse = +inf, so that the backward's p = exp(s - lse) is 0 on it, as
# are its gradients; a NaN row stays NaN (l is NaN, not 0)
_SAFE_EDITS = (
    ("    out = acc / l_i[:, None]\n",
     "    out = tl.where(l_i[:, None] == 0.0, 0.0, acc / l_i[:, None])\n"),
    ('    lse = tl.where(l_i == 0.0, float("nan"), ',
     '    lse = tl.where(l_i == 0.0, float("inf"), '),
    ("        inv_r = 1.0 / tl.where(m_valid, r, 1.0)",
     "        inv_r = tl.where(r == 0.0, 0.0, 1.0 / tl.where(m_valid, r, 1.0))"),
)


def _safe_softmax(src: str) -> str:
    for old, new in _SAFE_EDITS:
        if old not in src:
            raise AssertionError(f"safe softmax: template line not found: {old.strip()}")
        src = src.replace(old, new)
    return src


# ---------------------------------------------------------------------------------------------
# Loading: one module per spec, its source also written to a private per-user cache folder
# ---------------------------------------------------------------------------------------------
#
# Security: a shared temporary folder with predictable names lets any local user plant code that
# the next compile imports. So (1) the folder is per user (``cache_dir``): $FUSION_PASS_CACHE_DIR,
# else $XDG_CACHE_HOME/fusion_pass/kernels, else ~/.cache/fusion_pass/kernels, created 0o700 and
# used only when it is a directory owned by this user that neither group nor others may write
# (otherwise a fresh private folder from tempfile.mkdtemp); (2) file names are the SHA-256 of the
# content; (3) the file's bytes are compared with the generated source, and rewritten atomically
# when they differ; (4) the module is executed from the generated source in memory, and linecache
# is primed with it, so neither Python nor Triton (which reads a kernel's source through
# inspect/linecache) ever runs what is on disk: the file is there for people and tools to read.

_MODULES: dict = {}
CACHE_ENV = "FUSION_PASS_CACHE_DIR"
_FALLBACK_DIR: Optional[str] = None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _private_dir(path: str) -> bool:
    """A directory (not a symlink to one) owned by this user, not writable by group or others."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not (st.st_mode & 0o022)


def cache_dir() -> str:
    """The folder generated kernel sources are written to (see the security note above)."""
    global _FALLBACK_DIR
    base = os.environ.get(CACHE_ENV)
    if not base:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(root, "fusion_pass", "kernels")
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
    except OSError:
        pass
    if _private_dir(base):
        return base
    if _FALLBACK_DIR is None or not _private_dir(_FALLBACK_DIR):
        _FALLBACK_DIR = tempfile.mkdtemp(prefix="fusion_pass_kernels_")  # 0o700, ours
    return _FALLBACK_DIR


def _write_verified(path: str, data: bytes) -> None:
    """Make the file at ``path`` hold exactly ``data``: read it back, and when it differs (or is
    missing) write a new file beside it and rename it over (atomic: no reader sees half a file)."""
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".attn_", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def kernels(spec: AttentionSpec):
    """The generated module of ``spec`` (cached per spec key and interpreter mode)."""
    key = (spec.to_key(), _interpret())
    mod = _MODULES.get(key)
    if mod is None:
        src = generate_source(spec)
        data = src.encode()
        digest = hashlib.sha256(data).hexdigest()[:32]
        path = os.path.join(cache_dir(), f"attn_{digest}.py")
        _write_verified(path, data)
        # what runs is ``src`` itself: linecache serves it to inspect (and so to triton.jit), and
        # an entry without mtime is never re-read from disk
        linecache.cache[path] = (len(src), None, src.splitlines(True), path)
        name = f"fusion_pass_generated.attn_{digest}_{int(_interpret())}"
        mod = types.ModuleType(name)
        mod.__file__ = path
        sys.modules[name] = mod  # triton resolves a kernel's globals through its module
        exec(compile(src, path, "exec"), mod.__dict__)  # noqa: S102 - our generated source
        _MODULES[key] = mod
    return mod


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> bool:
    """True when the generated kernels cover this call; otherwise ops.py runs cpu.py."""
    if not (2 <= q.dim() <= 4 and k.dim() == q.dim() and v.dim() == q.dim()):
        return False
    if v.shape[:-2] != k.shape[:-2] or k.shape[:-3] != q.shape[:-3]:
        return False
    if q.dim() > 2 and (k.shape[-3] == 0 or q.shape[-3] % k.shape[-3] != 0):
        return False  # grouped-query attention needs K/V heads dividing the query heads
    # one dtype for the three inputs: the dots take like operands, and mixed-dtype calls are rare
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if to_dtype(spec.out_dtype) not in _FLOAT_DTYPES:
        return False
    if not (16 <= q.shape[-1] <= 256 and q.shape[-1] == k.shape[-1] and 16 <= v.shape[-1] <= 256):
        return False
    if q.shape[-2] == 0 or k.shape[-2] == 0 or q.numel() == 0 or k.numel() == 0:
        return False  # cpu.py owns the empty-softmax conventions
    if threshold(spec.dropout_p) >= 2 ** 32:
        return False
    if spec.masks and not predicates_supported(spec):
        return False  # ops._triton_operands then hands the masks over materialised
    if "data" in spec.captured and not spec.masks:
        return False
    for op in spec.score_ops:
        if op.kind not in _HANDLED_KINDS:
            return False
        if op.kind == "fn" and pointwise.triton_source(op.fn, op.args, "s") is None:
            return False  # the printer lacks a construct: the tiled implementation runs it
        if op.operand == "predicate":
            if op.kind in ("fill", "fill_not") and (op.value is None or not _fits_fp32(op.value)):
                return False
            continue
        if op.kind in ("fill", "fill_not"):
            if op.value is None or op.index is None or spec.captured[op.index] != "tensor":
                return False
            if not _fits_fp32(op.value):
                return False
        elif op.kind in _ARITH_KINDS:
            if op.operand == "const":
                if op.value is None or not _fits_fp32(op.value):
                    return False
            elif op.operand in ("scalar", "tensor"):
                if op.index is None or spec.captured[op.index] != op.operand:
                    return False
            else:
                return False
    return True


def _fits_fp32(x: float) -> bool:
    # a finite constant beyond fp32 (finfo(float64).min) would turn into -inf and change the
    # fully-masked-row semantics from finite to NaN
    x = float(x)
    return math.isnan(x) or math.isinf(x) or abs(x) <= _FP32_MAX


# (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs, per (architecture, direction):
# the first entry whose head-dim bound covers max(d, dv). Hopper/Blackwell: the forward at
# 128 x 128 (8 warps: two warpgroups of 64 rows each) so every dot is a warpgroup MMA, 3 stages of
# K/V in flight; the backward's tiles at >= 64 rows on both sides (dS^T Q and P^T dO have BLOCK_N
# rows) so its dots are warpgroup MMAs too. Ampere: FlashAttention-2's sizes.
_TILES = {
    (90, False): ((64, (128, 128, 8, 3)), (128, (128, 128, 8, 3)), (256, (128, 64, 8, 2))),
    (90, True): ((64, (64, 64, 4, 2)), (128, (64, 64, 4, 2)), (256, (64, 64, 8, 1))),
    (80, False): ((64, (128, 64, 4, 3)), (128, (128, 64, 8, 2)), (256, (64, 32, 4, 1))),
    (80, True): ((64, (64, 64, 4, 2)), (128, (32, 32, 4, 2)), (256, (16, 32, 4, 1))),
}
# fp32 inputs (IEEE or TF32 dots): twice the bytes per operand, the pre-Hopper sizes everywhere
_TILES_FP32 = {
    False: ((64, (128, 64, 8, 2)), (128, (64, 64, 4, 2)), (256, (64, 32, 4, 1))),
    True: ((64, (64, 64, 4, 2)), (128, (32, 32, 4, 2)), (256, (16, 32, 4, 1))),
}
_ARCH_OVERRIDE: List[int] = []


@contextlib.contextmanager
def target_arch(arch: int):
    """Choose tiles for compute capability ``arch`` (80, 90, 100...) whatever the device: for
    compiling ahead of time without the GPU (benchmarks/gpu_static.py)."""
    _ARCH_OVERRIDE.append(int(arch))
    try:
        yield
    finally:
        _ARCH_OVERRIDE.pop()


def _arch(device) -> Optional[int]:
    if _ARCH_OVERRIDE:
        return _ARCH_OVERRIDE[-1]
    if device is not None and torch.device(device).type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return None


def _blocks(d: int, dv: int, backward: bool, dtype=None, device=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a call (see _TILES)."""
    if _interpret():
        # small tiles keep the interpreter fast while still giving several key blocks to the
        # online softmax and partial tiles at the edges
        return 16, 16, 4, 1
    dmax = max(d, dv)
    arch = _arch(device)
    if dtype in (torch.float16, torch.bfloat16) and arch is not None:
        table = _TILES[(90 if arch >= 90 else 80, bool(backward))]
    else:
        table = _TILES_FP32[bool(backward)]
    for bound, cfg in table:
        if dmax <= bound:
            return cfg
    return table[-1][1]


def _to4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _operands(spec: AttentionSpec, captured: Sequence[torch.Tensor], score_shape4):
    """Kernel arguments of the captured operands: a number for scalars; for tensors a view
    expanded to the (B, H, Nq, Nk) scores (stride 0 where it broadcasts) and its 4 strides; for
    data tensors (read by mask predicates) the tensor, its sizes and strides; then each mask's
    score sizes n0 .. n{R-1}."""
    args = []
    arities = _data_arities(spec) if spec.masks else {}
    for i, (kind, c) in enumerate(zip(spec.captured, captured)):
        if kind == "scalar":
            args.append(float(c.item()))
        elif kind == "data":
            if c.dtype == torch.bool:
                c = c.view(torch.uint8)
            a = arities.get(i, 0)
            if a and c.dim() != a:
                raise ValueError(f"data tensor {i} has {c.dim()} dims, its predicate reads {a}")
            args.extend([c, *(c.shape if a else ()), *(c.stride() if a else ())])
        else:
            t = _to4d(c).expand(score_shape4)
            if t.dtype == torch.bool:
                t = t.view(torch.uint8)  # same bytes; a uint8 load is portable across versions
            args.extend([t, *t.stride()])
    for m in spec.masks:
        R = len(m.axes)
        args.extend(int(n) for n in score_shape4[4 - R:])
    return args


def _flags():
    return dict(UPCAST_DOT=_interpret(),
                ALLOW_TF32=bool(torch.backends.cuda.matmul.allow_tf32))


def _dims(q, k, v):
    """(B, H, G, Nq, Nk, D, Dv); G = query heads per K/V head (grouped-query attention)."""
    B, H, nq, d = q.shape
    return B, H, H // k.shape[1], nq, k.shape[2], d, v.shape[3]


def forward(q, k, v, captured, spec: AttentionSpec, seed: int = 0):
    """Returns (out (..., Nq, Dv) in spec.out_dtype, lse (..., Nq) float32)."""
    batch = tuple(q.shape[:-2])
    q4, k4, v4 = _to4d(q), _to4d(k), _to4d(v)
    B, H, G, nq, nk, d, dv = _dims(q4, k4, v4)
    out = torch.empty((B, H, nq, dv), dtype=to_dtype(spec.out_dtype), device=q.device)
    lse = torch.empty((B, H, nq), dtype=torch.float32, device=q.device)
    mod = kernels(spec)
    bm, bn, warps, stages = _blocks(d, dv, backward=False, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(nq, bm) * B * H,)
    ranges = block_ranges(spec, captured, (B, H, nq, nk), bm, bn, q.device)
    thresh = torch.zeros(1, dtype=torch.float32, device=q.device)
    full = None
    if ranges is not None:
        # the removal rule (removal.py) per call, on the device: a call that must not skip visits
        # every key block; the kernel checks each row's margin against THRESH itself
        thresh = _threshold32(spec, q4, k4, v4, captured)
        whole = torch.tensor([0, triton.cdiv(nk, bn)], dtype=torch.int32, device=q.device)
        ranges = (torch.where(torch.isposinf(thresh), whole, ranges[0]).contiguous(), ranges[1])
        full = full_ranges(spec, (B, H, nq, nk), bm, bn, q.device)
    full_tiles = bool(getattr(mod, "HAS_FULL_TILES", False)) and (ranges is None or full is not None)
    mod.attn_fwd[grid](
        q4, k4, v4, out, lse, *_operands(spec, captured, (B, H, nq, nk)),
        *_range_args(ranges[0] if ranges else None, B, H, q.device),
        *_range_args(full, B, H, q.device), thresh,
        *q4.stride(), *k4.stride(), *v4.stride(), *out.stride(),
        H, G, nq, nk, d, dv, _seed32(seed),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
        num_warps=warps, num_stages=stages, SKIP=ranges is not None, FULL_TILES=full_tiles,
        EVEN_D=(d == _pow2(d) and dv == _pow2(dv)), **_flags())
    return out.reshape(batch + (nq, dv)), lse.reshape(batch + (nq,))


def backward(grad_out, q, k, v, captured, out, lse, spec: AttentionSpec, seed: int = 0,
             needs_grad: Optional[Sequence[bool]] = None):
    """Returns (dq, dk, dv, [d captured_i or None]) like cpu.attention_backward."""
    needs_grad = list(needs_grad) if needs_grad is not None else [False] * len(captured)
    q4, k4, v4 = _to4d(q), _to4d(k), _to4d(v)
    do4, o4 = _to4d(grad_out), _to4d(out)
    B, H, G, nq, nk, d, dv = _dims(q4, k4, v4)
    # lse is tiny (B*H*Nq floats): the kernels index it as contiguous rows
    lse3 = lse.reshape(B, H, nq).contiguous()
    mod = kernels(spec)
    dq = torch.empty((B, H, nq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H // G, nk, d), dtype=k.dtype, device=k.device)
    dvt = torch.empty((B, H // G, nk, dv), dtype=v.dtype, device=v.device)
    delta = torch.empty((B, H, nq), dtype=torch.float32, device=q.device)
    ops = _operands(spec, captured, (B, H, nq, nk))
    bm, bn, warps, stages = _blocks(d, dv, backward=True, dtype=q.dtype, device=q.device)
    bdv = _pow2(dv)
    row_stats = _needs_row_stats(spec, o4.dtype)
    inv_r = torch.empty((B, H, nq) if row_stats else (1,), dtype=torch.float32, device=q.device)
    if not row_stats:
        mod.attn_bwd_preprocess[(triton.cdiv(nq, bm) * B * H,)](
            o4, do4, delta, *o4.stride(), *do4.stride(), H, nq, dv, BLOCK_M=bm, BLOCK_DV=bdv)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DV=bdv,
                  num_warps=warps, num_stages=stages, **_flags())
    grads = _grad_indices(spec)
    n_mb, n_nb = triton.cdiv(nq, bm), triton.cdiv(nk, bn)
    ranges = block_ranges(spec, captured, (B, H, nq, nk), bm, bn, q.device)
    if ranges is not None:
        ranges = _backward_ranges(spec, ranges, q4, k4, v4, do4, captured, lse3, bm, n_mb, n_nb)
    skip = ranges is not None
    # skipped tiles write no operand gradient: their buffers start at zero (the exact gradient of
    # a tile whose probabilities are all 0)
    new = torch.zeros if skip else torch.empty
    bufs, flags = {}, {}
    for i in grads:
        want = bool(needs_grad[i]) if i < len(needs_grad) else False
        flags[f"GRAD_C{i}"] = want
        if not want:
            bufs[i] = torch.empty(1, dtype=torch.float32, device=q.device)
        elif spec.captured[i] == "tensor":
            # the known N x N cost, paid only while a captured tensor requires grad
            bufs[i] = new((B, H, nq, nk), dtype=torch.float32, device=q.device)
        else:
            bufs[i] = new((B * H, n_mb, n_nb), dtype=torch.float32, device=q.device)
    mod.attn_bwd_dq[(n_mb * B * H,)](
        q4, k4, v4, do4, lse3, delta, inv_r, dq, *ops, *[bufs[i] for i in grads],
        *_range_args(ranges[0] if skip else None, B, H, q.device),
        *q4.stride(), *k4.stride(), *v4.stride(), *do4.stride(), *dq.stride(),
        H, G, nq, nk, d, dv, _seed32(seed), ROW_STATS=row_stats, SKIP=skip, **common, **flags)
    # after dq: with ROW_STATS it is the dq kernel that writes delta and inv_r
    mod.attn_bwd_dkdv[(triton.cdiv(nk, bn) * B * (H // G),)](
        q4, k4, v4, do4, lse3, delta, inv_r, dk, dvt, *ops,
        *_range_args(ranges[1] if skip else None, B, H, q.device),
        *q4.stride(), *k4.stride(), *v4.stride(), *do4.stride(), *dk.stride(), *dvt.stride(),
        H, G, nq, nk, d, dv, _seed32(seed), ROW_STATS=row_stats, SKIP=skip, **common)

    dcap: List[Optional[torch.Tensor]] = []
    for i, (kind, c) in enumerate(zip(spec.captured, captured)):
        if not (i < len(needs_grad) and needs_grad[i]):
            dcap.append(None)
        elif i not in bufs:
            dcap.append(torch.zeros_like(c))  # the chain does not depend on it (e.g. a mask)
        elif kind == "scalar":
            dcap.append(bufs[i].sum().reshape(c.shape).to(c.dtype))
        else:
            shape4 = _to4d(c).shape
            dims = [j for j in range(4) if shape4[j] == 1 and bufs[i].shape[j] != 1]
            g = bufs[i].sum(dim=dims, keepdim=True) if dims else bufs[i]
            dcap.append(g.reshape(c.shape).to(c.dtype))
    return dq.reshape(q.shape), dk.reshape(k.shape), dvt.reshape(v.shape), dcap


# ---------------------------------------------------------------------------------------------
# Block skipping: which key blocks each query block visits (and the transpose, for dK/dV)
# ---------------------------------------------------------------------------------------------

# elements of one chunk of keep evaluated at once while building the block ranges (the
# evaluation's int64 intermediates are 8x that in bytes)
RANGE_CHUNK_ELEMENTS = {"cuda": 1 << 24}
_RANGE_CHUNK_DEFAULT = 1 << 22


def skip_op(spec: AttentionSpec) -> Optional[ScoreOp]:
    """The predicate step whose masked keys the kernels may skip: the chain's last step, when the
    removal rule (``removal.skip_removal``) allows skipping at all; whether a call and each row
    may is decided at run time (``_threshold32``, the forward kernel's check, ``_backward_ranges``)."""
    return spec.score_ops[-1] if removal.skip_removal(spec) is not None else None


# block ranges computed from data tensors, shared by the calls (the layers) that read the same data:
# key -> (weak references to the data tensors, their versions, result); a few entries
_RANGE_CACHE: "dict" = {}
_RANGE_CACHE_SIZE = 8


def block_ranges(spec: AttentionSpec, captured: Sequence[torch.Tensor], score_shape4,
                 block_m: int, block_n: int, device=None):
    """``_block_ranges``, shared across calls: when the predicate reads data tensors (a padding
    mask), the result is kept for the next call with the same spec, shape and blocks that reads
    the very same tensors (identity) unchanged since (their version counters), so the layers of a
    model evaluate the mask once per forward instead of once each."""
    op = skip_op(spec)
    if op is None or not spec.masks[op.index].data:
        return _block_ranges(spec, captured, score_shape4, block_m, block_n, device)
    data = [captured[d] for d in spec.masks[op.index].data]
    key = (spec.masks[op.index], op.kind, tuple(int(x) for x in score_shape4), block_m, block_n,
           str(device), tuple(id(t) for t in data))
    hit = _RANGE_CACHE.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], data)) \
            and hit[1] == tuple(t._version for t in data):
        return hit[2]
    res = _block_ranges(spec, captured, score_shape4, block_m, block_n, device)
    if len(_RANGE_CACHE) >= _RANGE_CACHE_SIZE:
        _RANGE_CACHE.pop(next(iter(_RANGE_CACHE)))
    _RANGE_CACHE[key] = (tuple(weakref.ref(t) for t in data), tuple(t._version for t in data), res)
    return res


def _block_ranges(spec: AttentionSpec, captured: Sequence[torch.Tensor], score_shape4,
                  block_m: int, block_n: int, device=None):
    """None when the spec's chain does not allow skipping; else (rows, cols), int32 tensors on the
    data's device (exact for evaluated predicates; for conjunctions of linear conditions computed
    in O(Nq) from per-row intervals, ``_linear_block_ranges``, equal on convex masks):

    * rows (Bm, Hm, cdiv(Nq, block_m), 2): per query block, [lo, hi) of the key blocks holding a key
      some row of the block keeps; all key blocks when some row of the block keeps no key (eager
      then normalises over every key: uniform for a finite fill, NaN for -inf);
    * cols (Bm, Hm, cdiv(Nk, block_n), 2): per key block, [lo, hi) of the query blocks whose range
      contains it (the dK/dV kernel's loop).

    Bm, Hm are B, H, or 1 where the predicate does not depend on the batch index / the head (the
    kernels read them with stride 0). keep is evaluated with the torch code of predicate.py in
    chunks of query rows (never an Nq x Nk buffer at once)."""
    op = skip_op(spec)
    if op is None:
        return None
    m = spec.masks[op.index]
    R = len(m.axes)
    B, H, nq, nk = (int(x) for x in score_shape4)
    fast = _linear_block_ranges(m, op.kind == "fill", tuple(int(x) for x in score_shape4[4 - R:]),
                                nq, nk, block_m, block_n, device)
    if fast is not None:
        return fast
    uses = {back: m.uses_axis(m.axes[R - back]) for back in range(1, R + 1)}
    Bm = B if uses.get(4) else 1
    Hm = H if uses.get(3) else 1
    data = [captured[d] for d in m.data]
    dev = device if device is not None else data[0].device if data else None
    n_mb, n_nb = triton.cdiv(nq, block_m), triton.cdiv(nk, block_n)
    sizes = tuple(score_shape4[4 - R:])
    budget = RANGE_CHUNK_ELEMENTS.get(torch.device(dev).type if dev is not None else "cpu",
                                      _RANGE_CHUNK_DEFAULT)
    rows_per = max(block_m, (budget // max(1, Bm * Hm * nk)) // block_m * block_m)
    jj = torch.arange(nk, device=dev).reshape(1, 1, 1, nk)
    visit = torch.empty((Bm, Hm, n_mb, n_nb), dtype=torch.bool, device=dev)
    rowless = torch.empty((Bm, Hm, n_mb), dtype=torch.bool, device=dev)
    for q0 in range(0, nq, rows_per):
        q1 = min(nq, q0 + rows_per)
        grids = []
        for t in range(R):
            back = R - t
            if not uses[back]:
                grids.append(0)
            elif back == 1:
                grids.append(jj)
            elif back == 2:
                grids.append(torch.arange(q0, q1, device=dev).reshape(1, 1, -1, 1))
            elif back == 3:
                grids.append(torch.arange(Hm, device=dev).reshape(1, -1, 1, 1))
            else:
                grids.append(torch.arange(Bm, device=dev).reshape(-1, 1, 1, 1))
        keep = predicate.evaluate_keep(m, grids, sizes, data).to(torch.bool)
        if op.kind == "fill":
            keep = ~keep
        keep = torch.broadcast_to(keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape)),
                                  (Bm, Hm, q1 - q0, nk))
        mb0, mb1 = q0 // block_m, triton.cdiv(q1, block_m)
        pad_m, pad_n = (mb1 - mb0) * block_m - (q1 - q0), n_nb * block_n - nk
        kp = torch.nn.functional.pad(keep, (0, pad_n, 0, pad_m))  # padding keeps nothing
        visit[:, :, mb0:mb1] = kp.reshape(Bm, Hm, mb1 - mb0, block_m, n_nb, block_n).any(5).any(3)
        # a padding row is no row: only real rows that keep no key count
        none = torch.nn.functional.pad(~keep.any(-1), (0, pad_m))
        rowless[:, :, mb0:mb1] = none.reshape(Bm, Hm, mb1 - mb0, block_m).any(-1)
    idx = torch.arange(n_nb, device=dev)
    lo = torch.where(visit, idx, n_nb).amin(-1)
    hi = torch.where(visit, idx + 1, 0).amax(-1)
    return _ranges(lo, hi, rowless, n_mb, n_nb, dev)


def _ranges(lo, hi, rowless, n_mb: int, n_nb: int, dev):
    """(rows, cols) of block_ranges from per-query-block key-block bounds [lo, hi) and the blocks
    holding a row that keeps no key (those visit every key block)."""
    idx = torch.arange(n_nb, device=dev)
    lo = torch.where(rowless, 0, lo)
    hi = torch.where(rowless, n_nb, hi)
    hi = torch.maximum(hi, lo)
    rows = torch.stack([lo, hi], -1).to(torch.int32).contiguous()
    # the transpose: key block nb is visited by query block mb when lo[mb] <= nb < hi[mb]
    inside = (lo[..., None] <= idx) & (idx < hi[..., None])  # (Bm, Hm, n_mb, n_nb)
    midx = torch.arange(n_mb, device=dev)[:, None]
    clo = torch.where(inside, midx, n_mb).amin(-2)
    chi = torch.where(inside, midx + 1, 0).amax(-2)
    chi = torch.maximum(chi, clo)
    cols = torch.stack([clo, chi], -1).to(torch.int32).contiguous()
    return rows, cols


def _linear_block_ranges(m, invert: bool, sizes, nq: int, nk: int, block_m: int, block_n: int, dev):
    """block_ranges for a predicate that is a conjunction of linear conditions on i and j (causal,
    windows, KV-cache offsets) with no data, batch or head: every row's kept keys are an interval
    [lo(i), hi(i)] computed in O(Nq) (no Nq x Nk evaluation), a row keeps no key when it is empty,
    and a query block visits the key blocks from its rows' smallest lo to their largest hi (a
    superset of the blocks holding a kept key, which is all the kernels need). None otherwise."""
    plan = predicate.span_plan(m, invert)
    parts = plan[1] if isinstance(plan, tuple) and plan[0] == "and" else [plan]
    if plan is None or not all(isinstance(p, predicate._Lin) for p in parts):
        return None
    i = torch.arange(nq, device=dev, dtype=torch.int64)
    lo = torch.zeros(nq, dtype=torch.int64, device=dev)
    hi = torch.full((nq,), nk - 1, dtype=torch.int64, device=dev)
    for p in parts:  # a*j + b*i + c <= 0
        t = -p.b * i - p.c(*sizes)
        if p.a > 0:
            hi = torch.minimum(hi, torch.div(t, p.a, rounding_mode="floor"))
        elif p.a < 0:
            lo = torch.maximum(lo, -torch.div(-t, p.a, rounding_mode="floor"))
        else:  # no j: the row keeps every key or none
            hi = torch.where(t >= 0, hi, -1)
    empty = lo > hi
    n_mb, n_nb = triton.cdiv(nq, block_m), triton.cdiv(nk, block_n)
    pad = n_mb * block_m - nq
    blo = torch.nn.functional.pad(torch.where(empty, nk, lo), (0, pad), value=nk)
    bhi = torch.nn.functional.pad(torch.where(empty, -1, hi), (0, pad), value=-1)
    rowless = torch.nn.functional.pad(empty, (0, pad)).reshape(n_mb, block_m).any(-1)
    klo = torch.div(blo.reshape(n_mb, block_m).amin(-1), block_n, rounding_mode="floor")
    khi = torch.div(bhi.reshape(n_mb, block_m).amax(-1), block_n, rounding_mode="floor") + 1
    klo, khi = klo.clamp(0, n_nb), khi.clamp(0, n_nb)
    return _ranges(klo.reshape(1, 1, n_mb), khi.reshape(1, 1, n_mb), rowless.reshape(1, 1, n_mb),
                   n_mb, n_nb, dev)


def full_ranges(spec: AttentionSpec, score_shape4, block_m: int, block_n: int, device=None):
    """Per query block, [flo, fhi) of the key blocks every (real) row keeps whole and that lie
    inside the keys: the forward's full tiles, which skip the mask step and bounds checks. An int32
    (1, 1, n_mb, 2) tensor for a conjunction of linear conditions (causal, windows: each row keeps
    an interval, ``predicate.span_plan``), computed in O(Nq); None otherwise (no full tiles)."""
    op = skip_op(spec)
    if op is None or _full_ops(spec) is None:
        return None
    m = spec.masks[op.index]
    R = len(m.axes)
    B, H, nq, nk = (int(x) for x in score_shape4)
    rows = _linear_rows(m, op.kind == "fill", tuple(int(x) for x in score_shape4[4 - R:]), nq, nk,
                        device)
    if rows is None:
        return None
    lo, hi = rows  # kept keys of row i: [lo(i), hi(i)] (empty when lo > hi)
    n_mb = triton.cdiv(nq, block_m)
    pad = n_mb * block_m - nq
    # padding rows do not constrain; an empty real row leaves its block no full tile
    flo = torch.nn.functional.pad(lo, (0, pad), value=-1).reshape(n_mb, block_m).amax(-1)
    fhi = torch.nn.functional.pad(hi, (0, pad), value=nk).reshape(n_mb, block_m).amin(-1)
    kb_lo = torch.div(flo + block_n - 1, block_n, rounding_mode="floor").clamp(min=0)
    kb_hi = torch.div(torch.minimum(fhi + 1, torch.full_like(fhi, nk)), block_n,
                      rounding_mode="floor")
    kb_hi = torch.maximum(kb_hi, kb_lo)
    return torch.stack([kb_lo, kb_hi], -1).to(torch.int32).reshape(1, 1, n_mb, 2).contiguous()


def _linear_rows(m, invert: bool, sizes, nq: int, nk: int, dev):
    """(lo, hi) int64 (Nq,) of the keys each row keeps, for a conjunction of linear conditions on
    i and j with no data, batch or head; None otherwise."""
    plan = predicate.span_plan(m, invert)
    parts = plan[1] if isinstance(plan, tuple) and plan[0] == "and" else [plan]
    if plan is None or not all(isinstance(p, predicate._Lin) for p in parts):
        return None
    i = torch.arange(nq, device=dev, dtype=torch.int64)
    lo = torch.zeros(nq, dtype=torch.int64, device=dev)
    hi = torch.full((nq,), nk - 1, dtype=torch.int64, device=dev)
    for p in parts:  # a*j + b*i + c <= 0
        t = -p.b * i - p.c(*sizes)
        if p.a > 0:
            hi = torch.minimum(hi, torch.div(t, p.a, rounding_mode="floor"))
        elif p.a < 0:
            lo = torch.maximum(lo, -torch.div(-t, p.a, rounding_mode="floor"))
        else:  # no j: the row keeps every key or none
            hi = torch.where(t >= 0, hi, -1)
    return lo, hi


def _threshold32(spec: AttentionSpec, q, k, v, captured, grad_out=None) -> torch.Tensor:
    """THRESH of the forward kernel, a 1-element fp32 tensor on q's device: the least row max on
    which skipping is exact in this call (``removal.threshold``), rounded up to fp32; +inf when
    the call must not skip. ``finite_scores``: Triton's max does not propagate NaN, so the kernels
    skip only where the scores are provably finite."""
    r = removal.skip_removal(spec)
    worst = removal.worst_masked(spec, r, q, k, v, captured, grad_out, finite_scores=True)
    thr = removal.threshold(worst, r)
    t32 = thr.float()
    t32 = torch.where(t32.double() < thr, torch.nextafter(t32, torch.full_like(t32, math.inf)), t32)
    return t32.reshape(1)


def _backward_ranges(spec: AttentionSpec, ranges, q, k, v, do, captured, lse, bm: int, n_mb: int,
                     n_nb: int):
    """The backward's block ranges: the forward's, except that every query block with a row on
    which the removal rule does not prove skipping exact, decided from the lse the forward saved
    (``removal.rows_ok_from_lse``, with dO among the inputs that must be finite), visits every
    key block (and the dK/dV ranges follow). Torch ops on the device: no host round trip."""
    r = removal.skip_removal(spec)
    B, H, nq = lse.shape
    worst = removal.worst_masked(spec, r, q, k, v, captured, do, finite_scores=True)
    fail = ~removal.rows_ok_from_lse(lse, k.shape[-2], worst, r)
    fail = torch.nn.functional.pad(fail, (0, n_mb * bm - nq)).reshape(B, H, n_mb, bm).any(-1)
    rows = ranges[0]
    lo = rows[..., 0].expand(B, H, n_mb)
    hi = rows[..., 1].expand(B, H, n_mb)
    return _ranges(lo, hi, fail, n_mb, n_nb, lse.device)


def _range_args(ranges: Optional[torch.Tensor], B: int, H: int, device):
    """(RANGES, r_sb, r_sh) for a kernel: the per-(b, h) block ranges with stride 0 where the
    predicate broadcasts; a dummy when nothing is skipped."""
    if ranges is None:
        return [torch.zeros(2, dtype=torch.int32, device=device), 0, 0]
    sb = ranges.stride(0) if ranges.shape[0] == B and B > 1 else 0
    sh = ranges.stride(1) if ranges.shape[1] == H and H > 1 else 0
    return [ranges, sb, sh]



def _needs_row_stats(spec: AttentionSpec, out_dtype: torch.dtype) -> bool:
    """Whether the backward takes the extra pass for exact per-row statistics (see attn_bwd_dq):
    when O is rounded to 16 bits (delta), or when the chain can make a row's maximum huge (a
    finite fill value, or a tensor operand that may carry finfo.min), so lse loses log(l)."""
    if out_dtype != torch.float32:
        return True
    for op in spec.score_ops:
        if op.kind in ("fill", "fill_not") and math.isfinite(op.value):
            return True
        if op.kind in _ARITH_KINDS and op.operand in ("tensor", "predicate"):
            return True
    return False


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _seed32(seed: int) -> int:
    """The low 32 bits of the seed as a signed int32, so every seed launches the same kernel
    signature (a Python int above 2^31 would be specialised as int64); the kernel bitcasts back."""
    s = int(seed) & 0xFFFFFFFF
    return s - (1 << 32) if s >= (1 << 31) else s
