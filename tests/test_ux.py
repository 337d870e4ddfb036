"""What a new user meets in the first hour (issue 12): sites named by module, explain() leaving
other compiled models alone, options composed with mode=, one-line CLI errors, an install without
Triton, a quiet default test run, no noise, pictures, progress lines."""
import importlib.util
import logging
import os
import re
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

import fusion_pass
from fusion_pass import Backend, FusionMissedError

ROOT = Path(__file__).resolve().parent.parent


class Attention(torch.nn.Module):
    def __init__(self, dim=16, heads=2, causal=False):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.heads, self.causal = heads, causal

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) * (C // self.heads) ** -0.5
        if self.causal:
            i = torch.arange(N, device=x.device)
            s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)


class Net(torch.nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"attn": Attention(causal=causal)})
                                           for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["attn"](x)
        return x


def _missed(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2), -1)
    return p @ v, p  # the probabilities are returned: not fusable


def _qkv(n=8):
    return [torch.randn(2, 2, n, 8) for _ in range(3)]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py: Dynamo reset around each test


# ---- 1. sites named by their module --------------------------------------------------------------

def test_sites_are_named_by_module_in_report_strict_errors_and_files(tmp_path):
    expl = fusion_pass.explain(Net(), torch.randn(2, 8, 16))
    assert [s.module for s in expl.sites] == ["layers.0.attn", "layers.1.attn"]
    text = str(expl)
    assert re.search(r"site layers\.0\.attn \(node \w+\): fused", text), text

    # outside any module: the function and its line
    expl = fusion_pass.explain(_missed, *_qkv())
    assert re.fullmatch(r"_missed \(test_ux\.py:\d+\)", expl.sites[0].module)

    torch.compile(Net(), backend=Backend(strict=True, report=str(tmp_path), inductor=False))(
        torch.randn(2, 8, 16))
    with pytest.raises(Exception) as err:  # strict: the error names the site's place
        torch.compile(_missed, backend=Backend(strict=True, inductor=False))(*_qkv())
    if not isinstance(getattr(err.value, "inner_exception", err.value), FusionMissedError):
        raise err.value
    assert "_missed (test_ux.py:" in str(err.value) and "(node " in str(err.value)
    report = next(tmp_path.glob("graph_*.txt")).read_text()
    assert "site layers.1.attn (node " in report


def test_module_paths_are_cleaned_of_dynamo_prefixes():
    from fusion_pass.report import module_path

    class Node:
        def __init__(self, path):
            self.meta = {"nn_module_stack": {"x": ("L['self'].outer", Net), "y": (path, Attention)}}

    cases = {"L['self'].layers.0.self_attn": "layers.0.self_attn",
             "L['self'].layers[0].attn": "layers.0.attn",
             "L['self']._modules['h']._modules['3'].attn": "h.3.attn",
             "getattr(L['self'].layers, '0').attn": "layers.0.attn",
             "L['model'].encoder.layer.1": "model.encoder.layer.1",
             "L['self']": "Attention"}
    assert {p: module_path(Node(p)) for p in cases} == cases


# ---- 2. explain() leaves the user's compiled models alone ----------------------------------------

def test_explain_does_not_recompile_other_models():
    from torch._dynamo.eval_frame import _get_total_cache_entry_count
    from torch._dynamo.utils import counters

    net, x = Net(), torch.randn(2, 8, 16)
    user = torch.compile(net, backend="fusion_pass", options={"inductor": False})
    user(x)
    graphs = counters["stats"]["unique_graphs"]
    first = fusion_pass.explain(net, x)       # the same model, and another one
    fusion_pass.explain(_missed, *_qkv())
    again = fusion_pass.explain(net, x)       # explained twice: compiled again, same report
    assert counters["stats"]["unique_graphs"] == graphs + 3
    assert str(first) == str(again) and len(first.fused) == 2

    user(x)                                   # no recompile of the user's model
    assert counters["stats"]["unique_graphs"] == graphs + 3
    # code only explain compiled holds no entries afterwards
    assert _get_total_cache_entry_count(_missed) == 0


# ---- 3. options with any mode=, validated when given ---------------------------------------------

def test_backend_with_options_composes_with_mode(tmp_path, monkeypatch):
    import torch._inductor.compile_fx as cfx
    seen = []
    real = cfx.compile_fx

    def spy(gm, example_inputs, config_patches=None, **kw):
        seen.append(dict(config_patches or {}))
        return real(gm, example_inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    q, k, v = _qkv()
    f = torch.compile(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v,
                      backend=Backend(strict=True, report=str(tmp_path)), mode="reduce-overhead")
    torch.testing.assert_close(f(q, k, v), torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
    assert seen and seen[0].get("triton.cudagraphs") is True  # the mode reached Inductor
    assert "fused" in next(tmp_path.glob("graph_*.txt")).read_text()

    # strict + mode= together: a miss is an error
    with pytest.raises(Exception) as err:
        torch.compile(_missed, backend=Backend(strict=True),
                      mode="max-autotune-no-cudagraphs")(*_qkv())
    assert isinstance(getattr(err.value, "inner_exception", err.value), FusionMissedError)


def test_backend_mode_argument_and_equality(monkeypatch):
    import torch._inductor.compile_fx as cfx
    seen = []
    monkeypatch.setattr(cfx, "compile_fx",
                        lambda gm, ex, config_patches=None, **kw: seen.append(config_patches) or gm.forward)
    torch.compile(lambda x: x.sin() + 1, backend=Backend(mode="max-autotune-no-cudagraphs"))(torch.randn(3))
    assert seen[0]["max_autotune"] is True
    assert Backend(strict=True, report="a") == Backend(report="a", strict=True)
    assert hash(Backend(strict=True)) == hash(Backend(strict=True)) and Backend() != Backend(strict=True)
    assert "strict=True" in repr(Backend(strict=True))


@pytest.mark.parametrize("make, message", [
    (lambda: Backend(strict="yes"), "must be True or False"),
    (lambda: Backend(bogus=1), "unknown fusion_pass option"),
    (lambda: Backend(mode="fastest"), "Unrecognized mode"),
    (lambda: fusion_pass.configure(dump=3).__enter__(), "folder path"),
])
def test_bad_options_fail_when_given(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_configure_applies_to_string_backends_with_mode():
    with fusion_pass.configure(strict=True, inductor=False):
        with pytest.raises(Exception) as err:
            torch.compile(_missed, backend="fusion_pass", mode="reduce-overhead")(*_qkv())
        assert fusion_pass.explain(_missed, *_qkv()).missed  # explain reports, never raises
    assert isinstance(getattr(err.value, "inner_exception", err.value), FusionMissedError)
    torch._dynamo.reset()
    out, p = torch.compile(_missed, backend="fusion_pass",
                           options={"inductor": False})(*_qkv())  # outside: not strict again
    assert p.shape[-1] == 8


# ---- 4. the command line -------------------------------------------------------------------------

def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "fusion_pass", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


def test_cli_typo_in_class_is_one_line_with_a_suggestion(capsys):
    pytest.importorskip("transformers")
    from fusion_pass.__main__ import main
    assert main(["explain", "transformers:GPT2Modle"]) == 2  # returned: no traceback
    errors = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("[fusion_pass")]
    assert len(errors) == 1 and "GPT2Modle not found in transformers" in errors[0]
    assert "did you mean GPT2Model" in errors[0]


def test_cli_unknown_config_key_names_the_valid_keys(capsys):
    pytest.importorskip("transformers")
    from fusion_pass.__main__ import main
    assert main(["explain", "transformers:GPT2Model", "--config", "n_layers=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown --config key(s) n_layers for GPT2Config" in err
    assert "did you mean n_layer" in err and "valid keys:" in err and "n_embd" in err


@pytest.mark.parametrize("cls, config, sites", [
    ("WhisperModel", "d_model=32,encoder_layers=1,decoder_layers=1,encoder_attention_heads=2,"
     "decoder_attention_heads=2,encoder_ffn_dim=32,decoder_ffn_dim=32,num_mel_bins=8,"
     "max_source_positions=16", 3),
    pytest.param("transformers:T5Model", "d_model=32,num_layers=1,num_heads=2,d_kv=16,d_ff=32,"
                 "vocab_size=100", 3, marks=pytest.mark.slow),
], ids=["whisper", "t5"])
def test_cli_builds_encoder_decoder_inputs_from_the_config(cls, config, sites, capsys):
    pytest.importorskip("transformers")
    from fusion_pass.__main__ import main
    assert main(["explain", cls, "--config", config]) == 0
    out = capsys.readouterr().out
    assert f"{sites} attention site(s) fused, 0 not fused" in out
    assert re.search(r"site (encoder|decoder)\.\S+ \(node \w+\): fused", out)


def test_console_script_is_installed_and_documented():
    toml = (ROOT / "pyproject.toml").read_text()
    assert 'fusion-pass = "fusion_pass.__main__:main"' in toml
    readme = (ROOT / "README.md").read_text()
    assert "fusion-pass explain" in readme and "fusion-pass demo" in readme


# ---- 5. no GPU compiler on CPU-only installs -----------------------------------------------------

def test_triton_is_an_extra_and_the_package_runs_without_it():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    assert "triton" in project["optional-dependencies"]["gpu"]
    assert "triton" in project["optional-dependencies"]["test"]  # the interpreter tests
    script = textwrap.dedent("""
        import sys, importlib.abc
        class NoTriton(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "triton":
                    raise ImportError("No module named 'triton'")
        sys.meta_path.insert(0, NoTriton())
        import torch, fusion_pass
        def f(q, k, v):
            return (q @ k.transpose(-1, -2) * 0.25).softmax(-1) @ v
        q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))
        expl = fusion_pass.explain(f, q, k, v)
        assert len(expl.fused) == 1 and "fusion-pass[gpu]" in expl.fused[0].kernel_source()
        out = torch.compile(f, backend="fusion_pass", options={"inductor": False})(q, k, v)
        out.sum().backward()
        assert (out - f(q, k, v)).abs().max() < 1e-5 and "triton" not in sys.modules
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


# ---- 6. a default test run that fits a busy machine ----------------------------------------------

def test_long_sweeps_are_marked_slow_and_ci_runs_both():
    import tomllib
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert ini["addopts"] == ["-m", "not slow"]
    assert any(m.startswith("slow:") for m in ini["markers"])
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln.strip() for ln in setup.splitlines() if ln.strip() and not ln.startswith("#")]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith(("#", "set ", "cd "))]
    tests = [c for c in commands if "pytest" in c]
    assert len(tests) == 2 and any("-m slow" in c for c in tests)
    assert ci == tests  # CI runs exactly the README's test commands, fast ones then slow ones
    for name in ("test_families.py", "test_golden_graphs.py", "test_fuzz.py"):
        assert "pytest.mark.slow" in (ROOT / "tests" / name).read_text(), name


# ---- 7. no noise ---------------------------------------------------------------------------------

def test_memory_measurement_prints_no_profiler_lines(capfd):
    from fusion_pass.measure import peak_bytes
    assert peak_bytes(lambda: torch.empty(1 << 20, dtype=torch.uint8).fill_(1)) >= 1 << 20
    captured = capfd.readouterr()
    assert "USDT" not in captured.err + captured.out and "profiler_start" not in captured.err


def test_log_messages_carry_no_prefix_of_their_own(caplog):
    with caplog.at_level(logging.INFO, logger="fusion_pass"):
        fusion_pass.explain(Net(), torch.randn(2, 8, 16))
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("fusion_pass")]
    assert msgs and all(not m.startswith("fusion_pass") for m in msgs)
    assert any(m.startswith("site layers.0.attn (node ") for m in msgs)


def test_torch_logs_fusion_pass_shows_the_sites():
    script = ("import torch, fusion_pass\n"
              "f = lambda q, k, v: (q @ k.transpose(-1, -2)).softmax(-1) @ v\n"
              "torch.compile(f, backend='fusion_pass', options={'inductor': False})"
              "(*torch.randn(3, 1, 2, 8, 4))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCH_LOGS="fusion_pass")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"site .* fused: score_mod", r.stderr), r.stderr[-2000:]


# ---- 8. pictures ---------------------------------------------------------------------------------

def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_png_writer_round_trips():
    import numpy as np

    from fusion_pass.pictures import write_png
    img = np.zeros((3, 2, 3), dtype=np.uint8)
    img[1, 1] = (10, 20, 30)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fp_png_{os.getpid()}.png"
    write_png(str(path), img)
    data = path.read_bytes()
    assert _png_size(path) == (2, 3)
    idat = data.index(b"IDAT")
    n = int.from_bytes(data[idat - 4:idat], "big")
    raw = zlib.decompress(data[idat + 4:idat + 4 + n])
    assert raw[1 + 2 * 3 + 1 + 3:][:3] == bytes((10, 20, 30))  # row 1 (after its filter byte), pixel 1
    path.unlink()


@pytest.mark.parametrize("renderer", ["matplotlib", "none"])
def test_dump_draws_before_after_and_each_mask_block_map(tmp_path, monkeypatch, renderer):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no graphviz
    if renderer == "matplotlib":
        pytest.importorskip("matplotlib")
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    expl = fusion_pass.explain(Net(causal=True), torch.randn(1, 40, 16))
    files = {Path(p).name for p in expl.dump(str(tmp_path))}
    stem = "graph_0_layers.0.attn."
    region = [f for f in files if f.startswith(stem) and ".region." in f]
    assert any(f.endswith(".dot") for f in region)
    dot = next(tmp_path.glob(f"{stem}*.region.dot")).read_text()
    assert "cluster_before" in dot and "cluster_after" in dot and "attention" in dot
    notes = (tmp_path / "NOTES.txt").read_text()
    if renderer == "matplotlib":
        assert any(f.endswith(".region.png") for f in region)
        assert "install graphviz" in notes
    else:
        assert not any(f.endswith(".png") and ".region" in f for f in files)
        assert "install graphviz" in notes and "matplotlib" in notes

    # the causal mask's block map: 40 x 40 scores in 8 x 8 tiles of 5 x 5, 32 pixels a tile
    assert _png_size(next(tmp_path.glob(f"{stem}*.mask0.png"))) == (8 * 32 + 1, 8 * 32 + 1)
    text = next(tmp_path.glob(f"{stem}*.mask0.txt")).read_text()
    rows = text.strip().splitlines()[-8:]
    assert rows == ["#" * t + "+" + "." * (7 - t) for t in range(8)], text


def test_block_maps_read_the_users_padding_mask():
    import numpy as np

    from fusion_pass.pictures import FULL, PARTIAL, SKIPPED

    def causal_padded(q, k, v, mask):  # causal and the user's (B, N) padding mask, as decoders build it
        n = q.shape[-2]
        i = torch.arange(n)
        keep = (i[None, :] <= i[:, None])[None, None] & (mask[:, None, None, :] != 0)
        s = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~keep, torch.finfo(q.dtype).min)
        return s.softmax(-1) @ v

    q, k, v = _qkv(16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 8:] = 0  # batch entry 0: keys 8..15 are padding
    site = fusion_pass.explain(causal_padded, q, k, v, mask).fused[0]
    assert site.spec.masks, "the mask should reach the kernel as a predicate"
    (_, classes, block, why), = site.block_maps(block=(4, 4))
    r, c = np.indices((4, 4))
    want = np.where(c >= 2, SKIPPED, np.where(c < r, FULL, np.where(c == r, PARTIAL, SKIPPED)))
    assert block == (4, 4) and "batch 0" in why and (classes == want).all(), classes
    (_, classes1, _, _), = site.block_maps(block=(4, 4), batch=1)
    assert (classes1 == np.where(c < r, FULL, np.where(c == r, PARTIAL, SKIPPED))).all(), classes1


def test_benchmark_plots_are_written_next_to_the_table(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("plot", ROOT / "benchmarks" / "plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    rows = [dict(variant="scale", pass_=p, impl=i, N=n, ms=n * (1 + j), peak_bytes=n * 2 ** 20 * (1 + j))
            for p in ("fwd", "fwdbwd") for j, i in enumerate(("stock", "ours")) for n in (256, 512)]
    table = tmp_path / "cpu_core.json"
    written = plot.plot_results(table, rows)
    assert sorted(p.name for p in written) == ["cpu_core_scale_fwd.png", "cpu_core_scale_fwdbwd.png"]
    assert all(_png_size(p)[0] > 300 for p in written)
    assert list((ROOT / "benchmarks" / "results").glob("cpu_*_fwd.png"))  # committed with the tables


# ---- 9. progress lines ---------------------------------------------------------------------------

def test_progress_lines_go_to_stderr(capsys):
    from fusion_pass.measure import progress
    progress("compiling ours", "cpu_bench")
    out = capsys.readouterr()
    assert out.out == "" and re.fullmatch(r"\[cpu_bench +\d+\.\ds\] compiling ours\n", out.err)
    for name in ("cpu_bench.py", "score_mod_bench.py", "compile_time.py", "families.py"):
        assert "progress(" in (ROOT / "benchmarks" / name).read_text(), name


@pytest.mark.slow
def test_demo_says_what_it_does_and_prints_its_numbers():
    pytest.importorskip("transformers")
    r = _cli("demo", "--seq", "64", "--layers", "1", "--hidden", "32", "--heads", "2", "--repeats", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [ln for ln in r.stderr.splitlines() if ln.startswith("[fusion_pass")]
    assert len(steps) >= 8 and any("compiling fusion_pass" in s for s in steps), r.stderr
    assert "| forward | fusion_pass |" in r.stdout and "(how: " in r.stdout
    assert "USDT" not in r.stderr + r.stdout
