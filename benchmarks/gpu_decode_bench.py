"""GPU decode throughput (issue 15): few queries (Nq <= 16) over a long KV cache, where attention is
bound by reading K and V once. fusion_pass's split-KV kernels (``attn_decode`` +
``attn_decode_combine``, chosen by ``triton_attention.decode_plan``) vs SDPA's backends (cuDNN,
flash, efficient; ``enable_gqa``), bf16, grouped-query attention (32 query heads, 8 K/V heads).

    python benchmarks/gpu_decode_bench.py                  # the default rows
    python benchmarks/gpu_decode_bench.py --json out.json --budget-s 60

Bandwidth: bytes moved (K, V, Q read once, O written) / median time, against the memory bandwidth a
plain device copy reaches on this card (measured here: the practical peak) and the datasheet peak
when the card is known. Each row's output is checked against SDPA's math backend in fp32.
Target (issue 15): >= 70% of the memory bandwidth at batch 1 with a 32k cache.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

DATASHEET_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "B200": 8000.0, "L40S": 864.0}
ROWS = [  # (B, Nq, Nk)
    (1, 1, 32768), (1, 1, 8192), (1, 4, 32768), (8, 1, 8192), (1, 16, 16384), (32, 1, 4096),
]


def copy_bandwidth(torch, triton):
    """GB/s of a 2 GiB device-to-device copy (read + write)."""
    x = torch.empty(1 << 29, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=5, rep=50)
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import torch
    import triton
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from fusion_pass.kernels import triton_attention as ta
    from fusion_pass.kernels.spec import AttentionSpec, ScoreOp

    if not torch.cuda.is_available():
        print("gpu_decode_bench: no CUDA device")
        return 2
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in DATASHEET_GBS.items() if k in name), None)
    copy = copy_bandwidth(torch, triton)
    print(f"{name}: copy {copy:.0f} GB/s" + (f", datasheet {peak:.0f} GB/s" if peak else ""))
    H, HK, d = a.heads, a.kv_heads, a.d
    spec = AttentionSpec(score_ops=(ScoreOp("mul", "const", value=d ** -0.5),), qk_dtype="bfloat16",
                         softmax_dtype="bfloat16", prob_dtype="bfloat16", out_dtype="bfloat16")
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    out_rows, t0 = [], time.time()
    print(f"{'B':>3} {'Nq':>3} {'Nk':>6} {'impl':>10} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'%peak':>6} "
          f"{'maxdiff':>8} plan")
    for B, nq, nk in ROWS:
        if time.time() - t0 > a.budget_s:
            print(f"budget: skipping B={B} Nq={nq} Nk={nk}")
            continue
        q = torch.randn(B, H, nq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, HK, nk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, HK, nk, d, device="cuda", dtype=torch.bfloat16)
        nbytes = 2 * (k.numel() + v.numel() + 2 * q.numel())
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
        plan = ta.decode_plan(B, H, H // HK, nq, nk, d, d, spec, q.device)
        impls = {"ours": lambda: ta.forward(q, k, v, [], spec)[0]}
        for label, be in backends.items():
            def call(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            impls[label] = call
        for label, fn in impls.items():
            row = dict(B=B, Nq=nq, Nk=nk, H=H, HK=HK, d=d, impl=label, device=name,
                       plan=str(plan) if label == "ours" else "")
            try:
                diff = (fn().float() - ref).abs().max().item()
                ms = triton.testing.do_bench(fn, warmup=10, rep=100)
                gbs = nbytes / (ms * 1e-3) / 1e9
                row.update(ms=ms, gbs=gbs, pct_copy=100 * gbs / copy,
                           pct_peak=100 * gbs / peak if peak else None, maxdiff=diff)
                print(f"{B:>3} {nq:>3} {nk:>6} {label:>10} {ms:8.4f} {gbs:7.0f} {row['pct_copy']:6.1f} "
                      f"{row['pct_peak'] or 0:6.1f} {diff:8.4f} {row['plan']}")
            except Exception as e:  # an unsupported backend for this shape: recorded, not fatal
                row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
                print(f"{B:>3} {nq:>3} {nk:>6} {label:>10} ERROR {row['error'][:80]}")
            out_rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=name, copy_gbs=copy, peak_gbs=peak, rows=out_rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
