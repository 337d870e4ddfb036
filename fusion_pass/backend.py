"""The ``fusion_pass`` torch.compile backend: run the pass on Dynamo's graph, then Inductor.

    torch.compile(model, backend="fusion_pass", options={...})

Registered through the ``torch_dynamo_backends`` entry point, so no import is needed. The pass
rewrites each provable attention region into ``fusion_pass::attention`` and leaves everything
else untouched; the whole graph then goes to Inductor's ``compile_fx`` exactly as under the
default backend (so a model without attention compiles as it always did).
"""
from __future__ import annotations

import functools
import itertools
import logging
import threading
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from fusion_pass import kernels as _kernels
from fusion_pass.kernels.ops import kernel_summary

from .analyze import analyse
from .effects import erase_orphans
from .expand import closed_call, expand_attention_calls
from .match import NearMiss, attention_like, find_sites, match_site
from .options import Options
from .report import (Explanation, GraphReport, SiteReport, attach_mask_inputs, code_lines, dump,
                     module_path, region_dot)
from .canonicalize import canonicalize_graph, value
from .rewrite import fill_meta, find_fake_mode, no_gradient, rewrite_region

log = logging.getLogger("fusion_pass")


class FusionMissedError(RuntimeError):
    """Raised with ``options={"strict": True}`` when an attention site is not fused."""


_state = threading.local()
_graph_counter = itertools.count()  # names report files of graphs compiled outside explain()


def _sink() -> Optional[List[GraphReport]]:
    return getattr(_state, "sink", None)


def run_pass(gm: fx.GraphModule, index: int = 0, fuse_cpu_decode: bool = False) -> GraphReport:
    """Rewrite every provable attention region of ``gm`` in place, including those inside the
    bodies of higher-order ops (activation checkpointing, ``wrap``); report every softmax site.
    A CPU site of one query row is kept for Inductor unless ``fuse_cpu_decode`` (``_decode_kept``)."""
    report = GraphReport(index=index, code_before=gm.code)
    fake_mode = find_fake_mode(gm)
    _rewrite_graph(gm, report, fake_mode, prefix="", fuse_cpu_decode=fuse_cpu_decode)
    report.code_after = gm.code
    for s in report.sites:
        if s.fused:
            s.after = code_lines(s.code_after or report.code_after, s.after.splitlines())
    return report


# Higher-order ops whose body is plain user code run once per call, so that a rewrite inside it
# computes what the body computed: activation checkpointing (recomputed in the backward by the
# compiler, the fused op with it) and Dynamo's ``wrap``. Other subgraphs (control flow, autograd
# functions with user backward graphs...) are searched and their softmax sites reported, not rewritten.
_REWRITTEN_BODIES = {"tag_activation_checkpoint", "wrap", "invoke_subgraph"}


def _subgraphs(gm: fx.GraphModule):
    """(hop name, attribute name, GraphModule) for each body a higher-order op of ``gm`` calls."""
    seen = set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.HigherOrderOperator):
            continue
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a.target not in seen:
                sub = getattr(gm, a.target, None)
                if isinstance(sub, fx.GraphModule):
                    seen.add(a.target)
                    yield n.target.__name__, a.target, sub


# Why a decoding step on CPU is kept (measured, benchmarks/RESULTS.md "CPU decoding steps": GPT-2's
# buffer and Llama's grouped heads, 12 heads, d 64, 512 and 2048 cached keys, fp32, 2 threads)
_DECODE_REASON = ("kept: one query row on CPU (a decoding step): its scores are one row per head, "
                  "no N x N to avoid, and Inductor's code for the model's own steps runs it ~4x "
                  "faster than the fused op, whose per-call proofs read K and V whole and whose "
                  "dispatch costs more than the step itself (option fuse_cpu_decode=True fuses it)")
# A few query rows against more keys, with no gradient (speculative or chunked decoding against a
# cache, a short decoder prefix cross-attending to an encoder): the scores are at most FEW_ROWS
# rows per head, no larger than K's Nk x d for the head dims models use, so there is no N x N to
# avoid, and the fused op's fixed cost per call (dispatch, the proof's pass over K and V, the
# mask's per-call checks: 0.3-0.5 ms here) is more than Inductor's whole step. Grouped heads
# differ: the model's ``repeat_kv`` copies K and V on every call, which the fused op never does,
# so past FEW_ROWS_GROUPED_KEYS cached keys the fused op wins there (measured: 0.54-0.68x stock's time
# at 4096 keys, 2-16 rows) and a grouped site is kept only below that, with a static key
# length. Measured: benchmarks/RESULTS.md, "Issue 11, seventh session" (cpu_decode.py, 12 heads,
# d 64, fp32, 2 threads).
FEW_ROWS = 16
FEW_ROWS_GROUPED_KEYS = 2048
_FEW_ROWS_REASON = ("kept: {rows} query rows against {keys} keys on CPU with no gradient (a few "
                    "decoding rows against a cache, or a short query cross-attending): at most "
                    f"{FEW_ROWS} rows of scores per head, no N x N to avoid, and Inductor's code for "
                    "the model's own steps runs it faster than the fused op, whose fixed per-call "
                    "cost (dispatch, proofs reading K and V) exceeds the step (option "
                    "fuse_cpu_decode=True fuses it)")
# the same for a site that is one SDPA call: it stays that call, ATen's kernel without the fused
# op's fixed cost (measured: SDPA 0.5-0.6x stock's time on these shapes, the fused op 1.2-3.9x)
_FEW_ROWS_SDPA_REASON = ("kept: {rows} query rows against {keys} keys on CPU with no gradient (a "
                         "few decoding rows against a cache, or a short query cross-attending): "
                         f"at most {FEW_ROWS} rows of scores per head, no N x N to avoid, and the "
                         "SDPA call as written runs ATen's kernel without the fused op's fixed "
                         "per-call cost (dispatch, proofs reading K and V) (option "
                         "fuse_cpu_decode=True takes it)")


def _decode_kept(res) -> Optional[str]:
    """Why a CPU site is kept for Inductor, or None (fuse it). One query row, the static integer 1
    (Dynamo specialises a size of 1, so every decoding graph has it): always. A few rows (a static
    query length of at most ``FEW_ROWS``) against a longer or symbolic key length, where no input
    requires a gradient; with grouped heads only against a static key length of at most
    ``FEW_ROWS_GROUPED_KEYS``. The example values say (the output's rows, v's keys)."""
    out = value(res.region.pv)
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.device.type != "cpu":
        return None
    rows = out.shape[-2]
    if not isinstance(rows, int):
        return None
    if rows == 1:
        return _DECODE_REASON
    v = value(res.region.v)  # (..., Nk, dv): the key length for every region, SDPA calls included
    keys = v.shape[-2] if isinstance(v, torch.Tensor) and v.dim() >= 2 else None
    static = isinstance(keys, int)
    if keys is None or not 2 <= rows <= FEW_ROWS or static and keys <= rows:
        return None
    if res.region.group > 1 and not (static and keys <= FEW_ROWS_GROUPED_KEYS):
        return None
    if not no_gradient(res):
        return None
    text = _FEW_ROWS_SDPA_REASON if res.region.sdpa is not None else _FEW_ROWS_REASON
    return text.format(rows=rows, keys=keys if static else f"a symbolic number ({keys}) of")


def _rewrite_graph(gm: fx.GraphModule, report: GraphReport, fake_mode, prefix: str,
                   fuse_cpu_decode: bool = False) -> None:
    code_before = gm.code
    opened, closed, recorded = expand_attention_calls(gm, fake_mode)
    for c in closed:
        report.sites.append(SiteReport(prefix + c.node.name, False, c.reason, prefix + c.node.name,
                                       True, module=module_path(c.node), kept=c.kept))
        log.info("site %s not fused: %s", report.sites[-1].label, c.reason)
    if recorded:
        # what the opened body computes that nothing reads (the attention weights a caller drops)
        # goes now, or the softmax would look read outside its region
        erase_orphans(gm.graph, [n for n in recorded if not n.users])
    canon = canonicalize_graph(gm, lambda n: fill_meta(n, fake_mode))
    canon = [*opened, *canon]
    report.canonicalized += [prefix + c for c in canon]
    if canon:
        gm.recompile()
        code_before = gm.code
        if not prefix:
            report.code_before = code_before
    had_users = {n for n in gm.graph.nodes if n.users}
    fused_here = []
    for softmax in find_sites(gm):
        site = prefix + softmax.name
        m = match_site(softmax)
        res = analyse(m) if not isinstance(m, NearMiss) else m
        if isinstance(res, NearMiss):
            report.sites.append(SiteReport(site, False, res.reason, prefix + res.node, res.attention_like,
                                           module=module_path(softmax), kept=res.kept))
            log.info("site %s not fused: %s", report.sites[-1].label, res)
            continue
        kept = None if fuse_cpu_decode else _decode_kept(res)
        if kept:
            report.sites.append(SiteReport(site, False, kept, prefix + res.region.pv.name,
                                           True, module=module_path(softmax), kept=True))
            log.info("site %s not fused: %s", report.sites[-1].label, kept)
            continue
        before = code_lines(code_before, [n.name for n in res.region.nodes])
        dot = region_dot(site, res.region.nodes)
        old = set(gm.graph.nodes)
        rewrite_region(gm, res, fake_mode)
        new = [n.name for n in gm.graph.nodes if n not in old]
        sr = SiteReport(site, True, spec=res.spec, before=before, after="\n".join(new),
                        kernels=kernel_summary(res.spec), dot=dot, masks=list(res.masks or []),
                        module=module_path(softmax),
                        dot_after=region_dot(site, [n for n in gm.graph.nodes if n not in old]))
        report.sites.append(sr)
        fused_here.append(sr)
        log.info("site %s fused: %s", sr.label, res.spec)
    if fused_here:
        # masks now read as predicates leave their construction unused: erase what the rewrites
        # orphaned and nothing else (FX's eliminate_dead_code would also erase in-place method
        # calls whose result is unused, i.e. the model's mutations)
        erase_orphans(gm.graph, [n for n in gm.graph.nodes if n in had_users and not n.users])
    gm.graph.lint()
    gm.recompile()
    if prefix:
        for sr in fused_here:
            sr.code_after = gm.code
    for hop, attr, sub in _subgraphs(gm):
        sub_prefix = f"{prefix}{attr}."
        if hop in _REWRITTEN_BODIES:
            _rewrite_graph(sub, report, fake_mode, sub_prefix, fuse_cpu_decode)
        else:
            for softmax in find_sites(sub):
                report.sites.append(SiteReport(
                    sub_prefix + softmax.name, False,
                    f"inside the body of {hop}, which the pass does not rewrite",
                    sub_prefix + softmax.name, attention_like(softmax), module=module_path(softmax)))
            for n in sub.graph.nodes:
                name = closed_call(n)
                if name is not None:
                    report.sites.append(SiteReport(
                        sub_prefix + n.name, False,
                        f"{name} inside the body of {hop}, which the pass does not rewrite",
                        sub_prefix + n.name, True, module=module_path(n)))


def fusion_pass_backend(gm: fx.GraphModule, example_inputs, options: Optional[Mapping[str, Any]] = None,
                        mode: Optional[str] = None) -> Callable:
    """The backend Dynamo calls (``backend="fusion_pass"``); torch passes ``options`` and ``mode``
    of ``torch.compile`` as keywords. ``Backend(...)`` below is the same with options bound."""
    opts = Options.parse(options)
    if opts.enable:
        sink = _sink()
        report = run_pass(gm, index=len(sink) if sink is not None else next(_graph_counter),
                          fuse_cpu_decode=opts.fuse_cpu_decode)
        if sink is not None:
            sink.append(report)
        if sink is not None or opts.dump:
            attach_mask_inputs(gm, example_inputs, report.sites)
        if opts.report:
            Explanation([report]).write(opts.report)
        if opts.dump:
            dump(Explanation([report]), opts.dump)
        missed = [s for s in report.sites if not s.fused and s.attention_like and not s.kept]
        if opts.strict and missed:
            raise FusionMissedError("fusion_pass (strict): attention site(s) not fused:\n"
                                    + "\n".join(f"  {s.label}: {s.reason} (at node {s.node})"
                                                for s in missed))
    if not opts.inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx
    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    # our joint-graph pre-pass: carries our source hash into Inductor's cache key and keeps
    # Inductor's own attention patterns off this compile (see _OwnAttention)
    patches["joint_custom_pre_pass"] = _OwnAttention(torch._inductor.config.joint_custom_pre_pass)
    return compile_fx(gm, example_inputs, config_patches=patches)


class Backend:
    """The backend with its options bound, validated here (a ``ValueError`` now, not at the first
    call), composable with every ``torch.compile`` argument::

        fast = torch.compile(model, backend=fusion_pass.Backend(strict=True, report="out/"),
                             mode="max-autotune", dynamic=True)

    torch passes ``mode=`` (and ``options=``, which override these) on to a callable backend;
    ``Backend(mode=...)`` sets Inductor's mode for callers that cannot. Two ``Backend`` with the
    same options compare equal, so Dynamo reuses what one compiled for the other."""

    def __init__(self, *, mode: Optional[str] = None, **options: Any):
        from .options import validate, validate_mode
        self.mode = validate_mode(mode)
        self.options = validate(options)
        Options(**self.options)

    def __call__(self, gm: fx.GraphModule, example_inputs, options: Optional[Mapping[str, Any]] = None,
                 mode: Optional[str] = None) -> Callable:
        from .options import validate
        if mode is not None and self.mode is not None and mode != self.mode:
            raise ValueError(f"fusion_pass: mode {self.mode!r} given to Backend and {mode!r} to "
                             "torch.compile; give one")
        return fusion_pass_backend(gm, example_inputs, options={**self.options, **validate(options)},
                                   mode=mode or self.mode)

    def _key(self):
        return (self.mode, tuple(sorted(self.options.items())))

    def __eq__(self, other):
        return isinstance(other, Backend) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        args = [f"mode={self.mode!r}"] if self.mode else []
        args += [f"{k}={v!r}" for k, v in sorted(self.options.items())]
        return f"fusion_pass.Backend({', '.join(args)})"


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """Hash of this package's source (pass and kernels): part of Inductor's cache key, so a change
    to a fake implementation or a kernel never reuses code compiled against the old one."""
    roots = [Path(__file__).parent, Path(_kernels.__file__).parent]
    files = tuple(str(f) for root in roots for f in sorted(root.rglob("*.py")))
    # Inductor's own helper for hashing files; the names go in too (a renamed file is a change)
    return get_hash_for_files(files, extra="\n".join(Path(f).name for f in files)).hex()


class _OwnAttention(CustomGraphPass):
    """Inductor's joint-graph pre-pass for our compiles only (a scoped config patch, never global).

    fusion_pass owns attention in the graphs it compiles: Inductor's ``fuse_attention`` patterns
    (``_sfdp_pattern_*``) would otherwise still run afterwards, also on the regions the pass refused,
    and one of them rewrites a softmax over the *query* dim into SDPA, which normalises over keys
    (pytorch #196468: a wrong result, not a missed speed-up). This pass runs after Inductor has
    registered its patterns and before it applies them; it wraps each attention pattern's check
    (once per process) so that it declines whenever the compile in progress is one of ours, which
    it tells from this very config entry. Every other pattern and pass of Inductor runs as usual.
    A user's own pre-pass is kept and called first. ``uuid`` adds our source hash to the cache key
    (Inductor's ``CustomGraphPass`` protocol), so a kernel or fake change never reuses old code."""

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, graph):
        _decline_inductor_attention_patterns()
        if self.inner is not None:
            return self.inner(graph)
        return None

    def uuid(self):
        inner = None
        if self.inner is not None:
            inner = self.inner.uuid() if hasattr(self.inner, "uuid") else None
            if inner is None:
                return None  # a user pass without a uuid: Inductor then bypasses its cache
        return "fusion_pass-" + source_hash() + (f"+{inner}" if inner is not None else "")


def _ours_in_progress() -> bool:
    return isinstance(torch._inductor.config.joint_custom_pre_pass, _OwnAttention)


def _is_inductor_attention_pattern(entry) -> bool:
    name = getattr(entry, "pattern_name", None) or ""
    if name.startswith("_sfdp"):
        return True
    check = getattr(entry, "extra_check", None)
    for cell in getattr(check, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:
            continue
        if getattr(v, "__module__", "").endswith("fx_passes.fuse_attention"):
            return True
    return False


def _decline_inductor_attention_patterns() -> None:
    from torch._inductor.fx_passes import joint_graph

    for entries in joint_graph.patterns.patterns.values():
        for e in entries:
            check = getattr(e, "extra_check", None)
            if check is None or getattr(check, "_fusion_pass_wrapped", False):
                continue
            if not _is_inductor_attention_pattern(e):
                continue

            def declining(match, _check=check):
                return not _ours_in_progress() and _check(match)

            declining._fusion_pass_wrapped = True
            e.extra_check = declining


class collect_reports:
    """Context manager: gather the ``GraphReport`` of every graph the backend compiles inside it."""

    def __enter__(self) -> List[GraphReport]:
        self._prev = _sink()
        _state.sink = []
        return _state.sink

    def __exit__(self, *exc):
        _state.sink = self._prev
        return False
