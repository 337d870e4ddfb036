"""Loading the kernels of a spec: ``attention.py`` compiled in a fresh module per spec, completed by
the spec's generated functions (``codegen.generate_source``), kept in an explicit cache
(``KernelCache``, one per process: ``KERNELS``) keyed by the spec and the interpreter mode.

Security: a shared temporary folder with predictable names lets any local user plant code that
the next compile imports. So (1) the generated source is written, for people and tools to read,
to a per-user folder (``cache_dir``): $FUSION_PASS_CACHE_DIR, else
$XDG_CACHE_HOME/fusion_pass/kernels, else ~/.cache/fusion_pass/kernels, created 0o700 and used only
when it is a directory owned by this user that neither group nor others may write (otherwise a
fresh private folder from tempfile.mkdtemp); (2) file names are the SHA-256 of the content; (3) the
file's bytes are compared with the generated source, and rewritten atomically when they differ;
(4) the module is executed from the generated source in memory, and linecache is primed with it,
so neither Python nor Triton (which reads a kernel's source through inspect/linecache) ever runs
what is on disk. The kernels' own source is the installed ``attention.py``.
"""
from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
import stat
import sys
import tempfile
import types
from typing import Optional

from ..spec import AttentionSpec
from . import attention, codegen

CACHE_ENV = "FUSION_PASS_CACHE_DIR"
_FALLBACK_DIR: Optional[str] = None


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _private_dir(path: str) -> bool:
    """A directory (not a symlink to one) owned by this user, not writable by group or others."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not (st.st_mode & 0o022)


def cache_dir() -> str:
    """The folder generated kernel sources are written to (see the security note above)."""
    global _FALLBACK_DIR
    base = os.environ.get(CACHE_ENV)
    if not base:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(root, "fusion_pass", "kernels")
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
    except OSError:
        pass
    if _private_dir(base):
        return base
    if _FALLBACK_DIR is None or not _private_dir(_FALLBACK_DIR):
        _FALLBACK_DIR = tempfile.mkdtemp(prefix="fusion_pass_kernels_")  # 0o700, ours
    return _FALLBACK_DIR


def _write_verified(path: str, data: bytes) -> None:
    """Make the file at ``path`` hold exactly ``data``: read it back, and when it differs (or is
    missing) write a new file beside it and rename it over (atomic: no reader sees half a file)."""
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".attn_", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise



class KernelCache:
    """The loaded kernel modules, per (spec key, interpreter mode): a module holds ``attn_fwd``,
    ``attn_bwd_preprocess``, ``attn_bwd_dq``, ``attn_bwd_dkdv`` (``attention.py``'s kernels bound
    to the spec's generated functions) and ``HAS_FULL_TILES``."""

    def __init__(self):
        self.modules: dict = {}

    def clear(self) -> None:
        self.modules.clear()

    def get(self, spec: AttentionSpec) -> types.ModuleType:
        # the key string, not the spec object: equal specs may differ in their keys (0.0 and -0.0,
        # 1 and 1.0 compare equal), and so in their generated code; it is written once per spec
        # object (``AttentionSpec.to_key``), so a launch does no serialisation here
        key = (spec.to_key(), interpret())
        mod = self.modules.get(key)
        if mod is None:
            mod = self.modules[key] = _load(spec)
        return mod


def _load(spec: AttentionSpec) -> types.ModuleType:
    src = codegen.generate_source(spec)
    data = src.encode()
    digest = hashlib.sha256(data).hexdigest()[:32]
    path = os.path.join(cache_dir(), f"attn_{digest}.py")
    _write_verified(path, data)
    # what runs is ``src`` itself: linecache serves it to inspect (and so to triton.jit), and an
    # entry without mtime is never re-read from disk
    linecache.cache[path] = (len(src), None, src.splitlines(True), path)
    name = f"fusion_pass_generated.attn_{digest}_{int(interpret())}"
    mod = types.ModuleType(name)
    mod.__package__ = __package__  # attention.py's relative import of spec_parts
    sys.modules[name] = mod  # triton resolves a kernel's globals through its module
    # the kernels first (their tracebacks name attention.py's lines), then the spec's functions,
    # which replace spec_parts' in the namespace the kernels resolve their calls in
    kernel_path = attention.__file__
    with open(kernel_path, encoding="utf-8") as f:
        kernel_src = f.read()
    exec(compile(kernel_src, kernel_path, "exec"), mod.__dict__)  # noqa: S102 - our installed source
    mod.__file__ = path
    exec(compile(src, path, "exec"), mod.__dict__)  # noqa: S102 - our generated source
    return mod


KERNELS = KernelCache()


def kernels(spec: AttentionSpec) -> types.ModuleType:
    """The kernel module of ``spec`` (from ``KERNELS``)."""
    return KERNELS.get(spec)
