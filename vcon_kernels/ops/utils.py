"""What every Triton op here shares: the interpreter switch, launch settings, rounding helpers.

``INTERPRET`` is read once, at import: whether a kernel is interpreted is fixed when
``@triton.jit`` runs, so ``TRITON_INTERPRET=1`` must be set before this package's kernels
are imported (``tests/conftest.py`` does it on CPU-only machines).

Under the interpreter every kernel runs with ``UPCAST=True``: tiles are converted to fp32
right after loading, because the interpreter's bf16 arithmetic works on raw bit patterns,
and bf16 results are rounded with :func:`bf16_rtne` because its own fp32 -> bf16 cast
truncates. On a GPU ``UPCAST=False`` and the same code uses native casts.

Every launch goes through :func:`launch`, so that the ahead-of-time compile check
(``aot.py``) can record the exact kernels and constexpr variants the launchers produce.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
UPCAST = INTERPRET
# Autotuning benchmarks on the GPU; under the interpreter (or VCON_TRITON_AUTOTUNE=0, used by the
# GPU test run to keep hundreds of tiny shapes from each tuning 8 configs) one config is used.
AUTOTUNE = not INTERPRET and os.environ.get("VCON_TRITON_AUTOTUNE", "1") != "0"

TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1",
}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# 1.5 * 2**23: (x + C) - C rounds fp32 x to the nearest integer, ties to even, for |x| < 2**22.
# It works the same in the interpreter and on the GPU (libdevice.rint fails in the interpreter).
ROUND_MAGIC = 12582912.0


def bucket(n: int) -> int:
    """Autotune key for a dimension that varies between calls (tokens): next power of two, in [16, 16384].

    Sequence lengths 1000 and 1024 share a tuned config instead of each retuning.
    """
    return min(max(triton.next_power_of_2(max(int(n), 1)), 16), 16384)


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for fp32 operands, following torch's own matmul setting (tf32 only when allowed)."""
    if dtype != torch.float32:
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _exact_fma32(x, y, z):
    """fp32 ``x * y + z`` rounded once (numpy), as a GPU's FFMA; ``None`` for other dtypes.

    The product is exact in fp64 and the fp64 sum's own error is recovered exactly (TwoSum); the
    only double-rounding case, an fp64 sum exactly halfway between two fp32 values, is settled by
    the sign of that error.
    """
    import numpy as np

    if not (x.dtype == y.dtype == z.dtype == np.float32):
        return None
    with np.errstate(all="ignore"):
        p = x.astype(np.float64) * y.astype(np.float64)
        z64 = z.astype(np.float64)
        s = p + z64
        bb = s - p
        err = (p - (s - bb)) + (z64 - bb)
        r = s.astype(np.float32)
        d = s - r.astype(np.float64)
        nb = np.nextafter(r, np.where(d > 0, np.float32(np.inf), np.float32(-np.inf)))
        past_mid = (d != 0) & (nb.astype(np.float64) - r.astype(np.float64) == 2 * d) & (err * d > 0)
        return np.where(past_mid & np.isfinite(s), nb, r)


def exact_interpreter_fma() -> None:
    """Make the interpreter's ``tl.math.fma`` round once, like the GPU's (it computes ``x * y + z`` in
    numpy, rounding twice). ``transform.div_by_scale`` derives IEEE quotients from exact FMA
    residuals; without this the interpreter could differ from a GPU (and from torch) in a last bit.
    Called at import under ``TRITON_INTERPRET=1`` only; other dtypes keep Triton's own fma."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_fma, "_vcon_exact", False):
        return
    original = builder.create_fma

    def create_fma(self, x, y, z):
        out = _exact_fma32(x.data, y.data, z.data)
        if out is None:
            return original(self, x, y, z)
        return interpreter.TensorHandle(out, z.dtype.scalar)

    create_fma._vcon_exact = True
    builder.create_fma = create_fma


if INTERPRET:
    exact_interpreter_fma()


# -- launching (with an ahead-of-time recording hook) ----------------------------------------------
_capture = threading.local()


@contextlib.contextmanager
def capture_launches(records: list):
    """Record ``(kernel, kwargs, config)`` for every launch instead of running it (see ``aot.py``)."""
    previous = getattr(_capture, "records", None)
    _capture.records = records
    try:
        yield records
    finally:
        _capture.records = previous


def launch(kernel, grid, **kwargs):
    """Launch ``kernel[grid](**kwargs)`` on the device of the first tensor argument.

    ``enable_fp_fusion=False``: the transforms must round exactly as the plain-torch backend
    (``beta * w + (1 - beta) * q`` as two products and a sum, not an FMA), so that both
    backends take the same rounding decisions and W_eff is bit-identical. ``tl.dot``
    accumulation is not affected.
    """
    records = getattr(_capture, "records", None)
    if records is not None:
        records.append((kernel, kwargs))
        return
    device = next(v.device for v in kwargs.values() if isinstance(v, torch.Tensor))
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](**kwargs, enable_fp_fusion=False)
    else:
        kernel[grid](**kwargs)


# -- tile order --------------------------------------------------------------------------------------------
@triton.jit
def grouped_tile(pid, num_outer, num_inner, GROUP: tl.constexpr):
    """``(outer, inner)`` tile indices of program ``pid`` in grouped order.

    GROUP consecutive outer tiles are swept by every inner tile before the next GROUP start, so the
    inner operand's tiles are reused from L2 GROUP times (the usual GEMM swizzle). Row-major over
    ``num_outer x num_inner`` tiles otherwise; the last group may be shorter.
    """
    in_group = GROUP * num_inner
    first = (pid // in_group) * GROUP
    group_rows = tl.minimum(num_outer - first, GROUP)
    return first + (pid % in_group) % group_rows, (pid % in_group) // group_rows


# -- rounding and casting helpers ---------------------------------------------------------------------
@triton.jit
def bf16_rtne(x):
    """fp32 -> bf16 rounding to nearest even by bit manipulation (the interpreter's cast truncates)."""
    b = x.to(tl.uint32, bitcast=True)
    b = b + (0x7FFF + ((b >> 16) & 1))
    return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_to(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``x`` rounded to ``DTYPE`` (round to nearest even everywhere)."""
    if UPCAST and DTYPE == tl.bfloat16:
        return bf16_rtne(x)
    return x.to(DTYPE)


@triton.jit
def as_operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``x`` rounded to the GEMM operand dtype; kept in fp32 under the interpreter (UPCAST)."""
    if UPCAST:
        return cast_to(x, DTYPE, UPCAST).to(tl.float32)
    return x.to(DTYPE)


@triton.jit
def round_half_even(x):
    """Round to the nearest integer, ties to even (exact for |x| < 2**22; larger values are clamped later)."""
    return (x + 12582912.0) - 12582912.0
