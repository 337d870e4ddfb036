"""Command line: ``python -m fusion_pass demo`` (the main job) and ``python -m fusion_pass explain``
(installed as the ``fusion-pass`` command too).

    fusion-pass demo [--model mistral|bert|vit] [--seq N] [--pad 0.125]
    fusion-pass explain transformers:BertModel --config num_hidden_layers=2,hidden_size=64
    fusion-pass explain transformers:ViTModel --config image_size=32,patch_size=8 --dump out/
    fusion-pass explain transformers:WhisperModel --config max_source_positions=32,num_mel_bins=8

A class is ``module:Class`` (``transformers:`` may be left out); ``--config`` overrides fields of a
transformers class's config (or arguments of another class's constructor). Mistakes end in one
line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import sys

import torch


class UsageError(Exception):
    """A mistake on the command line: printed as one line, exit status 2."""


def _progress(msg: str) -> None:
    print(f"[fusion_pass] {msg}", file=sys.stderr, flush=True)


def _parse_config(text: str) -> dict:
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--config wants key=value pairs separated by commas, got {item!r}")
        for conv in (int, float):
            try:
                val = conv(val)
                break
            except ValueError:
                continue
        else:
            val = {"true": True, "false": False, "none": None}.get(val.lower(), val)
        out[key.strip()] = val
    return out


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def load_class(spec: str):
    """``module:Class`` (or a bare transformers class name) to the class, or a UsageError that
    suggests the close matches."""
    mod_name, colon, cls_name = spec.partition(":")
    if not colon:
        mod_name, cls_name = "transformers", spec
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"module {mod_name!r} not found ({e})") from None
    try:
        cls = getattr(module, cls_name)
    except (AttributeError, ImportError):
        cls = None
    if cls is None or not callable(cls):
        raise UsageError(f"{cls_name} not found in {mod_name}{_suggest(cls_name, dir(module))}")
    return mod_name, cls


def config_keys(config_cls) -> set:
    """Every key a config class accepts: its constructor's parameters, its fields and its aliases."""
    keys = {p for p, v in inspect.signature(config_cls.__init__).parameters.items()
            if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL) and p != "self"}
    try:
        keys |= set(config_cls().to_dict())
    except Exception:  # noqa: BLE001 - a config that needs arguments: its signature is enough
        pass
    keys |= set(getattr(config_cls, "attribute_map", {}) or {})
    return {k for k in keys if not k.startswith("_")}


def check_keys(overrides: dict, valid: set, owner: str) -> None:
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        close = [c for k in unknown for c in difflib.get_close_matches(k, list(valid), n=2, cutoff=0.6)]
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UsageError(f"unknown --config key(s) {', '.join(unknown)} for {owner}{hint}; "
                         f"valid keys: {', '.join(sorted(valid))}")


def build_model(spec: str, config: str):
    mod_name, cls = load_class(spec)
    overrides = _parse_config(config)
    config_cls = getattr(cls, "config_class", None)
    if mod_name.split(".")[0] == "transformers" and config_cls is not None:
        check_keys(overrides, config_keys(config_cls), config_cls.__name__)
        try:
            cfg = config_cls(**overrides)
            cfg._attn_implementation = "eager"
            return cls(cfg).eval(), cfg
        except Exception as e:  # noqa: BLE001 - a config the model refuses: say so in one line
            raise UsageError(f"{cls.__name__} with --config {config!r} could not be built: "
                             f"{type(e).__name__}: {e}") from None
    params = inspect.signature(cls).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        check_keys(overrides, {p for p in params if p != "self"}, cls.__name__)
    return cls(**overrides).eval(), None


def _example_inputs(model, cfg, batch: int, seq: int):
    """Inputs a model class accepts, from its forward's parameters and its config: token ids for
    text models, pixels for vision ones, log-mel features for speech encoders (Whisper: the
    encoder's convolutions want 2 x max_source_positions frames), raw audio for wav2vec2-likes,
    and decoder token ids for encoder-decoders (T5, BART, Whisper)."""
    params = inspect.signature(model.forward).parameters

    def get(name, default):
        v = getattr(cfg, name, None) if cfg is not None else None
        return default if v is None else v

    vocab = get("vocab_size", 100)
    kw = {}
    if "input_ids" in params:
        kw["input_ids"] = torch.randint(0, vocab, (batch, seq))
    elif "input_features" in params:
        frames = 2 * get("max_source_positions", seq // 2 or 1) if cfg is not None and \
            hasattr(cfg, "max_source_positions") else seq
        kw["input_features"] = torch.randn(batch, get("num_mel_bins", 80), frames)
    elif "pixel_values" in params:
        size = get("image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        kw["pixel_values"] = torch.randn(batch, get("num_channels", 3), size, size)
    elif "input_values" in params:
        stride = 1
        for s in get("conv_stride", (320,)):
            stride *= s
        kw["input_values"] = torch.randn(batch, seq * stride)
    if kw and "decoder_input_ids" in params:
        dec_vocab = get("decoder_vocab_size", vocab)
        dec_len = min(seq, get("max_target_positions", seq))
        kw["decoder_input_ids"] = torch.randint(0, dec_vocab, (batch, dec_len))
    if not kw:
        takes = ", ".join(p for p in params if p not in ("self", "kwargs"))
        raise UsageError(f"don't know which inputs {type(model).__name__} takes (its forward takes "
                         f"{takes}); call fusion_pass.explain(model, ...) from Python instead")
    return kw


def explain_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion_pass explain")
    ap.add_argument("model", help="module:Class, e.g. transformers:GPT2Model (or just GPT2Model)")
    ap.add_argument("--config", default="", help="comma-separated key=value overrides")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--dump", default=None, help="also write the report, each site's generated kernel "
                    "source, a picture of each rewrite and each mask's block map to this folder")
    ap.add_argument("--kernels", action="store_true", help="print each fused site's generated kernel source")
    args = ap.parse_args(argv)

    import fusion_pass

    _progress(f"building {args.model}" + (f" with {args.config}" if args.config else ""))
    model, cfg = build_model(args.model, args.config)
    inputs = _example_inputs(model, cfg, args.batch, args.seq)
    _progress("tracing it with Dynamo and running the pass (no Inductor)")
    with torch.no_grad():
        expl = fusion_pass.explain(model, **inputs)
    print(expl)
    if args.kernels:
        for site in expl.fused:
            print(f"\n# ---- generated kernels of site {site.label} ----\n{site.kernel_source()}")
    if args.dump:
        _progress(f"writing files to {args.dump}")
        for p in expl.dump(args.dump):
            print(f"wrote {p}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "demo":
            from .demo import main as demo_main
            return demo_main(rest)
        if cmd == "explain":
            return explain_main(rest)
    except UsageError as e:
        print(f"fusion_pass: error: {e}", file=sys.stderr)
        return 2
    print(f"fusion_pass: error: unknown command {cmd!r}{_suggest(cmd, ['demo', 'explain'])} "
          "(use demo or explain)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
