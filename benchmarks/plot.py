"""Plots of the CPU benchmark's results: time and peak memory against N, one line per
implementation, one figure per (variant, pass), saved next to the JSON table it reads.

    python benchmarks/plot.py benchmarks/results/cpu_core.json [more.json ...]

For ``cpu_grid.json`` (``cpu_bench.py --grid``) also ``benchmarks/cpu_grid.png``: one figure of the
whole grid, a panel per (pass, pattern) with time against N (``plot_grid``).

``benchmarks/cpu_bench.py`` calls ``plot_results`` itself after writing its JSON. Needs matplotlib
(``pip install "fusion-pass[plots]"``); without it, says so and writes nothing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List

LABEL = {"eager": "eager", "stock": "stock torch.compile", "ours": "fusion_pass",
         "sdpa": "SDPA (eager)", "flex": "FlexAttention (compiled)"}
PASS = {"fwd": "forward", "fwdbwd": "forward+backward"}


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plots: matplotlib is not installed (pip install \"fusion-pass[plots]\")",
              file=sys.stderr)
        return None
    return plt


def _lines(ax, sel, key, scale=1.0):
    """One line per implementation of rows ``sel``: ``key`` against N, log-log."""
    for impl in [i for i in LABEL if any(r["impl"] == i for r in sel)]:
        pts = sorted((r["N"], r.get(key, 0) * scale) for r in sel if r["impl"] == impl)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABEL[impl],
                linewidth=2.5 if impl == "ours" else 1.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.grid(True, which="both", alpha=0.3)


def _measured(rows, variant, pass_):
    return [r for r in rows if r["variant"] == variant and r["pass_"] == pass_ and "error" not in r
            and "ms" in r]


def plot_grid(rows: List[Dict], out, title: str = "") -> List[Path]:
    """One figure of the whole grid: a panel per (pass, pattern), median time against N, one line
    per implementation (issue 11: speed vs N per pattern). Returns [out] once written."""
    plt = _pyplot()
    if plt is None:
        return []
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    passes = [p for p in PASS if any(r["pass_"] == p for r in rows)]
    if not variants or not passes:
        return []
    fig, axes = plt.subplots(len(passes), len(variants), figsize=(3.6 * len(variants), 3.4 * len(passes)),
                             squeeze=False)
    for pi, pass_ in enumerate(passes):
        for vi, variant in enumerate(variants):
            ax = axes[pi][vi]
            _lines(ax, _measured(rows, variant, pass_), "ms")
            ax.set_title(f"{variant}, {PASS[pass_]}", fontsize=9)
            if vi == 0:
                ax.set_ylabel("median time (ms)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"CPU attention, B=1, H=12, d=64, fp32 ({title}; lower is better)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return [out]


def plot_results(json_path, rows: List[Dict] = None) -> List[Path]:
    """One PNG per (variant, pass) of the rows (default: the JSON file's), named
    ``<json stem>_<variant>_<pass>.png`` beside the JSON file. Returns the paths written."""
    json_path = Path(json_path)
    if rows is None:
        rows = json.loads(json_path.read_text())["rows"]
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    groups = sorted({(r["variant"], r["pass_"]) for r in rows})
    for variant, pass_ in groups:
        sel = _measured(rows, variant, pass_)
        if not sel:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        _lines(ax_t, sel, "ms")
        _lines(ax_m, sel, "peak_bytes", 2 ** -20)
        ax_t.set_ylabel("median time (ms)")
        ax_m.set_ylabel("peak memory (MiB)")
        ax_m.legend(fontsize=8)
        fig.suptitle(f"CPU attention, variant {variant}, {PASS.get(pass_, pass_)} "
                     f"({json_path.name}; lower is better)")
        fig.tight_layout()
        out = json_path.with_name(f"{json_path.stem}_{variant}_{pass_}.png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__)
        return 2
    for p in paths:
        written = plot_results(p)
        if Path(p).stem == "cpu_grid":  # cpu_bench.py --grid: the one-figure summary too
            meta = json.loads(Path(p).read_text())
            written += plot_grid(meta["rows"], Path(__file__).resolve().parent / "cpu_grid.png",
                                 title=f"{Path(p).name}, {meta['meta'].get('started', '')}")
        for out in written:
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
