"""Launchers of the attention kernels (``attention.py``, completed per spec by ``codegen.py``),
called by ``ops.py`` on CUDA tensors (or, under ``TRITON_INTERPRET=1``, on CPU tensors in the
tests): ``supports(q, k, v, spec)``, ``forward(...) -> (out, lse)`` and
``backward(...) -> (dq, dk, dv, dcaptured)``, with the semantics of ``cpu.py`` (the reference):

    out = dropout(softmax(score_mod(q @ k^T))) @ v,   lse = logsumexp(score_mod(q @ k^T), -1)

Also the tile table per (architecture, direction, head dim, dtype) and ``target_arch`` to choose
tiles for a GPU that is absent (``benchmarks/gpu_static.py``).

Known cost: the gradient of a captured *tensor* (a learnable bias) is written element-wise into an
fp32 buffer of the full scores' shape (B, H, Nq, Nk) and summed over the operand's broadcast dims
with torch; that N x N buffer exists only while such an operand requires grad. Gradients of scalar
operands are reduced per tile in the kernel (one fp32 partial per tile pair). Block skipping's
ranges (``ranges.py``) cost one evaluation of keep per score element (Bm * Hm * Nq * Nk) with torch
ops, in chunks, per forward and per backward, except for bands (causal, windows, KV-cache offsets:
``ranges.linear_band``), whose kernels (decode included) compute their ranges themselves from
four integers (no range tensor; the backward zeroes a (B * H, 2 + cdiv(Nq, BLOCK_M)) int32
buffer: the hull of the query blocks failing the removal rule, which its dQ kernel fills for the
dK/dV kernel, and a flag per query block). The forward allocates its outputs and, in decode,
one buffer of the splits' partials; nothing else per call (THRESH is a shared dummy when
nothing is skipped; a scalar operand is passed as its own 0-dim tensor, copied only when it is
on another device or of a dtype the kernels do not load: ``_scalar``).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import List, Optional, Sequence

import torch
import triton

from .. import pointwise, removal
from ..dropout import threshold
from ..spec import AttentionSpec, to_dtype
from . import ranges as _rng
from .codegen import (_ARITH_KINDS, _data_arities, _fits_fp32, _grad_indices, predicates_supported,
                      skip_op)
from .loader import interpret as _interpret
from .loader import kernels

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HANDLED_KINDS = {"mul", "div", "add", "sub", "rsub", "fill", "fill_not", "tanh", "cast", "fn"}


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




# (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs, per (architecture, direction):
# the first entry whose head-dim bound covers max(d, dv). Hopper/Blackwell: the forward at
# 128 x 128 (8 warps: two warpgroups of 64 rows each) so every dot is a warpgroup MMA, 3 stages of
# K/V in flight; the backward's tiles at >= 64 rows on both sides (dS^T Q and P^T dO have BLOCK_N
# rows) so its dots are warpgroup MMAs too. Ampere: FlashAttention-2's sizes; its d = 128
# backward at 64 x 32 (at 32 x 32 the 4 warps' mma.sync layout held each score twice: 2 MUFU per
# exponential, measured by gpu_static; 64 x 32 has none of that and no spills). Hopper's d = 256
# backward likewise at 128 x 64 on 8 warps (at 64 x 64 both warpgroups computed every score).
# Ampere's d = 256 forward at 32 x 64 (at 64 x 32, 255 registers, a bias made the compiler
# compute the exponential twice: 2.1 MUFU per score).
_TILES = {
    (90, False): ((64, (128, 128, 8, 3)), (128, (128, 128, 8, 3)), (256, (128, 64, 8, 2))),
    (90, True): ((64, (64, 64, 4, 2)), (128, (64, 64, 4, 2)), (256, (128, 64, 8, 1))),
    (80, False): ((64, (128, 64, 4, 3)), (128, (128, 64, 8, 2)), (256, (32, 64, 4, 2))),
    (80, True): ((64, (64, 64, 4, 2)), (128, (64, 32, 4, 2)), (256, (16, 32, 4, 1))),
}
# fp32 inputs (IEEE or TF32 dots): twice the bytes per operand, the pre-Hopper sizes everywhere
_TILES_FP32 = {
    False: ((64, (128, 64, 8, 2)), (128, (64, 64, 4, 2)), (256, (64, 32, 4, 1))),
    True: ((64, (64, 64, 4, 2)), (128, (32, 32, 4, 2)), (256, (16, 32, 4, 1))),
}
_ARCH_OVERRIDE: List[int] = []
_TILE_OVERRIDE: List[tuple] = []

# The small autotune set: per (architecture, direction), per head-dim bound, the candidates tried
# beside the table's entry (which stays the default). Only on a GPU, with $FUSION_PASS_AUTOTUNE=1:
# the first call of each key (architecture, direction, spec, head dims, dtype, sequence-length
# buckets) times every candidate (``TUNER``) and keeps the fastest. Under the interpreter, under
# target_arch (gpu_static's fixed configs) and while a CUDA graph is captured: the table's entry
# only. Each candidate is compiled and gated like the defaults by ``gpu_static.py --tune-set``.
# (gpu_static --tune-set, bf16 d = 64/128, plain and causal: every candidate passes the gates.
# Left out: the backward at 64 x 128 on 8 warps, where both warpgroups computed every score, 2.0
# MUFU per exponential; Ampere's forward at 64 x 64 for d = 128, 1.25 MUFU per score.)
_TUNE_EXTRA = {
    (90, False): ((128, ((128, 64, 8, 3), (128, 128, 8, 2))), (256, ())),
    (90, True): ((128, ((128, 64, 8, 2),)), (256, ())),
    (80, False): ((64, ((64, 64, 4, 3),)), (256, ())),
    (80, True): ((64, ((64, 32, 4, 2),)), (256, ())),
}
AUTOTUNE_ENV = "FUSION_PASS_AUTOTUNE"


@contextlib.contextmanager
def target_arch(arch: int):
    """Choose tiles for compute capability ``arch`` (80, 90, 100...) whatever the device: for
    compiling ahead of time without the GPU (benchmarks/gpu_static.py)."""
    _ARCH_OVERRIDE.append(int(arch))
    try:
        yield
    finally:
        _ARCH_OVERRIDE.pop()


@contextlib.contextmanager
def tiles(cfg):
    """Launch with the tiles ``cfg`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) for both
    directions, whatever the table says (the tuner's candidates; gpu_static's ``--tune-set``)."""
    _TILE_OVERRIDE.append(tuple(cfg))
    try:
        yield
    finally:
        _TILE_OVERRIDE.pop()


def tune_set(d: int, dv: int, backward: bool, dtype, arch: int) -> List[tuple]:
    """The autotune candidates of a call beside the table's entry (see _TUNE_EXTRA)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return []
    for bound, cfgs in _TUNE_EXTRA.get((90 if arch >= 90 else 80, bool(backward)), ()):
        if max(d, dv) <= bound:
            return list(cfgs)
    return []


class TileTuner:
    """The autotune choice per key, timed once on the GPU (triton.testing.do_bench over the whole
    launch, ranges included); a candidate that fails (out of shared memory on this device) is out."""

    def __init__(self):
        self.best: dict = {}

    def clear(self) -> None:
        self.best.clear()

    def choose(self, key, default, candidates, run):
        hit = self.best.get(key)
        if hit is not None:
            return hit
        from triton.testing import do_bench
        best, best_t = default, math.inf
        for cfg in [default] + [c for c in candidates if c != default]:
            try:
                with tiles(cfg):
                    t = do_bench(run, warmup=5, rep=25)
            except Exception:  # noqa: BLE001 - a config this device cannot launch
                continue
            if t < best_t:
                best, best_t = cfg, t
        self.best[key] = best
        return best


TUNER = TileTuner()


def _autotuned(mod, backward: bool, q, k, v, run):
    """Run ``run()`` (a whole launch) with the tiles the tuner chose for this call's key; the
    table's tiles whenever tuning is off (see _TUNE_EXTRA)."""
    if _TILE_OVERRIDE or _ARCH_OVERRIDE or _interpret() or q.device.type != "cuda" \
            or os.environ.get(AUTOTUNE_ENV) != "1" or torch.cuda.is_current_stream_capturing():
        return run()
    d, dv = q.shape[-1], v.shape[-1]
    arch = _arch(q.device)
    extra = tune_set(d, dv, backward, q.dtype, arch)
    if not extra:
        return run()
    default = _blocks(d, dv, backward, q.dtype, q.device)
    key = (arch, bool(backward), mod.__name__, d, dv, q.dtype, q.shape[-3] // k.shape[-3],
           triton.next_power_of_2(q.shape[-2]), triton.next_power_of_2(k.shape[-2]))
    with tiles(TUNER.choose(key, default, extra, run)):
        return run()


def _arch(device) -> Optional[int]:
    if _ARCH_OVERRIDE:
        return _ARCH_OVERRIDE[-1]
    if device is not None and torch.device(device).type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return None


def _blocks(d: int, dv: int, backward: bool, dtype=None, device=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a call (see _TILES)."""
    if _TILE_OVERRIDE:
        return _TILE_OVERRIDE[-1]
    if _interpret() and not _ARCH_OVERRIDE:
        # small tiles keep the interpreter fast while still giving several key blocks to the
        # online softmax and partial tiles at the edges; under target_arch the interpreter runs
        # the real tiles of that architecture (tests at GPU tile sizes)
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


# scalar dtypes the kernels load themselves (bool as uint8); other dtypes go through float64
_SCALAR_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.bool)


def _scalar(c: torch.Tensor, device) -> torch.Tensor:
    """A scalar operand (one element) as the kernels load it, without a host sync: the tensor
    itself when it is on ``device``. A CPU scalar with inputs on a GPU (eager allows it) becomes
    a fill there from its host value (no copy from pageable memory, and capturable in a CUDA
    graph, which then holds the value as the old float argument did); one on another GPU is
    copied without waiting. The kernels compute with the element rounded once to fp32, as when
    float(c.item()) was their fp32 argument: int64 (and dtypes beyond their loads) goes through
    float64 here, bool as 0/1 (its uint8 bytes); complex is refused, as float() refused it."""
    if c.is_complex():
        raise TypeError(f"a scalar operand must be real, got {c.dtype}")
    if c.dtype == torch.bool:
        c = c.view(torch.uint8)
    elif c.dtype not in _SCALAR_DTYPES:
        c = c.to(torch.float64)
    if c.device == device:
        return c
    if c.device.type == "cpu":
        return torch.full((), c.item(), dtype=c.dtype, device=device)
    return c.to(device, non_blocking=True)


def _operands(spec: AttentionSpec, captured: Sequence[torch.Tensor], score_shape4, device=None):
    """The kernels' operand tuple OPS, of the captured operands: for scalars the 0-dim tensor on
    ``device`` (``_scalar``: the kernels load its value, ``codegen.operand_values``; no host
    sync); for tensors a view expanded to the (B, H, Nq, Nk) scores (stride 0 where it
    broadcasts) and its 4 strides; for data tensors (read by mask predicates) the tensor, its
    sizes and strides; then each mask's score sizes n0 .. n{R-1}."""
    args = []
    arities = _data_arities(spec) if spec.masks else {}
    for i, (kind, c) in enumerate(zip(spec.captured, captured)):
        if kind == "scalar":
            args.append(_scalar(c, c.device if device is None else torch.device(device)))
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
    return tuple(args)  # the kernels' OPS (codegen.operand_names)


TMA_ENV = "FUSION_PASS_TMA"
_TMA_ALLOCATOR: List[bool] = []


def _tma(k4, v4, device) -> dict:
    """{"TMA": True} when a kernel loads two operands through tensor descriptors (the tensor
    memory accelerator): the forward and dQ kernels K and V, the dK/dV kernel Q and dO. Opt-in
    ($FUSION_PASS_TMA=1) while unmeasured, Hopper or newer (or the interpreter), and a layout TMA
    takes: unit last stride, rows apart (no stride 0: a broadcast gradient), every other stride
    and the base 16-byte aligned. Else {} (plain pointers). On the GPU the kernel builds its
    descriptors in a global scratch buffer, so Triton needs an allocator: one is installed on
    first use (process-wide)."""
    if os.environ.get(TMA_ENV) != "1":
        return {}
    arch = _arch(device)
    if not _interpret() and (arch is None or arch < 90):
        return {}
    for t in (k4, v4):
        e = t.element_size()
        if t.stride(-1) != 1 or t.stride(-2) == 0 or t.data_ptr() % 16 \
                or any((st * e) % 16 for st in t.stride()[:-1]):
            return {}
    if torch.device(device).type == "cuda" and not _TMA_ALLOCATOR:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                     device="cuda"))
        _TMA_ALLOCATOR.append(True)
    return {"TMA": True}


def _flags():
    return dict(UPCAST_DOT=_interpret(),
                ALLOW_TF32=bool(torch.backends.cuda.matmul.allow_tf32))


def _dims(q, k, v):
    """(B, H, G, Nq, Nk, D, Dv); G = query heads per K/V head (grouped-query attention)."""
    B, H, nq, d = q.shape
    return B, H, H // k.shape[1], nq, k.shape[2], d, v.shape[3]


# Decode (flash-decoding, attention.attn_decode): chosen when the queries of one K/V head (its G
# query heads x Nq) fit one tile of DECODE_MAX_ROWS rows and the cache has at least
# DECODE_MIN_KEYS keys; the key range is split so that about DECODE_PROGRAMS programs run, each
# over at least two key blocks
DECODE_MAX_QUERIES = 16
DECODE_MAX_ROWS = 128
DECODE_MIN_KEYS = 256
DECODE_PROGRAMS = 264  # two waves of an H100/H200's 132 SMs


def decode_plan(B: int, H: int, G: int, nq: int, nk: int, d: int, dv: int, spec: AttentionSpec,
                device=None):
    """(BLOCK_M, BLOCK_N, splits, key blocks per split, warps, stages) when a call takes the
    split-KV decode kernel, else None."""
    if nq > DECODE_MAX_QUERIES or nk < DECODE_MIN_KEYS or spec.dropout_p > 0:
        return None
    bm = _pow2(G * nq)
    if bm > DECODE_MAX_ROWS:
        return None
    bn = 64 if max(d, dv) <= 128 else 32
    arch = _arch(device)
    if _interpret() and not _ARCH_OVERRIDE:
        bn = 16
    elif arch is not None and arch >= 90:
        # a warpgroup MMA takes 64 rows: the padding rows cost no memory traffic, which is what
        # decode is bound by
        bm = max(bm, 64)
    n_nb = triton.cdiv(nk, bn)
    splits = max(1, min(triton.cdiv(n_nb, 2), triton.cdiv(DECODE_PROGRAMS, B * (H // G))))
    per = triton.cdiv(n_nb, splits)
    return bm, bn, triton.cdiv(n_nb, per), per, 4, 3


def _decode_band(spec: AttentionSpec, score_shape4, bn: int):
    """attn_decode's BAND arguments (B_LO, B_HI, K_LO, K_HI), from which the kernel computes the
    key blocks holding a key some query keeps (all blocks when one keeps none): when the chain's
    last step replaces the masked scores by -inf (then a skipped block adds exactly 0 to every
    row, and 0 * v, which the kernel checks on V alone); None: every block is computed. Not for
    an additive -inf mask (s + -inf is NaN for a NaN score: its K would be needed too).

    A band (``ranges.linear_band``: causal, windows, KV-cache offsets) is handed over as it is: a
    few integer operations here, no tensor, whatever the cache's length (which grows every
    generation step). Other conjunctions of linear conditions (another slope, a conjunct on i
    alone) keep the host's blocks (``_band_blocks``, torch ops memoised per shape), passed as the
    key bounds [lo * bn, min(hi * bn, Nk) - 1] of a band that bounds nothing else, from which the
    kernel computes exactly [lo, hi) again."""
    op = skip_op(spec)
    if op is None or op.kind not in ("fill", "fill_not") or op.operand != "predicate" \
            or op.value != -math.inf:
        return None
    if spec.masks[op.index].data:
        return None
    band = _rng.linear_band(spec, score_shape4)
    if band is not None:
        return band
    blocks = _decode_host_blocks(spec, score_shape4, bn)
    if blocks is None:
        return None
    nq, nk = int(score_shape4[2]), int(score_shape4[3])
    return -nq, nk, blocks[0] * bn, min(blocks[1] * bn, nk) - 1


def _decode_host_blocks(spec: AttentionSpec, score_shape4, bn: int):
    """(lo, hi), the key blocks holding a key some query keeps, as the host computes them
    (``_band_blocks``) for the skipping step's mask; None for a mask that is not a conjunction of
    linear conditions. The reference of the decode kernel's own (``attention._decode_key_blocks``)
    and its source for masks that are not bands."""
    op = skip_op(spec)
    m = spec.masks[op.index]
    R = len(m.axes)
    return _band_blocks(m, op.kind == "fill", tuple(int(x) for x in score_shape4[4 - R:]),
                        int(score_shape4[2]), int(score_shape4[3]), int(bn))


@functools.lru_cache(maxsize=256)
def _band_blocks(m, invert: bool, sizes, nq: int, nk: int, bn: int):
    """(lo, hi) Python ints: the key blocks holding a key some query keeps (all when one keeps
    none), from ``ranges``' O(Nq) linear ranges with the queries as one block, on the CPU and
    memoised per (mask, sizes); None for a mask that is not a conjunction of linear conditions."""
    r = _rng._linear_block_ranges(m, invert, sizes, nq, nk, nq, bn, None)
    if r is None:
        return None
    lo, hi = r[0].reshape(2).tolist()
    return int(lo), int(hi)


def _decode(mod, q4, k4, v4, out, lse, captured, spec, plan):
    B, H, G, nq, nk, d, dv = _dims(q4, k4, v4)
    bm, bn, splits, per, warps, stages = plan
    bdv = _pow2(dv)
    # the splits' partials (fp32): unnormalised output, row max and sum, per (b, h, i, split), in
    # one allocation (each part starting 16-byte aligned)
    n = B * H * nq * splits
    n4 = triton.cdiv(n, 4) * 4
    buf = torch.empty((n * bdv + 2 * n4,), dtype=torch.float32, device=q4.device)
    po = buf[:n * bdv].view(n, bdv)
    pm = buf[n * bdv:n * bdv + n]
    pl = buf[n * bdv + n4:n * bdv + n4 + n]
    band = _decode_band(spec, (B, H, nq, nk), bn)
    mod.attn_decode[(B * (H // G), splits)](
        q4, k4, v4, po, pm, pl, _operands(spec, captured, (B, H, nq, nk), q4.device),
        *q4.stride(), *k4.stride(), *v4.stride(),
        H, G, nq, nk, d, dv, per, splits, *(band or (0, 0, 0, 0)),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DV=bdv, num_warps=warps,
        num_stages=stages, BAND=band is not None, **_flags())
    mod.attn_decode_combine[(B * H * nq,)](
        po, pm, pl, out, lse, *out.stride(), H, nq, dv, splits,
        BLOCK_S=_pow2(splits), BLOCK_DV=bdv, num_warps=4 if bdv >= 128 else 1)


def forward(q, k, v, captured, spec: AttentionSpec, seed: int = 0):
    """Returns (out (..., Nq, Dv) in spec.out_dtype, lse (..., Nq) float32)."""
    q4, k4, v4 = _to4d(q), _to4d(k), _to4d(v)
    plan = decode_plan(*_dims(q4, k4, v4), spec, q.device)
    run = lambda: _forward(q, k, v, captured, spec, seed, plan)  # noqa: E731
    if plan is not None:
        return run()  # the decode kernels' tiles are decode_plan's
    return _autotuned(kernels(spec), False, q4, k4, v4, run)


def _forward(q, k, v, captured, spec: AttentionSpec, seed: int = 0, plan=None):
    """``forward``; ``plan``: its decode_plan (None: the forward kernel)."""
    batch = tuple(q.shape[:-2])
    q4, k4, v4 = _to4d(q), _to4d(k), _to4d(v)
    B, H, G, nq, nk, d, dv = _dims(q4, k4, v4)
    out = torch.empty((B, H, nq, dv), dtype=to_dtype(spec.out_dtype), device=q.device)
    lse = torch.empty((B, H, nq), dtype=torch.float32, device=q.device)
    mod = kernels(spec)
    if plan is not None:
        _decode(mod, q4, k4, v4, out, lse, captured, spec, plan)
        return out.reshape(batch + (nq, dv)), lse.reshape(batch + (nq,))
    bm, bn, warps, stages = _blocks(d, dv, backward=False, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(nq, bm) * B * H,)
    # a band (causal, windows): the kernel computes its key blocks and full tiles itself
    band = _rng.linear_band(spec, (B, H, nq, nk))
    ranges = None if band is not None else \
        _rng.block_ranges(spec, captured, (B, H, nq, nk), bm, bn, q.device)
    skip = band is not None or ranges is not None
    # the removal rule (removal.py) per call, on the device: a call that must not skip (THRESH =
    # +inf) visits every key block, the kernel checks each row's margin against THRESH itself;
    # without skipping THRESH is not read: a shared dummy, nothing allocated
    thresh = _threshold32(spec, q4, k4, v4, captured) if skip else \
        _rng.dummy(q.device, torch.float32)
    full = None
    if ranges is not None:
        full = _rng.full_ranges(spec, (B, H, nq, nk), bm, bn, q.device)
    full_tiles = bool(getattr(mod, "HAS_FULL_TILES", False)) and (
        not skip or band is not None or full is not None)
    mod.attn_fwd[grid](
        q4, k4, v4, out, lse, _operands(spec, captured, (B, H, nq, nk), q.device),
        *_rng._range_args(ranges[0] if ranges else None, B, H, q.device),
        *_rng._range_args(full, B, H, q.device), thresh, *(band or (0, 0, 0, 0)),
        *q4.stride(), *k4.stride(), *v4.stride(), *out.stride(),
        H, G, nq, nk, d, dv, _seed32(seed),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
        num_warps=warps, num_stages=stages, SKIP=skip, FULL_TILES=full_tiles,
        EVEN_D=(d == _pow2(d) and dv == _pow2(dv)), BAND=band is not None, **_flags(),
        **_tma(k4, v4, q.device))
    return out.reshape(batch + (nq, dv)), lse.reshape(batch + (nq,))


def backward(grad_out, q, k, v, captured, out, lse, spec: AttentionSpec, seed: int = 0,
             needs_grad: Optional[Sequence[bool]] = None):
    """Returns (dq, dk, dv, [d captured_i or None]) like cpu.attention_backward."""
    return _autotuned(kernels(spec), True, _to4d(q), _to4d(k), _to4d(v),
                      lambda: _backward(grad_out, q, k, v, captured, out, lse, spec, seed,
                                        needs_grad))


def _backward(grad_out, q, k, v, captured, out, lse, spec: AttentionSpec, seed: int = 0,
              needs_grad: Optional[Sequence[bool]] = None):
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
    ops = _operands(spec, captured, (B, H, nq, nk), q.device)
    bm, bn, warps, stages = _blocks(d, dv, backward=True, dtype=q.dtype, device=q.device)
    bdv = _pow2(dv)
    row_stats = _needs_row_stats(spec, o4.dtype)
    # read and written only with ROW_STATS; else the shared dummy (never written)
    inv_r = torch.empty((B, H, nq), dtype=torch.float32, device=q.device) if row_stats else \
        _rng.dummy(q.device, torch.float32)
    if not row_stats:
        mod.attn_bwd_preprocess[(triton.cdiv(nq, bm) * B * H,)](
            o4, do4, delta, *o4.stride(), *do4.stride(), H, nq, dv, BLOCK_M=bm, BLOCK_DV=bdv)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DV=bdv,
                  num_warps=warps, num_stages=stages, **_flags())
    grads = _grad_indices(spec)
    n_mb, n_nb = triton.cdiv(nq, bm), triton.cdiv(nk, bn)
    # a band (causal, windows): the kernels compute their ranges and full tiles themselves, the
    # dQ kernel also the removal check per query block (the threshold as removal.rows_ok_from_lse
    # takes it) and the hull of the failing blocks per head that the dK/dV kernel widens to
    band = _rng.linear_band(spec, (B, H, nq, nk))
    thr = fails = _rng.dummy(q.device)
    ranges = None
    if band is not None:
        r = removal.skip_removal(spec)
        worst = removal.worst_masked(spec, r, q4, k4, v4, captured, do4, finite_scores=True)
        thr = removal.threshold(worst, r).to(torch.float64).reshape(())
        # per (b, h): the hull of the failing query blocks, then one flag per query block
        fails = torch.zeros((B * H, n_mb + 2), dtype=torch.int32, device=q.device)
    else:
        ranges = _rng.block_ranges(spec, captured, (B, H, nq, nk), bm, bn, q.device)
        if ranges is not None:
            ranges = _rng.backward_ranges(spec, ranges, q4, k4, v4, do4, captured, lse3, bm,
                                          n_mb, n_nb)
    skip = band is not None or ranges is not None
    # skipped tiles write no operand gradient: their buffers start at zero (the exact gradient of
    # a tile whose probabilities are all 0)
    new = torch.zeros if skip else torch.empty
    bufs, grad_bits = {}, 0
    for pos, i in enumerate(grads):
        want = bool(needs_grad[i]) if i < len(needs_grad) else False
        grad_bits |= int(want) << pos
        if not want:
            bufs[i] = _rng.dummy(q.device, torch.float32)  # GRAD leaves it unwritten
        elif spec.captured[i] == "tensor":
            # the known N x N cost, paid only while a captured tensor requires grad
            bufs[i] = new((B, H, nq, nk), dtype=torch.float32, device=q.device)
        else:
            bufs[i] = new((B * H, n_mb, n_nb), dtype=torch.float32, device=q.device)
    # full tiles (every row keeps every key; see attention._full_range): per query block for dQ,
    # the transpose per key block for dK/dV; without skipping the kernels take every in-bounds tile
    full_q = full_k = None
    if ranges is not None:
        full_q = _rng.full_ranges(spec, (B, H, nq, nk), bm, bn, q.device)
        full_k = None if full_q is None else full_columns(full_q, nq, nk, bm, bn)
    full_tiles = bool(getattr(mod, "HAS_FULL_TILES", False)) and (
        not skip or band is not None or full_q is not None)
    common.update(FULL_TILES=full_tiles, EVEN_D=(d == _pow2(d) and dv == _pow2(dv)),
                  BAND=band is not None)
    band_args = band or (0, 0, 0, 0)
    mod.attn_bwd_dq[(n_mb * B * H,)](
        q4, k4, v4, do4, lse3, delta, inv_r, dq, ops, tuple(bufs[i] for i in grads),
        *_rng._range_args(ranges[0] if ranges else None, B, H, q.device),
        *_rng._range_args(full_q, B, H, q.device), thr, math.log(max(nk, 1)), fails, *band_args,
        *q4.stride(), *k4.stride(), *v4.stride(), *do4.stride(), *dq.stride(),
        H, G, nq, nk, d, dv, _seed32(seed), ROW_STATS=row_stats, SKIP=skip, GRAD=grad_bits,
        **common, **_tma(k4, v4, q.device))
    # after dq: with ROW_STATS it is the dq kernel that writes delta and inv_r
    mod.attn_bwd_dkdv[(triton.cdiv(nk, bn) * B * (H // G),)](
        q4, k4, v4, do4, lse3, delta, inv_r, dk, dvt, ops,
        *_rng._range_args(ranges[1] if ranges else None, B, H, q.device),
        *_rng._range_args(full_k, B, H, q.device), fails, *band_args,
        *q4.stride(), *k4.stride(), *v4.stride(), *do4.stride(), *dk.stride(), *dvt.stride(),
        H, G, nq, nk, d, dv, _seed32(seed), ROW_STATS=row_stats, SKIP=skip, **common,
        **_tma(q4, do4, q.device))

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


def full_columns(full_rows: torch.Tensor, nq: int, nk: int, bm: int, bn: int) -> torch.Tensor:
    """The dK/dV kernel's full tiles: per key block, [lo, hi) of the query blocks for which it is a
    full tile (the transpose of ``ranges.full_ranges``' (1, 1, n_mb, 2) per-query-block ranges),
    only query blocks without padding rows (the kernel loads them unmasked). A key block whose
    full query blocks are not one interval (a mask that is not monotone) gets none: exact, the
    others take the masked path. An int32 (1, 1, n_nb, 2) tensor on full_rows' device."""
    fr = full_rows.reshape(-1, 2).to(torch.int64)
    n_mb, n_nb = fr.shape[0], triton.cdiv(nk, bn)
    dev = fr.device
    idx = torch.arange(n_nb, device=dev)
    full = (fr[:, :1] <= idx) & (idx < fr[:, 1:])  # (n_mb, n_nb)
    full &= (torch.arange(n_mb, device=dev) < nq // bm)[:, None]
    midx = torch.arange(n_mb, device=dev)[:, None]
    lo = torch.where(full, midx, n_mb).amin(0)
    hi = torch.where(full, midx + 1, 0).amax(0)
    one = full.sum(0) == hi - lo  # contiguous (and empty when none: hi - lo <= 0 = sum)
    some = one & (hi > lo)
    lo = torch.where(some, lo, 0)
    hi = torch.where(some, hi, 0)
    return torch.stack([lo, hi], -1).to(torch.int32).reshape(1, 1, n_nb, 2).contiguous()


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
