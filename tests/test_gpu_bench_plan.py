"""benchmarks/gpu_bench.py's CPU-side logic (no GPU): the specs it gives ours are the ones the pass
builds, its FLOP counts match the dense predicate, its tile rule matches the kernels' block ranges,
and the dry run works."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import fusion_pass

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.py"
_spec = importlib.util.spec_from_file_location("gpu_bench", _PATH)
gb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gb)

PATTERNS = ("causal", "window", "causal_pad")


@pytest.mark.parametrize("pattern", PATTERNS + ("full",))
def test_kept_pairs_formula_matches_dense_predicate(pattern):
    for b, n, w in ((1, 40, 8), (3, 64, 16), (4, 50, 80)):
        spec = gb.build_spec(pattern, 16, w)
        captured = [gb.attention_mask(b, n)] if pattern == "causal_pad" else []
        want = int(gb.dense_keep(pattern, b, n, w, None).expand(b, 1, n, n).sum()) \
            if pattern in ("window", "causal_pad") else \
            b * n * (n + 1) // 2 if pattern == "causal" else b * n * n
        assert gb.kept_pairs(pattern, b, n, w) == want
        assert gb.dense_kept_pairs(spec, captured, b, 2, n, chunk_elements=300) == want


def _model(pattern, w):
    dt = torch.bfloat16

    def f(q, k, v, am):
        n = q.shape[-2]
        pos = torch.arange(n)
        keep = pos[None, None, None, :] <= pos[None, None, :, None]
        if pattern == "window":
            keep = keep & (pos[None, None, None, :] > pos[None, None, :, None] - w)
        if pattern == "causal_pad":
            keep = keep & am[:, None, None, :].bool()
        m = torch.zeros(keep.shape, dtype=dt).masked_fill(~keep, torch.finfo(dt).min)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return torch.matmul(torch.softmax(s + m, -1), v)
    return f


@pytest.mark.parametrize("pattern", PATTERNS)
def test_spec_is_the_one_the_pass_builds(pattern, fresh_dynamo):
    # inputs that require a gradient: the benchmark times forward and backward, so its spec is
    # a training site's (``inference`` False)
    q, k, v = (torch.randn(2, 2, 32, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    am = gb.attention_mask(2, 32)
    ex = fusion_pass.explain(_model(pattern, 256), q, k, v, am)
    specs = [s.spec for g in ex.graphs for s in g.sites if s.fused]
    assert specs == [gb.build_spec(pattern, 16, 256)]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_tile_rule_matches_the_kernels_block_ranges(pattern):
    ta = pytest.importorskip("fusion_pass.kernels.triton_attention")
    if not hasattr(ta, "block_ranges"):
        pytest.skip("triton_attention has no block_ranges")
    b, h, n = 3, 2, 96
    spec = gb.build_spec(pattern, 16, 24)
    captured = [gb.attention_mask(b, n)] if pattern == "causal_pad" else []
    for bm, bn in ((16, 16), (32, 16), (16, 32)):
        got = gb.rule_ranges(spec, captured, (b, h, n, n), bm, bn, chunk_elements=500)
        want = ta.block_ranges(spec, captured, (b, h, n, n), bm, bn)[0]
        assert torch.equal(got.long(), want.long()), (bm, bn)


def test_dry_run(capsys):
    assert gb.main(["--dry-run", "--sizes", "256", "512", "--dims", "64", "--tokens", "1024",
                    "--window", "64", "--dry-run-max-n", "512"]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and out.count("= formula") == 6


def test_computed_tiles_falls_back_to_the_rule(monkeypatch):
    """Without triton_attention.block_ranges the same tiles come from the rule, marked "rule"."""
    ta = pytest.importorskip("fusion_pass.kernels.triton_attention")
    spec = gb.build_spec("window", 16, 24)
    got = gb.computed_tiles(spec, [], (2, 2, 96, 96), 64, False)
    if hasattr(ta, "block_ranges"):
        monkeypatch.delattr(ta, "block_ranges")
        rule = gb.computed_tiles(spec, [], (2, 2, 96, 96), 64, False)
        assert rule[2] == "rule" and got[2] == "kernel" and rule[:2] == got[:2]
    assert got[0] < got[1]
