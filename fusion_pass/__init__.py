"""fusion_pass: a torch.compile backend that fuses every provable attention of an unmodified model.

    fast = torch.compile(model, backend="fusion_pass")
    fast = torch.compile(model, backend=fusion_pass.Backend(strict=True), mode="max-autotune")
    print(fusion_pass.explain(model, *inputs))

The road (one direction): canonicalize -> match -> analyze -> rewrite (this package), then the
kernels (``fusion_pass.kernels``) generated from each site's ``AttentionSpec``; ``report`` says
what happened at every softmax site.
"""
from __future__ import annotations

import inspect

import torch

from .backend import Backend, FusionMissedError, collect_reports, fusion_pass_backend, run_pass  # noqa: F401
from .options import Options, configure, configured  # noqa: F401
from .report import Explanation, GraphReport, SiteReport  # noqa: F401

__version__ = "0.1.0"


def explain(model, *args, dynamic=None, **kwargs) -> Explanation:
    """Run ``model(*args, **kwargs)`` through Dynamo and the pass (without Inductor) and return
    what happened at every softmax site: fused or not, why, the spec, the code before and after.

    What the user compiled elsewhere is left alone (no ``torch._dynamo.reset()``): this compile
    keeps its cache entries apart from everyone else's (``isolate_recompiles``), and afterwards
    drops them from every code object that holds no one else's. ``dynamic=None`` traces static
    shapes first, as a fresh process would, whatever shapes other compiles of the model saw."""
    # every option given: a configure() block's apply here only where they change what is fused
    # (``fuse_cpu_decode``), not its report folders or strict
    opts = Options(inductor=False, fuse_cpu_decode=configured().get("fuse_cpu_decode", False))

    def backend(gm, example_inputs):
        return fusion_pass_backend(gm, example_inputs, options=opts)

    if not _can_isolate():  # an older torch: the old way, which resets every compiled model
        with collect_reports() as reports:
            torch._dynamo.reset()
            torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
        torch._dynamo.reset()
        return Explanation(list(reports))

    ctx = torch._dynamo.optimize(backend, dynamic=False if dynamic is None else dynamic,
                                 isolate_recompiles=True)
    try:
        with collect_reports() as reports:
            ctx(model)(*args, **kwargs)
    finally:
        _drop_entries(ctx._isolate_recompiles_id)
    return Explanation(list(reports))


def _can_isolate() -> bool:
    try:
        return "isolate_recompiles" in inspect.signature(torch._dynamo.eval_frame._optimize).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def _drop_entries(region: int) -> None:
    """Free explain's compiled entries where only explain compiled: a code object whose every
    cache entry is in ``region`` is reset (which frees them); one that also holds the user's
    entries keeps ours, apart in their region, never looked up again."""
    try:
        from torch._dynamo import convert_frame
        from torch._dynamo.eval_frame import _get_cache_entries_for_region, _get_total_cache_entry_count
        for ref in list(convert_frame.input_codes.seen):
            code = ref()
            if code is None:
                continue
            ours = len(_get_cache_entries_for_region(code, region))
            if ours and ours == _get_total_cache_entry_count(code):
                torch._C._dynamo.eval_frame.reset_code(code)
    except Exception:  # noqa: BLE001 - Dynamo internals moved: the entries stay, isolated
        pass
