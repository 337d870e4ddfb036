"""CPU benchmark of the core attention pattern, as a model writes it, in one run:

    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)   [+ mask]   (variant "mask")
    p = scores.softmax(dim=-1)
    out = torch.matmul(p, v)

B=1, H=12, d=64, fp32, N in --sizes (default 512 1024 2048 4096). Four implementations:

* ``eager``       the module above, run eagerly;
* ``stock``       ``torch.compile(module)`` (default Inductor backend);
* ``ours``        ``torch.compile(module, backend="fusion_pass")``;
* ``sdpa``        ``F.scaled_dot_product_attention`` eagerly (the hand-written anchor).

Two passes: ``fwd`` (under ``torch.no_grad()``) and ``fwd+bwd`` (q, k, v require grad; the output is
back-propagated with a fixed random upstream gradient, drawn once outside the timed call). Both
compiled modules are compiled with ``dynamic=False`` and ``torch._dynamo.reset()`` is called
between sizes, so every size gets its own static graph; compilation happens in the warm-up calls,
which are not timed.

Time: median wall time (``time.perf_counter``) of ``--repeats`` calls after ``--warmup`` calls.
The implementations are timed round-robin (repeat 1 of each, then repeat 2 of each, ...), so a
slow phase of the machine (the other core is shared) hits all of them alike.

Peak memory: one extra call under ``torch.profiler.profile(profile_memory=True)``. Every
allocation and free torch's CPU allocator makes during the call is an event with a signed size
and an address. Events are sorted by time; an allocation adds its size to a running sum, a free
subtracts its size *only if the block was allocated during the call* (matched by address);
frees of blocks that were live before the call are not credited. The reported peak is the
maximum of that running sum: the most bytes allocated *by torch during the call* and live at
once. Included: every intermediate, the output, and (fwd+bwd) the autograd graph's saved
tensors and the gradients of q, k, v. Not included: q, k, v, the mask and the upstream gradient
(allocated before the call; the ``.grad`` of q, k, v is reset to None *before* the call, outside
the profiled region), and memory not allocated through torch's allocator (Python objects,
oneDNN scratch, Inductor's C++ stack buffers). ``selfcheck()`` (run first, every time) verifies
the method on calls of known peak.

Fusion check: the same profiled call of ``ours`` counts ``fusion_pass::attention`` (and, fwd+bwd,
``fusion_pass::attention_backward``) events; a row with zero fused calls is flagged. ``explain``
is also run once per variant and its summary printed.

Correctness: max |x - eager| of the output (fwd) and of dq, dk, dv (fwd+bwd), for every
implementation, computed on the warm-up results.

    python benchmarks/cpu_bench.py                       # full run, variant "scale"
    python benchmarks/cpu_bench.py --variants scale mask
    python benchmarks/cpu_bench.py --variants causal      # GPT-2 style, SDPA anchor is_causal=True
    python benchmarks/cpu_bench.py --variants window --impls eager stock ours sdpa flex
                                                          # Mistral sliding window 256 vs Flex BlockMask
    python benchmarks/cpu_bench.py --quick               # smoke test (small N, 1 repeat)

Results: a markdown table on stdout and a JSON file (``--out``, default
``benchmarks/results/cpu_core.json``; ``--quick`` writes ``cpu_core_quick.json``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion_pass
from fusion_pass.measure import profile_call, progress

HERE = Path(__file__).resolve().parent


class CoreAttention(nn.Module):
    """softmax(q @ k^T / sqrt(d) [+ mask]) @ v, written the way model code writes it."""

    def forward(self, q, k, v, mask=None):
        d = q.shape[-1]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        p = scores.softmax(dim=-1)
        return torch.matmul(p, v)


class CausalAttention(nn.Module):
    """GPT-2 / Llama style (variant "causal"): the causal mask built inside the model from aranges,
    as transformers builds it, added to the scores. Stock Inductor does not recognise it."""

    def forward(self, q, k, v, mask=None):
        n = q.shape[-2]
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(n, device=q.device)[None, :]
        causal = torch.where(j <= i, 0.0, torch.finfo(q.dtype).min)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + causal
        return torch.matmul(scores.softmax(dim=-1), v)


WINDOW = 256


class WindowAttention(nn.Module):
    """Mistral style (variant "window"): a causal sliding window of WINDOW keys, the mask built in
    the model from aranges as transformers builds it, added to the scores."""

    def forward(self, q, k, v, mask=None):
        n = q.shape[-2]
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(n, device=q.device)[None, :]
        keep = (j <= i) & (j > i - WINDOW)
        window = torch.where(keep, 0.0, torch.finfo(q.dtype).min)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + window
        return torch.matmul(scores.softmax(dim=-1), v)


def window_mask(n):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = (j <= i) & (j > i - WINDOW)
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min)


def flex(variant, n):
    """Compiled FlexAttention with the BlockMask of the variant's mask (it skips empty tiles, as
    its users are told to). Forward only: FlexAttention has no CPU backward."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    fa = torch.compile(flex_attention, dynamic=False)
    if variant == "window":
        def mask_mod(b, h, i, j):
            return (j <= i) & (j > i - WINDOW)
    elif variant == "causal":
        def mask_mod(b, h, i, j):
            return j <= i
    else:
        mask_mod = None
    bm = create_block_mask(mask_mod, None, None, n, n, device="cpu") if mask_mod else None
    return lambda q, k, v, mask=None: fa(q, k, v, block_mask=bm)


def sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_causal(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# -- measuring -------------------------------------------------------------------------------------

def selfcheck():
    """The peak method on calls whose peak is known."""
    MiB = 1 << 20

    def known():                              # 8 MiB temp + 4 MiB kept: 12 MiB
        a = torch.empty(2 * MiB)
        b = torch.empty(MiB)
        a.add_(1)
        del a
        return b

    peak, _ = profile_call(known)
    # (a few bytes of slack: ATen wraps the Python scalar of add_ in a small tensor)
    assert abs(peak - 12 * MiB) < 4096, f"peak-memory self-check failed: {peak} B != 12 MiB"
    held = [torch.randn(MiB)]                 # allocated before the call

    def inplace_and_free():                   # in place on an input, then frees it: 0 + 4 MiB
        held[0].mul_(2)
        held.clear()
        return torch.empty(MiB)
    peak, _ = profile_call(inplace_and_free)
    assert abs(peak - 4 * MiB) < 4096, \
        f"peak-memory self-check: a free of a pre-existing block was credited ({peak} B)"


def fused_count(names):
    return sum(c for n, c in names.items() if n.startswith("fusion_pass::attention"))


# -- one size --------------------------------------------------------------------------------------

def make_inputs(n, variant, B=1, H=12, D=64):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    mask = None
    if variant == "window":  # the SDPA anchor gets the materialised window mask
        mask = window_mask(n)
    if variant == "mask":
        # BERT-style extended padding mask: 0 for kept keys, finfo.min for the last eighth
        mask = torch.zeros(B, 1, 1, n)
        mask[..., n - n // 8:] = torch.finfo(torch.float32).min
    grad = torch.randn(B, H, n, D, generator=g)
    return q, k, v, mask, grad


def bench_size(n, variant, args, rows):
    torch._dynamo.reset()
    q0, k0, v0, mask, grad_out = make_inputs(n, variant)
    module = MODULES[variant]()
    impls = {
        "eager": module,
        "stock": torch.compile(module, dynamic=False),
        "ours": torch.compile(module, backend="fusion_pass", dynamic=False),
        "sdpa": sdpa_causal if variant == "causal" else sdpa,
    }
    if "flex" in args.impls:
        impls["flex"] = flex(variant, n)
    repeats = args.repeats if n < 4096 else max(1, min(args.repeats, args.repeats_4096))
    for pass_ in args.passes:
        calls = {}
        for name in args.impls:
            if name == "flex" and pass_ != "fwd":
                continue  # FlexAttention has no CPU backward
            f = impls[name]
            if pass_ == "fwd":
                def prepare():
                    pass

                def call(f=f):
                    with torch.no_grad():
                        return f(q0, k0, v0, mask)
            else:
                q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))

                def prepare(q=q, k=k, v=v):
                    q.grad = k.grad = v.grad = None

                def call(f=f, q=q, k=k, v=v):
                    out = f(q, k, v, mask)
                    out.backward(grad_out)
                    return out.detach(), q.grad, k.grad, v.grad
            calls[name] = (prepare, call)

        # warm-up (the first call compiles) and correctness against eager
        ref, rs = None, {}
        for name, (prepare, call) in calls.items():
            progress(f"{variant} N={n} {pass_}: {'compiling' if name in ('stock', 'ours', 'flex') else 'warming up'}"
                     f" {name} ({args.warmup} untimed call(s))", "cpu_bench")
            row = rs[name] = dict(variant=variant, N=n, pass_=pass_, impl=name, repeats=repeats,
                                  all_ms=[])
            try:
                prepare()
                t = time.perf_counter()
                res = call()
                row["first_call_s"] = time.perf_counter() - t
                for _ in range(args.warmup - 1):
                    prepare()
                    call()
                res = res if isinstance(res, tuple) else (res,)
                if name == "eager":
                    ref = res
                if ref is not None:
                    row["max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(res, ref))
                del res
            except Exception as e:  # one failure must not kill the table
                row["error"] = f"{type(e).__name__}: {e}"[:300]
        ref = None
        # timing, round-robin over the implementations
        progress(f"{variant} N={n} {pass_}: timing {repeats} round(s) of {', '.join(calls)}", "cpu_bench")
        for _ in range(repeats):
            for name, (prepare, call) in calls.items():
                if "error" in rs[name]:
                    continue
                try:
                    prepare()
                    t = time.perf_counter()
                    call()
                    rs[name]["all_ms"].append((time.perf_counter() - t) * 1e3)
                except Exception as e:
                    rs[name]["error"] = f"{type(e).__name__}: {e}"[:300]
        # peak memory (and, for ours, the fused-op count) of one more call
        progress(f"{variant} N={n} {pass_}: peak memory, one profiled call each", "cpu_bench")
        for name, (prepare, call) in calls.items():
            row = rs[name]
            if "error" in row:
                rows.append(row)
                print(f"  {variant} N={n} {pass_:7s} {name:5s} {row['error']}", flush=True)
                continue
            try:
                row["ms"] = statistics.median(row["all_ms"])
                row["min_ms"] = min(row["all_ms"])
                prepare()
                peak, names = profile_call(call)
                row["peak_bytes"] = peak
                if name == "ours":
                    row["fused_calls"] = fused_count(names)
                    row["fused_ops"] = {k_: c for k_, c in names.items()
                                        if k_.startswith("fusion_pass::")}
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(f"  {variant} N={n} {pass_:7s} {name:5s} "
                  + (f"{row['ms']:9.1f} ms  peak {row['peak_bytes'] / 2**20:8.1f} MiB"
                     f"  diff {row.get('max_abs_diff', float('nan')):.1e}"
                     + (f"  fused calls {row['fused_calls']}" if name == "ours" else "")
                     if "error" not in row else row["error"]), flush=True)


# -- report ----------------------------------------------------------------------------------------

LABEL = {"eager": "eager", "stock": "stock torch.compile", "ours": "fusion_pass",
         "sdpa": "SDPA (eager)", "flex": "FlexAttention (compiled, BlockMask)"}
MODULES = {}


def table(rows):
    out = ["| variant | N | pass | implementation | median ms | time / stock | time / SDPA | "
           "time / Flex | min ms | min / stock | peak MiB | peak / SDPA | peak / Flex | "
           "max abs diff vs eager | fused ops |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def find(r, impl):
        return next((x for x in rows if x["variant"] == r["variant"] and x["N"] == r["N"]
                     and x["pass_"] == r["pass_"] and x["impl"] == impl and "error" not in x), None)

    def ratio(a, b, key):
        return f"{a[key] / b[key]:.2f}" if b and b.get(key) else "-"

    for r in rows:
        if "error" in r:
            out.append(f"| {r['variant']} | {r['N']} | {r['pass_']} | {LABEL[r['impl']]} | "
                       f"error: {r['error'][:80]} | | | | | | | | | | |")
            continue
        stock, sd, fx = find(r, "stock"), find(r, "sdpa"), find(r, "flex")
        fused = ""
        if r["impl"] == "ours":
            fused = ", ".join(f"{k.split('::')[1]} x{c}" for k, c in sorted(r["fused_ops"].items()))
            fused = fused or "**none: not fused**"
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        out.append(f"| {r['variant']} | {r['N']} | {r['pass_']} | {LABEL[r['impl']]} | "
                   f"{r['ms']:.1f} | {ratio(r, stock, 'ms')} | {ratio(r, sd, 'ms')} | "
                   f"{ratio(r, fx, 'ms')} | {r['min_ms']:.1f} | {ratio(r, stock, 'min_ms')} | "
                   f"{r['peak_bytes'] / 2**20:.1f} | {ratio(r, sd, 'peak_bytes')} | "
                   f"{ratio(r, fx, 'peak_bytes')} | {diff} | "
                   f"{fused} |")
    return "\n".join(out)


# time ratios up to this are reported as "within noise": repeats of one kernel on this shared
# 2-core machine spread by 5-10%
NOISE = 1.03


def targets(rows):
    """Issue targets: (a) ours not slower than stock at N >= 1024; (b) peak <= 1.3x SDPA at 4096."""
    lines = []
    idx = {(r["variant"], r["N"], r["pass_"], r["impl"]): r for r in rows if "error" not in r}
    for (variant, n, pass_, impl), r in sorted(idx.items()):
        if impl != "ours":
            continue
        st, sd = idx.get((variant, n, pass_, "stock")), idx.get((variant, n, pass_, "sdpa"))
        fx = idx.get((variant, n, pass_, "flex"))
        anchor, aname = (fx, "Flex") if variant == "window" else (sd, "SDPA") if variant == "causal" \
            else (None, "")
        if anchor:
            rat = r["ms"] / anchor["ms"]
            lines.append(f"(anchor) {variant} N={n} {pass_}: ours {r['ms']:.1f} ms vs {aname} "
                         f"{anchor['ms']:.1f} ms, ratio {rat:.3f} -> "
                         f"{'met' if rat <= 1.0 else 'within noise' if rat <= NOISE else 'NOT met'}"
                         f"; peak ours/{aname} {r['peak_bytes'] / max(anchor['peak_bytes'], 1):.2f}")
        if n >= 1024 and st:
            rat = r["ms"] / st["ms"]
            verdict = ("met" if rat <= 1.0 else f"within noise (<= {NOISE:.2f})" if rat <= NOISE
                       else "NOT met")
            lines.append(f"(a) {variant} N={n} {pass_}: ours {r['ms']:.1f} ms vs stock "
                         f"{st['ms']:.1f} ms (median), ratio {rat:.3f} -> {verdict}; "
                         f"min-of-repeats ratio {r['min_ms'] / st['min_ms']:.3f}")
        if n == 4096 and sd:
            rat = r["peak_bytes"] / sd["peak_bytes"] if sd["peak_bytes"] else float("inf")
            lines.append(f"(b) {variant} N={n} {pass_}: peak ours/SDPA = {rat:.2f} -> "
                         f"{'met' if rat <= 1.3 else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--variants", nargs="+", default=["scale"], choices=["scale", "mask", "causal", "window"])
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--impls", nargs="+", default=["eager", "stock", "ours", "sdpa"],
                    choices=["eager", "stock", "ours", "sdpa", "flex"])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--repeats-4096", type=int, default=5,
                    help="repeats at N >= 4096 (eager fwd+bwd takes seconds there)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls (the first compiles)")
    ap.add_argument("--quick", action="store_true", help="smoke test: N 256 512, 1 repeat")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: "
                    "torch's default)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.repeats_4096, args.warmup = [256, 512], 1, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else HERE / "results" / (
        "cpu_core_quick.json" if args.quick else "cpu_core.json")
    torch._dynamo.config.recompile_limit = 64
    torch.manual_seed(0)

    selfcheck()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, started {started}")

    for variant in args.variants:
        q, k, v, mask, _ = make_inputs(256, variant)
        expl = fusion_pass.explain(MODULES[variant](), q, k, v, mask)
        print(f"explain ({variant}): {expl.summary()}")
        for s in expl.sites:
            print(f"  {s.label}: {s.status}  "
                  + (f"[{s.spec.score_mod_str()}]" if s.fused else f"({s.reason})"))

    rows = []
    t0 = time.perf_counter()
    for variant in args.variants:
        for n in args.sizes:
            bench_size(n, variant, args, rows)
    total = time.perf_counter() - t0

    print()
    print(table(rows))
    print("\n(min ms: the fastest repeat, robust to load from other processes, which only adds "
          "time)")
    print("time / stock < 1: faster than stock torch.compile; peak / SDPA: memory relative to "
          "eager SDPA. Peak = bytes allocated by torch during one call above what was live "
          "before it (inputs excluded, output and gradients included).\n")
    print(targets(rows))
    print(f"\ntotal benchmark time {total:.0f} s")

    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(script="benchmarks/cpu_bench.py", argv=sys.argv[1:], started=started,
                torch=torch.__version__, threads=torch.get_num_threads(),
                cpu=_cpu_model(), total_s=round(total, 1), B=1, H=12, D=64, dtype="float32")
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    sys.path.insert(0, str(HERE))
    from plot import plot_results
    for png in plot_results(out, rows):
        print(f"wrote {png.relative_to(Path.cwd()) if png.is_relative_to(Path.cwd()) else png}")
    bad = [r for r in rows if r["impl"] == "ours" and "error" not in r and not r["fused_calls"]]
    return 1 if bad or any("error" in r for r in rows) else 0


MODULES.update(scale=CoreAttention, mask=CoreAttention, causal=CausalAttention, window=WindowAttention)


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
