"""Golden graphs: the attention regions of real model families as Dynamo captures them, and what
the pass rewrites them into. One text file per family; ``tests/test_golden_graphs.py`` fails when
a file is stale, so a change in matching or rewriting is reviewed as a diff of these files.

    python graphs/regenerate.py            # rewrite every file
    python graphs/regenerate.py gpt2 t5    # some families

Families and their tiny configs are those of ``tests/test_families.py``; eval mode, no weights.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import fusion_pass  # noqa: E402
from test_families import FAMILIES  # noqa: E402

HEADER = "# generated; regenerate with `python graphs/regenerate.py {name}`\n"


def render(name: str) -> str:
    builder, sites, _ = FAMILIES[name]
    torch.manual_seed(0)
    model, inputs = builder()
    with torch.no_grad():
        expl = fusion_pass.explain(model.eval(), **inputs)
    out = [HEADER.format(name=name),
           f"# {type(model).__name__}: {sites} attention sites; {expl.summary()}\n"]
    for g in expl.graphs:
        for rule in g.canonicalized:
            out.append(f"canonicalised {rule}\n")
        for s in g.sites:
            out.append(f"\n## site {s.site}: {s.status}\n")
            if s.fused:
                out.append(f"{s.spec}\n")
                out.extend(f"{m}\n" for m in s.masks)
            else:
                out.append(f"why: {s.reason} (at node {s.node})\n")
            if s.before:
                out.append("before:\n" + "".join(f"    {ln}\n" for ln in s.before.splitlines()))
            if s.after:
                out.append("after:\n" + "".join(f"    {ln}\n" for ln in s.after.splitlines()))
    return "".join(out)


def path(name: str) -> Path:
    return HERE / f"{name}.txt"


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    names = (argv if argv is not None else sys.argv[1:]) or list(FAMILIES)
    for name in names:
        path(name).write_text(render(name))
        print(f"wrote {path(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
