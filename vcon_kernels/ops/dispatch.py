"""Which strategy runs a VCON linear call: the fused prologue GEMM, or W_eff + cuBLAS.

* ``"fused"``: the Triton GEMM transforms W tiles in registers (``vcon_matmul.py``); no
  weight-sized temporary, one kernel per GEMM. Each W tile is transformed once per
  BLOCK_M rows of x, so the extra ALU work grows with M / BLOCK_M; while the GEMM is
  memory-bound on W (small M: decoding, small micro-batches) it is free.
* ``"weff"``: one elementwise kernel writes W_eff (``blend_weight.py``), then
  ``torch.mm`` (cuBLAS): the transform runs once per weight element whatever M is, and
  the GEMM is the vendor's, at the cost of writing and reading one weight-sized
  temporary (freed right after the GEMM).

The crossover is a number of rows of x per strategy class, in ``FUSED_MAX_M``; the value
is argued from the sm_90 compiler's output next to the constant (no GPU measurement yet);
``bench/bench_gpu.py`` measures both strategies per mode and M and prints the crossover. Force one with
``VCON_TRITON_STRATEGY=fused|weff`` or ``with force("fused"):``.

Example usage::

    choose(m=16, spec=spec, dtype=torch.bfloat16)       # "fused"
    choose(m=512, spec=spec, dtype=torch.bfloat16)      # "weff"
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from ..spec import TransformSpec

STRATEGIES = ("fused", "weff")
# Largest M (rows of x) that runs fused, per class of spec. Not yet measured on a GPU; chosen from
# the sm_90 compiler's output (bench/SM90.md and the project's sm_90 audit notes), roughly +-50%:
# * the fused GEMM redoes the W transform M / BLOCK_M times; transform time / MMA time per tile is
#   about 11.8 x (hot-loop instructions per weight element) / BLOCK_M on an H200 (~67 TFLOP/s of
#   CUDA-core issue against ~790 TFLOP/s of bf16 wgmma). At 6-30 instructions per element and
#   BLOCK_M 64-128 that is 0.5-5x the MMA time: fused is estimated 2-4x slower than "weff" at
#   M = 512 and 2-11x slower than cuBLAS at M = 8192;
# * "weff" pays one elementwise pass over W (read W, write W_eff, ~3 bytes per weight for bf16 at
#   ~4.3 TB/s) whatever M is: ~1.04-1.09x cuBLAS at M = 8192, ~1.5-2x dense at M = 512;
# * at decode sizes (M <= 32, BLOCK_M 16-32 tiles on mma.sync) the GEMM is bound by reading W once,
#   the transform hides under that read and fused saves the W_eff round trip: fused is ahead there.
# * with swap-AB (one wgmma in flight during the transform) and 256-token tiles the compiler shows
#   11.5 (prune) / 14.6 (binary) / 23 (int8) instructions per element at BLOCK_M 256: transform / MMA
#   ~0.5 / 0.7 / 1.1, so fused would be ~1.1-2x cuBLAS at M = 8192 where they overlap, still behind
#   "weff" there, and at best level with it at M = 512 (prune, binary): not enough to move the line
#   without a measurement.
# So fused only up to M = 32, for every mode; bench/bench_gpu.py measures the crossover to put here.
FUSED_MAX_M = {"transform": 32, "lowrank": 32}
_local = threading.local()


def _check(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    return name


@contextlib.contextmanager
def force(strategy: str):
    """Force a strategy inside a ``with`` block (thread-local); for tests and benchmarks."""
    previous = getattr(_local, "strategy", None)
    _local.strategy = _check(strategy)
    try:
        yield
    finally:
        _local.strategy = previous


def forced():
    strategy = getattr(_local, "strategy", None)
    if strategy is not None:
        return strategy
    env = os.environ.get("VCON_TRITON_STRATEGY")
    return _check(env) if env else None


def spec_class(spec: TransformSpec, dtype: torch.dtype) -> str:
    """The row of FUSED_MAX_M (``dtype`` is kept for a measured per-dtype split)."""
    return "lowrank" if spec.lowrank else "transform"


def choose(m: int, spec: TransformSpec, dtype: torch.dtype) -> str:
    """The strategy for an (m, K) input; see the module docstring."""
    strategy = forced()
    if strategy is not None:
        return strategy
    return "fused" if m <= FUSED_MAX_M[spec_class(spec, dtype)] else "weff"


def _transform_words(spec: TransformSpec) -> str:
    parts = []
    if spec.has_prune:
        parts.append({1: "threshold mask", 2: f"{spec.nm_n}:{spec.nm_m} mask computed in the tile",
                      3: "stored bit-packed mask"}[spec.prune])
    if spec.has_quant:
        parts.append("binary s*sign" if spec.bits == 1 else f"int{spec.bits} fake quant (round half even)")
    return " then ".join(parts)


def describe(strategy: str, m: int, rows: int, cols: int, spec: TransformSpec) -> str:
    """One line for ``vk.explain``: backend, strategy, and what each kernel does."""
    head = f"triton[{strategy}] M={m} weight=({rows}, {cols}): "
    if spec.lowrank:
        if strategy == "fused":
            return head + ("t' = (1-beta) x V^T (thin Triton GEMM), then one Triton GEMM over K + r: "
                           "y = [x | t'] . [beta W | U]^T + b, written once")
        return head + "t' = (1-beta) x V^T (thin Triton GEMM), beta W by one elementwise kernel, torch.mm x2 (cuBLAS)"
    words = _transform_words(spec)
    if strategy == "fused":
        return head + f"one Triton GEMM, W tiles transformed in registers ({words}); no W_eff in memory"
    return head + f"W_eff by one elementwise Triton kernel ({words}), then torch.mm (cuBLAS)"
