"""Backend options: ``torch.compile(m, backend="fusion_pass", options={...})``.

Unknown keys and bad values are a ``ValueError`` naming the valid ones, raised when Dynamo first
calls the backend (the first call of the compiled model), before any rewriting.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class Options:
    enable: bool = True           # False: compile exactly as the default backend would
    strict: bool = False          # True: an attention site that is not fused is an error
    report: Optional[str] = None  # a folder: write each graph's report (sites, specs, code) there
    inductor: bool = True         # False: run the rewritten graph without Inductor (debugging)
    dump: Optional[str] = None    # a folder: the report plus each site's kernel source and picture

    @staticmethod
    def parse(options: Optional[Mapping[str, Any]]) -> "Options":
        if options is None:
            return Options()
        if not isinstance(options, Mapping):
            raise ValueError(f"fusion_pass options must be a dict, got {type(options).__name__}")
        valid = {f.name: f for f in fields(Options)}
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown fusion_pass option(s) {unknown}; valid options are "
                             f"{sorted(valid)}")
        for key in ("enable", "strict", "inductor"):
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
        return Options(**kw)
