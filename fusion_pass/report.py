"""Stage 7, report: every softmax site the matcher looked at, fused or not and why, its spec, and
the graph code of the region before and after the rewrite.

``Explanation`` is what ``fusion_pass.explain`` returns; ``str()`` of it is the readable report,
``write(folder)`` puts one text file per graph there.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

from fusion_pass.kernels.spec import AttentionSpec


@dataclass
class SiteReport:
    site: str                       # the softmax node's name
    fused: bool
    reason: str = ""                # why not, when not fused
    node: str = ""                  # the node that stopped the match
    attention_like: bool = True     # False: a softmax that is not part of an attention at all
    spec: Optional[AttentionSpec] = None
    before: str = ""                # graph code of the region before the rewrite
    after: str = ""                 # and after
    kernels: str = ""               # which kernels the site runs on
    dot: str = ""                   # the region as a graphviz graph (dump option)
    masks: List[str] = field(default_factory=list)  # mask operands as proven predicates
    code_after: str = ""            # the code of the site's own graph after the rewrite, when it
                                    # lives in a subgraph (checkpointed body); else the graph's

    def kernel_source(self) -> str:
        """The generated Triton source of this site's kernels (empty when not fused)."""
        if not self.fused:
            return ""
        from fusion_pass.kernels.predicate import keep_source, tensor_mask_spec
        from fusion_pass.kernels.triton_attention import generate_source
        spec = self.spec
        head = ""
        for k, m in enumerate(spec.masks):
            head += (f"# mask m{k} ({m.kind}), evaluated per tile by the CPU kernel:\n"
                     + "".join(f"#   {line}\n" for line in keep_source(m).splitlines()))
        if spec.biases:
            return head + ("# biases computed from indices (" + "; ".join(map(str, spec.biases))
                           + ") run on the tiled implementation (kernels/cpu.py), on every device;"
                           " no Triton kernel is generated for this spec\n")
        if spec.masks and tensor_mask_spec(spec) is not spec:
            try:
                return head + generate_source(spec)
            except Exception:  # noqa: BLE001 - kernels reading the masks as tensors
                head += "# the Triton kernels read these masks materialised as tensors:\n"
                spec = tensor_mask_spec(spec)
        return head + generate_source(spec)

    @property
    def status(self) -> str:
        if self.fused:
            return "fused"
        return "NOT fused" if self.attention_like else "not attention"

    def __str__(self) -> str:
        lines = [f"site {self.site}: {self.status}"]
        if self.fused:
            lines.append(f"  spec: {self.spec}")
            lines.append(f"  score_mod (sympy): {self.spec.score_mod_expr()};  d/ds: "
                         f"{self.spec.score_mod_grad_expr()}")
            if self.kernels:
                lines.append(f"  kernels: {self.kernels}")
            for m in self.masks:
                lines.append(f"  {m}")
        else:
            lines.append(f"  why: {self.reason} (at node {self.node})")
        if self.before:
            lines.append("  before:")
            lines += ["    " + ln for ln in self.before.splitlines()]
        if self.after:
            lines.append("  after:")
            lines += ["    " + ln for ln in self.after.splitlines()]
        return "\n".join(lines)


@dataclass
class GraphReport:
    index: int
    sites: List[SiteReport] = field(default_factory=list)
    code_before: str = ""
    code_after: str = ""
    canonicalized: List[str] = field(default_factory=list)  # graph rules that fired

    def __str__(self) -> str:
        fused = sum(s.fused for s in self.sites)
        att = sum(s.attention_like or s.fused for s in self.sites)
        head = [f"graph {self.index}: {fused} of {att} attention site(s) fused"]
        head += [f"  canonicalised {c}" for c in self.canonicalized]
        return "\n".join(head + [str(s) for s in self.sites])


@dataclass
class Explanation:
    graphs: List[GraphReport] = field(default_factory=list)

    @property
    def sites(self) -> List[SiteReport]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def fused(self) -> List[SiteReport]:
        return [s for s in self.sites if s.fused]

    @property
    def missed(self) -> List[SiteReport]:
        """Attention sites that were not fused (softmaxes that are not attention are not misses)."""
        return [s for s in self.sites if not s.fused and s.attention_like]

    def summary(self) -> str:
        return (f"fusion_pass: {len(self.fused)} attention site(s) fused, {len(self.missed)} not "
                f"fused, in {len(self.graphs)} graph(s)")

    def __str__(self) -> str:
        return "\n\n".join([self.summary()] + [str(g) for g in self.graphs])

    def dump(self, folder: str) -> List[str]:
        """The report, kernel sources and region pictures as files (see ``dump``)."""
        return dump(self, folder)

    def write(self, folder: str) -> List[str]:
        os.makedirs(folder, exist_ok=True)
        paths = []
        for g in self.graphs:
            p = os.path.join(folder, f"graph_{g.index}.txt")
            with open(p, "w") as f:
                f.write(str(g) + "\n\n# graph code before\n" + g.code_before
                        + "\n\n# graph code after\n" + g.code_after + "\n")
            paths.append(p)
        return paths


def dump(expl: "Explanation", folder: str) -> List[str]:
    """Everything about each graph and site, as files: the report, and per fused site its
    generated kernel source and a picture of the matched region (SVG when graphviz's ``dot`` is
    installed; the .dot text always, with a note in the report when it could not be rendered)."""
    import shutil
    import subprocess

    paths = expl.write(folder)
    dot_exe = shutil.which("dot")
    notes = []
    for g in expl.graphs:
        for site in g.sites:
            stem = os.path.join(folder, f"graph_{g.index}_{site.site}")
            if site.fused:
                with open(stem + ".kernel.py", "w") as f:
                    f.write(site.kernel_source())
                paths.append(stem + ".kernel.py")
            if site.dot:
                with open(stem + ".dot", "w") as f:
                    f.write(site.dot)
                paths.append(stem + ".dot")
                if dot_exe:
                    subprocess.run([dot_exe, "-Tsvg", stem + ".dot", "-o", stem + ".svg"], check=True)
                    paths.append(stem + ".svg")
    if any(s.dot for s in expl.sites) and not dot_exe:
        notes.append("graphviz's `dot` is not installed: region pictures were written as .dot files; "
                     "install graphviz (e.g. `apt-get install graphviz`) to get SVG")
    if notes:
        with open(os.path.join(folder, "NOTES.txt"), "w") as f:
            f.write("\n".join(notes) + "\n")
        paths.append(os.path.join(folder, "NOTES.txt"))
    return paths


def region_dot(name: str, nodes) -> str:
    """A graphviz picture of one region: its nodes (filled) and the tensors it reads."""

    inside = set(nodes)
    lines = [f'digraph "{name}" {{', "  rankdir=TB;", '  node [fontname="monospace", fontsize=10];']
    seen = set()
    for n in nodes:
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        lines.append(f'  "{n.name}" [shape=box, style=filled, fillcolor="#dbe9ff", '
                     f'label="{n.name}\\n{target}"];')
        for a in n.all_input_nodes:
            if a not in inside and a.name not in seen:
                seen.add(a.name)
                lines.append(f'  "{a.name}" [shape=ellipse, label="{a.name}"];')
            lines.append(f'  "{a.name}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


_ASSIGN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*) = ")


def code_lines(code: str, names: Iterable[str]) -> str:
    """The lines of generated graph code that define ``names``, without FX's `x = None` frees."""
    wanted = set(names)
    out = []
    for line in code.splitlines():
        m = _ASSIGN.match(line)
        if m and m.group(1) in wanted:
            out.append(line.strip().split(";  ")[0])
    return "\n".join(out)
