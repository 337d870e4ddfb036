"""The ``fusion_pass`` torch.compile backend: run the pass on Dynamo's graph, then Inductor.

    torch.compile(model, backend="fusion_pass", options={...})

Registered through the ``torch_dynamo_backends`` entry point, so no import is needed. The pass
rewrites each provable attention region into ``fusion_pass::attention`` and leaves everything
else untouched; the whole graph then goes to Inductor's ``compile_fx`` exactly as under the
default backend (so a model without attention compiles as it always did).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import threading
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from fusion_pass import kernels as _kernels
from fusion_pass.kernels.ops import kernel_summary

from .analyze import analyse
from .match import NearMiss, find_sites, match_site
from .options import Options
from .report import Explanation, GraphReport, SiteReport, code_lines, dump, region_dot
from .canonicalize import canonicalize_graph
from .rewrite import fill_meta, find_fake_mode, rewrite_region

log = logging.getLogger("fusion_pass")


class FusionMissedError(RuntimeError):
    """Raised with ``options={"strict": True}`` when an attention site is not fused."""


_state = threading.local()
_graph_counter = itertools.count()  # names report files of graphs compiled outside explain()


def _sink() -> Optional[List[GraphReport]]:
    return getattr(_state, "sink", None)


def run_pass(gm: fx.GraphModule, index: int = 0) -> GraphReport:
    """Rewrite every provable attention region of ``gm`` in place; report every softmax site."""
    report = GraphReport(index=index, code_before=gm.code)
    fake_mode = find_fake_mode(gm)
    report.canonicalized = canonicalize_graph(gm, lambda n: fill_meta(n, fake_mode))
    if report.canonicalized:
        gm.recompile()
        report.code_before = gm.code
    for softmax in find_sites(gm):
        site = softmax.name
        m = match_site(softmax)
        res = analyse(m) if not isinstance(m, NearMiss) else m
        if isinstance(res, NearMiss):
            report.sites.append(SiteReport(site, False, res.reason, res.node, res.attention_like))
            log.info("fusion_pass: site %s not fused: %s", site, res)
            continue
        before = code_lines(report.code_before, [n.name for n in res.region.nodes])
        dot = region_dot(site, res.region.nodes)
        old = set(gm.graph.nodes)
        rewrite_region(gm, res, fake_mode)
        new = [n.name for n in gm.graph.nodes if n not in old]
        report.sites.append(SiteReport(site, True, spec=res.spec, before=before, after="\n".join(new),
                                       kernels=kernel_summary(res.spec), dot=dot,
                                       masks=list(res.masks or [])))
        log.info("fusion_pass: site %s fused: %s", site, res.spec)
    if any(site.fused for site in report.sites):
        # masks now read as predicates leave their construction unused
        gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    report.code_after = gm.code
    for s in report.sites:
        if s.fused:
            s.after = code_lines(report.code_after, s.after.splitlines())
    return report


def fusion_pass_backend(gm: fx.GraphModule, example_inputs, options: Optional[Mapping[str, Any]] = None,
                        mode: Optional[str] = None) -> Callable:
    opts = Options.parse(options)
    if opts.enable:
        sink = _sink()
        report = run_pass(gm, index=len(sink) if sink is not None else next(_graph_counter))
        if sink is not None:
            sink.append(report)
        if opts.report:
            Explanation([report]).write(opts.report)
        if opts.dump:
            dump(Explanation([report]), opts.dump)
        missed = [s for s in report.sites if not s.fused and s.attention_like]
        if opts.strict and missed:
            raise FusionMissedError("fusion_pass (strict): attention site(s) not fused:\n"
                                    + "\n".join(f"  {s.site}: {s.reason} (at node {s.node})"
                                                for s in missed))
    if not opts.inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx
    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    if torch._inductor.config.post_grad_custom_post_pass is None:
        patches["post_grad_custom_post_pass"] = _CacheKeyPass()
    return compile_fx(gm, example_inputs, config_patches=patches)


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """Hash of this package's source (pass and kernels): part of Inductor's cache key, so a change
    to a fake implementation or a kernel never reuses code compiled against the old one."""
    h = hashlib.sha256()
    roots = [Path(__file__).parent, Path(_kernels.__file__).parent]
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


class _CacheKeyPass(CustomGraphPass):
    """A no-op post-grad pass whose ``uuid`` carries ``source_hash()`` into Inductor's cache key
    (Inductor's ``CustomGraphPass.uuid`` protocol); set only for our compiles, never globally."""

    def __call__(self, graph):
        return None

    def uuid(self):
        return "fusion_pass-" + source_hash()


class collect_reports:
    """Context manager: gather the ``GraphReport`` of every graph the backend compiles inside it."""

    def __enter__(self) -> List[GraphReport]:
        self._prev = _sink()
        _state.sink = []
        return _state.sink

    def __exit__(self, *exc):
        _state.sink = self._prev
        return False
