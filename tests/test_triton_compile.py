"""Ahead-of-time GPU compile: every kernel and constexpr variant compiles to a cubin for sm_80 and sm_90.

The interpreter accepts what a GPU compiler rejects (``tl.dot`` with K < 16, layout and dtype
problems, shared memory over the limit), so the variants the launchers actually produce
(``vcon_kernels/ops/aot.py`` records them) are compiled with ptxas from the Triton wheel,
on this CPU machine. It runs in subprocesses because kernels imported under
``TRITON_INTERPRET=1`` (this test process) are interpreted functions, not compilable ones.
"""

import os
import subprocess
import sys

import pytest
import triton  # noqa: F401  (a missing Triton fails this module, it does not skip it)

SHARDS = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_aot(*args, timeout=900):
    env = dict(os.environ, TRITON_INTERPRET="0", VCON_TRITON_AUTOTUNE="0")
    return subprocess.run([sys.executable, "-m", "vcon_kernels.ops.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("shard", range(SHARDS))
def test_every_variant_compiles_for_sm80_and_sm90(shard):
    proc = _run_aot("--arch", "80", "--arch", "90", "--shard", f"{shard}/{SHARDS}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok ", "over-smem "))]
    assert lines, proc.stdout
    assert any(" sm_80 " in line for line in lines) and any(" sm_90 " in line for line in lines)


def test_variant_plan_covers_every_kernel_and_mode():
    """The recorded launches reach every kernel, both GEMM orientations, every epilogue and every transform."""
    proc = _run_aot("--list")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for kernel in ("_vcon_matmul_kernel", "_blend_weight_kernel", "_weight_grad_kernel", "_quant_scales_kernel",
                   "_radix_histogram_kernel", "_radix_select_kernel"):
        assert f"sm_80 {kernel}" in text and f"sm_90 {kernel}" in text, kernel
    for flag in ("B_IS_W=0", "B_IS_W=1", "B_IS_W=2", "EXACT_COEF=True", "LOWRANK=True", "PRUNE=1,QUANT=0",
                 "PRUNE=2,QUANT=0", "PRUNE=0,QUANT=1", "PRUNE=1,QUANT=1", "PRUNE=2,QUANT=1", "SCALE_BY_BETA=True",
                 "PER_ROW=True", "PER_ROW=False", "BINARY=True", "PARTIAL=True", "INPUT_PRECISION=ieee",
                 "autotune-config"):
        assert flag in text, flag
    for dtype in ("bf16", "fp16", "fp32"):
        assert f"_vcon_matmul_kernel {dtype}" in text, dtype
