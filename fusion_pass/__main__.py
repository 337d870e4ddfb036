"""Command line: ``python -m fusion_pass demo`` (the main job) and ``python -m fusion_pass explain``.

    python -m fusion_pass explain transformers:BertModel --config num_hidden_layers=2,hidden_size=64
    python -m fusion_pass explain transformers:ViTModel --config image_size=32,patch_size=8 --dump out/
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch


def _parse_config(text: str) -> dict:
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, _, val = item.partition("=")
        for conv in (int, float):
            try:
                val = conv(val)
                break
            except ValueError:
                continue
        else:
            val = {"true": True, "false": False}.get(val.lower(), val)
        out[key.strip()] = val
    return out


def _example_inputs(model, cfg, batch: int, seq: int):
    """Inputs a model class accepts: token ids for text models, pixels for vision ones."""
    import inspect

    params = inspect.signature(model.forward).parameters
    if "input_ids" in params:
        vocab = getattr(cfg, "vocab_size", 100)
        kw = dict(input_ids=torch.randint(0, vocab, (batch, seq)))
        if "decoder_input_ids" in params:
            kw["decoder_input_ids"] = torch.randint(0, vocab, (batch, seq))
        return kw
    if "pixel_values" in params:
        size = getattr(cfg, "image_size", 32)
        return dict(pixel_values=torch.randn(batch, getattr(cfg, "num_channels", 3), size, size))
    raise SystemExit(f"don't know which inputs {type(model).__name__} takes")


def explain_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion_pass explain")
    ap.add_argument("model", help="module:Class, e.g. transformers:GPT2Model")
    ap.add_argument("--config", default="", help="comma-separated key=value overrides")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--dump", default=None, help="also write the report, each site's generated kernel "
                    "source and a picture of each region to this folder")
    ap.add_argument("--kernels", action="store_true", help="print each fused site's generated kernel source")
    args = ap.parse_args(argv)

    import fusion_pass

    mod_name, _, cls_name = args.model.partition(":")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    overrides = _parse_config(args.config)
    if mod_name == "transformers":
        cfg = cls.config_class(**overrides)
        cfg._attn_implementation = "eager"
        model = cls(cfg).eval()
    else:
        cfg = None
        model = cls(**overrides).eval()
    inputs = _example_inputs(model, cfg, args.batch, args.seq)
    with torch.no_grad():
        expl = fusion_pass.explain(model, **inputs)
    print(expl)
    if args.kernels:
        for site in expl.fused:
            print(f"\n# ---- generated kernels of site {site.site} ----\n{site.kernel_source()}")
    if args.dump:
        for p in expl.dump(args.dump):
            print(f"wrote {p}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    if cmd == "explain":
        return explain_main(rest)
    print(f"unknown command {cmd!r}; use 'demo' or 'explain'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
