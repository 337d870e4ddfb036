"""Static GPU check of the generated Triton kernels (issue 15), on a machine without a GPU.

For each spec of a matrix (head dim 64/128/256 x fp16/bf16 x patterns: no mask, causal
predicate, sliding window, padding, soft-cap, ALiBi-like bias, learnable bias, dropout, GQA, and
decode: one query of 4 heads per K/V head over a 4096-key cache, forward only, and
decode_window: the same under a 256-key sliding window, whose other key blocks are not computed) the
launchers of ``kernels/triton_attn/launch.py`` are run on CPU tensors with their kernels replaced by
recorders, so what gets compiled is exactly what a launch on the device would compile: the same
arguments, the same specialisation (pointer alignment, strides equal to 1 or divisible by 16), the
same tiles, warps and stages (chosen for the target architecture). Each recorded kernel is then
compiled ahead of time by Triton for sm_80, sm_90a and sm_100a and its cubin read with the
``cuobjdump`` Triton ships:

* registers, local memory (spills), shared memory (``--dump-resource-usage``, and Triton's dynamic
  shared memory from the kernel's metadata);
* from the SASS (``-sass``): warpgroup MMA (HGMMA, sm_90a), mma.sync (HMMA), tcgen05 MMA (UTC*MMA,
  sm_100a); and for the main loop (the innermost loop holding MMAs, found by its back-edge branch:
  a BRA to a lower address; with several such loops, the one with most MMAs, then fewest other
  instructions: the full-tile fast path) its MUFU count, its non-MMA instruction count (static,
  per thread, per key or query block) and MUFU per score element (x threads / (BLOCK_M*BLOCK_N)).

The same figures are taken for ``fa2_reference.fa2_fwd`` (a minimal FlashAttention-2 forward of our
own) compiled at the same tiles as our forward, without and with its causal split.

Gates (exit status 1 and a list of failures when any fails):
  compile   every kernel compiles for every target
  spill     no local memory for fp16/bf16 with d <= 128
  wgmma     on sm_90a every dot of the forward and backward lowers to HGMMA (no HMMA)
  mufu      main loop: <= 1 MUFU per score element in the forward, <= 2 in the backward, plus
            one per row (the rescale factor exp(m_old - m_new): the reference's own 1.06 at 64x64),
            plus what the score function needs itself (SCORE_MUFU: the soft-cap's tanh, 2)
  budget    forward main loop: non-MMA instructions <= 1.25x the reference's, no mask and causal

``--tune-set`` also compiles every autotune candidate (``launch.tune_set``: the tiles tried beside
the table's on a GPU with $FUSION_PASS_AUTOTUNE=1), gated like the table's tiles.

    python benchmarks/gpu_static.py                       # whole matrix, all targets
    python benchmarks/gpu_static.py --arch 90 --d 128 --dtype bfloat16 --pattern plain causal
    python benchmarks/gpu_static.py --json out.json --markdown table.md -j 2

Compiles are cached by Triton (~/.triton/cache) and the figures per kernel source/options in
``--cache`` (default ~/.cache/fusion_pass/gpu_static.json), so a rerun only compiles what changed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ARCHS = (80, 90, 100)
ARCH_NAME = {80: "sm_80", 90: "sm_90a", 100: "sm_100a"}
HEAD_DIMS = (64, 128, 256)
DTYPES = ("float16", "bfloat16")
PATTERNS = ("plain", "causal", "sliding", "padding", "softcap", "alibi", "bias_grad", "dropout",
            "gqa", "decode", "decode_window")
# decode: DECODE_QUERIES queries of 4 query heads per K/V head over a cache of DECODE_KEYS keys
# (the split-KV kernels attn_decode and attn_decode_combine; forward only: inference)
DECODE_QUERIES = 1
DECODE_KEYS = 4096
# MUFU per score element the score function needs by itself, beyond the softmax's budget: the
# soft-cap's tanh is an exponential and a reciprocal (1 - 2 / (exp(2x) + 1), exact at +-inf); its
# derivative 1 - tanh^2 reuses the forward's value (none more in the backward)
SCORE_MUFU = {"softcap": 2}
# kernels without a dot (no MMA to lower)
NO_DOT_KERNELS = ("attn_bwd_preprocess", "attn_decode_combine")
# the two cases whose forward is held to the reference's instruction budget
BUDGET_PATTERNS = {"plain": False, "causal": True}
BUDGET_RATIO = 1.25
SHAPE = dict(B=2, H=4, N=1024)
WINDOW = 256
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fusion_pass", "gpu_static.json")


# ---------------------------------------------------------------------------------------------
# The spec matrix
# ---------------------------------------------------------------------------------------------

def build_case(pattern: str, d: int, dtype_name: str):
    """(spec, q, k, v, captured, needs_grad) on CPU for one cell of the matrix."""
    import sympy
    import torch
    from fusion_pass.kernels import predicate
    from fusion_pass.kernels.spec import AttentionSpec, ScoreOp

    dtype = getattr(torch, dtype_name)
    B, H, N = SHAPE["B"], SHAPE["H"], SHAPE["N"]
    HK = H // 4 if pattern in ("gqa", "decode", "decode_window") else H
    b, i, j = (sympy.Symbol(x, integer=True, nonnegative=True) for x in "bij")
    d0 = sympy.Function("d0")
    axes = ("b", "h", "i", "j")

    def mask(keep, data=()):
        return predicate.MaskSpec(keep=sympy.srepr(keep), axes=axes, data=tuple(data), text=str(keep))

    scale = ScoreOp("mul", "const", value=d ** -0.5)
    ops, captured, kinds, masks, needs, p = (scale,), [], (), (), [], 0.0
    if pattern == "causal":
        masks = (mask(sympy.Not(sympy.Le(j, i))),)
        ops = (scale, ScoreOp("fill", "predicate", value=-math.inf, index=0))
    elif pattern == "sliding":
        masks = (mask(sympy.Not(sympy.And(sympy.Le(j, i), sympy.Lt(i - j, WINDOW)))),)
        ops = (scale, ScoreOp("fill", "predicate", value=-math.inf, index=0))
    elif pattern == "padding":
        # causal and a (B, N) key-padding mask read in the kernel
        am = torch.ones(B, N, dtype=torch.long)
        am[1, : N // 8] = 0
        masks = (mask(sympy.Not(sympy.And(sympy.Le(j, i), sympy.Ne(d0(b, j), 0))), data=(0,)),)
        ops = (scale, ScoreOp("fill", "predicate", value=-math.inf, index=0))
        captured, kinds, needs = [am], ("data",), [False]
    elif pattern == "softcap":
        cap = 50.0
        ops = (scale, ScoreOp("div", "const", value=cap), ScoreOp("tanh"),
               ScoreOp("mul", "const", value=cap))
    elif pattern in ("alibi", "bias_grad"):
        # ALiBi as ops.py hands it over (a bias tensor broadcast over the batch); learnable: the
        # same with a gradient
        bias = torch.randn(1, H, N, N, dtype=dtype)
        ops = (scale, ScoreOp("add", "tensor", index=0))
        captured, kinds, needs = [bias], ("tensor",), [pattern == "bias_grad"]
    elif pattern == "dropout":
        p = 0.1
    elif pattern == "decode_window":
        # the cache's last WINDOW keys (the query sits at position Nk - 1): key blocks outside the
        # band are not computed (attn_decode's BAND)
        pos = i + DECODE_KEYS - DECODE_QUERIES
        masks = (mask(sympy.Not(sympy.And(sympy.Le(j, pos), sympy.Lt(pos - j, WINDOW)))),)
        ops = (scale, ScoreOp("fill", "predicate", value=-math.inf, index=0))
    elif pattern not in ("plain", "gqa", "decode"):
        raise ValueError(pattern)
    n = dtype_name
    spec = AttentionSpec(score_ops=ops, captured=kinds, masks=masks, qk_dtype=n, softmax_dtype=n,
                         prob_dtype=n, out_dtype=n, dropout_p=p)
    nq, nk = (DECODE_QUERIES, DECODE_KEYS) if pattern.startswith("decode") else (N, N)
    q = torch.randn(B, H, nq, d, dtype=dtype)
    k = torch.randn(B, HK, nk, d, dtype=dtype)
    v = torch.randn(B, HK, nk, d, dtype=dtype)
    return spec, q, k, v, captured, needs


# ---------------------------------------------------------------------------------------------
# Recording the launches
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    kernel: str          # attn_fwd, attn_bwd_dq, ...
    fn: object           # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def compiled_mode():
    """Kernels defined and launchers run as on a GPU (not the interpreter)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


class _Recorder:
    def __init__(self, name, fn, log):
        self.name, self.fn, self.log = name, fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(Launch(self.name, self.fn, tuple(grid), args, kwargs))
        return launch


KERNEL_NAMES = ("attn_fwd", "attn_bwd_preprocess", "attn_bwd_dq", "attn_bwd_dkdv", "attn_decode",
                "attn_decode_combine")


def record_launches(pattern: str, d: int, dtype_name: str, arch: int, tiles=None) -> List[Launch]:
    """The kernel launches of one forward and one backward of the case, for ``arch``; ``tiles``:
    (BLOCK_M, BLOCK_N, warps, stages) instead of the table's (an autotune candidate)."""
    import torch
    from fusion_pass.kernels import triton_attention as ta
    from fusion_pass.kernels.triton_attn import launch as ta_launch

    spec, q, k, v, captured, needs = build_case(pattern, d, dtype_name)
    log: List[Launch] = []
    arch_ctx = ta.target_arch(arch) if hasattr(ta, "target_arch") else contextlib.nullcontext()
    tile_ctx = ta_launch.tiles(tiles) if tiles else contextlib.nullcontext()
    with compiled_mode(), arch_ctx, tile_ctx:
        mod = ta.kernels(spec)
        saved = {n: getattr(mod, n) for n in KERNEL_NAMES if hasattr(mod, n)}
        try:
            for n, fn in saved.items():
                setattr(mod, n, _Recorder(n, fn, log))
            assert ta.supports(q, k, v, spec), f"{pattern}: not supported by the Triton kernels"
            out, lse = ta.forward(q, k, v, captured, spec, seed=1)
            lse.zero_()
            out.zero_()
            if not pattern.startswith("decode"):
                go = torch.randn_like(out)
                ta.backward(go, q, k, v, captured, out, lse, spec, 1, needs)
        finally:
            for n, fn in saved.items():
                setattr(mod, n, fn)
    return log


def reference_launch(d: int, dtype_name: str, causal: bool, bm: int, bn: int, warps: int,
                     stages: int) -> Launch:
    import importlib
    import torch
    import triton
    with compiled_mode():  # defined as a compiled kernel, even under TRITON_INTERPRET=1 (tests)
        import fa2_reference
        if not isinstance(fa2_reference.fa2_fwd, triton.runtime.JITFunction):
            fa2_reference = importlib.reload(fa2_reference)
    dtype = getattr(torch, dtype_name)
    B, H, N = SHAPE["B"], SHAPE["H"], SHAPE["N"]
    q, k, v = (torch.randn(B, H, N, d, dtype=dtype) for _ in range(3))
    grid, args, kw, _ = fa2_reference.launch_args(q, k, v, causal, bm, bn)
    return Launch("fa2_ref", fa2_reference.fa2_fwd, grid, args,
                  dict(kw, num_warps=warps, num_stages=stages))


# ---------------------------------------------------------------------------------------------
# Compiling for a target without a GPU, and reading the cubin
# ---------------------------------------------------------------------------------------------

def _cuobjdump() -> Optional[str]:
    import triton
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return p if os.path.exists(p) else shutil.which("cuobjdump")


def available() -> Optional[str]:
    """None when this machine can run the check, else why not."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as e:  # pragma: no cover - triton is an extra
        return f"triton unavailable: {e}"
    if _cuobjdump() is None:
        return "cuobjdump not found"
    return None


def compile_launch(launch: Launch, arch: int):
    """(compiled kernel, options dict) of ``launch`` for sm_{arch}, specialised as a launch with
    these arguments would be on that device."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    src = ASTSource(fn, signature, constexprs, attrs)
    opts = {k: v for k, v in options.__dict__.items()
            if k in ("num_warps", "num_stages", "num_ctas", "maxnreg", "debug")}
    with compiled_mode():  # the code generator reads the interpreter switch too
        return triton.compile(src, target=target, options=opts), opts


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)([^;]*);")


def parse_sass(sass: str):
    """[(address, opcode, operands)] of the first function in a cuobjdump -sass listing."""
    out = []
    for line in sass.splitlines():
        m = _SASS_LINE.search(line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def _is_mma(op: str) -> bool:
    return "MMA" in op.split(".")[0]


def _loops(instrs):
    """[(start, end)] address ranges of loops: a branch back to a lower address."""
    loops = []
    for addr, op, rest in instrs:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", rest)
            if m and int(m.group(1), 16) < addr:
                loops.append((int(m.group(1), 16), addr))
    return loops


def analyse_sass(sass: str) -> dict:
    instrs = parse_sass(sass)
    ops = [op for _, op, _ in instrs]
    count = lambda pred, xs: sum(1 for o in xs if pred(o))
    res = {
        "instructions": count(lambda o: o != "NOP", ops),
        "hgmma": count(lambda o: o.startswith("HGMMA"), ops),
        "hmma": count(lambda o: o.startswith("HMMA"), ops),
        "tcgen05": count(lambda o: o.startswith("UTC") and "MMA" in o, ops),
        "mufu": count(lambda o: o.startswith("MUFU"), ops),
    }
    loops = []
    for lo, hi in _loops(instrs):
        body = [op for a, op, _ in instrs if lo <= a <= hi and op != "NOP"]
        mma = count(_is_mma, body)
        if mma:
            loops.append({"range": (lo, hi), "mma": mma, "mufu": count(lambda o: o.startswith("MUFU"), body),
                          "non_mma": len(body) - mma})
    # innermost loops holding MMAs: none of the other MMA loops inside them
    inner = [L for L in loops if not any(o is not L and L["range"][0] <= o["range"][0]
                                         and o["range"][1] <= L["range"][1] for o in loops)]
    res["loops"] = len(inner)
    if inner:
        top = max(L["mma"] for L in inner)
        main = min((L for L in inner if L["mma"] == top), key=lambda L: L["non_mma"])
        res.update(loop_mma=main["mma"], loop_mufu=main["mufu"], loop_non_mma=main["non_mma"],
                   loop_non_mma_max=max(L["non_mma"] for L in inner if L["mma"] == top))
    return res


def _resource_usage(text: str) -> dict:
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        return {}
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), static_smem=int(m.group(3)),
                local=int(m.group(4)))


def measure(launch: Launch, arch: int) -> dict:
    """Compile ``launch`` for ``arch`` and return its figures (or {"error": ...})."""
    tool = _cuobjdump()
    try:
        ck, opts = compile_launch(launch, arch)
    except Exception as e:  # a compile failure is a gate failure, not a crash
        msg = str(e).strip().splitlines()
        return {"error": f"{type(e).__name__}: {msg[-1] if msg else ''}"[:300]}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    res = _resource_usage(usage)
    res["smem"] = int(getattr(ck.metadata, "shared", 0) or 0) + res.get("static_smem", 0)
    res.update(analyse_sass(sass))
    res["utmaldg"] = len(re.findall(r"\bUTMALDG\b", sass))  # tensor-descriptor (TMA) loads
    kw = launch.kwargs
    res.update(block_m=kw.get("BLOCK_M"), block_n=kw.get("BLOCK_N"), warps=opts.get("num_warps"),
               stages=opts.get("num_stages"))
    if "loop_mufu" in res and res["block_m"] and res["block_n"]:
        res["mufu_per_elem"] = res["loop_mufu"] / _per_thread(res)[0]
    return res


def _per_thread(r) -> Tuple[float, int]:
    """(score elements, accumulator rows) each thread holds in a main-loop iteration. Rows: MMA
    layouts give a thread 2 of every 16-row slab of its warp's rows; they bound the per-row
    exponentials (the online softmax's rescale factor) the MUFU gate allows on top."""
    bm, bn, warps = r["block_m"], r["block_n"], r["warps"]
    rows = 2 * max(1, bm // (16 * min(warps, max(1, bm // 16))))
    return bm * bn / (32 * warps), rows


# ---------------------------------------------------------------------------------------------
# Driver: tasks, cache, gates, table
# ---------------------------------------------------------------------------------------------

def _launch_key(launch: Launch, arch: int) -> str:
    """Identifies what gets compiled: the kernel's source (with its callees) and arguments as they
    specialise, plus Triton's version."""
    import triton
    fn = launch.fn
    parts = [triton.__version__, fn.cache_key, str(arch), launch.kernel]

    def spec(a):
        if isinstance(a, tuple):  # the kernels' operand tuples specialise element by element
            return "(" + ",".join(spec(x) for x in a) + ")"
        if hasattr(a, "data_ptr"):
            return f"T{a.dtype}:{a.data_ptr() % 16 == 0}"
        if isinstance(a, bool) or a is None:
            return repr(a)
        if isinstance(a, int):
            return f"I{a == 1}:{a % 16 == 0}:{abs(a) >= 2 ** 31}"
        return type(a).__name__

    parts += [spec(a) for a in launch.args]
    parts.append(json.dumps({k: v for k, v in launch.kwargs.items()}, sort_keys=True, default=str))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _measure_task(task):
    """Worker: (cell, arch) -> [(kernel, figures)] for one case (recording happens here too, so
    the JITFunctions never cross a process boundary)."""
    cell, arch, cache = task
    kind = cell[0]
    out = []
    if kind == "ref":
        _, d, dt, causal, bm, bn, warps, stages = cell
        launches = [reference_launch(d, dt, causal, bm, bn, warps, stages)]
    else:
        _, pattern, d, dt, tune = cell
        launches = record_launches(pattern, d, dt, arch, tune[1] if tune else None)
        if tune:  # an autotune candidate of one direction: that direction's kernels only
            launches = [L for L in launches
                        if (L.kernel == "attn_fwd") == (tune[0] == "fwd") and L.kernel != "attn_bwd_preprocess"]
    for L in launches:
        key = _launch_key(L, arch)
        res = cache.get(key)
        if res is None:
            t = time.time()
            res = measure(L, arch)
            res["compile_s"] = round(time.time() - t, 1)
        out.append((L.kernel, key, res))
    return cell, arch, out


def tune_cells(arch: int, pattern: str, d: int, dt: str):
    """The autotune candidates of a case (``launch.tune_set``): (direction, tiles) pairs."""
    import torch
    from fusion_pass.kernels.triton_attn import launch as ta_launch
    if pattern.startswith("decode"):
        return []
    return [(direction, cfg) for direction in ("fwd", "bwd")
            for cfg in ta_launch.tune_set(d, d, direction == "bwd", getattr(torch, dt), arch)]


def run(archs, dims, dtypes, patterns, jobs=1, cache_path=DEFAULT_CACHE, log=print, tune=False):
    """Measure the matrix; returns rows: dicts with the cell, the kernel and its figures. ``tune``:
    also every autotune candidate (gated like the table's tiles)."""
    cache = {}
    if cache_path and os.path.exists(cache_path):
        with contextlib.suppress(Exception):
            with open(cache_path) as f:
                cache = json.load(f)
    cells = [("case", p, d, dt, None) for p in patterns for d in dims for dt in dtypes]
    tasks = [(c, a, cache) for c in cells for a in archs]
    if tune:
        tasks += [(("case", p, d, dt, t), a, cache) for p in patterns for d in dims
                  for dt in dtypes for a in archs for t in tune_cells(a, p, d, dt)]
    rows = []

    def collect(results):
        for cell, arch, out in results:
            for kernel, key, res in out:
                if "error" not in res:
                    cache[key] = res
                if cell[0] == "case":
                    label = dict(pattern=cell[1], d=cell[2], dtype=cell[3], candidate=bool(cell[4]))
                else:
                    label = dict(pattern="ref_causal" if cell[3] else "ref_plain", d=cell[1],
                                 dtype=cell[2])
                rows.append(dict(label, arch=arch, kernel=kernel, **res))
            log(f"  {ARCH_NAME[arch]} {cell[1:]}: " + ", ".join(
                f"{k} {'ERROR' if 'error' in r else str(r.get('regs')) + 'r'}" for k, _, r in out))

    def execute(tasks):
        if jobs > 1:
            with ProcessPoolExecutor(jobs) as ex:
                collect(ex.map(_measure_task, tasks))
        else:
            collect(map(_measure_task, tasks))

    execute(tasks)
    # the reference at the tiles of each measured forward (plain and causal cases)
    ref_cells = set()
    for r in rows:
        if r["kernel"] == "attn_fwd" and r["pattern"] in BUDGET_PATTERNS and "error" not in r:
            ref_cells.add((("ref", r["d"], r["dtype"], BUDGET_PATTERNS[r["pattern"]], r["block_m"],
                            r["block_n"], r["warps"], r["stages"]), r["arch"]))
    execute([(c, a, cache) for c, a in sorted(ref_cells, key=str)])
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tmp = cache_path + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, cache_path)
    return rows


def gates(rows) -> List[str]:
    """The failed gates, one line each."""
    fails = []
    refs = {}
    ref_at = {}
    for r in rows:
        if r["kernel"] == "fa2_ref" and "error" not in r:
            refs[(r["pattern"], r["d"], r["dtype"], r["arch"], r["block_m"], r["block_n"],
                  r["warps"], r["stages"])] = r
            ref_at[(r["d"], r["dtype"], r["arch"], r["block_m"], r["block_n"], r["warps"],
                    r["stages"])] = r
    for r in rows:
        if r["kernel"] == "fa2_ref":
            continue
        where = f"{r['kernel']} {r['pattern']} d={r['d']} {r['dtype']} {ARCH_NAME[r['arch']]}"
        if "error" in r:
            fails.append(f"compile: {where}: {r['error']}")
            continue
        if r["d"] <= 128 and r.get("local", 0) > 0:
            fails.append(f"spill: {where}: {r['local']} bytes of local memory")
        if r["arch"] == 90 and r["kernel"] not in NO_DOT_KERNELS and (r["hmma"] or not r["hgmma"]):
            fails.append(f"wgmma: {where}: {r['hgmma']} HGMMA, {r['hmma']} HMMA")
        # the softmax's own budget, plus what the score function itself costs per element
        limit = (1 if r["kernel"] in ("attn_fwd", "attn_decode") else 2) \
            + SCORE_MUFU.get(r["pattern"], 0)
        if "loop_mufu" in r and r.get("block_m") and r.get("block_n"):
            elems, nrows = _per_thread(r)
            # the per-row share as the reference compiled at the same tiles shows it (the layout
            # may spread a warp over columns: more rows per thread than the heuristic)
            ref = ref_at.get((r["d"], r["dtype"], r["arch"], r["block_m"], r["block_n"], r["warps"],
                              r["stages"]))
            if ref is not None and "loop_mufu" in ref:
                nrows = max(nrows, ref["loop_mufu"] - elems)
            if r["loop_mufu"] > limit * elems + nrows:
                fails.append(f"mufu: {where}: {r['loop_mufu'] / elems:.2f} MUFU per score element "
                             f"(limit {limit}, plus one per row: {nrows} per thread)")
        if r["kernel"] == "attn_fwd" and r["pattern"] in BUDGET_PATTERNS:
            ref = refs.get(("ref_causal" if BUDGET_PATTERNS[r["pattern"]] else "ref_plain", r["d"],
                            r["dtype"], r["arch"], r["block_m"], r["block_n"], r["warps"],
                            r["stages"]))
            if ref is None or "loop_non_mma" not in ref or "loop_non_mma" not in r:
                fails.append(f"budget: {where}: no main loop found in it or in the reference")
            elif r["loop_non_mma"] > BUDGET_RATIO * ref["loop_non_mma"]:
                fails.append(f"budget: {where}: {r['loop_non_mma']} non-MMA instructions per "
                             f"iteration > {BUDGET_RATIO} x reference {ref['loop_non_mma']}")
    return fails


COLUMNS = [("arch", 7), ("kernel", 19), ("pattern", 10), ("d", 4), ("dtype", 9), ("tile", 12),
           ("regs", 4), ("spill", 5), ("smem", 7), ("hgmma", 5), ("hmma", 4), ("tc05", 4),
           ("mufu/it", 7), ("mufu/el", 7), ("nonmma/it", 9), ("vs ref", 6)]


def table(rows) -> str:
    refs = {}
    for r in rows:
        if r["kernel"] == "fa2_ref" and "error" not in r:
            refs[(r["pattern"], r["d"], r["dtype"], r["arch"], r["block_m"], r["block_n"],
                  r["warps"], r["stages"])] = r
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    order = {k: n for n, k in enumerate(KERNEL_NAMES + ("fa2_ref",))}
    pats = {p: n for n, p in enumerate(PATTERNS + ("ref_plain", "ref_causal"))}
    for r in sorted(rows, key=lambda r: (r["arch"], order.get(r["kernel"], 99), pats.get(r["pattern"], 99),
                                         r["d"], r["dtype"])):
        if "error" in r:
            vals = [ARCH_NAME[r["arch"]], r["kernel"], r["pattern"], r["d"], r["dtype"],
                    "COMPILE ERROR: " + r["error"][:80]] + [""] * (len(COLUMNS) - 6)
        else:
            ratio = ""
            if r["kernel"] == "attn_fwd" and r["pattern"] in BUDGET_PATTERNS:
                ref = refs.get(("ref_causal" if BUDGET_PATTERNS[r["pattern"]] else "ref_plain",
                                r["d"], r["dtype"], r["arch"], r["block_m"], r["block_n"],
                                r["warps"], r["stages"]))
                if ref and ref.get("loop_non_mma") and r.get("loop_non_mma"):
                    ratio = f"{r['loop_non_mma'] / ref['loop_non_mma']:.2f}"
            nm = r.get("loop_non_mma", "-")
            if r.get("loop_non_mma_max", nm) != nm:
                nm = f"{nm}/{r['loop_non_mma_max']}"
            vals = [ARCH_NAME[r["arch"]], r["kernel"], r["pattern"], r["d"], r["dtype"],
                    f"{r.get('block_m')}x{r.get('block_n')} w{r.get('warps')}s{r.get('stages')}",
                    r.get("regs"), r.get("local"), r.get("smem"), r.get("hgmma"), r.get("hmma"),
                    r.get("tcgen05"), r.get("loop_mufu", "-"),
                    f"{r['mufu_per_elem']:.2f}" if "mufu_per_elem" in r else "-", nm, ratio]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return "\n".join(lines)


def real_vs_static(dims, dtypes, patterns, log=print) -> List[str]:
    """On a GPU: run each case's forward and backward for real, then compare every kernel the JIT
    compiled (registers and spills reported by the driver) with what the static compile predicts
    for this device's architecture. Returns mismatch lines (empty: the static figures hold)."""
    import torch
    from fusion_pass.kernels import triton_attention as ta
    major, minor = torch.cuda.get_device_capability()
    arch = 100 if major >= 10 else 90 if major == 9 else 80
    bad = []
    for pattern in patterns:
        for d in dims:
            for dt in dtypes:
                spec, q, k, v, captured, needs = build_case(pattern, d, dt)
                q, k, v = (t.cuda().requires_grad_(False) for t in (q, k, v))
                captured = [c.cuda() for c in captured]
                out, lse = ta.forward(q, k, v, captured, spec, seed=1)
                ta.backward(torch.randn_like(out), q, k, v, captured, out, lse, spec, 1, needs)
                torch.cuda.synchronize()
                mod = ta.kernels(spec)
                static = {L.kernel: measure(L, arch) for L in record_launches(pattern, d, dt, arch)}
                for name, st in static.items():
                    fn = getattr(mod, name)
                    real = [kk for cache in fn.device_caches.values() for kk in cache[0].values()]
                    if not real:
                        continue
                    kr = real[-1]
                    line = (f"{name} {pattern} d={d} {dt}: static regs {st.get('regs')} local "
                            f"{st.get('local')} | real regs {kr.n_regs} spills {kr.n_spills}")
                    log(line)
                    if st.get("regs") != kr.n_regs or (st.get("local", 0) > 0) != (kr.n_spills > 0):
                        bad.append(line)
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="*", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--d", type=int, nargs="*", default=list(HEAD_DIMS))
    ap.add_argument("--dtype", nargs="*", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--pattern", nargs="*", default=list(PATTERNS), choices=PATTERNS)
    ap.add_argument("-j", "--jobs", type=int, default=1)
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="figures cache ('' for none)")
    ap.add_argument("--json", help="write the rows and failed gates here")
    ap.add_argument("--markdown", help="write the table and failed gates here")
    ap.add_argument("--tma", action="store_true",
                    help="tensor-descriptor (TMA) loads: K and V in the forward and dQ kernels, Q and "
                         "dO in the dK/dV kernel ($FUSION_PASS_TMA=1)")
    ap.add_argument("--tune-set", action="store_true",
                    help="also compile and gate every autotune candidate (launch.tune_set)")
    ap.add_argument("--real", action="store_true",
                    help="on a GPU: compare the static figures with the kernels the JIT compiled")
    a = ap.parse_args(argv)
    why = available()
    if why:
        print(f"gpu_static: cannot run: {why}")
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if a.tma:
        os.environ["FUSION_PASS_TMA"] = "1"
    if a.real:
        bad = real_vs_static(a.d, a.dtype, a.pattern)
        print(f"static vs real: {len(bad)} mismatch(es)")
        for b in bad:
            print("MISMATCH " + b)
        return 1 if bad else 0
    t0 = time.time()
    rows = run(a.arch, a.d, a.dtype, a.pattern, a.jobs, a.cache or None, tune=a.tune_set)
    fails = gates(rows)
    text = table(rows)
    print(text)
    print(f"\n{len(rows)} kernels measured in {time.time() - t0:.0f} s; "
          f"{len(fails)} gate failure(s)")
    for f in fails:
        print("FAIL " + f)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "fails": fails}, f, indent=1, default=str)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text + "\n\n" + "\n".join("FAIL " + x for x in fails) + "\n")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
