"""Backend options, three ways to give them, validated when given:

    torch.compile(m, backend=fusion_pass.Backend(strict=True, report="out/"), mode="max-autotune")
    torch.compile(m, backend="fusion_pass", options={"strict": True})   # torch refuses mode= with it
    with fusion_pass.configure(strict=True): ...                        # for code that names the
                                                                        # backend by string (Trainer)

Unknown keys and bad values are a ``ValueError`` naming the valid ones: raised by ``Backend(...)``
and ``configure(...)`` at once; for ``options={...}`` when Dynamo first calls the backend (the
first call of the compiled model; torch hands the dict to no one before that), before any rewriting.
An option given to ``Backend`` or ``options=`` wins over ``configure``'s, which wins over the default.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterator, List, Mapping, Optional


@dataclass(frozen=True)
class Options:
    enable: bool = True           # False: compile exactly as the default backend would
    strict: bool = False          # True: an attention site that is not fused is an error
    report: Optional[str] = None  # a folder: write each graph's report (sites, specs, code) there
    inductor: bool = True         # False: run the rewritten graph without Inductor (debugging)
    dump: Optional[str] = None    # a folder: the report plus each site's kernel source and pictures
    # True: fuse CPU decoding sites too: a static query length of 1 (a decoding step), or of a few
    # rows against more keys with no gradient; by default such sites are kept for Inductor, whose
    # code for them is faster (``backend._decode_kept``)
    fuse_cpu_decode: bool = False

    @staticmethod
    def parse(options: Optional[Mapping[str, Any]]) -> "Options":
        """Options from a dict, over the defaults ``configure`` set (if any)."""
        return Options(**{**configured(), **validate(options)})


def validate(options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The given options, checked and normalised (folders as str); only the keys given."""
    if options is None:
        return {}
    if isinstance(options, Options):
        return {f.name: getattr(options, f.name) for f in fields(Options)}
    if not isinstance(options, Mapping):
        raise ValueError(f"fusion_pass options must be a dict, got {type(options).__name__}")
    valid = {f.name: f for f in fields(Options)}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown fusion_pass option(s) {unknown}; valid options are "
                         f"{sorted(valid)}")
    for key in ("enable", "strict", "inductor", "fuse_cpu_decode"):
        if key in options and not isinstance(options[key], bool):
            raise ValueError(f"fusion_pass option {key!r} must be True or False, got "
                             f"{options[key]!r}")
    kw = dict(options)
    for key in ("report", "dump"):
        folder = options.get(key)
        if folder is not None and not isinstance(folder, (str, os.PathLike)):
            raise ValueError(f"fusion_pass option {key!r} must be a folder path, got {folder!r}")
        if folder is not None:
            kw[key] = os.fspath(folder)
    return kw


def validate_mode(mode: Optional[str]) -> Optional[str]:
    """``mode`` as torch.compile takes it (None or one of Inductor's modes), or a ValueError."""
    if mode is None:
        return None
    import torch

    try:
        torch._inductor.list_mode_options(mode)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"fusion_pass: {e}") from None
    return mode


_configured: List[Dict[str, Any]] = []  # a stack: configure() blocks nest


def configured() -> Dict[str, Any]:
    """The options the innermost ``configure`` block gives (empty outside any)."""
    return dict(_configured[-1]) if _configured else {}


@contextlib.contextmanager
def configure(**options: Any) -> Iterator[Options]:
    """Defaults for every fusion_pass compile that starts inside the block, for code that names the
    backend by string and passes ``mode=`` (so cannot pass ``options=``)::

        with fusion_pass.configure(strict=True, report="out/"):
            trainer.train()   # torch.compile(model, backend="fusion_pass", mode="max-autotune")

    Dynamo compiles on the first call, so the calls belong inside the block; a recompile after
    it uses the options then in force. Validated here: a bad key or value is a ValueError now."""
    given = validate(options)
    _configured.append({**configured(), **given})
    try:
        yield Options(**_configured[-1])
    finally:
        _configured.pop()
