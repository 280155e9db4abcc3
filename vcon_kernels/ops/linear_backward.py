"""Backward of the blended linear layer on the Triton backend.

With ``G = dY^T X`` (computed once) and the same W_eff as the forward:

* pruning / quantization: ``dX = dY W_eff`` (fused: W tiles transformed in registers, as
  in the forward; weff: rebuilt W_eff + cuBLAS), ``dW = G`` (STE) or ``G * coef`` (exact,
  the coefficient applied as the GEMM's epilogue), ``db = sum_m dY`` (fused: row sums of
  the dY tiles the dW GEMM already loads).
* low rank, with ``g' = (1 - beta) dY U`` and ``t' = (1 - beta) x V^T`` (thin GEMMs):
  ``dX = [dY | g'] . [beta W ; V]`` (one GEMM over N + r), ``dW = G`` (STE) or
  ``beta G`` (exact), ``dU = dY^T t'``, ``dV = g'^T X`` (reductions over the tokens:
  cuBLAS, which splits that long reduction across the GPU). t' is the forward's
  (``linear_forward(keep_t=True)``), passed as ``t``; without it the thin GEMM runs again.

Example usage::

    dx, dw, db, du, dv = linear_backward(dy, x, w, b, beta, thr, scales, mask, u, v, spec, (True,) * 4)
"""

from __future__ import annotations

import torch

from . import dispatch
from .blend_weight import blend_weight
from .linear_forward import lowrank_t
from .vcon_matmul import B_IS_W
from .vcon_matmul import EPI_BETA
from .vcon_matmul import EPI_EXACT_COEF
from .vcon_matmul import EPI_NONE
from .vcon_matmul import EPI_ONE_MINUS_BETA
from .vcon_matmul import vcon_matmul
from .weight_grad import weight_grad
from .weight_state import WeightState


def weight_epilogue(spec) -> int:
    """What multiplies G = dY^T X into dW: nothing (STE, binary-only exact), beta, or the exact coefficient."""
    if not spec.exact:
        return EPI_NONE
    if spec.lowrank:
        return EPI_BETA
    if spec.has_prune or spec.bits > 1:
        return EPI_EXACT_COEF
    return EPI_NONE


def _input_grad(grad_out, weight, state, spec, strategy, g_low, v):
    m, k = grad_out.shape[0], weight.shape[1]
    if strategy == "fused":
        dx = torch.empty(m, k, dtype=grad_out.dtype, device=grad_out.device)
        lowrank = (g_low, v) if spec.lowrank else None
        return vcon_matmul(grad_out, weight, dx, state=state, b_is_w=B_IS_W, lowrank=lowrank)
    if spec.lowrank:
        return torch.mm(grad_out, blend_weight(state, scale_by_beta=True)).addmm_(g_low, v)
    return torch.mm(grad_out, blend_weight(state))


def _weight_grad(grad_out, x, weight, bias, state, spec, strategy, want_db):
    """(dW, db or None)."""
    epilogue = weight_epilogue(spec)
    if strategy == "fused":
        dw = torch.empty_like(weight)
        db = torch.empty_like(bias) if want_db else None
        vcon_matmul(grad_out.t(), x, dw, state=state, epilogue=epilogue, rowsum=db, tokens=x.shape[0])
        return dw, db
    g = torch.mm(grad_out.t(), x)
    if epilogue == EPI_EXACT_COEF:
        g = weight_grad(g, state)
    elif epilogue == EPI_BETA:
        g = blend_weight(WeightState(g, state.beta, None, None, None, spec), scale_by_beta=True)
    return g, None


def linear_backward(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, needs, t=None):
    """(dx, dW, db, dU, dV), None where ``needs`` (x, weight, bias, low-rank factors) says not needed.

    ``t``: the forward's t' = (1 - beta) x V^T of a low-rank layer, or None to recompute it.
    """
    need_x, need_w, need_b, need_lr = needs
    state = WeightState(weight, beta, threshold, scales, mask, spec)
    strategy = dispatch.choose(x.shape[0], spec, x.dtype)
    want_db = bool(need_b) and bias is not None
    dx = dw = db = du = dv = None
    g_low = None
    if spec.lowrank and (need_x or need_lr):
        g_low = torch.empty(grad_out.shape[0], u.shape[1], dtype=grad_out.dtype, device=grad_out.device)
        vcon_matmul(grad_out, u, g_low, beta=beta, epilogue=EPI_ONE_MINUS_BETA)
    if need_x:
        dx = _input_grad(grad_out, weight, state, spec, strategy, g_low, v)
    if need_w:
        dw, db = _weight_grad(grad_out, x, weight, bias, state, spec, strategy, want_db)
    if want_db and db is None:
        db = grad_out.sum(0).to(bias.dtype)
    if spec.lowrank and need_lr:
        du = torch.mm(grad_out.t(), lowrank_t(x, v, beta) if t is None else t)
        dv = torch.mm(g_low.t(), x)
    return dx, dw, db, du, dv
