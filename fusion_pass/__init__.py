"""fusion_pass: a torch.compile backend that fuses every provable attention of an unmodified model.

    fast = torch.compile(model, backend="fusion_pass")
    print(fusion_pass.explain(model, *inputs))

The road (one direction): canonicalize -> match -> analyze -> rewrite (this package), then the
kernels (``fusion_pass.kernels``) generated from each site's ``AttentionSpec``; ``report`` says
what happened at every softmax site.
"""
from __future__ import annotations

import torch

from .backend import FusionMissedError, collect_reports, fusion_pass_backend, run_pass  # noqa: F401
from .options import Options  # noqa: F401
from .report import Explanation, GraphReport, SiteReport  # noqa: F401

__version__ = "0.1.0"


def explain(model, *args, dynamic=None, **kwargs) -> Explanation:
    """Run ``model(*args, **kwargs)`` through Dynamo and the pass (without Inductor) and return
    what happened at every softmax site: fused or not, why, the spec, the code before and after."""
    def backend(gm, example_inputs):
        return fusion_pass_backend(gm, example_inputs, options={"inductor": False})

    with collect_reports() as reports:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, dynamic=dynamic)
        compiled(*args, **kwargs)
    torch._dynamo.reset()
    return Explanation(list(reports))

