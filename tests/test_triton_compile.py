"""The honest GPU compile check: recorded launches, specialized as the GPU JIT does, every tile config.

``vcon_kernels/ops/aot.py`` records every launch the ops make (modes x dtypes x strategies x
gradient modes x bias, at one shape per specialization class of a real layer), specializes
the arguments with Triton's own ``native_specialize_impl`` for CUDA, and compiles each
(variant, tile config, arch) job to a cubin with ptxas from the Triton wheel, on this CPU
machine. The full matrix is ~10^4 compiles, so CI compiles the rotation sample of the
current slot (every program family each run; every job within the rotation period, checked
by ``--check-rotation``), in two shards. Any compile error fails. It runs in subprocesses
because kernels imported under ``TRITON_INTERPRET=1`` (this test process) are interpreted.
"""

import os
import re
import subprocess
import sys

import pytest
import triton  # noqa: F401  (a missing Triton fails this module, it does not skip it)

SHARDS = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_aot(*args, timeout=1200):
    env = dict(os.environ, TRITON_INTERPRET="0", VCON_TRITON_AUTOTUNE="1")
    return subprocess.run([sys.executable, "-m", "vcon_kernels.ops.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("shard", range(SHARDS))
def test_ci_sample_compiles_for_sm80_and_sm90(shard):
    proc = run_aot("--ci", "--shard", f"{shard}/{SHARDS}")
    out = proc.stdout
    assert proc.returncode == 0, "\n".join(line for line in out.splitlines() if line.startswith("FAIL"))[-6000:] \
        + out[-2000:] + proc.stderr[-3000:]
    lines = [line for line in out.splitlines() if line.startswith(("ok ", "over-smem "))]
    assert len(lines) >= 40, out[-3000:]
    assert any(" sm_80 " in line for line in lines) and any(" sm_90 " in line for line in lines)
    assert "0 failed" in out


def test_rotation_covers_every_job_and_every_kernel():
    """Every kernel, orientation, epilogue, transform and dtype is recorded; the slots cover every job."""
    proc = run_aot("--list", "--list-all", "--check-rotation", "--ci", "--slot", "0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text, full_text = proc.stdout.split("== every job\n")
    assert "rotation: " in text and " slots of about " in text, text[:2000]
    sampled = int(re.search(r"CI sample, slot 0: (\d+) jobs", text).group(1))
    strata = int(re.search(r"jobs in (\d+) strata", text).group(1))
    assert strata <= sampled <= 2 * 120, (strata, sampled)  # every program family, about the budget
    for dtype in ("bf16", "fp16", "fp32"):
        assert f"_vcon_matmul_kernel {dtype}" in text, dtype
    text = full_text
    for kernel in ("_vcon_matmul_kernel", "_blend_weight_kernel", "_weight_grad_kernel", "_quant_scales_kernel",
                   "_radix_layer_kernel", "_radix_rows_kernel"):
        assert f"sm_80 {kernel}" in text and f"sm_90 {kernel}" in text, kernel
    for flag in ("B_IS_W=0", "B_IS_W=1", "B_IS_W=2", "EXACT_COEF=True", "LOWRANK=True", "PRUNE=1,QUANT=0",
                 "PRUNE=2,QUANT=0", "PRUNE=0,QUANT=1", "PRUNE=1,QUANT=1", "PRUNE=2,QUANT=1", "SCALE_BY_BETA=True",
                 "PASS=0", "PASS=1", "ONE_CHUNK=True", "ONE_CHUNK=False", "INPUT_PRECISION=ieee", "stored_mask=1",
                 "binary=1", "scale_grouped=1", "do_rowsum=1", "stride_bk=1", "M=1", "/odd)", "/decode)", "/tokens)",
                 "[default]", "[BM256xBN128xBK64_w8s3]", "[BM16xBN128xBK64_w4s4]"):
        assert flag in text, flag
