"""Stage 7, report: every softmax site the matcher looked at, fused or not and why, its spec, and
the graph code of the region before and after the rewrite.

``Explanation`` is what ``fusion_pass.explain`` returns; ``str()`` of it is the readable report,
``write(folder)`` puts one text file per graph there.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

from fusion_pass.kernels.spec import AttentionSpec


@dataclass
class SiteReport:
    site: str                       # the softmax node's name (a detail: ``module`` names the site)
    fused: bool
    reason: str = ""                # why not, when not fused
    node: str = ""                  # the node that stopped the match
    attention_like: bool = True     # False: a softmax that is not part of an attention at all
    kept: bool = False              # an attention left as it is on purpose (already the fastest
                                    # exact kernel: an SDPA call with nothing to skip); not a miss
    spec: Optional[AttentionSpec] = None
    before: str = ""                # graph code of the region before the rewrite
    after: str = ""                 # and after
    kernels: str = ""               # which kernels the site runs on
    dot: str = ""                   # the region as a graphviz graph (dump option)
    masks: List[str] = field(default_factory=list)  # mask operands as proven predicates
    code_after: str = ""            # the code of the site's own graph after the rewrite, when it
                                    # lives in a subgraph (checkpointed body); else the graph's
    module: str = ""                # the module the site lives in (``layers.0.self_attn``), or
                                    # the function and line for code outside modules; see module_path
    dot_after: str = ""             # the nodes that replaced the region, as a graphviz graph
    mask_inputs: Optional[tuple] = field(default=None, repr=False, compare=False)
                                    # (score shape, per mask its data tensors or None) at the
                                    # compile's example inputs: what block_maps() evaluates

    def block_maps(self, block: Optional[Tuple[int, int]] = None, batch: int = 0, head: int = 0):
        """Per mask of a fused site: (mask text, tile classes or None, (block_m, block_n), note).
        Tile classes (see ``pictures``): computed in full, partial, skipped, for the (batch, head)
        slice at the sizes of the compile's example inputs."""
        from . import pictures

        if not self.fused or not self.spec.masks:
            return []
        out = []
        shape, datas = self.mask_inputs or (None, [None] * len(self.spec.masks))
        for k, (m, data) in enumerate(zip(self.spec.masks, datas)):
            if shape is None:
                out.append((str(m), None, None, "no sizes recorded for this site"))
                continue
            bm, bn = pictures.tile_sizes(int(shape[-2]), int(shape[-1]), block)
            if data is None:
                out.append((str(m), None, (bm, bn), "its data tensors are computed inside the "
                            "graph; the map needs them at run time"))
                continue
            keep = pictures.mask_keep(m, shape, data, batch=batch, head=head)
            # a masked_fill removes where the mask is True; where(m, s, fill) and an additive
            # mask where it is False
            removes_where_true = any(op.kind == "fill" and op.operand == "predicate" and op.index == k
                                     for op in self.spec.score_ops)
            scores_kept = ~keep if removes_where_true else keep
            out.append((str(m), pictures.block_classes(scores_kept, bm, bn), (bm, bn),
                        f"batch {batch}, head {head}, scores {int(shape[-2])} x {int(shape[-1])}"))
        return out

    @property
    def label(self) -> str:
        """How a person finds the site: its module, with the softmax node's name as a detail."""
        return f"{self.module} (node {self.site})" if self.module else self.site

    def kernel_source(self) -> str:
        """The generated Triton source of this site's kernels (empty when not fused)."""
        if not self.fused:
            return ""
        from fusion_pass.kernels.predicate import keep_source, tensor_mask_spec
        try:
            from fusion_pass.kernels.triton_attention import generate_source
        except ImportError as e:  # Triton is an extra (pip install "fusion-pass[gpu]")
            return (f"# the Triton source is generated with Triton installed ({e}); install it "
                    "with `pip install \"fusion-pass[gpu]\"` (CUDA builds of torch bring it)\n")
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
        if self.kept:
            return "kept"
        return "NOT fused" if self.attention_like else "not attention"

    def __str__(self) -> str:
        lines = [f"site {self.label}: {self.status}"]
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
        return [s for s in self.sites if not s.fused and s.attention_like and not s.kept]

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
    """Everything about each graph and site, as files: the report; per fused site its generated
    kernel source, a picture of the rewrite (the region before and the nodes after: SVG and PNG
    when graphviz's ``dot`` is installed, else PNG when matplotlib is, the .dot text always) and
    each mask's block map (PNG and text); NOTES.txt says what could not be drawn here."""
    import shutil

    from . import pictures

    paths = expl.write(folder)
    dot_exe = shutil.which("dot")
    notes = []
    for g in expl.graphs:
        for site in g.sites:
            name = f"graph_{g.index}_" + pictures.safe_name(
                f"{site.module}.{site.site}" if site.module and " " not in site.module else site.site)
            stem = os.path.join(folder, name)
            if site.fused:
                with open(stem + ".kernel.py", "w") as f:
                    f.write(site.kernel_source())
                paths.append(stem + ".kernel.py")
            if site.dot:
                dot = pictures.before_after_dot(f"{site.label}: before and after", site.dot, site.dot_after)
                made, note = pictures.render(dot, stem + ".region", dot_exe)
                paths += made
                if note and note not in notes:
                    notes.append(note)
            for k, (text, classes, block, why) in enumerate(site.block_maps()):
                if classes is None:
                    notes.append(f"{site.label}: no block map of mask m{k} ({text}): {why}")
                    continue
                png = pictures.block_map_png(classes, f"{stem}.mask{k}.png")
                with open(f"{stem}.mask{k}.txt", "w") as f:
                    f.write(f"block map of mask m{k} of site {site.label}: {text}\n"
                            f"{block[0]} x {block[1]} tiles, {why}\n{pictures.LEGEND}\n\n"
                            + pictures.block_map_text(classes) + "\n")
                paths += [png, f"{stem}.mask{k}.txt"]
    if notes:
        with open(os.path.join(folder, "NOTES.txt"), "w") as f:
            f.write("\n".join(notes) + "\n")
        paths.append(os.path.join(folder, "NOTES.txt"))
    return paths


def attach_mask_inputs(gm, example_inputs, sites: List[SiteReport], limit: int = 400) -> None:
    """Record, for each fused site of ``gm`` (not of its subgraphs) whose spec has masks, the score
    shape and each mask's data tensors at the compile's example inputs, so that ``block_maps`` can
    draw them later. A data tensor computed inside the graph (the user's mask, cast or reshaped) is
    recomputed from copies of the inputs it depends on; one that needs more than ``limit`` nodes,
    or fails, is left out (its map is then not drawn, and the dump says why)."""
    import torch
    import torch.fx as fx

    names = {}
    for s in sites:
        if s.fused and s.spec is not None and s.spec.masks and "." not in s.site:
            for line in s.after.splitlines():
                if "fusion_pass.attention" in line:
                    names[line.split(" = ", 1)[0].strip()] = s
    if not names:
        return
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env = {}

    def value(n):
        if not isinstance(n, fx.Node):
            return n
        if n in env:
            return env[n]
        todo, seen = [n], {}
        while todo:  # the ancestors, without recursion
            x = todo.pop()
            if x in seen or x in env:
                continue
            seen[x] = True
            if len(seen) > limit:
                raise ValueError("too many nodes")
            todo.extend(x.all_input_nodes)
        for x in gm.graph.nodes:
            if x not in seen or x in env:
                continue
            args, kwargs = fx.node.map_arg((x.args, x.kwargs), lambda a: env[a])
            if x.op == "placeholder":
                v = example_inputs[places.index(x)]
                env[x] = v.clone() if isinstance(v, torch.Tensor) else v
            elif x.op == "get_attr":
                obj = gm
                for part in x.target.split("."):
                    obj = getattr(obj, part)
                env[x] = obj
            elif x.op == "call_function":
                env[x] = x.target(*args, **kwargs)
            elif x.op == "call_method":
                env[x] = getattr(args[0], x.target)(*args[1:], **kwargs)
            else:
                raise ValueError(f"cannot evaluate {x.op}")
        return env[n]

    def size(x):
        return int(x) if isinstance(x, int) else int(getattr(x.node, "hint", None) or x)

    for node in gm.graph.nodes:
        site = names.get(node.name) if node.op == "call_function" else None
        if site is None:
            continue
        q, k, captured = node.args[0], node.args[1], node.args[3]
        try:
            qv, kv = q.meta["example_value"], k.meta["example_value"]
            shape = tuple(size(d) for d in qv.shape[:-1]) + (size(kv.shape[-2]),)
        except Exception:  # noqa: BLE001 - no sizes, no maps
            continue
        datas = []
        for m in site.spec.masks:
            try:
                with torch.no_grad():
                    datas.append([value(captured[p]) for p in m.data])
            except Exception:  # noqa: BLE001 - this mask's data stays unknown
                datas.append(None)
        site.mask_inputs = (shape, datas)


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


_ROOT = re.compile(r"^(?:[LG]\['(?P<name>[^']*)'\]|L__self___|(?P<flat>[LG]__[A-Za-z0-9_]*?___))")
_GETATTR = re.compile(r"getattr\(([^()]*), '([^']*)'\)")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def module_path(node) -> str:
    """The site's place in the user's model, for a person: the qualified name of the innermost
    module around the node in Dynamo's ``nn_module_stack`` (``L['self'].layers[0].self_attn``
    becomes ``layers.0.self_attn``; a module reached from a local ``model`` keeps that name), or,
    for code outside any submodule, the function and line from the node's stack trace."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        path = str(path)
        while _GETATTR.search(path):
            path = _GETATTR.sub(r"\1.\2", path)
        m = _ROOT.match(path)
        if m:
            name, path = m.group("name"), path[m.end():]
        path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
        path = re.sub(r"\[(?:'([^']*)'|(\d+))\]", lambda g: "." + (g.group(1) or g.group(2)), path)
        path = path.lstrip("._")
        if m and name not in (None, "self"):
            path = ".".join(filter(None, (name, path)))
        if path:
            return path
        return getattr(cls, "__name__", "")
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if frames:
        file, line, fn = frames[-1]
        return f"{fn} ({os.path.basename(file)}:{line})"
    return ""


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
