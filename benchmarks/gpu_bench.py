"""GPU attention throughput (TFLOP/s): fusion_pass's Triton kernels vs SDPA flash vs FlexAttention.

    python benchmarks/gpu_bench.py                    # full sweep (within --budget-s seconds)
    python benchmarks/gpu_bench.py --dry-run          # no GPU needed: print the plan and FLOPs

bf16, head dims --dims (64 128), lengths --sizes (1k..16k), causal and not, forward and
forward+backward. Shapes follow the FlashAttention papers: ~16k tokens per batch
(B = tokens // N) and hidden 2048 (H = 2048 // D).

FLOPs: forward = 4 * B * H * N * N * D (two matmuls), halved for causal (the masked half is
not useful work, whatever an implementation computes); forward+backward = 3.5 x forward
(backward = 2.5 x forward). The same count is used for every implementation, so TFLOP/s are
comparable as "useful work per second".

Implementations:
* ``ours``:  ``fusion_pass.kernels.ops.fused_attention`` (torch.ops.fusion_pass.attention) with a
  spec as the pass would build for a bf16 model: ``s * (1/sqrt(D))``; causal adds a ``fill`` step
  reading a bool mask tensor (True = masked, -inf), as ``masked_fill(mask, -inf)`` in a model.
  The mask-as-predicate path (causal from indices, masked tiles skipped) does not exist yet, so
  ours reads the N x N mask and computes every tile: causal TFLOP/s are expected ~half.
  The row records which kernel ran (``triton_attention.supports``); if a spec is not supported
  by the Triton kernels the row is skipped (the fallback is the tiled torch-op implementation,
  which is not a GPU kernel worth timing).
* ``flash``: ``F.scaled_dot_product_attention`` under ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``
  (``is_causal`` for causal).
* ``flex``:  ``torch.compile(flex_attention)`` with a causal ``BlockMask`` (None when not causal).

Timing: ``triton.testing.do_bench`` (median ms; gradients reset to None between calls for
forward+backward). Every measurement is guarded: a failure (OOM, unsupported, compile error)
becomes an error entry and the table goes on. ``--budget-s``: rows not started before the
deadline are recorded as skipped. Results: a table on stdout and JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
MASK_NOTE = ("note: ours' causal runs as a bool mask tensor read by a `fill` step; the "
             "mask-as-predicate path (no N x N mask read, masked tiles skipped) does not exist yet")


def shape_for(n: int, d: int, tokens: int, hidden: int):
    """(B, H) for length n and head dim d: ~tokens tokens per batch, H * d = hidden."""
    return max(1, tokens // n), max(1, hidden // d)


def attn_flops(b: int, h: int, n: int, d: int, causal: bool, mode: str) -> float:
    f = 4.0 * b * h * n * n * d
    if causal:
        f /= 2
    if mode == "fwdbwd":
        f *= 3.5
    return f


def plan(args):
    rows = []
    for d in args.dims:
        for causal in args.causal:
            for n in args.sizes:
                b, h = shape_for(n, d, args.tokens, args.hidden)
                for mode in args.modes:
                    for impl in args.impls:
                        rows.append(dict(D=d, causal=causal, N=n, B=b, H=h, mode=mode, impl=impl,
                                         flops=attn_flops(b, h, n, d, causal, mode)))
    return rows


# -- implementations (imported lazily: the dry run needs no GPU, no triton) -----------------------

def make_ours(q, k, v, causal):
    import torch
    from fusion_pass.kernels import ops
    from fusion_pass.kernels.spec import AttentionSpec, ScoreOp

    dt = "bfloat16"
    score_ops = [ScoreOp("mul", "const", value=1.0 / math.sqrt(q.shape[-1]), dtype=dt)]
    captured = []
    if causal:
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)  # True = masked
        score_ops.append(ScoreOp("fill", "tensor", value=-math.inf, index=0, dtype=dt))
        captured.append(mask)
    spec = AttentionSpec(score_ops=tuple(score_ops), captured=tuple("tensor" for _ in captured),
                         qk_dtype=dt, softmax_dtype=dt, prob_dtype=dt, out_dtype=dt)
    if q.device.type != "cuda":  # --device cpu smoke test: the CPU kernels
        return lambda: ops.fused_attention(q, k, v, captured, spec)
    try:
        from fusion_pass.kernels import triton_attention
        supported = bool(triton_attention.supports(q, k, v, spec))
    except Exception as e:  # module not there yet, or supports() failed
        raise RuntimeError(f"triton_attention unavailable: {type(e).__name__}: {e}") from e
    if not supported:
        raise RuntimeError("triton_attention.supports() is False for this spec/shape "
                           "(would fall back to the tiled torch-op path): skipped")
    return lambda: ops.fused_attention(q, k, v, captured, spec)


def make_flash(q, k, v, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


_FLEX = {}


def make_flex(q, k, v, causal):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if causal:
        n = q.shape[-2]
        block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n,
                                       device=q.device)
    fn = _FLEX["fn"]
    return lambda: fn(q, k, v, block_mask=block_mask)


MAKERS = {"ours": make_ours, "flash": make_flash, "flex": make_flex}


def _cpu_bench(fn, warmup, rep, grad_to_none=()):
    """Median ms, for the --device cpu smoke test (do_bench needs a GPU)."""
    import statistics
    ts = []
    for i in range(3 + 5):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        if i >= 3:
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def measure(row, args, cache):
    import torch
    import torch.nn.attention  # noqa: F401  (sdpa_kernel for the reference below)
    dev = args.device
    if dev == "cuda":
        from triton.testing import do_bench
    else:
        do_bench = _cpu_bench
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    b, h, n, d = row["B"], row["H"], row["N"], row["D"]
    key = (b, h, n, d)
    if key not in cache:
        cache.clear()  # one shape's tensors at a time
        if dev == "cuda":
            torch.cuda.empty_cache()
        g = torch.Generator(device=dev).manual_seed(n * 1000 + d)
        cache[key] = [torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, generator=g)
                      for _ in range(4)]
    q0, k0, v0, dout = cache[key]
    if row["mode"] == "fwd":
        q, k, v = q0, k0, v0
        with torch.no_grad():
            fn = MAKERS[row["impl"]](q, k, v, row["causal"])
            out = fn()

            def bench():
                with torch.no_grad():
                    fn()
    else:
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (q0, k0, v0))
        fn = MAKERS[row["impl"]](q, k, v, row["causal"])

        def bench():
            fn().backward(dout)
        out = fn()
        out.backward(dout)
    sync()
    if row["impl"] != "flash":  # correctness against flash (bf16: loose, just a sanity check)
        with torch.no_grad(), torch.nn.attention.sdpa_kernel(
                torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            ref = torch.nn.functional.scaled_dot_product_attention(q0, k0, v0,
                                                                   is_causal=row["causal"])
        row["max_abs_diff_vs_flash"] = (out.detach().float() - ref.float()).abs().max().item()
        del ref
    del out
    kw = dict(warmup=args.warmup_ms, rep=args.rep_ms)
    if dev == "cuda":
        kw["return_mode"] = "median"
    if row["mode"] == "fwdbwd":
        kw["grad_to_none"] = [q, k, v]
    ms = do_bench(bench, **kw)
    row["ms"] = float(ms)
    row["tflops"] = row["flops"] / (ms * 1e-3) / 1e12


def table(rows, args):
    lines = ["| D | causal | N | B x H | mode | " + " | ".join(f"{i} TFLOP/s" for i in args.impls)
             + " | ours / flash |", "|---:|---|---:|---|---|" + "---:|" * (len(args.impls) + 1)]
    seen = []
    for r in rows:
        k = (r["D"], r["causal"], r["N"], r["mode"])
        if k not in seen:
            seen.append(k)
    for k in seen:
        group = {r["impl"]: r for r in rows if (r["D"], r["causal"], r["N"], r["mode"]) == k}
        cells = []
        for impl in args.impls:
            r = group.get(impl, {})
            cells.append(f"{r['tflops']:.1f}" if "tflops" in r else
                         ("skipped" if r.get("skipped") else "error" if "error" in r else "-"))
        o, f = group.get("ours", {}), group.get("flash", {})
        ratio = f"{o['tflops'] / f['tflops']:.2f}" if "tflops" in o and "tflops" in f else "-"
        any_r = next(iter(group.values()))
        lines.append(f"| {k[0]} | {'yes' if k[1] else 'no'} | {k[2]} | {any_r['B']} x {any_r['H']} "
                     f"| {k[3]} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes", "causal"),
                    nargs="+", default=[False, True], help="e.g. --causal false true")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--impls", nargs="+", default=["ours", "flash", "flex"],
                    choices=list(MAKERS))
    ap.add_argument("--tokens", type=int, default=16384, help="B * N")
    ap.add_argument("--hidden", type=int, default=2048, help="H * D")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="rows not started within this many seconds are skipped")
    ap.add_argument("--json", default=str(HERE / "results" / "gpu_bench.json"))
    ap.add_argument("--dry-run", action="store_true", help="print the plan and FLOPs, no GPU")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke test of this script's logic on the CPU kernels (tiny sizes)")
    args = ap.parse_args(argv)

    rows = plan(args)
    if args.dry_run:
        for r in rows:
            print(f"D={r['D']:3d} causal={r['causal']!s:5s} N={r['N']:5d} B={r['B']:2d} "
                  f"H={r['H']:2d} {r['mode']:6s} {r['impl']:5s} {r['flops'] / 1e12:8.3f} TFLOP")
        print(f"{len(rows)} measurements planned\n{MASK_NOTE}")
        return 0

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (use --dry-run to check the plan)")
        return 2
    import triton
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke test)"
    print(f"{dev_name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"bf16, {args.tokens} tokens/batch, hidden {args.hidden}")
    print(MASK_NOTE, flush=True)
    torch._dynamo.config.recompile_limit = 256
    start, cache = time.perf_counter(), {}
    for r in rows:
        if time.perf_counter() - start > args.budget_s:
            r["skipped"] = "budget"
            continue
        t = time.perf_counter()
        try:
            measure(r, args, cache)
        except Exception as e:  # one failure must not kill the table
            r["error"] = f"{type(e).__name__}: {e}"[:400]
            if not str(e).endswith("skipped"):
                traceback.print_exc(limit=3)
            if args.device == "cuda":
                torch.cuda.empty_cache()
        r["wall_s"] = round(time.perf_counter() - t, 2)
        msg = (f"{r['tflops']:7.1f} TFLOP/s  {r['ms']:8.3f} ms" if "tflops" in r else r["error"][:150])
        diff = f"  diff {r['max_abs_diff_vs_flash']:.1e}" if "max_abs_diff_vs_flash" in r else ""
        print(f"D={r['D']} causal={r['causal']} N={r['N']} {r['mode']} {r['impl']}: {msg}{diff}"
              f"  ({r['wall_s']} s)", flush=True)
    print()
    print(table(rows, args))
    print(f"\nFLOPs: fwd = 4*B*H*N*N*D (halved for causal), fwd+bwd = 3.5x fwd. {MASK_NOTE}")
    n_skip = sum(1 for r in rows if r.get("skipped"))
    if n_skip:
        print(f"{n_skip} measurements skipped: --budget-s {args.budget_s} reached")
    try:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(
            device=dev_name, torch=torch.__version__,
            triton=triton.__version__, argv=sys.argv[1:], rows=rows), indent=1))
        print(f"wrote {args.json}")
    except OSError as e:
        print(f"could not write {args.json}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
