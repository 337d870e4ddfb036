"""Masks, the predicate type: what the analysis hands on (``MaskPredicate``) or why not
(``NearMissReason``).

A ``MaskPredicate`` holds ``keep`` (a sympy Boolean over the score axes, size symbols and data
atoms), for additive masks the kept and masked values, and the data nodes its atoms read; it can
classify itself (``classify.py``), evaluate itself densely and per tile (``evaluate.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import sympy
import torch
import torch.fx as fx

from .classify import MaskClass, classify
from .evaluate import _eval, block_sparsity
from .symbols import _bind_sizes, _has_data, _merge_sizes, _uses

class NearMissReason(str):
    """Why a mask was not read as a predicate: ``"<node>: <text>"``; ``.node`` is the node's name."""

    def __new__(cls, node, text: str):
        name = node.name if isinstance(node, fx.Node) else str(node)
        s = super().__new__(cls, f"{name}: {text}")
        s.node = name
        s.text = text
        return s

@dataclass
class MaskPredicate:
    keep: Any                              # sympy Boolean over axes, size symbols and data atoms
    kind: str                              # "bool": keep == mask element; "additive": see below
    axes: Tuple[sympy.Symbol, ...]         # the score axes, left to right (b, h, i, j for 4-D scores)
    data: Tuple[fx.Node, ...] = ()         # tensors read by the data atoms, in the order of ``funcs``
    funcs: Tuple[Any, ...] = ()            # sympy functions d_<node>, one per data tensor
    sizes: Dict[Any, Optional[int]] = field(default_factory=dict)  # size symbol -> hint at capture
    dtype: Optional[torch.dtype] = None    # the mask's dtype
    kept_value: Optional[float] = None     # additive: the mask's value where keep (0.0 or -0.0)
    masked_value: Optional[float] = None   # additive: the value everywhere else
    node: Optional[fx.Node] = None

    def __str__(self):
        extra = f", masked={self.masked_value}" if self.kind == "additive" else ""
        return f"MaskPredicate({self.kind}: {self.keep}{extra})"

    def exact_below(self) -> float:
        """additive: s + masked_value == masked_value (in ``dtype``, round to nearest) for every finite
        |s| below this; -inf absorbs every finite s. With finfo(float32).min it is 2**103."""
        m = self.masked_value
        if m is None:
            return 0.0
        if m == -math.inf:
            return math.inf
        t = torch.tensor(m, dtype=self.dtype)
        gap = (torch.nextafter(t, torch.zeros_like(t)) - t).abs().item()  # spacing toward zero
        return gap / 2  # strictly below half a spacing the sum rounds back to m

    def structural(self):
        """The conjunction of the data-free conjuncts of ``keep`` (keep == structural & data part)."""
        return sympy.And(*[c for c in sympy.And.make_args(self.keep) if not _has_data(c)])

    def data_part(self):
        return sympy.And(*[c for c in sympy.And.make_args(self.keep) if _has_data(c)])

    def classify(self) -> "MaskClass":
        return classify(self.keep)

    def evaluate(self, shape: Sequence[int], sizes: Optional[Dict] = None,
                 data: Optional[Dict[fx.Node, torch.Tensor]] = None) -> torch.Tensor:
        """The dense boolean keep-mask of the score ``shape`` (concrete ints): ``sizes`` binds size
        symbols (by symbol or name; hints by default), ``data`` the data nodes' tensors."""
        expr = _bind_sizes(self.keep, self.sizes, sizes)
        grids = {}
        for k, (ax, n) in enumerate(zip(self.axes, shape)):
            g = np.arange(int(n)).reshape([-1 if d == k else 1 for d in range(len(shape))])
            grids[ax] = g
        arrays = {}
        for f, node in zip(self.funcs, self.data):
            if data is None or node not in data:
                if _uses(expr, f):
                    raise ValueError(f"evaluate needs the tensor of data node {node.name}")
                continue
            t = data[node]
            # the predicate's integers are exact: data of a narrow dtype is widened before any
            # arithmetic (numpy would wrap uint8 1 - d, or refuse it)
            arrays[f] = t.detach().cpu().to(torch.int64).numpy()
        out = _eval(expr, grids, arrays)
        return torch.from_numpy(np.broadcast_to(np.asarray(out, dtype=bool), tuple(int(n) for n in shape)).copy())

    def block_sparsity(self, block_m: int, block_n: int, n_q: int, n_k: int,
                       sizes: Optional[Dict] = None, batch: Optional[Dict] = None) -> np.ndarray:
        return block_sparsity(self.structural(), block_m, block_n, n_q, n_k,
                              sizes=_merge_sizes(self.sizes, sizes), batch=batch)

def is_causal(pred) -> Optional[Any]:
    """The offset o when the structural part of the predicate is exactly j <= i + o (o may be a size
    expression, e.g. past_len), else None. Data conjuncts (padding) are allowed alongside."""
    keep = pred.structural() if isinstance(pred, MaskPredicate) else \
        sympy.And(*[c for c in sympy.And.make_args(pred) if not _has_data(c)])
    cl = classify(keep)
    return cl.causal_offset if cl.kinds == ("causal",) else None


def sliding_window(pred) -> Optional[Tuple[Any, Any]]:
    """(lo, hi) when the structural part is exactly lo <= j - i <= hi (one-sided: hi == 0)."""
    keep = pred.structural() if isinstance(pred, MaskPredicate) else pred
    cl = classify(keep)
    return cl.band if cl.kinds == ("sliding_window",) else None
