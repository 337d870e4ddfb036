"""Golden graphs: the attention regions of real model families as Dynamo captures them, and what
the pass rewrites them into. One text file per family; ``tests/test_golden_graphs.py`` fails when
a file is stale, so a change in matching or rewriting is reviewed as a diff of these files.

    python graphs/regenerate.py            # rewrite every file
    python graphs/regenerate.py gpt2 t5    # some families

Families and their tiny configs are those of ``tests/test_families.py``; eval mode, no weights,
``fuse_cpu_decode=True`` (so sites of a few query rows, kept on CPU by default, show their rewrite).
``SPELLINGS`` adds hand-picked programs of the attention-program generator
(``tests/test_fuzz.py``), one per spelling that real families do not show: products that move
between batch layouts, in-place updates through views, a K/V head broadcast by the products,
K stored transposed, pointwise score functions, graph-built masks and fills.
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import fusion_pass  # noqa: E402
from test_families import FAMILIES  # noqa: E402
from test_fuzz import Program  # noqa: E402

HEADER = "# generated; regenerate with `python graphs/regenerate.py {name}`\n"

_F32 = torch.float32
SPELLINGS = {
    # BLOOM's ALiBi as baddbmm's input on merged heads, a 4-D view for the mask written in place
    # (masked_fill_ through the view), softmax in float32, P @ V back on merged heads
    "spelling-baddbmm-alibi-inplace-view": Program(
        B=2, H=2, Nq=9, Nk=9, D=8, dtype=_F32, qk="baddbmm_alibi", qk_layout="flat",
        chain_layout="4d", pv="bmm", pv_layout="flat", scale_at="alpha", scale_value=1 / math.sqrt(8),
        masks=("causal", "padding"), combine="and", mask_form="masked_fill_", fill="finfo_min",
        softmax="dtype"),
    # multi-query by broadcasting: k and v have one head; P @ V on merged heads expands v itself
    "spelling-mqa-broadcast-softcap": Program(
        B=2, H=1, kv_rep=4, repeat="broadcast", Nq=7, Nk=11, D=8, dtype=_F32, qk="matmul_t",
        pv="bmm", pv_layout="flat", scale_at="mul", scale_value=1 / math.sqrt(8),
        score_fns=("softcap",), masks=("causal_br",), mask_form="where", fill="-inf",
        softmax="decomposed"),
    # K stored transposed, einsum, both q and k scaled, a pointwise chain, a bidirectional window
    # mask in torch.where's commuted form with a graph-built fill, GQA by expand + flatten
    "spelling-stored-kt-pointwise-window": Program(
        B=1, H=2, kv_rep=2, repeat="expand_flatten", Nq=10, Nk=10, D=8, dtype=_F32, qk="einsum_kt",
        projected=True, scale_at="both", scale_value=1 / math.sqrt(8),
        score_fns=("fn:gelu", "fn:clamp"), masks=("window_abs",), mask_form="where_commuted",
        fill="full", softmax="log_softmax"),
    # merged-head bmm, views with inferred (-1) sizes, in-place scaling and bias, hand-written ALiBi
    # from aranges, a document (block-diagonal) mask as BERT's additive mask, softmax type_as
    "spelling-merged-inferred-views-alibi-documents": Program(
        B=2, H=3, Nq=8, Nk=8, D=8, dtype=_F32, qk="bmm", qk_layout="flat", chain_layout="4d",
        view_inferred=True, pv="einsum", scale_at="div_", scale_value=math.sqrt(8),
        score_fns=("bias_head_inplace", "alibi"), masks=("document",), mask_form="add_bert",
        softmax="type_as"),
    # a learnable temperature, K transposed by swapaxes, a prefix-LM mask and padding (== 0) as two
    # additive steps, a detached decomposed softmax, nn.Dropout, GQA by repeat_interleave
    "spelling-temperature-prefix-padding": Program(
        B=2, H=1, kv_rep=2, repeat="repeat_interleave", Nq=6, Nk=6, D=8, dtype=_F32, qk="swapaxes",
        scale_at="param", scale_value=1 / math.sqrt(8), masks=("prefix", "padding_eq0"),
        combine="steps", mask_form="add_first", fill="-1e9", softmax="decomposed_values",
        dropout="module"),
}
NAMES = list(FAMILIES) + list(SPELLINGS)


def _build(name: str):
    torch.manual_seed(0)
    if name in SPELLINGS:
        program = SPELLINGS[name]
        model = program.module(name)
        return model, program.inputs(), {}, 1, "# program:\n" + "".join(
            f"#   {ln}\n" for ln in program.source().splitlines())
    builder, sites, _ = FAMILIES[name]
    model, inputs = builder()
    return model, [], inputs, sites, ""


def render(name: str) -> str:
    model, args, kwargs, sites, preamble = _build(name)
    # fuse_cpu_decode: the rewrite of every site is what is reviewed here, also of those the CPU
    # default keeps in inference (a decoder's few rows cross-attending to more keys); training and
    # CUDA run that rewrite
    with torch.no_grad(), fusion_pass.configure(fuse_cpu_decode=True):
        expl = fusion_pass.explain(model.eval(), *args, **kwargs)
    out = [HEADER.format(name=name),
           f"# {type(model).__name__}: {sites} attention sites; {expl.summary()}\n", preamble]
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
    names = (argv if argv is not None else sys.argv[1:]) or NAMES
    for name in names:
        if name not in NAMES:
            print(f"unknown name {name}; one of {', '.join(NAMES)}", file=sys.stderr)
            return 2
        torch._dynamo.reset()
        path(name).write_text(render(name))
        print(f"wrote {path(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
