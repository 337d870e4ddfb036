"""Measuring helpers shared by the demo and the benchmarks: median wall time and peak memory.

Peak memory on CPU is read from torch.profiler's allocation events: the running sum of every
allocation torch makes during the call and of the frees of those same blocks (matched by address:
freeing a block that existed before the call does not lower the count); its maximum is the peak
bytes the call held *on top of what was already live* (inputs, weights): the output is included,
the inputs are not. On CUDA, ``torch.cuda.max_memory_allocated`` minus the memory
allocated before the call, which counts the same thing.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch


_T0 = time.perf_counter()


def progress(msg: str, prog: str = "fusion_pass") -> None:
    """One line saying what a long job is doing now, to stderr (the results go to stdout), with
    the seconds since the job started."""
    print(f"[{prog} {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("?" where /proc is missing): benchmarks print it next
    to their numbers, since other jobs on a shared machine slow every implementation."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def site_lines(expl) -> str:
    """An ``Explanation`` in short: its summary, then one line per site (fused with its score
    function, or the reason it was not), as the demo and the benchmarks print it."""
    lines = [expl.summary()]
    for s in expl.sites:
        lines.append(f"  {s.label}: {s.status}  "
                     + (f"[{s.spec.score_mod_str()}]" if s.fused else f"({s.reason})"))
    return "\n".join(lines)


def median_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def peak_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return profile_call(fn)[0]


def round_robin(calls: Dict[str, Callable[[], object]], repeats: int,
                before: Optional[Callable[[], object]] = None,
                say: Optional[Callable[[int], object]] = None) -> Dict[str, List[float]]:
    """Wall times in ms of ``repeats`` rounds that call every function of ``calls`` once, in turn
    (a slow phase of a shared machine hits all of them alike). ``before()`` runs, untimed, before
    each call (e.g. clearing gradients); ``say(r)`` before round r (progress lines)."""
    times = {name: [] for name in calls}
    for r in range(repeats):
        if say is not None:
            say(r)
        for name, fn in calls.items():
            if before is not None:
                before()
            times[name].append(median_ms(fn, repeats=1, warmup=0))
    return times


def time_passes(impls: Dict[str, Callable[..., torch.Tensor]], inputs, params, repeats: int, label: str,
                prog: str, **kwargs) -> List[dict]:
    """Each implementation ``f(*inputs, **kwargs)`` timed forward (under ``no_grad``) and forward
    plus backward (gradients of the floating inputs and of ``params``), round-robin, median of
    ``repeats`` rounds, with the peak memory of one more call and its largest difference from the
    first implementation's output. One dict per (pass, implementation); a line each on stdout."""
    rows = []
    for pass_ in ("fwd", "fwd+bwd"):
        args = [x.detach().clone().requires_grad_(pass_ != "fwd" and x.is_floating_point())
                if isinstance(x, torch.Tensor) else x for x in inputs]
        leaves = [x for x in args if isinstance(x, torch.Tensor) and x.requires_grad] + list(params)

        def clear():
            for t in leaves:
                t.grad = None

        def make(f):
            if pass_ == "fwd":
                def call():
                    with torch.no_grad():
                        return f(*args, **kwargs)
            else:
                def call():
                    out = f(*args, **kwargs)
                    out.sum().backward()
                    return out.detach()
            return call
        calls = {name: make(f) for name, f in impls.items()}
        ref, diffs = None, {}
        for name, call in calls.items():
            progress(f"{label} {pass_}: warming up {name}", prog)
            clear()
            out = call()
            call()  # a backward compiles on its first call
            ref = out if ref is None else ref
            diffs[name] = (out - ref).abs().max().item()
        progress(f"{label} {pass_}: timing {repeats} rounds", prog)
        times = round_robin(calls, repeats, before=clear)
        for name, call in calls.items():
            clear()
            rows.append(dict(pass_=pass_, impl=name, ms=statistics.median(times[name]),
                             min_ms=min(times[name]), peak_mib=peak_bytes(call) / 2**20,
                             max_abs_diff=diffs[name]))
            r = rows[-1]
            print(f"  {label} {pass_:8s} {name:7s} {r['ms']:9.1f} ms  peak {r['peak_mib']:8.1f} MiB  "
                  f"diff {r['max_abs_diff']:.1e}", flush=True)
    return rows


def profile_call(fn: Callable[[], object], kernels: bool = False):
    """Run fn once under torch.profiler; (peak bytes on CPU as the module docstring defines it,
    {op name: number of calls}), and with ``kernels`` a third item: which kernel each
    ``fusion_pass`` op ran on (``attention_kernels``; records input shapes, so slightly slower)."""
    from torch._C._profiler import _EventType

    with quiet_profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                       record_shapes=kernels) as prof:
        fn()
    roots = list(prof.profiler.kineto_results.experimental_event_tree())
    stack = list(roots)
    events, names = [], {}
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.ptr))
        else:
            names[e.name] = names.get(e.name, 0) + 1
        stack.extend(e.children)
    events.sort(key=lambda x: x[0])
    live = peak = 0
    ours = {}  # blocks allocated during the call, by address: frees of older blocks don't count
    for _, size, ptr in events:
        if size > 0:
            ours[ptr] = size
            live += size
        elif ptr in ours:
            live -= ours.pop(ptr)
        peak = max(peak, live)
    if kernels:
        return peak, names, attention_kernels(roots)
    return peak, names


_FLASH_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu": (4, 5),  # is_causal, attn_mask
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward": (7, 8)}


def attention_kernels(roots) -> str:
    """Which kernel each ``fusion_pass::attention`` (``fwd``) and ``attention_backward`` (``bwd``)
    call of a profiled run ran on, counted: ``FlexAttention`` (a compiled region inside the op:
    ``kernels/cpu_flex.py``), ``ATen flash`` (with ``is_causal`` and/or ``mask``
    where the call passed them, read from the recorded inputs) when ATen's CPU flash kernel ran
    inside it, ``tiled`` when our tiled implementation's products (``aten::matmul``) ran or nothing
    recognisable did (on CUDA, Triton), ``ATen flash then tiled`` when both ran (rows that failed
    the flash kernel's check, recomputed). E.g.
    ``fwd: ATen flash is_causal x2; bwd: tiled x2``; empty when no fusion_pass op ran. Needs a
    profile taken with ``record_shapes=True``."""
    ops = {"fusion_pass::attention": "fwd", "fusion_pass::attention_backward": "bwd"}
    found: Dict[str, Dict[str, int]] = {"fwd": {}, "bwd": {}}

    def inner(e, acc):
        if e.name == "aten::matmul":  # the tiled implementation's products
            acc.append("tiled")
            return
        if e.name.startswith("Torch-Compiled Region"):  # cpu_flex's compiled FlexAttention call
            acc.append("FlexAttention")
            return
        if e.name in _FLASH_OPS:
            causal_at, mask_at = _FLASH_OPS[e.name]
            args = list(getattr(e.extra_fields, "inputs", []) or [])
            what = "ATen flash"
            if len(args) > causal_at and args[causal_at] is True:
                what += " is_causal"
            if len(args) > mask_at and args[mask_at] is not None:
                what += " mask"
            acc.append(what)
            return
        for c in e.children:
            inner(c, acc)

    def outer(e):
        if e.name in ops:
            acc: List[str] = []
            for c in e.children:
                inner(c, acc)
            acc = list(dict.fromkeys(acc)) or ["tiled"]  # no flash, no matmul: Triton, or empty
            kind = " then ".join(acc)
            d = found[ops[e.name]]
            d[kind] = d.get(kind, 0) + 1
            return  # the op's own dispatcher frames below it are the same call
        for c in e.children:
            outer(c)

    for r in roots:
        outer(r)
    return "; ".join(f"{p}: " + ", ".join(f"{k} x{c}" for k, c in sorted(d.items()))
                     for p, d in found.items() if d)


@contextlib.contextmanager
def quiet_profile(**kwargs):
    """``torch.profiler.profile(**kwargs)`` without Kineto's ``USDT ... profiler_start`` and
    ``profiler_stop`` lines. Kineto writes them to file descriptor 2 from C++ at every log level
    (``KINETO_LOG_LEVEL`` does not silence them), so descriptor 2 goes to /dev/null while the
    profiler starts and stops, and only then; what ``fn`` writes while profiled is kept."""
    prof = torch.profiler.profile(**kwargs)
    with _stderr_fd_silenced():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _stderr_fd_silenced():
            prof.__exit__(None, None, None)


@contextlib.contextmanager
def _stderr_fd_silenced():
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
