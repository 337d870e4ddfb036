"""The static GPU check (benchmarks/gpu_static.py) on a few specs: the generated kernels compile
ahead of time for Hopper without a GPU, and their figures pass the gates of issue 15. The whole
matrix is ``python benchmarks/gpu_static.py``; here one causal case (forward, dq, dK/dV and the
reference) and the split-KV decode kernels, cached by Triton after the first run, and the SASS
reader on a listing of its own."""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
pytest.importorskip("triton")
gs = pytest.importorskip("gpu_static")

_why = gs.available()
pytestmark = pytest.mark.skipif(_why is not None, reason=str(_why))

_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0020*/                   MUFU.EX2 R3, R2 ;
        /*0030*/                   FFMA R2, R4, R5, -R6 ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR8], R24 ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   NOP ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""


def test_sass_reader_finds_the_loop_by_its_back_edge():
    r = gs.analyse_sass(_SASS)
    assert (r["hgmma"], r["hmma"], r["mufu"]) == (2, 0, 1)
    assert r["loops"] == 1  # the self-branch after EXIT is no loop: it holds no MMA
    assert (r["loop_mma"], r["loop_mufu"], r["loop_non_mma"]) == (2, 1, 3)


def test_causal_and_decode_compile_for_hopper_and_pass_the_gates(tmp_path):
    # in a process of its own: under TRITON_INTERPRET=1 (this suite on CPU) Triton's own library
    # functions (tl.cdiv, tl.max...) are interpreter objects and cannot be compiled
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "static.json"
    script = os.path.join(os.path.dirname(gs.__file__), "gpu_static.py")
    proc = subprocess.run([sys.executable, script, "--arch", "90", "--d", "64", "--dtype", "bfloat16",
                           "--pattern", "causal", "decode", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    res = json.loads(out.read_text())
    rows = res["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv", "fa2_ref", "attn_decode",
            "attn_decode_combine"} <= kernels, proc.stdout[-2000:]
    for r in rows:
        assert "error" not in r, r
        assert r["regs"] > 0 and (r.get("loop_mma", 0) > 0 or r["kernel"] in gs.NO_DOT_KERNELS), r
    assert res["fails"] == [] and proc.returncode == 0, proc.stdout[-2000:]
