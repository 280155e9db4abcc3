#!/usr/bin/env bash
# One prepared call on the GPU device machine (torch + Triton preinstalled there, no network):
#   1. the Triton kernel tests natively on the GPU (no interpreter; one tile config per kernel),
#   2. bench/bench_gpu.py: the issue-3 table (bf16 H200 targets), CSV under $OUT, table printed last,
#   3. bench/bench_gpu_infer.py: finalized layers vs nn.Linear in the time left (issue 11, CSV under $OUT).
# Device tool call: run(command="bash bench/gpu_check.sh", timeout_s=600). Locally: OUT=/tmp/out bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
# The package runs from the working tree: nothing to install (torch, triton, pytest, xdist are in the image).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
PY
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$OUT/env.txt"

# Time limits (8 minutes in all): tests 150 s, benchmark 240 s, the finalized-layer benchmark what is left.
echo "== 1. kernel tests on the GPU"
test_start=$(date +%s)
VCON_TRITON_AUTOTUNE=0 timeout 150 python3 -m pytest -q -x -p no:cacheprovider -n 8 \
    tests/test_triton_state.py tests/test_triton_blend.py tests/test_triton_linear.py tests/test_triton_modules.py \
    2>&1 | tee "$OUT/tests.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc in $(( $(date +%s) - test_start ))s"

echo "== 2. benchmark"
# Tune over the two large tiles (+ the decode one) only: 8 configs x ~20 s of compile per key would
# not fit the 8-minute call; the compile check (ops/aot.py) still compiles all of them on CPU.
export VCON_TRITON_TUNE_CONFIGS=${VCON_TRITON_TUNE_CONFIGS:-2}
timeout 240 python3 bench/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -n 80
bench_rc=${PIPESTATUS[0]}

echo "== 3. finalized layers: Triton dequant GEMM vs nn.Linear (bench/bench_gpu_infer.py)"
# Whatever is left of 8 minutes ($SECONDS: since this script started), 20 s kept for the transfer;
# one tile config per M regime (no autotune compiles); rows are written as they are measured.
left=$(( 460 - SECONDS ))
infer_rc=0
if (( left >= 60 )); then
    VCON_TRITON_AUTOTUNE=0 timeout "$left" python3 bench/bench_gpu_infer.py --out "$OUT" --budget-s $(( left - 45 )) \
        2>&1 | tee "$OUT/bench_infer.log" | tail -n 45
    infer_rc=${PIPESTATUS[0]}
else
    echo "skipped: ${left}s left of the 8 minutes"
fi
echo "tests rc=$tests_rc bench rc=$bench_rc infer rc=$infer_rc"
exit $(( tests_rc != 0 || bench_rc != 0 || infer_rc != 0 ))
