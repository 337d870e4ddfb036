#!/usr/bin/env bash
# GPU check in one command, hard-capped under 8 minutes (the whole script re-runs itself under
# `timeout`): environment, the GPU tests (compiled Triton kernels, not the interpreter), then
# benchmarks/gpu_bench.py and its table (causal, sliding window, causal + padding with the masks
# as predicates; useful and computed-tile TFLOP/s).
#
#   bash benchmarks/gpu_check.sh            # from anywhere; results go to $OUT if set
#
# Expects the project installed (pip install --no-deps --no-build-isolation -e .) and a CUDA GPU.
# Budget: tests <= 170 s, static <= 160 s, decode <= 75 s, TMA A/B <= 55 s, then the benchmark gets
# what is left (at most 230 s of rows; on the timeout's SIGTERM it prints the table of what it
# measured within the 15 s grace), total <= 470 s.
set -u
if [ -z "${GPU_CHECK_INNER:-}" ]; then
    GPU_CHECK_INNER=1 exec timeout -k 5 470 bash "$0" "$@"
fi
cd "$(dirname "$0")/.."
RES="${OUT:-benchmarks/results}"
mkdir -p "$RES"
start=$(date +%s)
unset TRITON_INTERPRET  # the tests must run compiled on the GPU

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python - <<'EOF' || true
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
import fusion_pass.kernels.ops as ops
try:
    import fusion_pass.kernels.triton_attention as ta
    print("triton_attention:", ta.__file__, "| block_ranges (key-block skipping):",
          hasattr(ta, "block_ranges"))
except Exception as e:
    print("triton_attention NOT importable:", type(e).__name__, e)
EOF

echo "== GPU tests"
if [ -f tests/test_triton_kernels.py ]; then
    # the suite, then the full-tile / decode-band / autotune tests (their extra tile configs are
    # compiled last, so a slow compile cuts them, not the suite)
    timeout -k 5 170 python -m pytest tests/test_triton_kernels.py tests/test_triton_full_tiles.py \
        -q -rfE --maxfail=10 -p no:cacheprovider -o addopts="" 2>&1 | tail -25
    echo "tests rc=${PIPESTATUS[0]} (124: timed out)"
else
    timeout -k 5 170 python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -25
    echo "tests rc=${PIPESTATUS[0]} (5: no gpu tests collected; 124: timed out)"
fi
echo "tests took $(( $(date +%s) - start )) s"

echo "== static check (benchmarks/gpu_static.py) for this device, and static vs real"
# the gates of issue 15 for this GPU's architecture (d=128 bf16, every pattern), then the same
# kernels compiled by the JIT on the device: registers and spills must match the static figures
cc=$(python -c "import torch; a, b = torch.cuda.get_device_capability(); print(100 if a >= 10 else 90 if a == 9 else 80)" 2>/dev/null || echo 90)
timeout -k 5 100 python benchmarks/gpu_static.py --arch "$cc" --d 128 --dtype bfloat16 -j 8 --cache "$RES/gpu_static_cache.json" \
    --json "$RES/gpu_static.json" --markdown "$RES/gpu_static.md" > "$RES/gpu_static.log" 2>&1
echo "static rc=$? (1: a gate failed; 124: timed out); failures:"; grep '^FAIL' "$RES/gpu_static.log" | head -20
timeout -k 5 60 python benchmarks/gpu_static.py --real --d 128 --dtype bfloat16 --pattern plain causal softcap \
    > "$RES/gpu_static_real.log" 2>&1
echo "static-vs-real rc=$?"; tail -8 "$RES/gpu_static_real.log"
echo "static took $(( $(date +%s) - start )) s"

echo "== decode (split-KV kernels vs SDPA backends, GB/s against the copy bandwidth)"
timeout -k 5 75 python benchmarks/gpu_decode_bench.py --budget-s 45 --json "$RES/gpu_decode.json" \
    2>&1 | tee "$RES/gpu_decode.log" | tail -30
echo "decode rc=${PIPESTATUS[0]} (124: timed out)"
echo "decode took $(( $(date +%s) - start )) s"

echo "== TMA A/B (FUSION_PASS_TMA=1: K/V, and Q/dO in the dK/dV kernel, through tensor descriptors)"
# opt-in until measured: ours with and without it, side by side, d=128 bf16 at N=8192
timeout -k 5 55 python benchmarks/gpu_bench.py --impls ours ours_tma --dims 128 --sizes 8192 \
    --patterns causal window --budget-s 30 --json "$RES/gpu_bench_tma.json" 2>&1 \
    | tee "$RES/gpu_bench_tma.log" | grep -v '^  File\|^    ' | tail -12
echo "tma rc=${PIPESTATUS[0]} (124: timed out)"
echo "tma took $(( $(date +%s) - start )) s"

echo "== benchmark"
left=$(( 460 - ($(date +%s) - start) ))
budget=$(( left - 50 ))  # the benchmark gets what the steps before left
[ "$budget" -gt 230 ] && budget=230
if [ "$budget" -lt 30 ]; then
    echo "no time left for the benchmark"
    exit 1
fi
timeout -k 15 $(( budget + 40 )) python benchmarks/gpu_bench.py --budget-s "$budget" \
    --json "$RES/gpu_bench.json" 2>&1 | tee "$RES/gpu_bench.log" | grep -v '^  File\|^    ' | tail -100
echo "bench rc=${PIPESTATUS[0]} (124: timed out; the per-row log is in $RES/gpu_bench.log)"
echo "total $(( $(date +%s) - start )) s"
