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
from typing import Callable

import torch


_T0 = time.perf_counter()


def progress(msg: str, prog: str = "fusion_pass") -> None:
    """One line saying what a long job is doing now, to stderr (the results go to stdout), with
    the seconds since the job started."""
    print(f"[{prog} {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


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


def profile_call(fn: Callable[[], object]):
    """Run fn once under torch.profiler; (peak bytes on CPU as the module docstring defines it,
    {op name: number of calls})."""
    from torch._C._profiler import _EventType

    with quiet_profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
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
    return peak, names


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
