"""The comparison the other tests rest on: ``helpers.max_rel_error`` must fail on a NaN or an
infinity the reference does not have (Python's ``max(0.0, nan)`` is 0.0, which once let a NaN
output compare as equal) and accept non-finite values exactly where the reference has them."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import max_rel_error

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("got, want, ok", [
    ([1.0, 2.0], [1.0, 2.0], True),
    ([1.0, NAN], [1.0, NAN], True),           # NaN where eager has it
    ([1.0, INF, -INF], [1.0, INF, -INF], True),
    ([1.0, NAN], [1.0, 2.0], False),          # a NaN eager does not have
    ([NAN, 2.0], [1.0, 2.0], False),          # ... also in the first place
    ([1.0, 2.0], [1.0, NAN], False),          # eager's NaN missing
    ([1.0, INF], [1.0, 2.0], False),
    ([1.0, -INF], [1.0, INF], False),         # an infinity of the other sign
    ([NAN, NAN], [NAN, NAN], True),           # all NaN on both sides: nothing finite to compare
])
def test_max_rel_error_nonfinite(got, want, ok):
    err = max_rel_error([torch.tensor(got)], [torch.tensor(want)])
    assert (err == 0.0) if ok else math.isinf(err)


def test_max_rel_error_measures_finite_entries_against_the_scale():
    want = torch.tensor([4.0, NAN, -2.0])
    got = torch.tensor([4.4, NAN, -2.0])
    assert max_rel_error([got], [want]) == pytest.approx(0.1, rel=1e-6)
    # a gradient that is zero in the reference is measured against 1e-3 of the overall scale
    # (1e-4 / 4e-3 = 0.025, below the first tensor's 0.1)
    assert max_rel_error([got, torch.tensor([1e-4])], [want, torch.tensor([0.0])]) == \
        pytest.approx(0.1, rel=1e-5)
