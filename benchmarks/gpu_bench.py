"""GPU attention throughput (TFLOP/s) on masked patterns: fusion_pass's Triton kernels, with the mask
read as a predicate, vs SDPA vs compiled FlexAttention with its BlockMask (issue #4).

    python benchmarks/gpu_bench.py                    # full sweep (within --budget-s seconds)
    python benchmarks/gpu_bench.py --dry-run          # no GPU: the plan, FLOPs, tile fractions

bf16, head dims --dims (128 64), lengths --sizes (1k..16k), forward and forward+backward, three
mask patterns (--patterns):

* ``causal``:     keep j <= i;
* ``window``:     keep (j <= i) & (j > i - 256)   (sliding window, --window);
* ``causal_pad``: keep (j <= i) & Ne(d0(b, j), 0), d0 a (B, N) int64 attention mask with right
  padding: the last N/8 keys of the first ceil(B/2) batch entries are padding (0);
* ``full``:       no mask (optional, not in the default sweep).

Shapes follow the FlashAttention papers: ~16k tokens per batch (B = tokens // N) and hidden 2048
(H = 2048 // D). Rows are measured largest N first (so a budget cut drops the small lengths) and
tabulated in order.

FLOPs, two counts (forward+backward = 3.5 x forward: backward = 2.5 x forward, in both):

* useful: 4 * D * H * (kept (i, j) pairs), the pairs counted exactly (analytically per pattern;
  checked against a chunked dense count of the predicate, on the GPU per shape, on the CPU in
  ``--dry-run``); the same count for every implementation, so its TFLOP/s compare as "useful work
  per second";
* computed (ours only): the (BLOCK_M x BLOCK_N) tiles ours' kernels visit x 4 * BLOCK_M * BLOCK_N * D
  (forward tiles with the forward's blocks; the backward's tiles with its own blocks, x 2.5). The
  tiles are the key-block ranges ``triton_attention.block_ranges`` gives the kernels (source
  "kernel"); where the Triton module has no such function, the same rule computed here (a tile is
  visited iff it lies in its query block's [first, last] range of key blocks holding a kept element;
  a query block with a row that keeps nothing visits every key block): source "rule", marked ``*``
  in the table. The table shows the fraction of all tiles computed, for ours and (from its
  BlockMask) for Flex.

Implementations:
* ``ours``: ``fusion_pass.kernels.ops.fused_attention`` (torch.ops.fusion_pass.attention) with the
  spec the pass builds for a bf16 model that adds ``where(keep, 0, finfo(bf16).min)`` to
  ``q @ k^T / sqrt(D)``: ``ScoreOp("div", "const", sqrt(D))``, ``ScoreOp("add", "predicate", 0)``,
  ``spec.masks = (MaskSpec(keep=srepr(expr), axes=("b","h","i","j"), kind="additive", ...),)``,
  ``causal=True``; for ``causal_pad`` the attention mask is the op's one captured "data" operand.
  The row records the Triton path (predicate in-kernel, or materialised by ``ops.py`` when the
  kernels cannot generate it); a spec ``triton_attention.supports()`` rejects is skipped (the
  fallback is the torch-op implementation, not a GPU kernel worth timing). Ours' time includes
  whatever its launcher does per call (e.g. computing the block ranges); that part is also timed
  alone (``ranges_ms``).
* ``sdpa``: ``F.scaled_dot_product_attention``: flash with ``is_causal`` for causal (and unmasked
  for ``full``); for window and causal_pad, the memory-efficient backend with a dense (.., N, N)
  bool mask (flash takes no mask): label "efficient+dense mask" (it reads the mask, it skips no
  tile).
* ``flex``: ``torch.compile(flex_attention)`` with the matching ``BlockMask`` (``mask_mod``: causal;
  window; causal reading the padding tensor), which skips the empty blocks.

Correctness: each row's forward output is compared with a reference (flash ``is_causal`` or the
efficient backend with the dense mask, independently built): max abs diff, bf16, a sanity check.
Timing: ``triton.testing.do_bench`` (median ms; gradients reset to None between calls for
forward+backward). Every measurement is guarded: a failure (OOM, unsupported, compile error)
becomes an error entry and the table goes on. ``--budget-s``: rows not started before the
deadline are recorded as skipped; on SIGTERM (gpu_check.sh's outer ``timeout``) the row in
progress and the rest are skipped and the table is still printed and written. Results: a table on
stdout and JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent

PATTERNS = ("causal", "window", "causal_pad", "full")
DEFAULT_PATTERNS = ("causal", "window", "causal_pad")
MASKED = "finfo(bfloat16).min"


# -- shapes, masks as predicates, FLOPs (no GPU) -------------------------------------------------

def shape_for(n: int, d: int, tokens: int, hidden: int):
    """(B, H) for length n and head dim d: ~tokens tokens per batch, H * d = hidden."""
    return max(1, tokens // n), max(1, hidden // d)


def padded_entries(b: int) -> int:
    """How many batch entries (the first ones) carry right padding: ceil(B / 2)."""
    return (b + 1) // 2


def pad_len(n: int) -> int:
    """Padding keys at the right end of a padded entry: the last n / 8."""
    return n // 8


def attention_mask(b: int, n: int, device=None):
    """(B, N) int64, 1 = token, 0 = padding (as transformers' attention_mask)."""
    import torch
    am = torch.ones(b, n, dtype=torch.int64, device=device)
    am[:padded_entries(b), n - pad_len(n):] = 0
    return am


def keep_expr(pattern: str, window: int):
    """The predicate as the pass writes it (sympy; axes b, h, i, j; data atom d0), or None."""
    import sympy
    b, i, j = (sympy.Symbol(x, integer=True, nonnegative=True) for x in "bij")
    if pattern == "full":
        return None
    if pattern == "causal":
        return j <= i
    if pattern == "window":
        return sympy.And(j <= i, j > i - window)
    if pattern == "causal_pad":
        return sympy.And(j <= i, sympy.Ne(sympy.Function("d0")(b, j), 0))
    raise ValueError(pattern)


def build_spec(pattern: str, d: int, window: int, dtype: str = "bfloat16"):
    """The AttentionSpec the pass builds for ``softmax(q @ k^T / sqrt(d) + where(keep, 0, min))``
    in ``dtype`` (see tests/test_gpu_bench_plan.py, which compares it with the pass's own)."""
    import sympy
    import torch
    from fusion_pass.kernels.spec import AttentionSpec, MaskSpec, ScoreOp, to_dtype
    from fusion_pass.masks.classify import carried

    ops = [ScoreOp("div", "const", value=math.sqrt(d), dtype=dtype)]
    e = keep_expr(pattern, window)
    if e is None:
        return AttentionSpec(score_ops=tuple(ops), qk_dtype=dtype, softmax_dtype=dtype,
                             prob_dtype=dtype, out_dtype=dtype)
    data = (0,) if pattern == "causal_pad" else ()
    m = MaskSpec(keep=sympy.srepr(e), axes=("b", "h", "i", "j"), data=data, kind="additive",
                 dtype=dtype, kept=0.0, masked=float(torch.finfo(to_dtype(dtype)).min), text=str(e),
                 **carried(e))
    ops.append(ScoreOp("add", "predicate", index=0, dtype=dtype))
    return AttentionSpec(score_ops=tuple(ops), captured=("data",) * len(data), qk_dtype=dtype,
                         softmax_dtype=dtype, prob_dtype=dtype, out_dtype=dtype, causal=True,
                         masks=(m,))


def kept_pairs(pattern: str, b: int, n: int, window: int) -> int:
    """Kept (i, j) pairs summed over the batch, per head, analytically (Nq = Nk = n)."""
    def causal_upto(length):  # sum over rows i of min(i + 1, length)
        length = min(length, n)
        return length * (length + 1) // 2 + (n - length) * length
    if pattern == "full":
        return b * n * n
    if pattern == "causal":
        return b * causal_upto(n)
    if pattern == "window":
        return b * causal_upto(window)
    if pattern == "causal_pad":
        p = padded_entries(b)
        return p * causal_upto(n - pad_len(n)) + (b - p) * causal_upto(n)
    raise ValueError(pattern)


def dense_kept_pairs(spec, captured, b: int, h: int, n: int, device=None,
                     chunk_elements: int = 1 << 24):
    """Kept pairs summed over the batch, per head, counted by evaluating the spec's predicate on
    the dense grid in chunks of query rows (the check of ``kept_pairs``)."""
    import torch
    from fusion_pass.kernels import predicate
    if not spec.masks:
        return b * n * n
    m = spec.masks[0]
    data = [captured[k] for k in m.data]
    uses_b = m.uses_axis("b")
    bb = b if uses_b else 1
    rows = max(1, chunk_elements // (bb * n))
    jj = torch.arange(n, device=device).reshape(1, 1, 1, n)
    total = 0
    for q0 in range(0, n, rows):
        q1 = min(n, q0 + rows)
        grids = [torch.arange(bb, device=device).reshape(-1, 1, 1, 1) if uses_b else 0,
                 0, torch.arange(q0, q1, device=device).reshape(1, 1, -1, 1), jj]
        keep = predicate.evaluate_keep(m, grids, (b, h, n, n), data)
        keep = torch.broadcast_to(keep, (bb, 1, q1 - q0, n))
        total += int(keep.sum().item())
    return total * (b // bb)


def useful_flops(pairs: int, h: int, d: int, mode: str) -> float:
    f = 4.0 * d * h * pairs
    return f * 3.5 if mode == "fwdbwd" else f


def blocks(d: int, backward: bool, dtype=None, device=None):
    """(BLOCK_M, BLOCK_N) of ours' Triton kernels for this dtype on this device (the tiles depend
    on the architecture and dtype): their own ``_blocks`` when importable (interpreter tiles under
    TRITON_INTERPRET=1), else its table as of this writing."""
    try:
        import torch

        from fusion_pass.kernels import triton_attention
        dtype = dtype if dtype is not None else torch.bfloat16
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else None)
        return tuple(triton_attention._blocks(d, d, backward, dtype=dtype, device=device)[:2])
    except Exception:
        if backward:
            return (64, 64) if d <= 64 else (32, 32) if d <= 128 else (16, 32)
        return (128, 64) if d <= 64 else (64, 64) if d <= 128 else (64, 32)


def rule_ranges(spec, captured, score_shape4, block_m: int, block_n: int, device=None,
                chunk_elements: int = 1 << 24):
    """Per query block [lo, hi) of key blocks, (Bm, 1, n_mb, 2) int64, by the rule the Triton
    kernels follow: from the first to the last key block holding a key some row of the block keeps;
    every key block when some row of the block keeps none. None when nothing may be skipped (no
    mask). The stand-in for ``triton_attention.block_ranges`` where that does not exist."""
    import torch
    from fusion_pass.kernels import predicate
    if not spec.masks:
        return None
    m = spec.masks[0]
    B, H, nq, nk = (int(x) for x in score_shape4)
    data = [captured[k] for k in m.data]
    uses_b = m.uses_axis("b")
    bb = B if uses_b else 1
    n_mb, n_nb = -(-nq // block_m), -(-nk // block_n)
    rows = max(block_m, (chunk_elements // (bb * nk)) // block_m * block_m)
    jj = torch.arange(nk, device=device).reshape(1, 1, 1, nk)
    visit = torch.zeros((bb, 1, n_mb, n_nb), dtype=torch.bool, device=device)
    rowless = torch.zeros((bb, 1, n_mb), dtype=torch.bool, device=device)
    for q0 in range(0, nq, rows):
        q1 = min(nq, q0 + rows)
        grids = [torch.arange(bb, device=device).reshape(-1, 1, 1, 1) if uses_b else 0,
                 0, torch.arange(q0, q1, device=device).reshape(1, 1, -1, 1), jj]
        keep = predicate.evaluate_keep(m, grids, (B, H, nq, nk), data).to(torch.bool)
        keep = torch.broadcast_to(keep, (bb, 1, q1 - q0, nk))
        mb0, mb1 = q0 // block_m, -(-q1 // block_m)
        pm, pn = (mb1 - mb0) * block_m - (q1 - q0), n_nb * block_n - nk
        kp = torch.nn.functional.pad(keep, (0, pn, 0, pm))
        visit[:, :, mb0:mb1] = kp.reshape(bb, 1, mb1 - mb0, block_m, n_nb, block_n).any(5).any(3)
        none = torch.nn.functional.pad(~keep.any(-1), (0, pm))
        rowless[:, :, mb0:mb1] = none.reshape(bb, 1, mb1 - mb0, block_m).any(-1)
    idx = torch.arange(n_nb, device=device)
    lo = torch.where(visit, idx, n_nb).amin(-1)
    hi = torch.where(visit, idx + 1, 0).amax(-1)
    lo = torch.where(rowless, 0, lo)
    hi = torch.maximum(torch.where(rowless, n_nb, hi), lo)
    return torch.stack([lo, hi], -1)


def computed_tiles(spec, captured, score_shape4, d: int, backward: bool, device=None):
    """(tiles ours' kernel visits, all tiles, source, ranges_ms) for one pass (forward, or the
    backward's blocks). source: "kernel" (triton_attention.block_ranges), "rule" (rule_ranges:
    the module exposes no ranges), "none" (the kernel gets no ranges: every tile)."""
    import torch
    B, H, nq, nk = (int(x) for x in score_shape4)
    from fusion_pass.kernels.spec import to_dtype
    bm, bn = blocks(d, backward, to_dtype(spec.qk_dtype), device)
    n_mb, n_nb = -(-nq // bm), -(-nk // bn)
    total = B * H * n_mb * n_nb
    fn, source = None, "rule"
    try:
        from fusion_pass.kernels import triton_attention
        fn = getattr(triton_attention, "block_ranges", None)
        if fn is not None:
            source = "kernel"
    except Exception:
        pass
    cuda = device is not None and torch.device(device).type == "cuda"

    def ranges():
        if fn is None:
            return rule_ranges(spec, captured, (B, H, nq, nk), bm, bn, device)
        got = fn(spec, captured, (B, H, nq, nk), bm, bn, device)
        return got[0] if got is not None else None
    rows = ranges()
    if cuda:  # timed warm: what the launcher pays per call
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ranges()
        torch.cuda.synchronize()
        ranges_ms = (time.perf_counter() - t0) * 1e3
    else:
        ranges_ms = float("nan")
    if rows is None:
        return total, total, "none", ranges_ms
    per = (rows[..., 1] - rows[..., 0]).long()  # (Bm, Hm, n_mb): broadcast over b, h
    tiles = int(per.sum().item()) * (B // per.shape[0]) * (H // per.shape[1])
    return tiles, total, source, ranges_ms


def tile_flops(d: int, backward: bool) -> float:
    bm, bn = blocks(d, backward)
    return 4.0 * bm * bn * d * (2.5 if backward else 1.0)


def plan(args):
    """Rows in measurement order: D as given, N largest first, then pattern, mode, impl."""
    rows = []
    for d in args.dims:
        for n in sorted(args.sizes, reverse=True):
            b, h = shape_for(n, d, args.tokens, args.hidden)
            for pattern in args.patterns:
                pairs = kept_pairs(pattern, b, n, args.window)
                for mode in args.modes:
                    for impl in args.impls:
                        rows.append(dict(D=d, pattern=pattern, N=n, B=b, H=h, mode=mode,
                                         impl=impl, kept_pairs=pairs,
                                         kept_frac=pairs / (b * n * n),
                                         flops=useful_flops(pairs, h, d, mode)))
    return rows


def tile_info(pattern, b, h, n, d, args, device=None, cache=None):
    """{"fwd": (tiles, total, source, ms), "bwd": ...} for ours, and the dense pair count; cached
    per shape and pattern."""
    key = (pattern, b, h, n, d)
    if cache is not None and key in cache:
        return cache[key]
    spec = build_spec(pattern, d, args.window)
    captured = [attention_mask(b, n, device)] if pattern == "causal_pad" else []
    info = dict(fwd=computed_tiles(spec, captured, (b, h, n, n), d, False, device),
                bwd=computed_tiles(spec, captured, (b, h, n, n), d, True, device),
                dense_pairs=dense_kept_pairs(spec, captured, b, h, n, device))
    if cache is not None:
        cache[key] = info
    return info


def add_tiles(row, info):
    """ours' computed-tile FLOPs and tile fractions into ``row``."""
    d = row["D"]
    ft, fa, src, fms = info["fwd"]
    row["tiles_source"] = src
    row["tiles_fwd"], row["tiles_fwd_total"] = ft, fa
    flops = ft * tile_flops(d, False)
    frac = ft / fa
    if row["mode"] == "fwdbwd":
        bt, ba, _, bms = info["bwd"]
        row["tiles_bwd"], row["tiles_bwd_total"] = bt, ba
        flops += bt * tile_flops(d, True)
        # the fraction of the pass's tile work: forward and backward tiles weighted by FLOPs
        frac = flops / (fa * tile_flops(d, False) + ba * tile_flops(d, True))
    row["computed_flops"] = flops
    row["tiles_frac"] = frac


# -- implementations (imported lazily: the dry run needs no GPU) ---------------------------------

def make_ours(q, k, v, ctx, row):
    from fusion_pass.kernels import ops

    spec, captured = ctx["spec"], ctx["captured"]
    if q.device.type != "cuda":  # --device cpu smoke test: the CPU kernels
        row["path"] = "cpu kernels"
        return lambda: ops.fused_attention(q, k, v, captured, spec)
    try:
        from fusion_pass.kernels import triton_attention
        ts, _, _ = ops._triton_operands(q, k, captured, spec)
        supported = bool(triton_attention.supports(q, k, v, ts))
    except Exception as e:  # module not there, or supports() failed
        raise RuntimeError(f"triton_attention unavailable: {type(e).__name__}: {e}") from e
    if not supported:
        raise RuntimeError("triton_attention.supports() is False for this spec/shape "
                           "(would fall back to the tiled torch-op path): skipped")
    row["path"] = ("triton, predicate in-kernel" if ts is spec and spec.masks
                   else "triton, mask materialised" if spec.masks else "triton")
    return lambda: ops.fused_attention(q, k, v, captured, spec)


def dense_keep(pattern, b, n, window, device):
    """The dense keep mask, built with torch ops (independently of the predicate): (1 or B, 1, N, N)
    bool, True = attend; None for causal / full."""
    import torch
    if pattern in ("causal", "full"):
        return None
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    keep = j <= i
    if pattern == "window":
        return (keep & (j > i - window))[None, None]
    am = attention_mask(b, n, device)
    return keep[None, None] & (am[:, None, None, :] != 0)


def sdpa_call(q, k, v, pattern, mask):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if mask is None:
        backend = SDPBackend.FLASH_ATTENTION if q.device.type == "cuda" else SDPBackend.MATH
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=pattern == "causal")
    backend = SDPBackend.EFFICIENT_ATTENTION if q.device.type == "cuda" else SDPBackend.MATH
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_label(pattern, device_type="cuda"):
    if pattern in ("causal", "full"):
        return ("flash is_causal" if pattern == "causal" else "flash") if device_type == "cuda" \
            else "math"
    return "efficient+dense mask" if device_type == "cuda" else "math+dense mask"


def make_sdpa(q, k, v, ctx, row):
    row["path"] = sdpa_label(row["pattern"], q.device.type)
    mask = ctx["dense"]
    return lambda: sdpa_call(q, k, v, row["pattern"], mask)


_FLEX = {}


def make_flex(q, k, v, ctx, row):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    pattern, n, b, w = row["pattern"], row["N"], row["B"], ctx["window"]
    if pattern == "full":
        block_mask = None
    else:
        bm_key = ("flex_block_mask", pattern)
        if bm_key not in ctx:
            if pattern == "causal":
                def mask_mod(bi, hi, qi, ki):
                    return qi >= ki
                mb = None
            elif pattern == "window":
                def mask_mod(bi, hi, qi, ki):
                    return (qi >= ki) & (qi - ki < w)
                mb = None
            else:
                am = ctx["captured"][0]

                def mask_mod(bi, hi, qi, ki):
                    return (qi >= ki) & (am[bi, ki] != 0)
                mb = b
            ctx[bm_key] = create_block_mask(mask_mod, mb, None, n, n, device=q.device)
        block_mask = ctx[bm_key]
        try:
            row["flex_tiles_frac"] = 1.0 - float(block_mask.sparsity()) / 100.0
        except Exception:
            pass
    row["path"] = "compiled flex, BlockMask" if block_mask is not None else "compiled flex"
    fn = _FLEX["fn"]
    return lambda: fn(q, k, v, block_mask=block_mask)


# ``ours_tma``: ours with ``$FUSION_PASS_TMA=1`` for the whole row (forward and backward): K/V (and
# in the dK/dV kernel Q/dO) through tensor descriptors, opt-in until a GPU run measures it
MAKERS = {"ours": make_ours, "ours_tma": make_ours, "sdpa": make_sdpa, "flex": make_flex}


def _cpu_bench(fn, warmup, rep, grad_to_none=()):
    """Median ms, for the --device cpu smoke test (do_bench needs a GPU)."""
    import statistics
    ts = []
    for i in range(2 + 3):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        if i >= 2:
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _context(row, args, cache):
    """Per shape: q, k, v, dout; per (shape, pattern): the spec, its captured data, the dense mask,
    the reference output, the tile counts. One shape's tensors at a time."""
    import torch
    dev = args.device
    b, h, n, d = row["B"], row["H"], row["N"], row["D"]
    key = (b, h, n, d)
    if cache.get("key") != key:
        cache.clear()
        if dev == "cuda":
            torch.cuda.empty_cache()
        g = torch.Generator(device=dev).manual_seed(n * 1000 + d)
        cache["key"] = key
        cache["qkvd"] = [torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, generator=g)
                         for _ in range(4)]
    pk = ("pattern", row["pattern"])
    if pk not in cache:
        cache.pop(cache.get("last_pattern"), None)  # one pattern's dense mask at a time
        cache["last_pattern"] = pk
        pattern = row["pattern"]
        ctx = dict(window=args.window, spec=build_spec(pattern, d, args.window),
                   captured=[attention_mask(b, n, dev)] if pattern == "causal_pad" else [],
                   dense=dense_keep(pattern, b, n, args.window, dev))
        q0, k0, v0, _ = cache["qkvd"]
        with torch.no_grad():
            ctx["ref"] = sdpa_call(q0, k0, v0, pattern, ctx["dense"])
        ctx["tiles"] = tile_info(pattern, b, h, n, d, args, device=dev)
        cache[pk] = ctx
    return cache["qkvd"], cache[pk]


def measure(row, args, cache):
    if row["impl"] != "ours_tma":
        return _measure(row, args, cache)
    from fusion_pass.kernels.triton_attn.launch import TMA_ENV
    old = os.environ.get(TMA_ENV)
    os.environ[TMA_ENV] = "1"
    try:
        _measure(row, args, cache)
        row["path"] = row.get("path", "") + ", TMA"
    finally:
        if old is None:
            os.environ.pop(TMA_ENV, None)
        else:
            os.environ[TMA_ENV] = old


def _measure(row, args, cache):
    import torch
    dev = args.device
    if dev == "cuda":
        from triton.testing import do_bench
    else:
        do_bench = _cpu_bench
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    (q0, k0, v0, dout), ctx = _context(row, args, cache)
    info = ctx["tiles"]
    row["dense_pairs"] = info["dense_pairs"]
    if info["dense_pairs"] != row["kept_pairs"]:
        row["pairs_mismatch"] = True  # the predicate does not keep what the formula counts
    if row["impl"].startswith("ours"):
        add_tiles(row, info)
        row["ranges_ms"] = info["fwd"][3] + (info["bwd"][3] if row["mode"] == "fwdbwd" else 0.0)
    if row["mode"] == "fwd":
        q, k, v = q0, k0, v0
        with torch.no_grad():
            fn = MAKERS[row["impl"]](q, k, v, ctx, row)
            out = fn()

        def bench():
            with torch.no_grad():
                fn()
    else:
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (q0, k0, v0))
        fn = MAKERS[row["impl"]](q, k, v, ctx, row)

        def bench():
            fn().backward(dout)
        out = fn()
        out.backward(dout)
    sync()
    ref = ctx["ref"]
    row["max_abs_diff_vs_ref"] = (out.detach().float() - ref.float()).abs().max().item()
    del out
    kw = dict(warmup=args.warmup_ms, rep=args.rep_ms)
    if dev == "cuda":
        kw["return_mode"] = "median"
    if row["mode"] == "fwdbwd":
        kw["grad_to_none"] = [q, k, v]
    ms = do_bench(bench, **kw)
    row["ms"] = float(ms)
    row["tflops"] = row["flops"] / (ms * 1e-3) / 1e12
    if "computed_flops" in row:
        row["computed_tflops"] = row["computed_flops"] / (ms * 1e-3) / 1e12


# -- output --------------------------------------------------------------------------------------

def _group_key(r):
    return (r["D"], PATTERNS.index(r["pattern"]), r["N"], r["mode"])


def table(rows, args):
    impls = list(args.impls)
    head = (["D", "pattern", "N", "B x H", "mode", "kept"] + [f"{i} TFLOP/s" for i in impls]
            + (["ours computed TFLOP/s", "ours tiles", "flex tiles"]
               if "ours" in impls else [])
            + (["ours / sdpa"] if {"ours", "sdpa"} <= set(impls) else [])
            + (["ours / flex"] if {"ours", "flex"} <= set(impls) else []) + ["sdpa kernel"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    groups = {}
    for r in rows:
        groups.setdefault(_group_key(r), {})[r["impl"]] = r
    rule_seen = False
    for key in sorted(groups):
        g = groups[key]
        any_r = next(iter(g.values()))
        cells = [str(any_r["D"]), any_r["pattern"], str(any_r["N"]),
                 f"{any_r['B']} x {any_r['H']}", any_r["mode"], f"{any_r['kept_frac']:.3f}"]

        def tf(r):
            return (f"{r['tflops']:.1f}" if "tflops" in r else
                    "skipped" if r.get("skipped") else "error" if "error" in r else "-")
        cells += [tf(g.get(i, {})) for i in impls]
        o = g.get("ours", {})
        if "ours" in impls:
            mark = "*" if o.get("tiles_source") == "rule" else ""
            rule_seen |= bool(mark)
            cells.append(f"{o['computed_tflops']:.1f}{mark}" if "computed_tflops" in o else "-")
            cells.append(f"{o['tiles_frac']:.3f}{mark}" if "tiles_frac" in o else "-")
            fx = g.get("flex", {})
            cells.append(f"{fx['flex_tiles_frac']:.3f}" if "flex_tiles_frac" in fx else "-")

        def ratio(other):
            x = g.get(other, {})
            return f"{o['tflops'] / x['tflops']:.2f}" if "tflops" in o and "tflops" in x else "-"
        if {"ours", "sdpa"} <= set(impls):
            cells.append(ratio("sdpa"))
        if {"ours", "flex"} <= set(impls):
            cells.append(ratio("flex"))
        cells.append(sdpa_label(any_r["pattern"], args.device))
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["kept: fraction of (i, j) pairs kept. TFLOP/s: useful FLOPs (4*D*H*kept pairs, "
             "fwd+bwd 3.5x) per second; ours computed: FLOPs of the tiles ours' kernels visit; "
             "tiles: fraction of all tiles computed (fwd+bwd: weighted by tile FLOPs); flex "
             "tiles: 1 - BlockMask.sparsity()."]
    if rule_seen:
        notes.append("*: tiles by the rule computed here (triton_attention exposes no "
                     "block_ranges): the kernel itself may visit more.")
    return "\n".join(lines) + "\n" + "\n".join(notes)


def dry_run(args, rows):
    print(f"plan: {len(rows)} measurements (order: D, N largest first, pattern, mode, impl); "
          f"bf16, {args.tokens} tokens/batch, hidden {args.hidden}, window {args.window}, "
          f"padding: last N/8 keys of the first ceil(B/2) entries")
    print(f"ours' blocks: fwd {blocks(args.dims[0], False)}, bwd {blocks(args.dims[0], True)} "
          f"(D={args.dims[0]})")
    shapes = {}
    for r in rows:
        shapes.setdefault((r["D"], r["N"], r["pattern"]), r)
    cache = {}
    print("| D | N | B x H | pattern | kept | fwd TFLOP (useful) | fwd+bwd TFLOP (useful) "
          "| ours tiles fwd | ours tiles bwd | source | dense count |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for (d, n, pattern), r in sorted(shapes.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                      PATTERNS.index(kv[0][2]))):
        b, h = r["B"], r["H"]
        fw = useful_flops(r["kept_pairs"], h, d, "fwd") / 1e12
        fb = useful_flops(r["kept_pairs"], h, d, "fwdbwd") / 1e12
        if n <= args.dry_run_max_n:
            info = tile_info(pattern, b, h, n, d, args, device=None, cache=cache)
            tf = f"{info['fwd'][0] / info['fwd'][1]:.3f}"
            tb = f"{info['bwd'][0] / info['bwd'][1]:.3f}"
            src = info["fwd"][2]
            same = info["dense_pairs"] == r["kept_pairs"]
            ok &= same
            dc = "= formula" if same else f"MISMATCH {info['dense_pairs']} != {r['kept_pairs']}"
        else:
            tf = tb = src = dc = f"(N > {args.dry_run_max_n}: on the GPU)"
        print(f"| {d} | {n} | {b} x {h} | {pattern} | {r['kept_frac']:.3f} | {fw:.3f} | {fb:.3f} "
              f"| {tf} | {tb} | {src} | {dc} |")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--patterns", nargs="+", default=list(DEFAULT_PATTERNS), choices=PATTERNS)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--impls", nargs="+", default=["ours", "sdpa", "flex"], choices=list(MAKERS))
    ap.add_argument("--tokens", type=int, default=16384, help="B * N")
    ap.add_argument("--hidden", type=int, default=2048, help="H * D")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="rows not started within this many seconds are skipped")
    ap.add_argument("--json", default=str(HERE / "results" / "gpu_bench.json"))
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: the plan, useful FLOPs, and (N <= --dry-run-max-n) ours' tile "
                         "fractions and the dense pair count, on the CPU")
    ap.add_argument("--dry-run-max-n", type=int, default=4096)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke test of this script's logic on the CPU kernels (tiny sizes)")
    args = ap.parse_args(argv)

    rows = plan(args)
    if args.dry_run:
        return dry_run(args, rows)

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --dry-run to check the plan)")
        return 2
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke test)"
    print(f"{dev_name}, torch {torch.__version__}, triton {tv}, bf16, {args.tokens} tokens/batch, "
          f"hidden {args.hidden}, patterns {' '.join(args.patterns)}, window {args.window}",
          flush=True)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    start, cache = time.perf_counter(), {}

    class _Stop(BaseException):
        pass

    def _on_term(signum, frame):  # an outer `timeout`: stop measuring, still print the table
        raise _Stop()
    signal.signal(signal.SIGTERM, _on_term)
    stopped = False
    for r in rows:
        if stopped or time.perf_counter() - start > args.budget_s:
            r["skipped"] = "SIGTERM" if stopped else "budget"
            continue
        t = time.perf_counter()
        try:
            measure(r, args, cache)
        except _Stop:
            stopped, r["skipped"] = True, "SIGTERM"
            print("SIGTERM: stopping, printing what was measured", flush=True)
            continue
        except Exception as e:  # one failure must not kill the table
            r["error"] = f"{type(e).__name__}: {e}"[:400]
            if not str(e).endswith("skipped"):
                traceback.print_exc(limit=3)
            if args.device == "cuda":
                torch.cuda.empty_cache()
        r["wall_s"] = round(time.perf_counter() - t, 2)
        msg = (f"{r['tflops']:7.1f} TFLOP/s  {r['ms']:8.3f} ms" if "tflops" in r
               else r["error"][:150])
        extra = ""
        if "computed_tflops" in r:
            extra += (f"  computed {r['computed_tflops']:.1f} TFLOP/s, tiles {r['tiles_frac']:.3f}"
                      f" ({r['tiles_source']}; ranges {r['ranges_ms']:.1f} ms)")
        if "max_abs_diff_vs_ref" in r:
            extra += f"  diff {r['max_abs_diff_vs_ref']:.1e}"
        if r.get("pairs_mismatch"):
            extra += f"  PAIRS MISMATCH dense {r['dense_pairs']} != {r['kept_pairs']}"
        print(f"D={r['D']} {r['pattern']} N={r['N']} {r['mode']} {r['impl']} [{r.get('path', '')}]:"
              f" {msg}{extra}  ({r['wall_s']} s)", flush=True)
    print()
    print(table(rows, args))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    n_skip = sum(1 for r in rows if r.get("skipped"))
    if n_skip:
        print(f"{n_skip} measurements skipped: "
              + ("stopped by SIGTERM" if stopped else f"--budget-s {args.budget_s} reached"))
    try:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(
            device=dev_name, torch=torch.__version__, triton=tv, argv=sys.argv[1:],
            window=args.window, rows=rows), indent=1))
        print(f"wrote {args.json}")
    except OSError as e:
        print(f"could not write {args.json}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
