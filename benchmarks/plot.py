"""Plots of the CPU benchmark's results: time and peak memory against N, one line per
implementation, one figure per (variant, pass), saved next to the JSON table it reads.

    python benchmarks/plot.py benchmarks/results/cpu_core.json [more.json ...]

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


def plot_results(json_path, rows: List[Dict] = None) -> List[Path]:
    """One PNG per (variant, pass) of the rows (default: the JSON file's), named
    ``<json stem>_<variant>_<pass>.png`` beside the JSON file. Returns the paths written."""
    json_path = Path(json_path)
    if rows is None:
        rows = json.loads(json_path.read_text())["rows"]
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plots: matplotlib is not installed (pip install \"fusion-pass[plots]\")",
              file=sys.stderr)
        return []
    written = []
    groups = sorted({(r["variant"], r["pass_"]) for r in rows})
    for variant, pass_ in groups:
        sel = [r for r in rows if r["variant"] == variant and r["pass_"] == pass_ and "error" not in r
               and "ms" in r]
        if not sel:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for impl in [i for i in LABEL if any(r["impl"] == i for r in sel)]:
            pts = sorted((r["N"], r["ms"], r.get("peak_bytes", 0) / 2 ** 20)
                         for r in sel if r["impl"] == impl)
            ns = [p[0] for p in pts]
            style = dict(marker="o", label=LABEL[impl], linewidth=2.5 if impl == "ours" else 1.5)
            ax_t.plot(ns, [p[1] for p in pts], **style)
            ax_m.plot(ns, [p[2] for p in pts], **style)
        for ax, what in ((ax_t, "median time (ms)"), (ax_m, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(what)
            ax.grid(True, which="both", alpha=0.3)
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
        for out in plot_results(p):
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
