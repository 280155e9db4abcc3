"""The one tiled GEMM behind every VCON linear: optional in-register W transform, low-rank fold, epilogues.

``out = epilogue(A @ B [* beta + A2 @ B2]) + bias`` over an (M, N) output tile grid, with
fp32 accumulation. What makes it a VCON kernel:

* ``B_IS_W`` (prologue): B is the layer weight, as ``W^T`` (``1``, the forward
  ``y = x W_eff^T``) or ``W`` (``2``, the input gradient ``dX = dY W_eff``). Each B tile
  is loaded once per K step and turned into its W_eff tile in registers (threshold /
  N:M / stored mask, fake quant, prune-then-quant; ``transform.py``) right before
  ``tl.dot``; W_eff never exists in memory. These GEMMs compute the output tile transposed
  (swap-AB: ``out^T = W_eff-tile . x^T``): the transformed tile is the left operand, which
  sm_90's wgmma reads from registers, and one MMA stays in flight while the next tile is
  transformed (``bench/SM90.md``).
* ``LOWRANK``: after the main K loop the accumulator is scaled by beta and a second,
  thin reduction ``A2 @ B2`` (A2 = ``(1 - beta) x V^T`` and B2 = ``U^T`` in the forward;
  A2 = ``(1 - beta) dY U`` and B2 = ``V`` for dX) is added into the same tile: the
  ``[x | t] . [beta W | (1 - beta) U]^T`` identity with one output write.
* epilogue: scale by beta or by ``1 - beta`` (thin low-rank GEMMs; a runtime flag), or
  (``EXACT_COEF``) by the exact-gradient coefficient of W at (row, col) of the output
  (``dW = G * coef``).
* ``do_rowsum``: also writes the row sums of A (the bias gradient ``db = sum_m dY`` when A is
  ``dY^T`` in the weight-gradient GEMM), from the tiles already in registers.

Example usage::

    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    vcon_matmul(x, weight.t(), out, state=WeightState(weight, beta, thr, scales, mask, spec), b_is_w=1)
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .safe_autotune import safe_autotune
from .safe_autotune import short_tune_bench
from .transform import group_recip
from .transform import load_row_state
from .transform import row_state
from .transform import scale_reciprocals_kernel
from .transform import transform_tile
from .utils import AUTOTUNE
from .utils import INTERPRET
from .utils import UPCAST
from .utils import as_operand
from .utils import bucket
from .utils import cast_to
from .utils import grouped_tile
from .utils import input_precision
from .utils import launch
from .weight_state import WeightState
from .weight_state import dummy

B_PLAIN, B_IS_WT, B_IS_W = 0, 1, 2
EPI_NONE, EPI_BETA, EPI_ONE_MINUS_BETA, EPI_EXACT_COEF = 0, 1, 2, 3

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Largest first: the fused path runs for
# small and medium M (decode, fine-tuning micro-batches), the last two rows are for M <= 32.
# 256 x 128, not 128 x 256: with swap-AB BLOCK_N is wgmma's M side, where 256 W rows spilled and
# converted the tile with scalar-width stores; 256 tokens also amortize each W tile's transform
# over twice the rows (bench/SM90.md).
GPU_CONFIGS = [
    (256, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 64, 4, 4), (16, 128, 64, 4, 4),
]
def _tuned_rows() -> list:
    """GPU_CONFIGS, or its first n rows plus the decode row with ``VCON_TRITON_TUNE_CONFIGS=n``.

    ``bench/gpu_check.sh`` sets it so that one device call (8 minutes, compiles included: 1-30 s
    per config and key) can tune every benchmark key.
    """
    raw = os.environ.get("VCON_TRITON_TUNE_CONFIGS", "")
    if not raw:
        return list(GPU_CONFIGS)
    if not raw.isdigit() or not 1 <= int(raw) <= len(GPU_CONFIGS):
        raise ValueError(f"VCON_TRITON_TUNE_CONFIGS must be an integer in [1, {len(GPU_CONFIGS)}], got {raw!r}")
    n = int(raw)
    return GPU_CONFIGS[:n] + ([GPU_CONFIGS[-1]] if n < len(GPU_CONFIGS) else [])


# One config without autotuning. Under the interpreter big tiles are cheapest (its cost is per
# program and K step); tests shrink INTERPRET_CONFIG to cover several tiles per dimension.
# Two stages: with the swap-AB tile the 2-byte N:M + grouped-int8 transform needs 64 KB of shared memory
# per stage on sm_80 (3 stages: 196608 B > an A100's 166912; the compile check's "default" jobs); the
# autotuned configs are what a tuned run uses, this one only serves VCON_TRITON_AUTOTUNE=0.
DEFAULT_GPU_CONFIG = (64, 128, 64, 4, 2)
INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}
# Tile sizes forced on top of those (tests: several tiles per dimension on small shapes).
TILE_OVERRIDE: dict = {}


def _as_config(row):
    bm, bn, bk, warps, stages = row
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles much taller than the bucketed M (they would only compute padding).

    The autotuner passes positional arguments as ``named_args`` and keyword arguments as
    ``kwargs``; ``launch`` passes everything by keyword.
    """
    m = {**named_args, **kwargs}["M_KEY"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(2 * m, 16)]
    return kept or configs[-1:]


# Mode flags that change the hot loop are constexprs (one lean program per mode: the sm_90 audit
# measured 243-254 -> 133-171 registers, no spills, vectorized B loads without them as runtime
# values). The JIT specializes every int == 1 into a constant anyway, so a 0/1 runtime flag never
# saved a compile; the cheap epilogue-only and per-row values are kept out of the specialization
# (``do_not_specialize``) so that they do not multiply the programs a GPU compiles.
# (Not under the interpreter, where specialization means nothing.)
_UNSPECIALIZED = [] if INTERPRET else ["thr_stride", "mask_stride", "nm_n", "scale_row_stride", "group_size",
                                       "prune_kind", "quant_on", "has_bias", "scale_mode"]


@triton.jit(do_not_specialize=["M_KEY", "N_KEY", "K_KEY"] + _UNSPECIALIZED)
def _vcon_matmul_kernel(
    a_ptr, b_ptr, out_ptr, bias_ptr, a2_ptr, b2_ptr, rowsum_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    stride_a2m, stride_a2r, stride_b2r, stride_b2n,
    w_ptr, stride_wr, stride_wc, beta_ptr, rcp_ptr, thr_ptr, thr_stride, mask_ptr, mask_stride,
    stored_mask: tl.constexpr,
    nm_n, nm_m, NM_GROUP: tl.constexpr, NM_KEEP: tl.constexpr, scale_ptr, scale_row_stride, group_size,
    scale_grouped: tl.constexpr,
    binary: tl.constexpr, qmin, qmax, QMIN: tl.constexpr, QMAX: tl.constexpr,
    prune_kind, quant_on, has_bias, do_rowsum: tl.constexpr, scale_mode, M_KEY, N_KEY, K_KEY,
    PRUNE: tl.constexpr, QUANT: tl.constexpr, B_IS_W: tl.constexpr, EXACT_COEF: tl.constexpr,
    LOWRANK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share their B tiles while they are in L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    TRANSFORM: tl.constexpr = (B_IS_W != 0) and (PRUNE != 0 or QUANT != 0)

    if TRANSFORM:
        # Swap-AB: the output tile is computed transposed, out^T = W_eff-tile . x^T, so that the
        # transformed W tile is the LEFT operand of tl.dot. On sm_90 wgmma reads its left operand
        # from registers (the right one only from shared memory), and one MMA stays in flight while
        # the next tile is transformed. Prune, binary and the int8 forward load the tile straight into
        # wgmma's register layout; the int8 dX and N:M still convert it through shared memory once
        # (bench/SM90.md says why).
        # bt[n, k] = b[k, n].
        bt_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_k[None, :] * stride_bk
        # The tile axis that runs along W's columns (N:M group mates from registers): k in the
        # forward (bt[n, k] = W[n, k]), n for dX (bt[n, k] = W[k, n]).
        NM_AXIS_B: tl.constexpr = 1 if B_IS_W == 1 else 0
        # No division per element (transform.div_by_scale): per-tensor / per-channel scales take one
        # reciprocal per W row, per-group scales read theirs (precomputed by the launcher) beside the scale.
        RECIP: tl.constexpr = not scale_grouped
        GROUP_RECIP: tl.constexpr = scale_grouped and QUANT != 0 and binary == 0
        if RECIP and B_IS_W == 1:
            # forward: the W rows are this program's offs_n at every K step; their threshold, scale
            # and reciprocal are loaded and computed once, before the loop
            t_n, s_n, lift_n, r_n, b_n = row_state(thr_ptr, thr_stride, scale_ptr, scale_row_stride,
                                                   offs_n[:, None], n_ok[:, None], PRUNE, QUANT)
        if B_IS_W == 1:
            # forward: the clamp bounds as constants (QMIN / QMAX) let Triton load the W tile straight into
            # wgmma's register layout (a runtime scalar splat in the transform keeps it in shared memory);
            # dX keeps the runtime bounds: hoisted, its per-step row vectors cost more than the conversion
            q_lo, q_hi = QMIN, QMAX
        else:
            q_lo, q_hi = qmin, qmax
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K
            valid = n_ok[:, None] & k_ok[None, :]
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            bt = tl.load(bt_ptrs, mask=valid, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
            if B_IS_W == 1:  # bt[n, k] = W[n, k]: W rows run along the tile's axis 0
                wr = tl.broadcast_to(offs_n[:, None], (BLOCK_N, BLOCK_K))
                wc = tl.broadcast_to(kk[None, :], (BLOCK_N, BLOCK_K))
                if RECIP:
                    t, s, lift, r, b = t_n, s_n, lift_n, r_n, b_n
                else:
                    t, s = load_row_state(thr_ptr, thr_stride, scale_ptr, scale_row_stride, group_size,
                                          scale_grouped, offs_n[:, None], n_ok[:, None], wr, wc, valid, PRUNE, QUANT)
                    if GROUP_RECIP:
                        lift, r, b = group_recip(rcp_ptr, s, scale_row_stride, group_size, wr, wc, valid)
                    else:
                        lift = s
                        r = s
                        b = s
            else:  # bt[n, k] = W[k, n]: W rows run along axis 1
                wr = tl.broadcast_to(kk[None, :], (BLOCK_N, BLOCK_K))
                wc = tl.broadcast_to(offs_n[:, None], (BLOCK_N, BLOCK_K))
                if RECIP:
                    # the W rows change every K step: their scales' reciprocals are read, precomputed
                    # once per call by the launcher (a division per row and step spilled at 128x256)
                    t, s, lift, r, b = row_state(thr_ptr, thr_stride, scale_ptr, scale_row_stride, kk[None, :],
                                                 k_ok[None, :], PRUNE, QUANT, rcp_ptr, QUANT != 0 and binary == 0)
                else:
                    t, s = load_row_state(thr_ptr, thr_stride, scale_ptr, scale_row_stride, group_size,
                                          scale_grouped, kk[None, :], k_ok[None, :], wr, wc, valid, PRUNE, QUANT)
                    if GROUP_RECIP:
                        lift, r, b = group_recip(rcp_ptr, s, scale_row_stride, group_size, wr, wc, valid)
                    else:
                        lift = s
                        r = s
                        b = s
            w_eff = transform_tile(bt.to(tl.float32), t, s, wr, wc, valid, w_ptr, stride_wr, stride_wc, beta_ptr,
                                   mask_ptr, mask_stride, stored_mask, nm_n, nm_m, 0, binary, q_lo, q_hi,
                                   PRUNE, QUANT, False, NM_AXIS_B, NM_GROUP, NM_KEEP, lift, r, RECIP or GROUP_RECIP,
                                   0, b)  # beta as a vector: a scalar broadcast keeps the tile out of wgmma's layout
            acc_t = tl.dot(as_operand(w_eff, b_ptr.dtype.element_ty, UPCAST), tl.trans(a), acc_t,
                           input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            bt_ptrs += BLOCK_K * stride_bk
        acc = tl.trans(acc_t)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # (no row sums in transform GEMMs)
        rowsum_here = False
    else:
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        rowsum_here = pid_n == 0
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if do_rowsum:  # a constexpr: no A tile in registers unless row sums are wanted
                if rowsum_here:
                    row_sum += tl.sum(a.to(tl.float32), axis=1)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

    if LOWRANK:
        # y = beta (x W^T) + ((1 - beta) t) U^T: the second reduction lands in the same tile.
        acc = acc * tl.load(beta_ptr)
        a2_ptrs = a2_ptr + offs_m[:, None].to(tl.int64) * stride_a2m + offs_k[None, :] * stride_a2r
        b2_ptrs = b2_ptr + offs_k[:, None] * stride_b2r + offs_n[None, :].to(tl.int64) * stride_b2n
        for r0 in range(0, R, BLOCK_K):
            r_ok = (r0 + offs_k) < R
            a2 = tl.load(a2_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            b2 = tl.load(b2_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a2 = a2.to(tl.float32)
                b2 = b2.to(tl.float32)
            acc = tl.dot(a2, b2, acc, input_precision=INPUT_PRECISION)
            a2_ptrs += BLOCK_K * stride_a2r
            b2_ptrs += BLOCK_K * stride_b2r

    if scale_mode == 1:
        acc = acc * tl.load(beta_ptr)
    elif scale_mode == 2:
        acc = acc * (1 - tl.load(beta_ptr))
    if EXACT_COEF:
        # dW = G * dW_eff/dW: output (row, col) is W's (row, col).
        wr = tl.broadcast_to(offs_m[:, None], (BLOCK_M, BLOCK_N))
        wc = tl.broadcast_to(offs_n[None, :], (BLOCK_M, BLOCK_N))
        valid = m_ok[:, None] & n_ok[None, :]
        w = tl.load(w_ptr + wr.to(tl.int64) * stride_wr + wc * stride_wc, mask=valid, other=0.0).to(tl.float32)
        # once per output tile: the mode is a runtime value (one variant for every mode)
        t, s = load_row_state(thr_ptr, thr_stride, scale_ptr, scale_row_stride, group_size, scale_grouped,
                              offs_m[:, None], m_ok[:, None], wr, wc, valid, prune_kind, quant_on)
        acc = acc * transform_tile(w, t, s, wr, wc, valid, w_ptr, stride_wr, stride_wc, beta_ptr, mask_ptr,
                                   mask_stride, stored_mask, nm_n, nm_m, 0, binary, qmin, qmax,
                                   prune_kind, quant_on, True, 1, NM_GROUP, NM_KEEP)
    if has_bias != 0:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, cast_to(acc, out_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])
    if do_rowsum:
        if rowsum_here:
            tl.store(rowsum_ptr + offs_m, cast_to(row_sum, rowsum_ptr.dtype.element_ty, UPCAST), mask=m_ok)


_KEYS = ["M_KEY", "N_KEY", "K_KEY", "PRUNE", "QUANT", "B_IS_W", "EXACT_COEF", "LOWRANK", "prune_kind", "quant_on",
         "has_bias", "do_rowsum", "scale_grouped", "NM_GROUP", "NM_KEEP", "INPUT_PRECISION"]
_vcon_matmul_tuned = safe_autotune(
    configs=[_as_config(c) for c in _tuned_rows()], key=_KEYS, prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=short_tune_bench,
)(_vcon_matmul_kernel)


def tile_configs(dtype: str) -> list:
    """Every tile config a GEMM launch of operand ``dtype`` ("bf16", "fp16", "fp32") can get on a GPU.

    ``[(label, constexprs, num_warps, num_stages)]``: the autotune configs, then the untuned
    default (``VCON_TRITON_AUTOTUNE=0``); the compile check (``aot.py``) compiles all of them.
    """
    out = []
    for bm, bn, bk, warps, stages in GPU_CONFIGS:
        out.append((f"BM{bm}xBN{bn}xBK{bk}_w{warps}s{stages}", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                    warps, stages))
    bm, bn, bk, warps, stages = DEFAULT_GPU_CONFIG
    if dtype == "fp32":
        bk //= 2
    out.append(("default", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), warps, stages))
    return out


def min_tile() -> int:
    """The smallest BLOCK_N / BLOCK_K any config may use (N:M groups must divide it to stay in-tile)."""
    if AUTOTUNE:
        return min(min(c[1], c[2]) for c in GPU_CONFIGS)
    cfg = current_config(torch.float32)
    return min(cfg["BLOCK_N"], cfg["BLOCK_K"])


def nm_in_tile(m: int, tile: int) -> bool:
    """N:M groups of m stay whole inside tiles of ``tile`` (both powers of two, m <= tile)."""
    return m >= 1 and (m & (m - 1)) == 0 and m <= tile


def current_config(dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile sizes used without autotuning (interpreter, or VCON_TRITON_AUTOTUNE=0)."""
    if INTERPRET:
        return dict(INTERPRET_CONFIG, **TILE_OVERRIDE)
    bm, bn, bk, warps, stages = DEFAULT_GPU_CONFIG
    if dtype == torch.float32:  # 4-byte tiles: halve BLOCK_K to stay inside an A100's shared memory
        bk //= 2
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    return dict(cfg, **TILE_OVERRIDE)


def scale_reciprocals(scales: torch.Tensor) -> torch.Tensor:
    """``RN(1 / (s' lift))`` of every scale (``transform.row_scale``), same shape; one small launch."""
    scales = scales.contiguous()
    out = torch.empty_like(scales)
    n = scales.numel()
    launch(scale_reciprocals_kernel, (triton.cdiv(n, 1024),), scale_ptr=scales, out_ptr=out, n=n, BLOCK=1024,
           num_warps=4)
    return out


def _no_transform_args(device) -> dict:
    d = dummy(device)
    return dict(w_ptr=d, stride_wr=0, stride_wc=0, thr_ptr=d, thr_stride=0, mask_ptr=d, mask_stride=0,
                stored_mask=0, nm_n=0, nm_m=1, scale_ptr=d, scale_row_stride=0, group_size=1, scale_grouped=0,
                binary=0, qmin=0.0, qmax=0.0, prune_kind=0, quant_on=0, PRUNE=0, QUANT=0)


def vcon_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    *,
    state: Optional[WeightState] = None,
    beta: Optional[torch.Tensor] = None,
    b_is_w: int = B_PLAIN,
    epilogue: int = EPI_NONE,
    bias: Optional[torch.Tensor] = None,
    lowrank: Optional[tuple] = None,
    rowsum: Optional[torch.Tensor] = None,
    tokens: Optional[int] = None,
) -> torch.Tensor:
    """``out = epilogue(a @ b [* beta + a2 @ b2]) + bias`` (see the module docstring); any strides.

    Args:
        a: (M, K); b: (K, N), a view of the weight (``W.t()`` or ``W``) when ``b_is_w`` is set.
        state: the weight transform (for ``b_is_w`` with pruning/quantization, or the exact epilogue).
        beta: the fp32 beta tensor (defaults to ``state.beta``).
        lowrank: ``(a2, b2)`` with a2 (M, r) and b2 (r, N).
        rowsum: optional (M,) output receiving ``a.sum(1)``.
        tokens: the dimension that varies between calls (for the autotune bucket); defaults to M.
    """
    m, k = a.shape
    n = b.shape[1]
    device = a.device
    d = dummy(device)
    args = dict(state.kernel_args()) if state is not None else _no_transform_args(device)
    if beta is None:
        beta = state.beta if state is not None else d
    args["beta_ptr"] = beta
    if b_is_w == B_PLAIN:  # the main loop transforms nothing; the exact epilogue branches at run time
        args.update(PRUNE=0, QUANT=0)
        if epilogue != EPI_EXACT_COEF:
            args.update(prune_kind=0, quant_on=0)
    a2, b2 = lowrank if lowrank is not None else (d.view(1, 1), d.view(1, 1))
    r = a2.shape[1] if lowrank is not None else 0
    tokens = m if tokens is None else tokens
    args.update(
        a_ptr=a, b_ptr=b, out_ptr=out, bias_ptr=bias if bias is not None else d, a2_ptr=a2, b2_ptr=b2,
        rowsum_ptr=rowsum if rowsum is not None else d,
        M=m, N=n, K=k, R=r,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=b.stride(0), stride_bn=b.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1),
        stride_a2m=a2.stride(0), stride_a2r=a2.stride(1), stride_b2r=b2.stride(0), stride_b2n=b2.stride(1),
        M_KEY=bucket(m) if tokens == m else m, N_KEY=bucket(n) if tokens == n else n,
        K_KEY=bucket(k) if tokens == k else k,
        B_IS_W=b_is_w, EXACT_COEF=epilogue == EPI_EXACT_COEF, LOWRANK=lowrank is not None,
        scale_mode={EPI_BETA: 1, EPI_ONE_MINUS_BETA: 2}.get(epilogue, 0), has_bias=int(bias is not None),
        do_rowsum=int(rowsum is not None), INPUT_PRECISION=input_precision(a.dtype), UPCAST=UPCAST,
    )
    # N:M groups whole inside every tile: (n, m) become constexprs and the keep-mask is computed in
    # registers (transform.nm_keep_reshaped); otherwise the group mates are read from memory.
    in_tile = args["prune_kind"] == 2 and nm_in_tile(args["nm_m"], min_tile())
    args.update(NM_GROUP=args["nm_m"] if in_tile else 0, NM_KEEP=args["nm_n"] if in_tile else 0)
    # An integer-quantized transform GEMM reads the reciprocals of its scales (transform.row_scale):
    # dX (its W rows change every K step) and per-group scales in both orientations; the forward
    # with per-tensor / per-channel scales computes them itself, once per program.
    # The forward's clamp bounds as constexprs (see the kernel); 0 elsewhere (no extra programs).
    fwd_quant = b_is_w == B_IS_WT and args["QUANT"] and not args["binary"]
    args.update(QMIN=args["qmin"] if fwd_quant else 0.0, QMAX=args["qmax"] if fwd_quant else 0.0)
    args["rcp_ptr"] = d
    if b_is_w != B_PLAIN and args["QUANT"] and not args["binary"] and (b_is_w == B_IS_W or args["scale_grouped"]):
        args["rcp_ptr"] = scale_reciprocals(args["scale_ptr"])
    if AUTOTUNE:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        launch(_vcon_matmul_tuned, grid, **args)
    else:
        cfg = current_config(a.dtype)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        launch(_vcon_matmul_kernel, grid, **args, **cfg)
    return out
