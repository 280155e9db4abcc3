"""W_eff built by one elementwise kernel: the "build W_eff + cuBLAS" strategy and conv layers.

``W_eff = beta_q W1 + (1 - beta_q) Q(W1)``, ``W1 = where(M, W, beta_p W)`` (``spec.py``),
computed in fp32 and rounded once to the weight dtype, bit-identical to the torch
backend. ``scale_by_beta=True`` instead writes ``beta * W`` (the dense half of a low-rank
layer when the GEMM itself goes to cuBLAS).

Example usage::

    w_eff = blend_weight(WeightState(w, beta, threshold, scales, mask, spec))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import PRUNE_NM
from .transform import load_row_state
from .transform import transform_tile
from .utils import INTERPRET
from .utils import UPCAST
from .utils import cast_to
from .utils import launch
from .weight_state import WeightState

# Rows x columns per program. The GPU shape reads 2 KB-8 KB contiguous runs per row; under the
# interpreter bigger tiles are cheaper (its cost is per program).
BLOCKS = (64, 64) if INTERPRET else (8, 256)


@triton.jit
def _blend_weight_kernel(
    w_ptr, out_ptr, n_rows, n_cols, stride_wr, stride_wc, stride_or, stride_oc,
    beta_ptr, thr_ptr, thr_stride, mask_ptr, mask_stride, stored_mask, nm_n, nm_m,
    nm_in_tile, scale_ptr, scale_row_stride, group_size, scale_grouped, binary, qmin, qmax, prune_kind, quant_on,
    SCALE_BY_BETA: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    wr = tl.broadcast_to(rows[:, None], (BLOCK_R, BLOCK_C))
    wc = tl.broadcast_to(cols[None, :], (BLOCK_R, BLOCK_C))
    valid = (wr < n_rows) & (wc < n_cols)
    w = tl.load(w_ptr + wr.to(tl.int64) * stride_wr + wc * stride_wc, mask=valid, other=0.0).to(tl.float32)
    if SCALE_BY_BETA:
        w_eff = w * tl.load(beta_ptr)
    else:
        t, s = load_row_state(thr_ptr, thr_stride, scale_ptr, scale_row_stride, group_size, scale_grouped,
                              rows[:, None], (rows < n_rows)[:, None], wr, wc, valid, prune_kind, quant_on)
        w_eff = transform_tile(w, t, s, wr, wc, valid, w_ptr, stride_wr, stride_wc, beta_ptr, mask_ptr, mask_stride,
                               stored_mask, nm_n, nm_m, nm_in_tile, binary, qmin, qmax, prune_kind, quant_on, False, 1)
    out = out_ptr + wr.to(tl.int64) * stride_or + wc * stride_oc
    tl.store(out, cast_to(w_eff, out_ptr.dtype.element_ty, UPCAST), mask=valid)


def nm_in_tile(spec, block_c: int) -> int:
    """1 when N:M groups stay whole inside [*, block_c] column tiles (group mates read from registers)."""
    m = spec.nm_m
    return int(spec.prune == PRUNE_NM and (m & (m - 1)) == 0 and m <= block_c)


def blend_weight(state: WeightState, scale_by_beta: bool = False) -> torch.Tensor:
    """W_eff (or ``beta * W``) as a new tensor in the weight's dtype, shape and device."""
    w = state.weight
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    rows, cols = w.shape
    if out.numel() == 0:
        return out
    args = state.kernel_args()
    for name in ("w_ptr", "PRUNE", "QUANT"):  # the mode is a runtime value here (prune_kind, quant_on)
        args.pop(name)
    block_r, block_c = BLOCKS
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    launch(
        _blend_weight_kernel, grid, w_ptr=w, out_ptr=out, n_rows=rows, n_cols=cols,
        stride_or=out.stride(0), stride_oc=out.stride(1), **args, SCALE_BY_BETA=scale_by_beta, UPCAST=UPCAST,
        nm_in_tile=nm_in_tile(state.spec, block_c), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return out
