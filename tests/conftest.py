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
import sys, os; sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches reset before and after a test, so compiled frames of one test never serve
    another (files that compile use it for every test: ``pytestmark``)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
