"""Weight-only GEMM of a finalized layer: ``y = x W^T + b`` reading the compressed codes, never a dense W.

The CUDA path of ``compressed/matmul.py``. Each program owns a (BLOCK_N output features) x
(BLOCK_M tokens) tile; per K step it loads the *stored* form of a (BLOCK_N, BLOCK_K) slice of
W (int8 codes, packed int4 / int2 codes, sign bits, N:M values or codes + packed in-group
positions), rebuilds that slice in registers exactly as ``storage.materialize()`` does, and
feeds it to ``tl.dot`` with fp32 accumulation:

* int8 / int4 / int2 (``QuantizedWeight``): ``w = float32(code) * s`` with the fp32 scale of the
  element's row (per channel), group (per group) or layer (per tensor); ``code = u + qmin`` for
  the packed formats (value ``i`` of a row in byte ``i * bits // 8`` at bit ``(i * bits) % 8``,
  ``packing.py``);
* binary (``QuantizedWeight``, 1 bit): ``code = 2 * sign_bit - 1``, times the non-zero bit where
  the storage has that plane (exact zeros after pruning);
* N:M (``NMSparseWeight``): ``w[r, g m + p] = values[r, g n + j]`` for the ``j`` whose stored
  position is ``p``, 0 elsewhere (``NMQuantizedWeight``: the same with int8 codes, then ``* s``);
* the slice is rounded once to the activation dtype (``materialize()`` computes in fp32 and
  casts), so ``y`` equals ``F.linear(x, storage.materialize(), bias)`` up to the order of the
  fp32 accumulation.

The tile is computed transposed (``acc[n, m] = sum_k W[n, k] x[m, k]``): the rebuilt weight
slice is the *left* ``tl.dot`` operand, which on sm_90 lets wgmma take it from registers (no
shared-memory round trip, as in the transform GEMMs of ``vcon_matmul.py``, bench/SM90.md), and the token
count, tiny at decode, becomes the MMA's N dimension (16 for M = 1 instead of 64).

Autotune configs cover decode (``BLOCK_M = 16``, narrow N tiles so that a 4096-row weight still
spreads over 128+ programs) and prefill (128 x 128 / 128 x 256 tiles); the early prune keeps the
tiles that fit the bucketed M. From ``DENSE_MIN_M`` rows of x on (an estimate until measured), the
weight is instead rebuilt once per call by ``_dequantize_kernel`` (the same tile code, one pass,
``== materialize()`` bit for bit) and multiplied by cuBLAS: at large M the fused GEMM redoes the
dequantization for every token tile. No host synchronization: launches read only shapes and
strides.

What the sm_90 compiler makes of it (Triton 3.7.1, bf16, specialized as the GPU JIT does,
``ops/aot_compile.py``; never run on a GPU yet). Registers / spill bytes / main-loop SASS
instructions per weight element and thread:

* decode tile 16x64x128 (4 warps): int8 91-96 / 0 / 8.6-8.8, int4 139-191 / 0 / 12.9-13.7, int2
  116 / 0 / 13.3, binary 128-205 / 0 / 11.0, 2:4 107 / 0 / 12.6, 2:4 + int8 150 / 0 / 15.1;
* prefill tile 128x128x64 (8 warps): int8 125-141 / 0 / 11.0-11.2, int4 167-185 / 0 / 14.6-16.3,
  int2 164 / 0 / 12.6, binary 168 / 0 / 19.5, 2:4 169 / 0 / 13.0, 2:4 + int8 168 / 0 / 15.5;
* wgmma and cp.async everywhere but the BLOCK_N = 32 tiles (mma.sync); spills only for N:M with
  m not a power of two (3:6: the per-column gather, 255 registers, 0.5-2.6 KB, ~50 instructions
  per element) and groups straddling K steps (96 columns: up to 412 B at the largest tiles).
  Packed codes (int4 / int2 / bits) are loaded as scalar bytes and cross shared memory once for
  the unpack's layout: the first thing to improve if a GPU shows int4 decode instruction-bound.

Example usage::

    from vcon_kernels.ops.dequant_matmul import dequant_linear, supports
    if supports(layer.storage):
        y = dequant_linear(x2d, layer.storage, layer.bias)    # (M, N), x2d's dtype
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .safe_autotune import safe_autotune
from .safe_autotune import short_tune_bench
from .utils import AUTOTUNE
from .utils import INTERPRET
from .utils import UPCAST
from .utils import as_operand
from .utils import bucket
from .utils import cast_to
from .utils import grouped_tile
from .utils import input_precision
from .utils import launch

# Storage formats (compressed/storage.py IF_*: the numbers csrc/infer.h uses too).
FMT_Q8, FMT_QPACK, FMT_Q1, FMT_NM, FMT_NMQ = 0, 1, 2, 3, 4
SUPPORTED_FORMATS = (FMT_Q8, FMT_QPACK, FMT_Q1, FMT_NM, FMT_NMQ)
# Scale layouts: one per layer, one per row (group = K), one per group of GROUP columns, none (N:M floats).
SCALE_TENSOR, SCALE_CHANNEL, SCALE_GROUP, SCALE_NONE = 0, 1, 2, 3
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_M is the token tile (the MMA's N).
# Decode rows first: memory-bound, they want many programs (N / BLOCK_N >= 128 at N = 4096) and
# long K steps; prefill rows are the usual compute tiles.
GPU_CONFIGS = [
    (16, 32, 128, 4, 4), (16, 32, 256, 4, 3), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3),
    (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
]
# Without autotuning (VCON_TRITON_AUTOTUNE=0): one config per regime of M. Decode: 128 programs at
# N = 4096 (132 SMs on an H100) and 3 x 32 x 256 code bytes in flight per program (an unmeasured guess).
DEFAULT_DECODE = (16, 32, 256, 4, 3)
DEFAULT_PREFILL = (128, 128, 64, 8, 3)
DECODE_MAX_M = 16
# From this many rows of x on, rebuild W in one pass (``dequantize``) and run cuBLAS instead of the
# fused GEMM. An estimate from the sm_90 compile, not a measurement: the fused kernel spends ~7-20
# instructions per weight element per BLOCK_M token tile (about the MMA time at 128-row tiles),
# while one dequantize pass (codes in, bf16 W out) costs ~15 us at 4096 x 4096 on an H100 against a
# ~100 us GEMM at M = 2048. ``bench/bench_gpu_infer.py`` measures both; None: always fused.
DENSE_MIN_M = 1024
DEQUANTIZE_BLOCK = (32, 128)  # (rows, columns) per program of the one-pass dequantize
# Under the interpreter big tiles are cheapest; tests override them to span several tiles.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_N": 4}
TILE_OVERRIDE: dict = {}


@triton.jit
def _unpack(b, BITS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """uint8 bytes (ROWS, COLS * BITS / 8) -> the (ROWS, COLS) unsigned BITS-wide fields, as int32.

    Field ``i`` of a row sits in byte ``i * BITS // 8`` at bit ``(i * BITS) % 8`` (packing.py):
    each byte is shifted by every in-byte offset and the (bytes, fields) pairs are flattened in
    order, so the byte tile itself is loaded contiguously (vectorized).
    """
    PER: tl.constexpr = 8 // BITS
    if PER == 1:
        return b.to(tl.int32)
    shifts = tl.arange(0, PER) * BITS
    fields = (b.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(fields, (ROWS, COLS))


@triton.jit
def _uint_to_f32(u, OFFSET: tl.constexpr):
    """``float(u - OFFSET)`` for int32 ``0 <= u < 2**22``, exactly, without an I2F (quarter rate on sm_90):
    ``2**23 + u`` is the fp32 with bits ``0x4B000000 | u``; one FADD removes ``2**23 + OFFSET``."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _packed_tile(ptr, stride_r, offs_n, n_ok, k0, K, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) BITS-wide fields of columns k0.. of a packed (N, ceil(K BITS / 8)) array."""
    PER: tl.constexpr = 8 // BITS
    kb = k0 // PER + tl.arange(0, BLOCK_K // PER)
    row_bytes = (K * BITS + 7) // 8
    raw = tl.load(ptr + offs_n[:, None].to(tl.int64) * stride_r + kb[None, :],
                  mask=n_ok[:, None] & (kb < row_bytes)[None, :], other=0)
    return _unpack(raw, BITS, BLOCK_N, BLOCK_K)


@triton.jit
def _nm_tile(val_ptr, stride_vn, idx_ptr, stride_in, offs_n, n_ok, k0, K,
             NM_N: tl.constexpr, NM_M: tl.constexpr, INDEX_BITS: tl.constexpr, INT_CODES: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense fp32 (BLOCK_N, BLOCK_K) slice of an N:M storage (values or int8 codes), 0 where pruned."""
    # Tiled: whole groups per tile and whole index bytes per tile; powers of two (aranges).
    CB: tl.constexpr = BLOCK_K // NM_M * NM_N  # stored entries per row in this K step
    TILED: tl.constexpr = ((NM_M & (NM_M - 1)) == 0 and (NM_N & (NM_N - 1)) == 0 and BLOCK_K % NM_M == 0
                           and (CB * INDEX_BITS) % 8 == 0)
    kept = K // NM_M * NM_N  # stored entries per row
    if TILED:
        c = k0 // NM_M * NM_N + tl.arange(0, CB)
        c_ok = n_ok[:, None] & (c < kept)[None, :]
        v = tl.load(val_ptr + offs_n[:, None].to(tl.int64) * stride_vn + c[None, :], mask=c_ok, other=0)
        if INT_CODES:  # int8 codes: exact fp32 integers without an I2F (_uint_to_f32)
            v = _uint_to_f32(v.to(tl.int32) + 128, 128)
        else:
            v = v.to(tl.float32)
        pos = _packed_tile(idx_ptr, stride_in, offs_n, n_ok, k0 // NM_M * NM_N, kept, INDEX_BITS, BLOCK_N, CB)
        # (rows, groups, n, 1) entries against the m in-group positions: one-hot, summed over n
        v4 = tl.reshape(v, (BLOCK_N, BLOCK_K // NM_M, NM_N, 1))
        p4 = tl.reshape(pos, (BLOCK_N, BLOCK_K // NM_M, NM_N, 1))
        at = tl.arange(0, NM_M)[None, None, None, :]
        dense = tl.sum(tl.where(p4 == at, v4, 0.0), axis=2)
        return tl.reshape(dense, (BLOCK_N, BLOCK_K))
    else:
        # Any n:m (3:6, groups straddling tiles): each column reads its group's n entries (cached).
        kk = k0 + tl.arange(0, BLOCK_K)
        ok = n_ok[:, None] & (kk < K)[None, :]
        rows = offs_n[:, None].to(tl.int64)
        first = (kk // NM_M * NM_N)[None, :]
        at = (kk % NM_M)[None, :]
        w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for j in tl.static_range(NM_N):
            c = first + j
            v = tl.load(val_ptr + rows * stride_vn + c, mask=ok, other=0).to(tl.float32)
            byte = tl.load(idx_ptr + rows * stride_in + (c * INDEX_BITS) // 8, mask=ok, other=0).to(tl.int32)
            p = (byte >> ((c * INDEX_BITS) % 8)) & ((1 << INDEX_BITS) - 1)
            w = tl.where(p == at, v, w)
        return w


@triton.jit
def _apply_scales(w, scale_ptr, stride_sn, stride_sg, s_row, offs_n, n_ok, k0, K, SCALE_MODE: tl.constexpr,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``w * s`` (fp32) with the scale of each element's group; tensor / channel scales come as ``s_row``."""
    if SCALE_MODE == 0 or SCALE_MODE == 1:
        return w * s_row
    elif SCALE_MODE == 2:
        rows = offs_n[:, None].to(tl.int64) * stride_sn
        groups = K // GROUP
        if GROUP % BLOCK_K == 0:  # one group per K step: a (BLOCK_N,) column of scales
            s = tl.load(scale_ptr + rows + (k0 // GROUP) * stride_sg, mask=n_ok[:, None], other=0.0)
            return w * s
        elif BLOCK_K % GROUP == 0:  # whole groups in the step: (BLOCK_N, groups) scales broadcast in-thread
            g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
            s = tl.load(scale_ptr + rows + g[None, :] * stride_sg, mask=n_ok[:, None] & (g < groups)[None, :],
                        other=0.0)
            w3 = tl.reshape(w, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * s[:, :, None]
            return tl.reshape(w3, (BLOCK_N, BLOCK_K))
        else:  # groups straddling steps (e.g. 48 columns): one scale per element, from cache
            g = (k0 + tl.arange(0, BLOCK_K)) // GROUP
            s = tl.load(scale_ptr + rows + g[None, :] * stride_sg, mask=n_ok[:, None] & (g < groups)[None, :],
                        other=0.0)
            return w * s
    else:
        return w


@triton.jit
def _row_scales(scale_ptr, stride_sn, offs_n, n_ok, SCALE_MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_N, 1) fp32: the layer's scale (per tensor) or each row's (per channel); unused otherwise."""
    s_row = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    if SCALE_MODE == 0:
        s_row += tl.load(scale_ptr)
    elif SCALE_MODE == 1:
        s_row += tl.load(scale_ptr + offs_n[:, None].to(tl.int64) * stride_sn, mask=n_ok[:, None], other=0.0)
    return s_row


@triton.jit
def _weight_tile(code_ptr, aux_ptr, scale_ptr, stride_wn, stride_an, stride_sn, stride_sg, s_row, offs_n, n_ok, k0, K,
                 FMT: tl.constexpr, BITS: tl.constexpr, QMIN: tl.constexpr, HAS_NONZERO: tl.constexpr,
                 SCALE_MODE: tl.constexpr, GROUP: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
                 INDEX_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_K) slice ``W[offs_n, k0:k0 + BLOCK_K]`` rebuilt from the stored codes (0 outside)."""
    # Codes become exact fp32 integers, then times the fp32 scale, as materialize().
    if FMT == 0:  # int8 codes
        kk = k0 + tl.arange(0, BLOCK_K)
        code = tl.load(code_ptr + offs_n[:, None].to(tl.int64) * stride_wn + kk[None, :],
                       mask=n_ok[:, None] & (kk < K)[None, :], other=0)
        w = _uint_to_f32(code.to(tl.int32) + 128, 128)
    elif FMT == 1:  # packed int4 / int2: code = u + qmin
        w = _uint_to_f32(_packed_tile(code_ptr, stride_wn, offs_n, n_ok, k0, K, BITS, BLOCK_N, BLOCK_K), -QMIN)
    elif FMT == 2:  # sign bits: +-1 (0 where the non-zero bit is clear)
        bit = _packed_tile(code_ptr, stride_wn, offs_n, n_ok, k0, K, 1, BLOCK_N, BLOCK_K)
        w = tl.where(bit != 0, 1.0, -1.0)
        if HAS_NONZERO:
            w = tl.where(_packed_tile(aux_ptr, stride_an, offs_n, n_ok, k0, K, 1, BLOCK_N, BLOCK_K) != 0, w, 0.0)
    else:  # N:M values (FMT 3) or int8 codes (FMT 4)
        w = _nm_tile(code_ptr, stride_wn, aux_ptr, stride_an, offs_n, n_ok, k0, K, NM_N, NM_M, INDEX_BITS,
                     FMT == 4, BLOCK_N, BLOCK_K)
    return _apply_scales(w, scale_ptr, stride_sn, stride_sg, s_row, offs_n, n_ok, k0, K, SCALE_MODE, GROUP,
                         BLOCK_N, BLOCK_K)


@triton.jit
def _dequantize_kernel(
    code_ptr, aux_ptr, scale_ptr, w_ptr, N, K, stride_wn, stride_an, stride_sn, stride_sg, stride_on,
    FMT: tl.constexpr, BITS: tl.constexpr, QMIN: tl.constexpr, HAS_NONZERO: tl.constexpr,
    SCALE_MODE: tl.constexpr, GROUP: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
    INDEX_BITS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``w = storage.materialize()`` in one pass (large-M strategy: then one cuBLAS GEMM)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    kk = k0 + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    s_row = _row_scales(scale_ptr, stride_sn, offs_n, n_ok, SCALE_MODE, BLOCK_N)
    w = _weight_tile(code_ptr, aux_ptr, scale_ptr, stride_wn, stride_an, stride_sn, stride_sg, s_row, offs_n, n_ok,
                     k0, K, FMT, BITS, QMIN, HAS_NONZERO, SCALE_MODE, GROUP, NM_N, NM_M, INDEX_BITS, BLOCK_N, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * stride_on + kk[None, :],
             cast_to(w, w_ptr.dtype.element_ty, UPCAST), mask=n_ok[:, None] & (kk < K)[None, :])


@triton.jit(do_not_specialize=["M_KEY"])
def _dequant_matmul_kernel(
    x_ptr, code_ptr, aux_ptr, scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_an, stride_sn, stride_sg, stride_om, stride_on,
    has_bias, M_KEY,
    FMT: tl.constexpr, BITS: tl.constexpr, QMIN: tl.constexpr, HAS_NONZERO: tl.constexpr,
    SCALE_MODE: tl.constexpr, GROUP: tl.constexpr,
    NM_N: tl.constexpr, NM_M: tl.constexpr, INDEX_BITS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped order: GROUP_N weight tiles are swept by every token tile while they sit in L2.
    pid_n, pid_m = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    m_ok = offs_m < M
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None] * stride_xk  # x^T (K, M) tile

    # Per-tensor / per-channel scales: loaded once, outside the K loop.
    s_row = _row_scales(scale_ptr, stride_sn, offs_n, n_ok, SCALE_MODE, BLOCK_N)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_ptrs, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        w = _weight_tile(code_ptr, aux_ptr, scale_ptr, stride_wn, stride_an, stride_sn, stride_sg, s_row, offs_n,
                         n_ok, k0, K, FMT, BITS, QMIN, HAS_NONZERO, SCALE_MODE, GROUP, NM_N, NM_M, INDEX_BITS,
                         BLOCK_N, BLOCK_K)
        # materialize() rounds the fp32 product to the layer dtype once: so does the operand.
        acc = tl.dot(as_operand(w, x_ptr.dtype.element_ty, UPCAST), x, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk

    if has_bias != 0:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptrs, cast_to(acc, out_ptr.dtype.element_ty, UPCAST), mask=n_ok[:, None] & m_ok[None, :])


def _as_config(row):
    bm, bn, bk, warps, stages = row
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_N": 8}, num_warps=warps,
                         num_stages=stages)


def _prune_configs(configs, named_args, **kwargs):
    """Token tiles that fit the bucketed M: decode rows for M <= 16, at most 2 M wide otherwise."""
    m = {**named_args, **kwargs}["M_KEY"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(2 * m, 16) and (m > DECODE_MAX_M or
                                                                            c.kwargs["BLOCK_M"] == 16)]
    return kept or configs[:1]


_KEYS = ["M_KEY", "N", "K", "FMT", "BITS", "HAS_NONZERO", "SCALE_MODE", "GROUP", "NM_N", "NM_M", "INPUT_PRECISION"]
_dequant_matmul_tuned = safe_autotune(
    configs=[_as_config(c) for c in GPU_CONFIGS], key=_KEYS, prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=short_tune_bench,
)(_dequant_matmul_kernel)


def tile_configs(dtype: str = "bf16") -> list:
    """``[(label, constexprs, num_warps, num_stages)]``: every config a launch can get on a GPU
    (the autotune configs, then the two untuned defaults); the compile check compiles them all."""
    out = []
    for row in GPU_CONFIGS + [DEFAULT_DECODE, DEFAULT_PREFILL]:
        bm, bn, bk, warps, stages = row
        out.append((f"BM{bm}xBN{bn}xBK{bk}_w{warps}s{stages}",
                    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_N=8), warps, stages))
    return list({label: (label, c, w, s) for label, c, w, s in out}.values())


def current_config(m: int) -> dict:
    """Tile sizes without autotuning (interpreter, or ``VCON_TRITON_AUTOTUNE=0``)."""
    if INTERPRET:
        return dict(INTERPRET_CONFIG, **TILE_OVERRIDE)
    bm, bn, bk, warps, stages = DEFAULT_DECODE if m <= DECODE_MAX_M else DEFAULT_PREFILL
    return dict(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_N=8, num_warps=warps, num_stages=stages),
                **TILE_OVERRIDE)


def supports(storage) -> bool:
    """Whether this kernel reads ``storage``'s format (quantized, binary, N:M, N:M + int codes; not CSR/dense)."""
    args = storage.infer_args()
    return args is not None and args[0] in SUPPORTED_FORMATS


def _scale_layout(group_size: int, cols: int) -> int:
    if group_size == 0:
        return SCALE_TENSOR
    return SCALE_CHANNEL if group_size == cols else SCALE_GROUP


def kernel_args(storage) -> dict:
    """The storage-dependent kernel arguments (pointers, strides and format constexprs)."""
    args = storage.infer_args()
    if args is None or args[0] not in SUPPORTED_FORMATS:
        raise ValueError(f"dequant_linear: storage {type(storage).__name__} ({storage.format_name}) has no Triton "
                         f"kernel; supported: quantized, binary, N:M and N:M + quantized storages")
    fmt, a, b, _crow, scales, bits, qmin, group_size, n, m, index_bits = args
    cols = storage.shape[1]
    aux = b if b is not None else a
    if scales is None:  # N:M float values
        scale_mode, scales = SCALE_NONE, a
    else:
        scale_mode = _scale_layout(group_size, cols)
    return dict(
        code_ptr=a, aux_ptr=aux, scale_ptr=scales,
        stride_wn=a.stride(0), stride_an=aux.stride(0),
        stride_sn=scales.stride(0) if scale_mode in (SCALE_CHANNEL, SCALE_GROUP) else 0,
        stride_sg=scales.stride(1) if scale_mode == SCALE_GROUP else 0,
        FMT=fmt, BITS=bits if fmt in (FMT_QPACK, FMT_Q1) else 8, QMIN=qmin if fmt == FMT_QPACK else 0,
        HAS_NONZERO=fmt == FMT_Q1 and b is not None, SCALE_MODE=scale_mode,
        GROUP=group_size if scale_mode == SCALE_GROUP else 0,
        NM_N=n if fmt in (FMT_NM, FMT_NMQ) else 1, NM_M=m if fmt in (FMT_NM, FMT_NMQ) else 1,
        INDEX_BITS=index_bits if fmt in (FMT_NM, FMT_NMQ) else 8,
    )


def dequantize(storage) -> torch.Tensor:
    """``storage.materialize()`` (bit for bit) in one kernel pass, on the storage's device."""
    rows, cols = storage.shape
    args = kernel_args(storage)
    out = torch.empty(rows, cols, dtype=storage.dtype, device=args["code_ptr"].device)
    args.update(w_ptr=out, N=rows, K=cols, stride_on=out.stride(0), UPCAST=UPCAST, BLOCK_N=DEQUANTIZE_BLOCK[0],
                BLOCK_K=DEQUANTIZE_BLOCK[1], num_warps=4)
    launch(_dequantize_kernel, (triton.cdiv(rows, DEQUANTIZE_BLOCK[0]), triton.cdiv(cols, DEQUANTIZE_BLOCK[1])),
           **args)
    return out


def dequant_linear(x: torch.Tensor, storage, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` for a 2-D ``x`` (M, K) and a compressed ``storage`` of shape (N, K).

    ``x``'s dtype must be the storage's (fp32, bf16 or fp16); the result has that dtype.
    Equal to ``F.linear(x, storage.materialize(), bias)`` up to the fp32 accumulation order (fp32
    operands follow ``torch.get_float32_matmul_precision()``: tf32 unless it is "highest").
    From ``DENSE_MIN_M`` rows on, the weight is rebuilt by :func:`dequantize` and multiplied by
    ``F.linear`` (cuBLAS): exactly the old result, one elementwise pass instead of several.
    """
    if x.dim() != 2 or x.shape[1] != storage.shape[1]:
        raise ValueError(f"dequant_linear: x must be (M, {storage.shape[1]}), got {tuple(x.shape)}")
    if x.dtype not in DTYPES or x.dtype != storage.dtype:
        raise ValueError(f"dequant_linear: x's dtype {x.dtype} must be the storage's ({storage.dtype}), one of "
                         f"{DTYPES}")
    rows = storage.shape[0]
    m, k = x.shape
    if DENSE_MIN_M is not None and m >= DENSE_MIN_M:
        return torch.nn.functional.linear(x, dequantize(storage), bias)
    out = torch.empty(m, rows, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    args = kernel_args(storage)
    args.update(
        x_ptr=x, bias_ptr=bias if bias is not None else out, out_ptr=out, M=m, N=rows, K=k,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_om=out.stride(0), stride_on=out.stride(1),
        has_bias=int(bias is not None), M_KEY=bucket(m), INPUT_PRECISION=input_precision(x.dtype), UPCAST=UPCAST,
    )
    if AUTOTUNE:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(rows, meta["BLOCK_N"]),)

        launch(_dequant_matmul_tuned, grid, **args)
    else:
        cfg = current_config(m)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(rows, cfg["BLOCK_N"]),)
        launch(_dequant_matmul_kernel, grid, **args, **cfg)
    return out


__all__ = ["dequant_linear", "dequantize", "kernel_args", "supports", "tile_configs"]
