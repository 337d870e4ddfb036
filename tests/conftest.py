"""Shared test set-up.

One kernel test suite, two modes (JAX Pallas' interpret-test pattern): with a CUDA device the
Triton kernels run compiled; without one they run under Triton's interpreter on CPU tensors. The
switch must be set before any Triton kernel is defined, hence here, at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_patches_once():
    """Triton's interpreter re-patches ``triton.language`` (``_patch_lang``: every builtin of tl,
    tl.core, tl.tensor, tl.math) on each call of a ``@triton.jit`` helper inside a kernel, in every
    program of the grid: 40% of an interpreted kernel's time here. The launch (``GridExecutor``)
    has patched those same modules before its first program, and a helper's own patch is never
    restored (its scope is dropped), so the repeat changes nothing: it is skipped while a launch
    that patched the same modules runs. The kernels compute what they computed before, bit for
    bit (``test_triton_kernels.py::test_interpreter_patch_skip_gives_the_same_bits``). Left
    alone if Triton's internals are not the ones read here."""
    try:
        import inspect
        import triton.language as tl
        from triton.runtime import interpreter as ti
        real, launch = ti._patch_lang, ti.GridExecutor.__call__
        ti._LangPatchScope  # noqa: B018  (what a skipped call returns)
    except (ImportError, AttributeError):
        return
    if getattr(real, "skips_repeats", False):
        return
    launches = []  # per launch in progress: the modules patched since it began (ids)

    langs = {}  # function -> the language modules its globals hold (as _patch_lang reads them)

    def langs_of(fn):
        if fn not in langs:
            langs[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                  if inspect.ismodule(v) and v in (tl, tl.core))
        return langs[fn]

    def patch_lang(fn):
        mods = langs_of(fn)
        if launches and mods and mods <= launches[-1]:
            return ti._LangPatchScope()  # a helper under a launch that patched these already
        scope = real(fn)
        if launches:
            launches[-1] |= mods
        return scope

    def launch_once(self, *args, **kwargs):
        launches.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    patch_lang.skips_repeats = True
    patch_lang.real = real
    ti._patch_lang = patch_lang
    ti.GridExecutor.__call__ = launch_once


if INTERPRET:
    _interpreter_patches_once()
import sys, os; sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches reset before and after a test, so compiled frames of one test never serve
    another (files that compile use it for every test: ``pytestmark``)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
