"""Quantization scales of the prune-blended weight W1, per row, per group or per tensor.

Integer modes: ``s = max |W1| / qmax``; binary: ``s = sum |W1| / max(count(W1 != 0), 1)``
over each group (``spec.py``), with ``W1 = where(M, W, beta_p W)`` computed in registers
(the keep-mask from the threshold, N:M ranks or the stored mask). The divisions are IEEE
(``div_rn``), so the integer-mode scales equal the torch backend's bit for bit (a maximum
does not depend on the order of reduction). A binary scale is a sum: it can differ from
torch's by the rounding of a different summation order (a few fp32 ulps).

One program reduces ``BLOCK_R`` rows of one group. Per tensor, the kernel writes per-row
partials (max, or sum and count) and a tiny torch reduction over the rows finishes.

Example usage::

    scales = quant_scales(WeightState(w, beta, threshold, None, mask, spec))   # (rows, groups) fp32
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .transform import keep_tile
from .transform import load_row_state
from .utils import INTERPRET
from .utils import launch
from .weight_state import WeightState

BLOCK_R = 64 if INTERPRET else 4


@triton.jit
def _quant_scales_kernel(
    w_ptr, out_ptr, count_ptr, n_rows, group_len, n_groups, stride_wr, stride_wc, qmax,
    beta_ptr, thr_ptr, thr_stride, mask_ptr, mask_stride, stored_mask, nm_n, nm_m,
    PRUNE: tl.constexpr, BINARY: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1)
    row_ok = rows < n_rows
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    count = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for c0 in range(0, group_len, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        wr = tl.broadcast_to(rows[:, None], (BLOCK_R, BLOCK_C))
        wc = tl.broadcast_to((group * group_len + offs)[None, :], (BLOCK_R, BLOCK_C))
        valid = row_ok[:, None] & (offs < group_len)[None, :]
        w = tl.load(w_ptr + wr.to(tl.int64) * stride_wr + wc * stride_wc, mask=valid, other=0.0).to(tl.float32)
        w1 = w
        if PRUNE != 0:  # W1 = where(M, W, beta_p W)
            t, _ = load_row_state(thr_ptr, thr_stride, thr_ptr, 0, 1, 0, rows[:, None], row_ok[:, None], wr, wc,
                                  valid, PRUNE, 0)
            keep = keep_tile(tl.abs(w), t, wr, wc, valid, w_ptr, stride_wr, stride_wc, mask_ptr, mask_stride,
                             stored_mask, nm_n, nm_m, 0, PRUNE, -1)
            w1 = tl.where(keep, w, tl.load(beta_ptr) * w)
        a1 = tl.abs(w1)
        if BINARY:
            total += tl.sum(a1, axis=1)
            count += tl.sum((valid & (w1 != 0)).to(tl.int32), axis=1)
        else:
            amax = tl.maximum(amax, tl.max(a1, axis=1))
    out = out_ptr + rows * n_groups + group
    if PARTIAL:  # per tensor: raw per-row partials, reduced over rows by the launcher
        if BINARY:
            tl.store(out, total, mask=row_ok)
            tl.store(count_ptr + rows, count, mask=row_ok)
        else:
            tl.store(out, amax, mask=row_ok)
    else:
        if BINARY:
            scale = tl.math.div_rn(total, tl.maximum(count, 1).to(tl.float32))
        else:
            scale = tl.math.div_rn(amax, qmax)
        tl.store(out, scale, mask=row_ok)


def quant_scales(state: WeightState) -> torch.Tensor:
    """fp32 scales of shape ``spec.scales_shape(N, K)`` for the current weight and beta_p."""
    spec = state.spec
    w = state.weight.detach()
    rows, cols = w.shape
    per_tensor = spec.group_size == 0
    group_len = cols if (per_tensor or spec.group_size == cols) else spec.group_size
    n_groups = cols // group_len if cols else 0
    binary = spec.bits == 1
    device = w.device
    out = torch.zeros((rows, n_groups), dtype=torch.float32, device=device)
    count = torch.zeros(rows if (per_tensor and binary) else 1, dtype=torch.int32, device=device)
    if w.numel():
        args = state.kernel_args()
        for unused in ("scale_ptr", "scale_row_stride", "group_size", "qmin", "qmax", "QUANT", "scale_grouped",
                       "binary", "prune_kind", "quant_on"):
            args.pop(unused)
        block_c = min(triton.next_power_of_2(group_len), 256 if INTERPRET else 128)
        launch(
            _quant_scales_kernel, (triton.cdiv(rows, BLOCK_R), n_groups), out_ptr=out, count_ptr=count,
            n_rows=rows, group_len=group_len, n_groups=n_groups, qmax=float(spec.qmax), **args,
            BINARY=binary, PARTIAL=per_tensor, BLOCK_R=BLOCK_R, BLOCK_C=block_c, num_warps=4,
        )
    if not per_tensor:
        return out
    if binary:  # same formula as the kernel, over the row partials: IEEE division in fp32
        return (out.sum() / count.sum().clamp_min(1).to(torch.float32)).reshape(1, 1)
    return (out.amax() / float(spec.qmax) if rows else out.new_zeros(())).reshape(1, 1)
