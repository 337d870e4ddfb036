"""The measuring helpers the demo and the benchmarks share (``fusion_pass.measure``): which kernel
each fused call ran on, read from a profiled call; round-robin timing; the grid plot."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from fusion_pass.measure import attention_kernels, profile_call, quiet_profile, round_robin

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _causal(q, k, v):
    n = q.shape[-2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + torch.where(j <= i, 0.0, float("-inf"))
    return s.softmax(-1) @ v


def _softcap(q, k, v):
    s = torch.tanh(q @ k.transpose(-1, -2) / 8.0) * 8.0
    return s.softmax(-1) @ v


@pytest.mark.parametrize("fn, fwd, bwd", [
    (_causal, "ATen flash is_causal x1", "ATen flash is_causal x1"),
    (_softcap, "tiled x1", "tiled x1"),
])
def test_attention_kernels_names_the_kernel_of_each_fused_call(fn, fwd, bwd):
    q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(fn, backend="fusion_pass")
    compiled(q, k, v).sum().backward()  # compile forward and backward
    peak, names, used = profile_call(lambda: compiled(q, k, v).sum().backward(), kernels=True)
    assert used == f"fwd: {fwd}; bwd: {bwd}"
    assert peak > 0 and names.get("fusion_pass::attention")


def test_attention_kernels_is_empty_without_fused_calls():
    with quiet_profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.randn(8, 8).softmax(-1)
    assert attention_kernels(list(prof.profiler.kineto_results.experimental_event_tree())) == ""


def test_round_robin_calls_each_function_once_per_round_in_turn():
    calls, cleared = [], []
    times = round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3,
                        before=lambda: cleared.append(1))
    assert calls == ["a", "b"] * 3 and len(cleared) == 6
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_grid_plot_has_a_panel_per_pattern_and_pass(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("plot", ROOT / "benchmarks" / "plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    rows = [dict(variant=var, pass_=p, impl=i, N=n, ms=n * (1 + j), peak_bytes=n)
            for var in ("scale", "window") for p in ("fwd", "fwdbwd")
            for j, i in enumerate(("stock", "ours", "sdpa")) for n in (256, 512)]
    out = plot.plot_grid(rows, tmp_path / "grid.png", title="test")
    assert out == [tmp_path / "grid.png"] and out[0].stat().st_size > 10_000
