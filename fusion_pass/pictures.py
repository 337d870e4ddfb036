"""Pictures for the report (stage 7): each rewrite before and after, and each mask's block map.

* A region picture is one graphviz graph with two clusters, the matched region before the rewrite
  and the nodes that replaced it. Rendered to SVG and PNG by graphviz's ``dot`` when it is
  installed; else to PNG by matplotlib (networkx's layers) when that is installed; else only the
  ``.dot`` text is written, and the caller says so.
* A block map shows, for one (batch, head) slice of one mask at the call's sizes, which
  ``block_m`` x ``block_n`` tiles of the score matrix a kernel computes in full (every element
  kept), computes partly (some kept: the mask is applied inside the tile) or skips (none kept).
  Written as a PNG by a few lines of zlib (no dependency) and as text.
"""
from __future__ import annotations

import math
import re
import struct
import zlib
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

SKIPPED, PARTIAL, FULL = 0, 1, 2
_COLORS = {SKIPPED: (245, 245, 245), PARTIAL: (246, 178, 107), FULL: (31, 119, 180)}
_TEXT = {SKIPPED: ".", PARTIAL: "+", FULL: "#"}
LEGEND = ("tiles: # (blue) every score kept, computed in full; + (orange) partial, the mask applied "
          "inside the tile; . (light grey) no score kept, a tile the kernels skip")


# ---- block maps ---------------------------------------------------------------------------------

def block_classes(keep: torch.Tensor, block_m: int, block_n: int) -> np.ndarray:
    """(ceil(Nq/block_m), ceil(Nk/block_n)) tile classes of a (Nq, Nk) boolean keep matrix."""
    nq, nk = keep.shape
    tq, tk = max(1, math.ceil(nq / block_m)), max(1, math.ceil(nk / block_n))
    padded = torch.zeros(tq * block_m, tk * block_n, dtype=torch.int32)
    counted = torch.zeros_like(padded)
    padded[:nq, :nk] = keep.to(torch.int32)
    counted[:nq, :nk] = 1
    kept = padded.reshape(tq, block_m, tk, block_n).sum(dim=(1, 3))
    total = counted.reshape(tq, block_m, tk, block_n).sum(dim=(1, 3))
    out = np.full((tq, tk), PARTIAL, dtype=np.int8)
    out[(kept == 0).numpy()] = SKIPPED
    out[((kept == total) & (total > 0)).numpy()] = FULL
    return out


def tile_sizes(nq: int, nk: int, block: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """The kernels' 64 x 64 tiles, smaller for short sequences so that a map has 8 tiles a side."""
    if block:
        return block
    return (min(64, max(1, math.ceil(nq / 8))), min(64, max(1, math.ceil(nk / 8))))


def block_map_text(classes: np.ndarray, limit: int = 64) -> str:
    rows = ["".join(_TEXT[int(c)] for c in row[:limit]) + (" ..." if len(row) > limit else "")
            for row in classes[:limit]]
    if len(classes) > limit:
        rows.append(f"... ({len(classes) - limit} more rows of tiles)")
    return "\n".join(rows)


def block_map_png(classes: np.ndarray, path: str, cell: Optional[int] = None) -> str:
    """The tile classes as a PNG: one square per tile, a grid line between tiles."""
    tq, tk = classes.shape
    cell = cell or int(min(32, max(3, 768 // max(tq, tk))))
    h, w = tq * cell + 1, tk * cell + 1
    img = np.full((h, w, 3), 160, dtype=np.uint8)  # grid lines
    for c, rgb in _COLORS.items():
        ys, xs = np.nonzero(classes == c)
        for y, x in zip(ys, xs):
            img[y * cell + 1:(y + 1) * cell, x * cell + 1:(x + 1) * cell] = rgb
    write_png(path, img)
    return path


def write_png(path: str, rgb: np.ndarray) -> None:
    """An (H, W, 3) uint8 image as an 8-bit RGB PNG (zlib and the PNG chunk format, nothing else)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def mask_keep(mask, score_shape: Sequence[int], data: Sequence[Optional[torch.Tensor]],
              batch: int = 0, head: int = 0, rows_per_step: int = 256) -> torch.Tensor:
    """The (Nq, Nk) keep matrix of one ``MaskSpec`` at (batch, head), built a strip of query rows
    at a time (never more than rows_per_step x Nk at once)."""
    from fusion_pass.kernels.predicate import evaluate_keep

    shape = [int(n) for n in score_shape]
    R = len(mask.axes)
    shape = shape[-R:] if R else []
    nq, nk = (shape[-2], shape[-1]) if R >= 2 else (1, 1)
    fixed = {0: batch, 1: head} if R == 4 else ({0: batch} if R == 3 else {})
    strips = []
    for q0 in range(0, nq, rows_per_step):
        q1 = min(nq, q0 + rows_per_step)
        grids = []
        for ax in range(R):
            if ax in fixed:
                grids.append(min(fixed[ax], shape[ax] - 1))
            elif ax == R - 2:
                grids.append(torch.arange(q0, q1).reshape(-1, 1))
            elif ax == R - 1:
                grids.append(torch.arange(nk).reshape(1, -1))
            else:
                grids.append(0)
        keep = evaluate_keep(mask, grids, shape, list(data))
        strips.append(torch.broadcast_to(keep.reshape(keep.shape[-2:] if keep.dim() >= 2 else (1, 1)),
                                         (q1 - q0, nk)))
    return torch.cat(strips) if strips else torch.zeros(0, nk, dtype=torch.bool)


# ---- region pictures ----------------------------------------------------------------------------

_NODE = re.compile(r'^\s*"([^"]+)" \[(.*)\];$')
_EDGE = re.compile(r'^\s*"([^"]+)" -> "([^"]+)";$')


# Not ``torch.fx.passes.graph_drawer.FxGraphDrawer``: it draws a whole GraphModule through pydot,
# which is no dependency (and not installed on the CPU machines we test on), while a region picture
# is a handful of nodes and their inputs, before and after, in two clusters of one graph; the text
# below is plain graphviz that ``dot`` or the matplotlib fallback renders.
def before_after_dot(title: str, before: str, after: str) -> str:
    """One graphviz graph of two clusters from two ``region_dot`` texts: the region before the
    rewrite and what replaced it (node ids prefixed, so q, k, v appear in both)."""
    lines = [f'digraph "{_esc(title)}" {{', "  rankdir=TB;", '  node [fontname="monospace", fontsize=10];',
             f'  label="{_esc(title)}"; labelloc=t;']
    for tag, text in (("before", before), ("after", after)):
        if not text:
            continue
        lines += [f"  subgraph cluster_{tag} {{", f'    label="{tag}"; style=rounded; color="#888888";']
        for ln in text.splitlines():
            m, e = _NODE.match(ln), _EDGE.match(ln)
            if m:
                lines.append(f'    "{tag}:{m.group(1)}" [{m.group(2)}];')
            elif e:
                lines.append(f'    "{tag}:{e.group(1)}" -> "{tag}:{e.group(2)}";')
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def render(dot_text: str, stem: str, dot_exe: Optional[str]) -> Tuple[List[str], Optional[str]]:
    """Write ``stem.dot`` and the pictures that can be made here: ``stem.svg`` and ``stem.png``
    by graphviz, else ``stem.png`` by matplotlib. Returns (paths, a note when no picture was made)."""
    import subprocess

    paths = [stem + ".dot"]
    with open(stem + ".dot", "w") as f:
        f.write(dot_text)
    if dot_exe:
        for fmt in ("svg", "png"):
            subprocess.run([dot_exe, f"-T{fmt}", stem + ".dot", "-o", f"{stem}.{fmt}"], check=True)
            paths.append(f"{stem}.{fmt}")
        return paths, None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return paths, ("graphviz's `dot` is not installed, nor matplotlib: region pictures were "
                       "written as .dot files only; install graphviz (e.g. `apt-get install "
                       "graphviz`) for SVG and PNG, or matplotlib (`pip install matplotlib`) for PNG")
    _matplotlib_png(dot_text, stem + ".png")
    paths.append(stem + ".png")
    return paths, ("graphviz's `dot` is not installed: region pictures are PNGs drawn by matplotlib "
                   "(install graphviz, e.g. `apt-get install graphviz`, for graphviz's SVG and PNG)")


def _matplotlib_png(dot_text: str, path: str) -> None:
    """Draw a ``before_after_dot`` graph without graphviz: each cluster's nodes in layers (networkx's
    topological generations), the clusters side by side."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import networkx as nx

    g = nx.DiGraph()
    labels, boxes = {}, set()
    for ln in dot_text.splitlines():
        m, e = _NODE.match(ln), _EDGE.match(ln)
        if m:
            nid, attrs = m.groups()
            lab = re.search(r'label="((?:[^"\\]|\\.)*)"', attrs)
            labels[nid] = (lab.group(1) if lab else nid).replace("\\n", "\n")
            g.add_node(nid)
            if "shape=box" in attrs:
                boxes.add(nid)
        elif e:
            g.add_edge(*e.groups())
    clusters = sorted({n.split(":", 1)[0] for n in g}, key=lambda t: t != "before")
    pos, x0 = {}, 0.0
    for tag in clusters:
        sub = g.subgraph([n for n in g if n.startswith(tag + ":")])
        # as late as possible: each input right above the node that reads it
        layers = list(nx.topological_generations(sub.reverse(copy=False)))[::-1]
        width = max((len(layer) for layer in layers), default=1)
        for depth, layer in enumerate(layers):
            for k, n in enumerate(sorted(layer)):
                pos[n] = (x0 + (k - (len(layer) - 1) / 2) * 1.0 + width / 2, -depth)
        x0 += width + 1.5
    depth = max((-y for _, y in pos.values()), default=0) + 1
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * x0), max(3, 1.1 * depth)))
    for u, v in g.edges:
        ax.annotate("", xy=pos[v], xytext=pos[u],
                    arrowprops=dict(arrowstyle="->", color="#555555", shrinkA=14, shrinkB=14))
    for n, (x, y) in pos.items():
        ax.text(x, y, labels.get(n, n.split(":", 1)[1]), ha="center", va="center", fontsize=7,
                family="monospace", bbox=dict(boxstyle="round", fc="#dbe9ff" if n in boxes else "white",
                                              ec="#333333"))
    for tag in clusters:
        xs = [x for n, (x, _) in pos.items() if n.startswith(tag + ":")]
        if xs:
            ax.text(sum(xs) / len(xs), 0.7, tag, ha="center", fontsize=10, weight="bold")
    xs = [x for x, _ in pos.values()] or [0]
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(-depth, 1.2)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
