"""The exact-mode weight gradient as an elementwise epilogue: ``dW = G * dW_eff/dW``.

Used where G = dL/dW_eff comes from elsewhere (cuBLAS in the "build W_eff" strategy, the
convolution backward). The fused strategy applies the same coefficient inside its dW GEMM
(``vcon_matmul`` with ``EPILOGUE=3``). Coefficient (``spec.py``): ``where(M, 1, beta_p) *
(beta_q + (1 - beta_q) R)``, R the in-range mask of the integer codes; binary quantization
passes the gradient straight through (its factor is 1).

Example usage::

    dw = weight_grad(grad_w_eff, WeightState(w, beta, threshold, scales, mask, spec))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blend_weight import BLOCKS
from .blend_weight import nm_in_tile
from .transform import load_row_state
from .transform import transform_tile
from .utils import UPCAST
from .utils import cast_to
from .utils import launch
from .weight_state import WeightState


@triton.jit
def _weight_grad_kernel(
    g_ptr, out_ptr, n_rows, n_cols, stride_gr, stride_gc, stride_or, stride_oc,
    w_ptr, stride_wr, stride_wc, beta_ptr, thr_ptr, thr_stride, mask_ptr, mask_stride, stored_mask, nm_n, nm_m,
    nm_in_tile, scale_ptr, scale_row_stride, group_size, scale_grouped, binary, qmin, qmax, prune_kind, quant_on,
    UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    wr = tl.broadcast_to(rows[:, None], (BLOCK_R, BLOCK_C))
    wc = tl.broadcast_to(cols[None, :], (BLOCK_R, BLOCK_C))
    valid = (wr < n_rows) & (wc < n_cols)
    r64 = wr.to(tl.int64)
    w = tl.load(w_ptr + r64 * stride_wr + wc * stride_wc, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + r64 * stride_gr + wc * stride_gc, mask=valid, other=0.0).to(tl.float32)
    t, s = load_row_state(thr_ptr, thr_stride, scale_ptr, scale_row_stride, group_size, scale_grouped,
                          rows[:, None], (rows < n_rows)[:, None], wr, wc, valid, prune_kind, quant_on)
    coef = transform_tile(w, t, s, wr, wc, valid, w_ptr, stride_wr, stride_wc, beta_ptr, mask_ptr, mask_stride,
                          stored_mask, nm_n, nm_m, nm_in_tile, binary, qmin, qmax, prune_kind, quant_on, True, 1)
    out = out_ptr + r64 * stride_or + wc * stride_oc
    tl.store(out, cast_to(g * coef, out_ptr.dtype.element_ty, UPCAST), mask=valid)


def weight_grad(grad: torch.Tensor, state: WeightState) -> torch.Tensor:
    """``grad * coef`` in grad's dtype (a new tensor)."""
    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    rows, cols = grad.shape
    if out.numel() == 0:
        return out
    block_r, block_c = BLOCKS
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    args = state.kernel_args()
    for name in ("PRUNE", "QUANT"):  # the mode is a runtime value here (prune_kind, quant_on)
        args.pop(name)
    launch(
        _weight_grad_kernel, grid, g_ptr=grad, out_ptr=out, n_rows=rows, n_cols=cols,
        stride_gr=grad.stride(0), stride_gc=grad.stride(1), stride_or=out.stride(0), stride_oc=out.stride(1),
        **args, UPCAST=UPCAST, nm_in_tile=nm_in_tile(state.spec, block_c), BLOCK_R=block_r,
        BLOCK_C=block_c, num_warps=4,
    )
    return out
