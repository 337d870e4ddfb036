"""Which kernel runs a spec: the candidates that compute it exactly, and the choice among them.

One definition of the routing (STYLE 13): ``ops.attention`` and ``ops.attention_backward``
dispatch through ``route(spec)`` and ``pick``, and the report prints ``route(spec).describe()``
(with any choices measured so far). Kernels:

* ``triton``: the generated Triton kernels (CUDA; ``triton_attention.supports`` decides per call);
* ``aten_flash``: ATen's CPU flash kernel, for specs whose normalised form is its function
  (``cpu_flash.plan``), per call only where ``cpu_flash.usable`` / ``rows_ok`` prove it exact;
* ``tiled``: the tiled implementation (``cpu.py``), every spec on every device;
* ``flex``: FlexAttention's compiled CPU kernel (``cpu_flex.py``), forward only: for specs the
  rewrite proved ``inference``, and for training specs ATen's kernel does not serve (their
  backward is the tiled path's, which does not read the forward's lse); last in the static order
  (it compiles for seconds on a spec's first call), so it runs only where a measurement chose it.

**Measured choice.** Where more than one kernel is exact for a call, the first call of a
(spec, shape bucket, dtype, device, direction) runs each candidate once on the call's own inputs,
keeps the faster, and caches the choice in memory and on disk (``cache_path()``: a small JSON under
``$FUSION_PASS_CACHE_DIR``, else ``$TORCHINDUCTOR_CACHE_DIR/fusion_pass``, else
``~/.cache/fusion_pass``), keyed with a hash of the kernels' sources and the torch version, so an
edited kernel is measured again. Measuring costs one run of the losing candidate, on the first call
only (its result is the winner's run, not recomputed); later calls look the choice up in a dict.
Small problems (``MEASURE_MIN_ELEMENTS``) and ``FUSION_PASS_MEASURE=0`` use the static preference
order instead (``aten_flash`` before ``tiled``: 2-3x faster wherever both ran, RESULTS.md).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from . import cpu_flash, cpu_flex, removal
from .spec import AttentionSpec

# below this many score elements per (batch, head) (Nq * Nk) a choice is not worth a measurement
# and the static order applies: the checks and Python around either kernel dominate there
MEASURE_MIN_ELEMENTS = 1 << 20
# the measured winner replaces the static first choice only when clearly faster (a shared machine
# makes one timing noisy; a wrong choice would be cached)
MARGIN = 0.85

NAMES = {"triton": "generated Triton kernels", "aten_flash": "ATen flash kernel",
         "tiled": "tiled implementation", "flex": "FlexAttention (compiled, CPU, forward)"}


@dataclass(frozen=True)
class Route:
    """A spec's candidates per device, in static preference order, and ATen's plan for it."""

    cpu: Tuple[str, ...]
    cuda: Tuple[str, ...]
    plan: Optional[cpu_flash.Plan]
    causal_skip: bool      # the tiled path may skip keys j > i (removal rule, per call and row)
    span_skip: bool        # the tiled path skips the keys no row of a query block keeps
    rule: str              # the removal rule in words ("" when nothing is skipped)
    biases: bool
    form: str = ""         # how ATen's kernel takes the mask (cpu_flash.mask_form)

    def describe(self, spec_key: Optional[str] = None) -> str:
        """The routing in words, for the report (with the choices measured so far for the spec)."""
        p = self.plan
        if p is None:
            cpu = "tiled implementation"
        else:
            how = [self.form] if self.form else []
            if p.finite_fill:
                how.append(f"the fill {p.fill!r} dropped only where the removal rule proves it exact")
            cpu = ("ATen flash kernel" + (f" ({'; '.join(how)})" if how else "")
                   + "; the tiled implementation for calls it does not compute exactly (rows with no "
                     "key, inputs or scores that are not finite, rows failing the removal rule, "
                     "bias gradients)")
            if len(self.cpu) > 1:
                cpu += ("; where both are exact the faster is measured once per shape bucket "
                        "and cached")
        if "flex" in self.cpu:
            cpu += ("; FlexAttention's compiled CPU kernel for the forward where measured faster "
                    "and exact for the call (inputs and scores finite, every row keeping a key; a "
                    "BlockMask where the removal rule holds)")
        if self.span_skip:
            cpu += "; the tiled implementation skips the keys no row of a query block keeps"
        rule = f"; {self.rule}" if self.rule else ""
        measured = describe_choices(spec_key) if spec_key else ""
        measured = f"; measured: {measured}" if measured else ""
        if self.biases:
            return (f"tiled implementation on every device, computing the bias from the indices per "
                    f"tile (no Triton kernel takes biases yet)"
                    f"{'; it skips the keys no row of a query block keeps' if self.span_skip else ''}"
                    f"{rule}{measured}")
        return f"CUDA: generated Triton kernels; CPU: {cpu}{rule}{measured}"


# ATen's mask forms (``cpu_flash.mask_form``) under which FlexAttention is no candidate: no mask
# tensor, so ATen's kernel reads only q, k, v and skips the blocks above the diagonal itself.
# Measured here (torch 2.13, 2 threads, fp32, B=1, ``benchmarks/RESULTS.md``, "Issue 11, fourth
# session"): FlexAttention with its causal BlockMask took
# 1.18 / 1.33 / 1.52x ATen's is_causal time at N = 1024 / 2048 / 4096 (H=12, d=64), 1.31-1.34x
# with grouped heads (12 / 2), 1.17-1.24x at d=128, 1.04-1.19x at d=256, 1.05x at d=512; plain
# (no mask) 1.3-2.4x. Where ATen needs a mask tensor (padding, a bias) both are measured.
FLEX_DOMINATED = ("", "is_causal")


@functools.lru_cache(maxsize=None)
def route(spec: AttentionSpec) -> Route:
    p = cpu_flash.plan(spec)
    form = cpu_flash.mask_form(spec, p) if p is not None else None
    if form is None:
        p = None
    cpu = ("aten_flash", "tiled") if p is not None else ("tiled",)
    # FlexAttention's CPU kernel: a forward with no lse (NaN). For inference specs; for training
    # specs too where ATen's kernel is no candidate: the backward is then the tiled path's, which
    # recomputes from q, k, v and never reads the forward's lse (ATen's backward needs the lse).
    # Not where ATen's kernel takes the spec with no mask tensor (plain, is_causal): there it
    # lost every measurement (FLEX_DOMINATED), and measuring it would compile it (~10 s on a
    # cold cache) only to lose
    if cpu_flex.plan(spec) is not None and (spec.inference or p is None) and \
            not (p is not None and form in FLEX_DOMINATED):
        cpu += ("flex",)
    cuda = ("tiled",) if spec.biases else ("triton", "tiled")
    return Route(cpu, cuda, p, removal.causal_removal(spec) is not None,
                 removal.skip_removal(spec) is not None, removal.describe(spec), bool(spec.biases),
                 form or "")


@functools.lru_cache(maxsize=64)
def route_of_key(key: str) -> Route:
    return route(AttentionSpec.from_key(key))


# ---------------------------------------------------------------------------------------------
# The measured choice
# ---------------------------------------------------------------------------------------------

def measuring() -> bool:
    return os.environ.get("FUSION_PASS_MEASURE", "1") not in ("0", "false", "False", "off")


def cache_path() -> Path:
    root = os.environ.get("FUSION_PASS_CACHE_DIR")
    if root:
        return Path(root) / "kernel_choices.json"
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    base = Path(inductor) / "fusion_pass" if inductor else Path.home() / ".cache" / "fusion_pass"
    return base / "kernel_choices.json"


@functools.lru_cache(maxsize=None)
def sources_hash() -> str:
    """The kernels' sources and the torch version: a choice measured for other code is void."""
    h = hashlib.sha256(torch.__version__.encode())
    here = Path(__file__).resolve().parent
    for name in ("cpu.py", "cpu_flash.py", "cpu_flex.py", "removal.py", "select.py"):
        h.update((here / name).read_bytes())
    h.update(str(torch.get_num_threads()).encode())
    return h.hexdigest()[:16]


def _bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@functools.lru_cache(maxsize=1024)
def _spec_hash(spec_key: str) -> str:
    return hashlib.sha256(spec_key.encode()).hexdigest()[:16]


def shape_key(direction: str, spec_key: str, q: torch.Tensor, k: torch.Tensor) -> str:
    """(direction, spec, bucketed sizes, dtype, device, layout) as one string."""
    spec_hash = _spec_hash(spec_key)
    batch = math.prod(q.shape[:-2])
    heads_major = q.dim() >= 4 and q.stride(-3) < q.stride(-2)
    return (f"{direction}|{spec_hash}|bh{_bucket(batch)}|q{_bucket(q.shape[-2])}|k{_bucket(k.shape[-2])}"
            f"|d{q.shape[-1]}|{q.dtype}|{q.device.type}|{'hm' if heads_major else 'c'}")


class _Choices:
    """The cached choices: {shape_key: {"kernel": name, "ms": {name: ms}}}, read from disk once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.mem: Dict[str, dict] = {}
        self.loaded = False

    def _load(self):
        if self.loaded:
            return
        self.loaded = True
        try:
            data = json.loads(cache_path().read_text())
        except (OSError, ValueError):
            return
        if data.get("sources") == sources_hash():
            self.mem.update(data.get("choices", {}))

    def get(self, key: str) -> Optional[dict]:
        with self.lock:
            self._load()
            return self.mem.get(key)

    def put(self, key: str, value: dict) -> None:
        with self.lock:
            self._load()
            self.mem[key] = value
            path = cache_path()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"sources": sources_hash(), "choices": self.mem}, indent=1,
                                          sort_keys=True))
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only home: the choice still holds for this process

    def clear(self) -> None:
        with self.lock:
            self.mem.clear()
            self.loaded = False


CHOICES = _Choices()


def pick(key: str, candidates: Dict[str, Callable[[tuple], object]], args: tuple,
         shrink: Optional[Callable[[tuple], Optional[Tuple[tuple, float]]]] = None,
         q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None) -> Tuple[str, object]:
    """(name, result) of the kernel to use for this call. ``candidates`` maps names, in static
    preference order, to functions of ``args`` that run the kernel and return its result, or None
    where it turns out not to compute this call exactly (then the next one runs). With one
    candidate, a small problem, measuring off or nothing to shrink: the first that returns a
    result. Otherwise the cached choice for ``key``, or, on the key's first call, ``_measure``."""
    names = list(candidates)
    q = args[0] if q is None else q
    k = args[1] if k is None else k
    small = q.shape[-2] * k.shape[-2] < MEASURE_MIN_ELEMENTS
    if len(names) > 1 and not small and shrink is not None and measuring():
        chosen = CHOICES.get(key)
        if chosen is None:
            return _measure(key, candidates, args, shrink)
        if chosen["kernel"] in candidates:
            names.remove(chosen["kernel"])
            names.insert(0, chosen["kernel"])
    for name in names:
        got = candidates[name](args)
        if got is not None:
            return name, got
    raise RuntimeError("no kernel computed this call")  # the last candidate (tiled) always does


def _measure(key, candidates, args, shrink):
    """The first candidate runs the call itself, timed (its result is the call's); each other one
    runs once on a slice of the heads (``shrink``: at most 1/8 of them, one batch element) and its
    time is scaled by the work ratio, so a slow candidate costs the first call a fraction of its
    full time (the tiled path under load: 7 s at N = 2048, 30x ATen's); a compiled candidate
    (``warm_first``) runs the whole call, once untimed first, then the faster of two timed runs
    (a single run after its compile has measured 1.5x its steady time). The faster is cached (a
    slice's scaled time must beat the first's by ``MARGIN``); this call keeps the first's result
    (exact either way)."""
    names = list(candidates)
    t = time.perf_counter()
    got = candidates[names[0]](args)
    times = {names[0]: (time.perf_counter() - t) * 1e3}
    if got is None:  # not exact for this call: nothing to compare, nothing cached
        for name in names[1:]:
            res = candidates[name](args)
            if res is not None:
                return name, res
        raise RuntimeError("no kernel computed this call")
    small = shrink(args)
    sub, factor = small if small is not None else (None, 1.0)
    for name in names[1:]:
        # a candidate that cannot be measured here (no slice of the heads, not exact for this
        # call, an error) is left out of the comparison; the others are still compared and cached
        # (re-measuring on every call would run them all each time)
        compiled = getattr(candidates[name], "warm_first", False)
        if not compiled and small is None:
            continue
        call, scale = (args, 1.0) if compiled else (sub, factor)
        try:
            if compiled and candidates[name](call) is None:
                continue  # compiled (untimed), and not exact for this call
            ms, res = math.inf, None
            for _ in range(2 if compiled else 1):  # a compiled kernel is cheap: the faster of two
                t = time.perf_counter()
                res = candidates[name](call)
                ms = min(ms, (time.perf_counter() - t) * 1e3 * scale)
        except Exception:  # noqa: BLE001 - a slice the kernel cannot take: no measurement
            continue
        if res is not None:
            times[name] = ms
    # a slice's time scaled up is an estimate: it must beat the first by MARGIN; a compiled
    # candidate timed on the whole call (the faster of two runs) need only beat it
    whole = {n for n in names[1:] if getattr(candidates[n], "warm_first", False)}
    beat = [n for n in times if n != names[0]
            and times[n] < times[names[0]] * (1.0 if n in whole else MARGIN)]
    best = min(beat, key=times.get) if beat else names[0]
    CHOICES.put(key, {"kernel": best, "ms": {n: round(t, 3) for n, t in times.items()}})
    return names[0], got


def warm_first(fn):
    """Mark a candidate that compiles on its first run: ``_measure`` runs it once untimed before
    timing it (else the compile would be measured as its speed), both on the whole call: it is a
    fast kernel wherever it is a candidate, and a slice of the heads would starve its parallel
    loop (FlexAttention's CPU kernel: 1 of 12 heads ran 2-3x slower per head)."""
    fn.warm_first = True
    return fn


def head_slice(q, k, v, captured, kinds, like_q=(), like_lse=()):
    """((q, k, v, captured, *like_q, *like_lse) restricted to one batch element and at most 1/8 of
    the heads (whole GQA groups), work ratio) for measuring; None below 4 heads or 3 dims."""
    if q.dim() < 3 or k.shape[-3] == 0 or q.shape[-3] % k.shape[-3]:
        return None
    group = q.shape[-3] // k.shape[-3]
    hk = max(1, k.shape[-3] // 8)
    h = hk * group
    if math.prod(q.shape[:-2]) < 4 * h:
        return None

    def cut(t, heads, at):  # the heads dim is ``at``-th from the right; dims left of it: first
        for d in range(t.dim()):
            back = t.dim() - d
            if back == at and t.shape[d] > 1:
                t = t.narrow(d, 0, min(heads, t.shape[d]))
            elif back > at and t.shape[d] > 1:
                t = t.narrow(d, 0, 1)
        return t

    caps = [cut(c, h, 3) if kind == "tensor" else c for c, kind in zip(captured, kinds)]
    out = (cut(q, h, 3), cut(k, hk, 3), cut(v, hk, 3), caps) + \
        tuple(cut(t, h, 3) for t in like_q) + tuple(cut(t, h, 2) for t in like_lse)
    return out, q.numel() / max(out[0].numel(), 1)


def describe_choices(spec_key: str) -> str:
    """The choices measured for a spec so far, e.g. ``fwd q2048 k2048 float32: aten_flash
    (aten_flash 30.1 ms, tiled 75.3 ms)``."""
    spec_hash = hashlib.sha256(spec_key.encode()).hexdigest()[:16]
    CHOICES.get("")  # loads the disk cache
    out = []
    for key, v in sorted(CHOICES.mem.items()):
        parts = key.split("|")
        if len(parts) < 3 or parts[1] != spec_hash:
            continue
        times = ", ".join(f"{n} {ms:g} ms" for n, ms in v["ms"].items())
        out.append(f"{parts[0]} {' '.join(parts[2:])}: {v['kernel']} ({times})")
    return "; ".join(out)
