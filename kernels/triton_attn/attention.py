"""Generate stage, Triton half: the attention kernels, FlashAttention-2 style, forward and backward.

Plain Triton, read top to bottom: small helpers, the forward's key-block step (``_fwd_tile``, one
body for full and partial tiles) and kernel, the backward's shared tile step (``_bwd_tile``), the
preprocess, dK/dV and dQ kernels. What varies per ``AttentionSpec`` (the score function, its
derivative, the mask predicates, a few constants) comes from ``spec_parts`` here and is replaced per
spec by generated functions (``codegen.py``; ``loader.py`` compiles this file in each spec's
namespace). Launchers: ``launch.py``; host-side block ranges: ``ranges.py``.

* ``attn_fwd``: one program per (query block, batch*head); online softmax over key blocks with
  fp32 accumulators; saves the row log-sum-exp for the backward.
* ``attn_bwd_preprocess``: ``delta = rowsum(dO * O)`` (equals rowsum(dP * P) even with dropout).
* ``attn_bwd_dq``: one program per query block, looping over key blocks; then ``attn_bwd_dkdv``:
  one program per key block, looping over query blocks. Neither uses atomics, so gradients are
  bitwise deterministic; the price is recomputing the scores twice in the backward.
* Grouped-query attention: K/V may have fewer heads (G query heads per K/V head); the forward and
  dq kernels read K/V head h // G, and each dK/dV program loops over its G query heads.
* ``ROW_STATS`` (both backward kernels): instead of the preprocess kernel, the dq kernel first
  takes one more pass over the keys for exact per-row statistics (see ``attn_bwd_dq``).
* ``SKIP``: the key blocks of each query block (and the transpose for dK/dV) come from the host
  (``ranges.block_ranges``); the forward checks each row's max against THRESH (the removal rule,
  ``kernels/removal.py``) and recomputes its query block over every key block when a row fails.
* ``BAND`` (with SKIP): for a mask whose rows keep one interval of keys that moves with i
  (causal, windows, bands, KV-cache offsets: ``ranges.linear_band``), the kernels compute those
  ranges and the full tiles themselves from four integers (``_band_key_blocks``, the transpose
  ``_band_query_blocks``), the same blocks as the host's tensors; no range tensor is built. The
  backward's removal check per query block runs in the dQ kernel (``_rows_fail``), which hands
  the hull of the failing blocks per head to the dK/dV kernel (FAILS).
* ``FULL_TILES``: key blocks every row of the query block keeps whole (``ranges.full_ranges``)
  take ``_fwd_tile`` with FULL: no bounds checks, the skipped mask step left out. The backward
  likewise (``_bwd_tile`` with FULL): dQ over the same per-query-block ranges, dK/dV over their
  transpose per key block (``launch.full_columns``); tiles with padding rows or keys never are.
* ``attn_decode`` + ``attn_decode_combine``: the forward for few queries over a long KV cache
  (flash-decoding: the keys split across programs, the partial results combined by their
  log-sum-exp; grouped-query heads of one K/V head share a tile), chosen by ``launch.decode_plan``;
  with BAND, key blocks no query keeps are not computed (their V only is checked for non-finite
  values, which eager's 0 * v would spread).

Everything is fp32 except the dot operands (the inputs' dtype).
"""
import triton
import triton.language as tl

# replaced per spec in the kernels' namespace (loader.py)
from .spec_parts import (
    DROP_SCALE, DROP_THRESHOLD, FULL_SCALE, HAS_DROPOUT, LOG2_UNITS, SAFE_SOFTMAX, operand_values,
    operand_tiles, operand_tiles_full, qk_round, score_mod, score_mod_backward,
    score_mod_backward_store, score_mod_full)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

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
def _exp(x):
    # the exponential in the score's units (exp2 when log2(e) is folded into the chain)
    if LOG2_UNITS:
        return tl.math.exp2(x)
    else:
        return tl.exp(x)


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
    return h.to(tl.int64) >= DROP_THRESHOLD


@triton.jit
def _load_tile(P, rows, s_r, n_r, cols, s_c, n_c):
    # a (rows x cols) tile of a strided tensor, zero outside [0, n_r) x [0, n_c)
    return tl.load(P + rows[:, None] * s_r + cols[None, :] * s_c,
                   mask=(rows[:, None] < n_r) & (cols[None, :] < n_c), other=0.0)


@triton.jit
def _load_rows(P, rows, s_r, cols, s_c, n_c, EVEN_D: tl.constexpr):
    # a tile whose rows are all in bounds (a full tile): only the head dim may need a mask
    ptrs = P + rows[:, None] * s_r + cols[None, :] * s_c
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=cols[None, :] < n_c, other=0.0)


@triton.jit
def _block_range(RANGES, off, pid, SKIP: tl.constexpr, N, BLOCK: tl.constexpr):
    # [lo, hi) of the blocks this program visits: with SKIP the precomputed range of block pid
    # (ranges.block_ranges), else all cdiv(N, BLOCK)
    if SKIP:
        lo = tl.load(RANGES + off + pid * 2)
        hi = tl.load(RANGES + off + pid * 2 + 1)
    else:
        lo = 0
        hi = tl.cdiv(N, BLOCK)
    return lo, hi


@triton.jit
def _full_range(FULL, off, pid, lo, hi, n_full, FULL_TILES: tl.constexpr, HOST: tl.constexpr):
    # [flo, fhi) within [lo, hi) of the full tiles of block pid: every row keeps every key of the
    # tile and nothing is out of bounds. HOST: the host's ranges (ranges.full_ranges, or its
    # transpose for dK/dV); else every block before n_full (no mask to skip). n_full: the blocks
    # lying wholly inside the loop's dimension (0 when this program's own block is ragged)
    if FULL_TILES and HOST:
        flo = tl.load(FULL + off + pid * 2)
        fhi = tl.load(FULL + off + pid * 2 + 1)
    else:
        flo = lo
        fhi = n_full
    return _clip_full(flo, fhi, lo, hi, n_full, FULL_TILES)


@triton.jit
def _band_key_blocks(pid, B_LO, B_HI, K_LO, K_HI, N_Q, N_K, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    # BAND: the key blocks of query block pid computed here from the band (ranges.linear_band:
    # row i keeps the keys [max(K_LO, i + B_LO), min(K_HI, i + B_HI)], K_LO >= 0, K_HI < N_K),
    # equal to the host's ranges (ranges._linear_block_ranges, ranges.full_ranges) without a
    # tensor: both ends of a row's interval grow with i, so the block's first and last rows decide.
    # (lo, hi): the blocks holding a key some row keeps, every block when a row keeps none;
    # (flo, fhi): the full tiles, every row keeping every key of the block (empty: flo >= fhi).
    # Scalars in int64 (i + B_HI may pass 2^31 near the int32 limits); block indices int32
    r0 = pid.to(tl.int64) * BLOCK_M
    r1 = tl.minimum(r0 + BLOCK_M, N_Q) - 1
    return _band_rows_blocks(r0, r1, B_LO, B_HI, K_LO, K_HI, N_K, BLOCK_N)


@triton.jit
def _band_rows_blocks(r0, r1, B_LO, B_HI, K_LO, K_HI, N_K, BLOCK_N: tl.constexpr):
    # _band_key_blocks for the rows [r0, r1] (int64, r0 <= r1): (lo, hi, flo, fhi)
    n_blocks = tl.cdiv(N_K, BLOCK_N)
    # a row keeping no key: the first rows (i + B_HI < K_LO) or the last (i + B_LO > K_HI)
    rowless = (B_LO > B_HI) | (K_LO > K_HI) | (r0 + B_HI < K_LO) | (r1 + B_LO > K_HI)
    first = tl.maximum(r0 + B_LO, K_LO)  # the least key kept by a row of the block (>= 0)
    last = tl.minimum(r1 + B_HI, K_HI)   # the greatest
    lo = tl.where(rowless, 0, first // BLOCK_N).to(tl.int32)
    hi = tl.where(rowless, n_blocks, last // BLOCK_N + 1).to(tl.int32)
    # full tiles: from the last row's first kept key to the first row's last kept key
    f_first = tl.maximum(r1 + B_LO, K_LO)
    f_last = tl.minimum(tl.minimum(r0 + B_HI, K_HI) + 1, N_K)  # exclusive
    flo = (f_first + BLOCK_N - 1) // BLOCK_N
    fhi = tl.maximum(tl.maximum(f_last, 0) // BLOCK_N, flo)
    return lo, hi, flo.to(tl.int32), fhi.to(tl.int32)


@triton.jit
def _decode_key_blocks(B_LO, B_HI, K_LO, K_HI, N_Q, N_K, BLOCK_N: tl.constexpr):
    # BAND in the decode kernel: [lo, hi) of the key blocks holding a key some query keeps, every
    # query of the call taken as one block (_band_key_blocks' rows [0, N_Q - 1]; every block when
    # a query keeps none), as launch._band_blocks computes it on the host
    r0 = tl.full([], 0, tl.int64)
    lo, hi, flo, fhi = _band_rows_blocks(r0, r0 + N_Q - 1, B_LO, B_HI, K_LO, K_HI, N_K, BLOCK_N)
    return lo, hi


@triton.jit
def _band_query_blocks(pid, f_lo, f_hi, B_LO, B_HI, K_LO, K_HI, N_Q, N_K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # BAND, the transpose for the dK/dV kernel: (lo, hi) the query blocks whose key blocks
    # (_band_key_blocks, every block for those in [f_lo, f_hi): the backward's failing blocks)
    # contain key block pid, as one interval (their hull, as ranges._ranges); (flo, fhi) the query
    # blocks without padding rows for which it is a full tile (launch.full_columns), (0, 0) none
    nb = pid.to(tl.int64)
    n_mb = tl.cdiv(N_Q, BLOCK_M)
    # query blocks with a row that keeps no key (they visit every key block): a prefix [0, pre)
    # (rows i < K_LO - B_HI) and a suffix [suf, n_mb) (rows i > K_HI - B_LO); all of them when
    # the band or the key bounds are empty
    p = K_LO - B_HI
    pre = tl.where(p > 0, tl.minimum(tl.cdiv(tl.maximum(p, 0), BLOCK_M), n_mb), 0)
    pre = tl.where((B_LO > B_HI) | (K_LO > K_HI), n_mb, pre)
    s = K_HI - B_LO
    suf = tl.where(N_Q - 1 > s, tl.minimum(tl.maximum(s + 1, 0) // BLOCK_M, n_mb), n_mb)
    # the other blocks [pre, suf) visit [first // BLOCK_N, last // BLOCK_N + 1), both ends
    # growing with the block: it contains nb from the first block whose last row's last key
    # reaches nb * BLOCK_N to the last block whose first row's first key is before the next block
    t = nb * BLOCK_N - B_HI + 1
    a = tl.where((K_HI >= nb * BLOCK_N) & (N_Q >= t),
                 tl.maximum(tl.cdiv(tl.maximum(t, 0), BLOCK_M) - 1, 0), n_mb)
    u = (nb + 1) * BLOCK_N - 1 - B_LO
    b = tl.where((K_LO <= (nb + 1) * BLOCK_N - 1) & (u >= 0), u // BLOCK_M, -1)
    m0 = tl.maximum(pre, a)
    m1 = tl.minimum(suf, b + 1)
    # the hull of the four sets
    lo = tl.minimum(tl.minimum(tl.where(pre > 0, 0, n_mb), tl.where(suf < n_mb, suf, n_mb)),
                    tl.minimum(tl.where(m1 > m0, m0, n_mb), tl.where(f_hi > f_lo, f_lo, n_mb)))
    hi = tl.maximum(tl.maximum(pre, tl.where(suf < n_mb, n_mb, 0)),
                    tl.maximum(tl.where(m1 > m0, m1, 0), tl.where(f_hi > f_lo, f_hi, 0)))
    hi = tl.maximum(hi, lo)
    # full tiles: the blocks whose first row's last key reaches the end of nb and whose last
    # row's first key is at most its start; only blocks without padding rows, nb not ragged
    v = (nb + 1) * BLOCK_N - 1
    fa = tl.where((K_HI >= v) & (N_K >= v + 1), tl.cdiv(tl.maximum(v - B_HI, 0), BLOCK_M), n_mb)
    w = nb * BLOCK_N - B_LO - BLOCK_M + 1
    fb = tl.where((K_LO <= nb * BLOCK_N) & (w >= 0), w // BLOCK_M, -1)
    fe = tl.minimum(fb + 1, N_Q // BLOCK_M)
    some = fe > fa
    flo = tl.where(some, fa, 0)
    fhi = tl.where(some, fe, 0)
    return lo.to(tl.int32), hi.to(tl.int32), flo.to(tl.int32), fhi.to(tl.int32)


@triton.jit
def _clip_full(flo, fhi, lo, hi, n_full, FULL_TILES: tl.constexpr):
    # full tiles [flo, fhi) brought within [lo, hi) and before n_full (see _full_range)
    if FULL_TILES:
        fhi = tl.minimum(fhi, n_full)
        flo = tl.minimum(tl.maximum(flo, lo), hi)
        fhi = tl.minimum(tl.maximum(fhi, flo), hi)
    else:
        flo = lo
        fhi = lo
    return flo, fhi


@triton.jit
def _rows_fail(lse, m_valid, THR, LOG_NK):
    # BAND, the backward: whether a row of the block fails the removal rule, decided from the
    # forward's lse (natural units) exactly as removal.rows_ok_from_lse does on the host, in
    # float64 and in the same order of operations (the products are by powers of two: exact);
    # a NaN lse fails (NaN < inf is false)
    lse = lse.to(tl.float64)
    lo = lse - LOG_NK - (tl.abs(lse) * 9.5367431640625e-07 + 1e-3)
    ok = (tl.abs(lo) < float("inf")) & (lo - tl.load(THR) >= tl.abs(lo) * 9.5367431640625e-07)
    return tl.sum((m_valid & ~ok).to(tl.int32), 0) > 0


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


# Integer helpers of the generated mask predicates (Python's floor division and modulo)

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


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tile(q, K_bh, V_bh, m_i, l_i, acc, start_n, OPS, off_b, off_h, off_bh, offs_m, m_valid,
              offs_d, offs_dv, skn, skd, svn, svd, N_Q, N_K, D, DV, seed,
              BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr, ALLOW_TF32: tl.constexpr,
              EVEN_D: tl.constexpr, FULL: tl.constexpr, TMA: tl.constexpr = False):
    # One key block of the online softmax. TMA: K_bh and V_bh are tensor descriptors of this
    # head's keys and values (zero outside [0, N_K) x [0, D)), loaded by the tensor memory
    # accelerator instead of per-thread pointers. FULL: every row keeps every key of the block and no
    # key is out of bounds, so the bounds checks and the skipped mask step are left out
    # (FlexAttention's full blocks). ``s`` ends in the units of the exponential (_exp).
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TMA:
        k = K_bh.load([start_n, 0])
    if FULL:
        valid = m_valid[:, None]
        if not TMA:
            k = _load_rows(K_bh + tl.cast(start_n, tl.int64) * skn, tl.arange(0, BLOCK_N), skn,
                           offs_d, skd, D, EVEN_D)
        s = qk_round(_dot(q, tl.trans(k), UPCAST_DOT, ALLOW_TF32))
        T = operand_tiles_full(OPS, off_b, off_h, offs_m, offs_n, valid)
        if FULL_SCALE > 0:
            # FlashAttention-2's form: the max of the raw products, one FMA per score
            m_new = tl.maximum(m_i, tl.max(s, 1) * FULL_SCALE)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s * FULL_SCALE - m_safe[:, None])
        else:
            s = score_mod_full(s, T)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = _exp(s - m_safe[:, None])
    else:
        n_valid = offs_n < N_K
        valid = m_valid[:, None] & n_valid[None, :]
        if not TMA:
            k = _load_tile(K_bh + tl.cast(start_n, tl.int64) * skn, tl.arange(0, BLOCK_N), skn,
                           N_K - start_n, offs_d, skd, D)
        s = qk_round(_dot(q, tl.trans(k), UPCAST_DOT, ALLOW_TF32))
        T = operand_tiles(OPS, off_b, off_h, offs_m, offs_n, valid)
        s = score_mod(s, T)
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row whose keys so far are all -inf keeps m = -inf; subtracting 0 instead avoids
        # -inf - -inf = NaN, so a later block with finite scores still counts
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp(s - m_safe[:, None])
    alpha = _exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        # l_i sums the probabilities before dropout: softmax normalises, dropout then scales
        keep = _dropout_keep(seed, off_bh, offs_m, offs_n, N_Q, N_K)
        p = tl.where(keep, p * DROP_SCALE, 0.0)
    if TMA:
        v = V_bh.load([start_n, 0])
    elif FULL:
        v = _load_rows(V_bh + tl.cast(start_n, tl.int64) * svn, tl.arange(0, BLOCK_N), svn,
                       offs_dv, svd, DV, EVEN_D)
    else:
        v = _load_tile(V_bh + tl.cast(start_n, tl.int64) * svn, tl.arange(0, BLOCK_N), svn,
                       N_K - start_n, offs_dv, svd, DV)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT, ALLOW_TF32)
    return m_new, l_i, acc


@triton.jit
def _finish(acc, l_b, m, l):
    # (out, lse) of rows from the online softmax's accumulator, max and sum (l_b: l broadcast to
    # acc). A fully masked row (all -inf) has l = 0: 0/0 gives eager's NaN row, and lse is NaN as
    # in cpu.py (max - log(max p) with p NaN). SDPA's safe softmax: output 0 and lse = +inf, so
    # that the backward's p = exp(s - lse) is 0 on it; a NaN row stays NaN (l is NaN, not 0)
    if LOG2_UNITS:
        lse = (m + tl.math.log2(l)) * LN2
    else:
        lse = m + tl.log(l)
    if SAFE_SOFTMAX:
        out = tl.where(l_b == 0.0, 0.0, acc / l_b)
        lse = tl.where(l == 0.0, float("inf"), lse)
    else:
        out = acc / l_b
        lse = tl.where(l == 0.0, float("nan"), lse)
    return out, lse


@triton.jit(do_not_specialize=["seed", "B_LO", "B_HI", "K_LO", "K_HI"])
def attn_fwd(
    Q, K, V, Out, LSE, OPS, RANGES, r_sb, r_sh, FULL, f_sb, f_sh, THRESH, B_LO, B_HI, K_LO, K_HI,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    H, G, N_Q, N_K, D, DV, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST_DOT: tl.constexpr, ALLOW_TF32: tl.constexpr, SKIP: tl.constexpr,
    FULL_TILES: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr = False,
    BAND: tl.constexpr = False,
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
    if TMA:
        # the launcher checked the layout: unit last stride, 16-byte aligned rows and heads
        K_bh = tl.make_tensor_descriptor(K_bh, shape=[N_K, D], strides=[skn, 1],
                                         block_shape=[BLOCK_N, BLOCK_D])
        V_bh = tl.make_tensor_descriptor(V_bh, shape=[N_K, DV], strides=[svn, 1],
                                         block_shape=[BLOCK_N, BLOCK_DV])
    OPS = operand_values(OPS)  # the scalar operands' values, loaded once
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    n_blocks = tl.cdiv(N_K, BLOCK_N)
    if BAND:
        # the key blocks and full tiles from the band's four integers (no range tensor)
        lo, hi, flo, fhi = _band_key_blocks(pid_m, B_LO, B_HI, K_LO, K_HI, N_Q, N_K, BLOCK_M,
                                            BLOCK_N)
    else:
        # key blocks [lo, hi): all, or with SKIP those holding a key some row of this block keeps
        lo, hi = _block_range(RANGES, off_b * r_sb + off_h * r_sh, pid_m, SKIP, N_K, BLOCK_N)
    if SKIP:
        # a call that must not skip (THRESH = +inf: an input not finite) visits every key block
        whole = tl.load(THRESH) == float("inf")
        lo = tl.where(whole, 0, lo)
        hi = tl.where(whole, n_blocks, hi)
    if BAND:
        flo, fhi = _clip_full(flo, fhi, lo, hi, N_K // BLOCK_N, FULL_TILES)
    else:
        # full tiles [flo, fhi) within [lo, hi): every row keeps every key and no key is out of
        # bounds; the tiles before and after take the masked path
        flo, fhi = _full_range(FULL, off_b * f_sb + off_h * f_sh, pid_m, lo, hi, N_K // BLOCK_N,
                               FULL_TILES, SKIP)
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
            m_nat = m_i
            if LOG2_UNITS:
                m_nat = m_i * LN2
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
            m_i, l_i, acc = _fwd_tile(
                q, K_bh, V_bh, m_i, l_i, acc, blk_n * BLOCK_N, OPS, off_b, off_h, off_bh, offs_m,
                m_valid, offs_d, offs_dv, skn, skd, svn, svd, N_Q, N_K, D, DV, seed,
                BLOCK_N, UPCAST_DOT, ALLOW_TF32, EVEN_D, phase == 1, TMA)
    out, lse = _finish(acc, l_i[:, None], m_i, l_i)
    tl.store(Out + off_b * sob + off_h * soh + offs_m[:, None].to(tl.int64) * som + offs_dv[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_valid[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + off_bh * N_Q + offs_m, lse, mask=m_valid)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

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


@triton.jit
def _bwd_tile(q, k, v, do, lse, OPS, off_b, off_h, offs_m, offs_n, valid,
              UPCAST_DOT: tl.constexpr, ALLOW_TF32: tl.constexpr, FULL: tl.constexpr):
    # One tile of the backward: the raw products s0, the operand tiles, the probabilities
    # p = exp(score_mod(s0) - lse) (0 outside the bounds: by where, not by a 0/1 product, so a
    # fully masked row's NaN reaches dV as in eager while the padding's does not) and dP = dO V^T.
    # FULL: every row keeps every key of the tile and nothing is out of bounds, so neither the
    # skipped mask step nor the bounds select is computed (as the forward's _fwd_tile)
    # s0 as the forward saw it (qk_round: float16's overflow to +-inf), so P matches
    s0 = qk_round(_dot(q, tl.trans(k), UPCAST_DOT, ALLOW_TF32))
    if FULL:
        T = operand_tiles_full(OPS, off_b, off_h, offs_m, offs_n, valid)
        p = _exp(score_mod_full(s0, T) - lse[:, None])
    else:
        T = operand_tiles(OPS, off_b, off_h, offs_m, offs_n, valid)
        p = tl.where(valid, _exp(score_mod(s0, T) - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), UPCAST_DOT, ALLOW_TF32)
    return s0, T, p, dp


@triton.jit
def _bwd_dropout(p, dp, seed, off_bh, offs_m, offs_n, N_Q, N_K):
    # (dropped probabilities, dP through the dropout)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, off_bh, offs_m, offs_n, N_Q, N_K)
        pd = tl.where(keep, p * DROP_SCALE, 0.0)
        dp = tl.where(keep, dp * DROP_SCALE, 0.0)
    else:
        pd = p
    return pd, dp


@triton.jit
def _bwd_kv_tile(q, do, lse, K_bh, V_bh, start_n, OPS, off_b, off_h, offs_m, m_valid, offs_d,
                 offs_dv, skn, skd, svn, svd, N_K, D, DV,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 ALLOW_TF32: tl.constexpr, EVEN_D: tl.constexpr, FULL: tl.constexpr,
                 TMA: tl.constexpr = False):
    # the dQ kernel's key block at start_n: its K tile, indices, bounds and _bwd_tile. TMA: K_bh
    # and V_bh are tensor descriptors of the head (as in _fwd_tile)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TMA:
        k = K_bh.load([start_n, 0])
        v = V_bh.load([start_n, 0])
    else:
        K_t = K_bh + tl.cast(start_n, tl.int64) * skn
        V_t = V_bh + tl.cast(start_n, tl.int64) * svn
    if FULL:
        valid = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
        if not TMA:
            k = _load_rows(K_t, tl.arange(0, BLOCK_N), skn, offs_d, skd, D, EVEN_D)
            v = _load_rows(V_t, tl.arange(0, BLOCK_N), svn, offs_dv, svd, DV, EVEN_D)
    else:
        valid = m_valid[:, None] & (offs_n < N_K)[None, :]
        if not TMA:
            k = _load_tile(K_t, tl.arange(0, BLOCK_N), skn, N_K - start_n, offs_d, skd, D)
            v = _load_tile(V_t, tl.arange(0, BLOCK_N), svn, N_K - start_n, offs_dv, svd, DV)
    s0, T, p, dp = _bwd_tile(q, k, v, do, lse, OPS, off_b, off_h, offs_m, offs_n, valid,
                             UPCAST_DOT, ALLOW_TF32, FULL)
    return k, offs_n, valid, s0, T, p, dp


@triton.jit
def _phase_range(lo, flo, fhi, hi, phase: tl.constexpr, FULL_TILES: tl.constexpr):
    # the blocks of phase 0 (partial, before the full tiles), 1 (full) or 2 (partial, after);
    # without full tiles one phase over [lo, hi)
    if not FULL_TILES:
        return lo, hi
    elif phase == 0:
        return lo, flo
    elif phase == 1:
        return flo, fhi
    else:
        return fhi, hi


@triton.jit(do_not_specialize=["seed", "B_LO", "B_HI", "K_LO", "K_HI"])
def attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, INV_R, DK, DV_, OPS, RANGES, r_sb, r_sh, FULL, f_sb, f_sh,
    FAILS, B_LO, B_HI, K_LO, K_HI,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    H, G, N_Q, N_K, D, DV, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST_DOT: tl.constexpr, ALLOW_TF32: tl.constexpr, ROW_STATS: tl.constexpr,
    SKIP: tl.constexpr, FULL_TILES: tl.constexpr, EVEN_D: tl.constexpr,
    BAND: tl.constexpr = False, TMA: tl.constexpr = False,
):
    # TMA: the query blocks' Q and dO tiles are loaded through tensor descriptors of each head
    # (zero outside [0, N_Q) x [0, D)), as the forward loads K and V (launch._tma)
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
    # query blocks with no padding row; none when this key block is ragged
    n_full = tl.where((pid_n + 1) * BLOCK_N <= N_K, N_Q // BLOCK_M, 0)
    OPS = operand_values(OPS)  # the scalar operands' values, loaded once
    # grouped-query attention: the G query heads that share this K/V head add into one dK/dV,
    # in a fixed order (no atomics)
    for g in range(G):
        off_h = off_hk * G + g
        off_bh = off_b * H + off_h
        Q_bh = Q + off_b * sqb + off_h * sqh
        DO_bh = DO + off_b * sdob + off_h * sdoh
        if TMA:
            Q_d = tl.make_tensor_descriptor(Q_bh, shape=[N_Q, D], strides=[sqm, 1],
                                            block_shape=[BLOCK_M, BLOCK_D])
            DO_d = tl.make_tensor_descriptor(DO_bh, shape=[N_Q, DV], strides=[sdom, 1],
                                             block_shape=[BLOCK_M, BLOCK_DV])
        # query blocks [lo, hi): all, or with SKIP those some of whose rows keep a key here; the
        # full tiles [flo, fhi) among them (the transpose of the forward's) skip the mask step
        if BAND:
            # from the band, and the hull [f_lo, f_hi) of the query blocks of this head that
            # failed the removal rule (written by attn_bwd_dq, which ran first)
            n_mb = tl.cdiv(N_Q, BLOCK_M)
            f_lo = n_mb - tl.load(FAILS + off_bh * (n_mb + 2))
            f_hi = tl.load(FAILS + off_bh * (n_mb + 2) + 1)
            lo, hi, flo, fhi = _band_query_blocks(pid_n, f_lo, f_hi, B_LO, B_HI, K_LO, K_HI,
                                                  N_Q, N_K, BLOCK_M, BLOCK_N)
            flo, fhi = _clip_full(flo, fhi, lo, hi, n_full, FULL_TILES)
        else:
            lo, hi = _block_range(RANGES, off_b * r_sb + off_h * r_sh, pid_n, SKIP, N_Q, BLOCK_M)
            flo, fhi = _full_range(FULL, off_b * f_sb + off_h * f_sh, pid_n, lo, hi, n_full,
                                   FULL_TILES, SKIP)
        for phase in tl.static_range(3 if FULL_TILES else 1):
            b0, b1 = _phase_range(lo, flo, fhi, hi, phase, FULL_TILES)
            for blk_m in range(b0, b1):
                start_m = blk_m * BLOCK_M
                offs_m = start_m + tl.arange(0, BLOCK_M)
                Q_t = Q_bh + tl.cast(start_m, tl.int64) * sqm
                DO_t = DO_bh + tl.cast(start_m, tl.int64) * sdom
                if TMA:
                    q = Q_d.load([start_m, 0])
                    do = DO_d.load([start_m, 0]).to(v.dtype)
                if phase == 1:
                    valid = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
                    if not TMA:
                        q = _load_rows(Q_t, tl.arange(0, BLOCK_M), sqm, offs_d, sqd, D, EVEN_D)
                        do = _load_rows(DO_t, tl.arange(0, BLOCK_M), sdom, offs_dv, sdod, DV,
                                        EVEN_D).to(v.dtype)
                    lse = tl.load(LSE + off_bh * N_Q + offs_m)
                    delta = tl.load(DELTA + off_bh * N_Q + offs_m)
                else:
                    m_valid = offs_m < N_Q
                    valid = m_valid[:, None] & n_valid[None, :]
                    if not TMA:
                        q = _load_tile(Q_t, tl.arange(0, BLOCK_M), sqm, N_Q - start_m, offs_d,
                                       sqd, D)
                        do = _load_tile(DO_t, tl.arange(0, BLOCK_M), sdom, N_Q - start_m,
                                        offs_dv, sdod, DV).to(v.dtype)
                    lse = tl.load(LSE + off_bh * N_Q + offs_m, mask=m_valid, other=0.0)
                    delta = tl.load(DELTA + off_bh * N_Q + offs_m, mask=m_valid, other=0.0)
                if LOG2_UNITS:
                    lse = lse * LOG2E
                s0, T, p, dp = _bwd_tile(q, k, v, do, lse, OPS, off_b, off_h, offs_m, offs_n,
                                         valid, UPCAST_DOT, ALLOW_TF32, phase == 1)
                if ROW_STATS:
                    if phase == 1:
                        p = p * tl.load(INV_R + off_bh * N_Q + offs_m)[:, None]
                    else:
                        p = p * tl.load(INV_R + off_bh * N_Q + offs_m, mask=m_valid, other=1.0)[:, None]
                pd, dp = _bwd_dropout(p, dp, seed, off_bh, offs_m, offs_n, N_Q, N_K)
                dv += _dot(tl.trans(pd).to(do.dtype), do, UPCAST_DOT, ALLOW_TF32)
                ds = p * (dp - delta[:, None])
                ds = score_mod_backward(ds, s0, T)
                if phase != 1:
                    ds = tl.where(valid, ds, 0.0)
                dk += _dot(tl.trans(ds).to(q.dtype), q, UPCAST_DOT, ALLOW_TF32)
    tl.store(DK + off_b * sdkb + off_hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=n_valid[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + off_b * sdvb + off_hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV_.dtype.element_ty), mask=n_valid[:, None] & (offs_dv[None, :] < DV))


@triton.jit(do_not_specialize=["seed", "B_LO", "B_HI", "K_LO", "K_HI"])
def attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, INV_R, DQ, OPS, DC, RANGES, r_sb, r_sh, FULL, f_sb, f_sh,
    THR, LOG_NK: tl.float64, FAILS, B_LO, B_HI, K_LO, K_HI,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    H, G, N_Q, N_K, D, DV, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST_DOT: tl.constexpr, ALLOW_TF32: tl.constexpr, ROW_STATS: tl.constexpr,
    SKIP: tl.constexpr, GRAD: tl.constexpr, FULL_TILES: tl.constexpr, EVEN_D: tl.constexpr,
    BAND: tl.constexpr = False, TMA: tl.constexpr = False,
):
    # TMA: the key blocks' K and V tiles through tensor descriptors of the head (launch._tma)
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
    K_bh = K + off_b * skb + off_hk * skh
    V_bh = V + off_b * svb + off_hk * svh
    if TMA:
        K_bh = tl.make_tensor_descriptor(K_bh, shape=[N_K, D], strides=[skn, 1],
                                         block_shape=[BLOCK_N, BLOCK_D])
        V_bh = tl.make_tensor_descriptor(V_bh, shape=[N_K, DV], strides=[svn, 1],
                                         block_shape=[BLOCK_N, BLOCK_DV])
    OPS = operand_values(OPS)  # the scalar operands' values, loaded once
    # in the units of the exponential (base 2 when log2(e) is folded into the chain)
    lse = tl.load(LSE + off_bh * N_Q + offs_m, mask=m_valid, other=0.0)
    # the forward's key blocks (skipped ones hold only masked keys: their p is exactly 0), and
    # the full tiles among them (none when this query block has padding rows)
    n_full = tl.where((pid_m + 1) * BLOCK_M <= N_Q, N_K // BLOCK_N, 0)
    if BAND:
        # from the band; a block with a row on which the removal rule fails (decided here from
        # lse, as ranges.backward_ranges does) visits every key block, and says so to the dK/dV
        # kernel through the hull of such blocks per head (FAILS[bh, 0:2], zeroed by the
        # launcher)
        lo, hi, flo, fhi = _band_key_blocks(pid_m, B_LO, B_HI, K_LO, K_HI, N_Q, N_K, BLOCK_M,
                                            BLOCK_N)
        n_mb = tl.cdiv(N_Q, BLOCK_M)
        FAILS_bh = FAILS + off_bh * (n_mb + 2)
        fail = _rows_fail(lse, m_valid, THR, LOG_NK)
        if fail:
            tl.atomic_max(FAILS_bh, n_mb - pid_m)
            tl.atomic_max(FAILS_bh + 1, pid_m + 1)
        # the flag makes a round trip through this block's own slot (FAILS[bh, 2 + pid_m]): the
        # loops' bounds then come from a load, as the host's ranges did, instead of from the
        # row reduction, around which ptxas scheduled every loop of the kernel worse (non-MMA
        # per iteration of the full-tile loop: sm_80 +4, sm_90a +38, sm_100a +39)
        tl.store(FAILS_bh + 2 + pid_m, fail.to(tl.int32))
        tl.debug_barrier()
        fail = tl.load(FAILS_bh + 2 + pid_m) != 0
        lo = tl.where(fail, 0, lo)
        hi = tl.where(fail, tl.cdiv(N_K, BLOCK_N), hi)
        flo, fhi = _clip_full(flo, fhi, lo, hi, n_full, FULL_TILES)
    else:
        lo, hi = _block_range(RANGES, off_b * r_sb + off_h * r_sh, pid_m, SKIP, N_K, BLOCK_N)
        flo, fhi = _full_range(FULL, off_b * f_sb + off_h * f_sh, pid_m, lo, hi, n_full,
                               FULL_TILES, SKIP)
    if LOG2_UNITS:
        lse = lse * LOG2E
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
        for phase in tl.static_range(3 if FULL_TILES else 1):
            b0, b1 = _phase_range(lo, flo, fhi, hi, phase, FULL_TILES)
            for blk_n in range(b0, b1):
                k, offs_n, valid, s0, T, p, dp = _bwd_kv_tile(
                    q, do, lse, K_bh, V_bh, blk_n * BLOCK_N, OPS, off_b, off_h, offs_m, m_valid,
                    offs_d, offs_dv, skn, skd, svn, svd, N_K, D, DV,
                    BLOCK_M, BLOCK_N, UPCAST_DOT, ALLOW_TF32, EVEN_D, phase == 1, TMA)
                pd, dp = _bwd_dropout(p, dp, seed, off_bh, offs_m, offs_n, N_Q, N_K)
                r += tl.sum(p, 1)
                delta += tl.sum(p * dp, 1)
        if SAFE_SOFTMAX:
            inv_r = tl.where(r == 0.0, 0.0, 1.0 / tl.where(m_valid, r, 1.0))
        else:
            inv_r = 1.0 / tl.where(m_valid, r, 1.0)  # padding rows have r = 0
        delta = delta * inv_r
        tl.store(DELTA + off_bh * N_Q + offs_m, delta, mask=m_valid)
        tl.store(INV_R + off_bh * N_Q + offs_m, inv_r, mask=m_valid)
    else:
        delta = tl.load(DELTA + off_bh * N_Q + offs_m, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    num_n_blocks = tl.cdiv(N_K, BLOCK_N)
    for phase in tl.static_range(3 if FULL_TILES else 1):
        b0, b1 = _phase_range(lo, flo, fhi, hi, phase, FULL_TILES)
        for blk_n in range(b0, b1):
            k, offs_n, valid, s0, T, p, dp = _bwd_kv_tile(
                q, do, lse, K_bh, V_bh, blk_n * BLOCK_N, OPS, off_b, off_h, offs_m, m_valid,
                offs_d, offs_dv, skn, skd, svn, svd, N_K, D, DV,
                BLOCK_M, BLOCK_N, UPCAST_DOT, ALLOW_TF32, EVEN_D, phase == 1, TMA)
            if ROW_STATS:
                p = p * inv_r[:, None]
            pd, dp = _bwd_dropout(p, dp, seed, off_bh, offs_m, offs_n, N_Q, N_K)
            ds = p * (dp - delta[:, None])
            # the captured operands' gradients are stored per tile inside (GRAD: which ones)
            ds = score_mod_backward_store(ds, s0, T, DC, GRAD, off_bh, pid_m, blk_n, offs_m,
                                          offs_n, valid, N_Q, N_K, BLOCK_M, num_n_blocks)
            if phase != 1:
                ds = tl.where(valid, ds, 0.0)
            dq += _dot(ds.to(k.dtype), k, UPCAST_DOT, ALLOW_TF32)
    tl.store(DQ + off_b * sdqb + off_h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=m_valid[:, None] & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------------------
# Decode (flash-decoding): few queries over a long KV cache
# ---------------------------------------------------------------------------------------------
#
# With Nq <= 16 the forward above has one query block per (batch, head): too few programs to fill
# a GPU, and each reads the whole K/V of its head, G times under grouped-query attention. Here the
# key range is split across programs (grid: batch*K/V heads x splits) and each program takes the
# G query heads of one K/V head together as its rows (row r = query head g * Nq + query i), so K
# and V are read once per split. Each writes its unnormalised partial output, row max and sum; a
# second kernel combines the splits by their log-sum-exp. The key blocks of the split are visited
# through the forward's partial-tile step, except, with BAND, those outside the blocks holding a
# key some query keeps under a mask that replaces the scores it removes by -inf, computed here
# from the band's four integers (``_decode_key_blocks``, ``launch._decode_band``; all blocks when
# some query keeps none): no host work per call, though the cache grows every generation step.
# Those add exp(-inf) = 0 to every row; what eager still takes from them is 0 * v, NaN in a column
# where one of their v is not finite, so their V alone is read for that (no K, no dot, no
# exponential): exact for any input.

@triton.jit(do_not_specialize=["B_LO", "B_HI", "K_LO", "K_HI"])
def attn_decode(
    Q, K, V, PO, PM, PL, OPS,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    H, G, N_Q, N_K, D, DV, BLOCKS_PER_SPLIT, N_SPLITS, B_LO, B_HI, K_LO, K_HI,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST_DOT: tl.constexpr, ALLOW_TF32: tl.constexpr, BAND: tl.constexpr,
):
    # batch*K/V heads on axis 0 (no 65535 limit there), the splits (a few hundred) on axis 1
    off_bk = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    HK = H // G
    off_b = off_bk // HK
    off_hk = off_bk % HK
    rows = tl.arange(0, BLOCK_M)
    r_valid = rows < G * N_Q
    g = rows // N_Q
    offs_m = rows % N_Q                      # the query index of each row
    off_h = (off_hk * G + g).to(tl.int64)    # the query head of each row
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + off_b * sqb + off_h[:, None] * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=r_valid[:, None] & (offs_d[None, :] < D), other=0.0)
    K_bh = K + off_b * skb + off_hk * skh
    V_bh = V + off_b * svb + off_hk * svh
    OPS = operand_values(OPS)  # the scalar operands' values, loaded once
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    b0 = split * BLOCKS_PER_SPLIT
    b1 = tl.minimum(b0 + BLOCKS_PER_SPLIT, tl.cdiv(N_K, BLOCK_N))
    # the blocks of the split some query keeps: [c0, c1)
    if BAND:
        lo, hi = _decode_key_blocks(B_LO, B_HI, K_LO, K_HI, N_Q, N_K, BLOCK_N)
        c0 = tl.minimum(tl.maximum(lo, b0), b1)
        c1 = tl.minimum(tl.maximum(hi, c0), b1)
    else:
        c0 = b0
        c1 = b1
    for blk_n in range(c0, c1):
        # the forward's partial-tile step, each row with its own head (no dropout here: the
        # batch*head and seed arguments are unused)
        m_i, l_i, acc = _fwd_tile(
            q, K_bh, V_bh, m_i, l_i, acc, blk_n * BLOCK_N, OPS, off_b, off_h[:, None], 0, offs_m,
            r_valid, offs_d, offs_dv, skn, skd, svn, svd, N_Q, N_K, D, DV, 0,
            BLOCK_N, UPCAST_DOT, ALLOW_TF32, False, False)
    if BAND:
        # the skipped blocks' 0 * v: NaN in the columns where one of their v is not finite
        bad = tl.zeros([BLOCK_DV], tl.int32)
        for part in tl.static_range(2):
            if part == 0:
                s0 = b0
                s1 = c0
            else:
                s0 = c1
                s1 = b1
            for blk_n in range(s0, s1):
                v = _load_tile(V_bh + tl.cast(blk_n * BLOCK_N, tl.int64) * svn, tl.arange(0, BLOCK_N),
                               svn, N_K - blk_n * BLOCK_N, offs_dv, svd, DV).to(tl.float32)
                nonfinite = ((tl.abs(v) == float("inf")) | (v != v)).to(tl.int32)
                bad = tl.maximum(bad, tl.max(nonfinite, 0))
        acc = tl.where(bad[None, :] != 0, float("nan"), acc)
    # partials, per (b, query head, query, split): contiguous fp32 buffers
    part = ((off_b * H + off_h) * N_Q + offs_m) * N_SPLITS + split
    tl.store(PM + part, m_i, mask=r_valid)
    tl.store(PL + part, l_i, mask=r_valid)
    tl.store(PO + part[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=r_valid[:, None])


@triton.jit
def attn_decode_combine(
    PO, PM, PL, Out, LSE, sob, soh, som, sod, H, N_Q, DV, N_SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # one program per (batch, head, query): the splits' partials weighted by exp(m_s - m)
    row = tl.program_id(0).to(tl.int64)  # (b * H + h) * N_Q + i
    off_i = row % N_Q
    off_bh = row // N_Q
    off_b = off_bh // H
    off_h = off_bh % H
    offs_s = tl.arange(0, BLOCK_S)
    s_valid = offs_s < N_SPLITS
    offs_dv = tl.arange(0, BLOCK_DV)
    m_s = tl.load(PM + row * N_SPLITS + offs_s, mask=s_valid, other=float("-inf"))
    l_s = tl.load(PL + row * N_SPLITS + offs_s, mask=s_valid, other=0.0)
    m = tl.max(m_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = _exp(m_s - m_safe)
    l_i = tl.sum(l_s * w, 0)
    o_s = tl.load(PO + (row * N_SPLITS + offs_s)[:, None] * BLOCK_DV + offs_dv[None, :],
                  mask=s_valid[:, None], other=0.0)
    acc = tl.sum(o_s * w[:, None], 0)
    out, lse = _finish(acc, l_i, m, l_i)
    tl.store(Out + off_b * sob + off_h * soh + off_i * som + offs_dv * sod,
             out.to(Out.dtype.element_ty), mask=offs_dv < DV)
    tl.store(LSE + row, lse)
