"""Forward of the blended linear layer on the Triton backend.

Pruning / quantization (``W_eff = beta W + (1 - beta) C(W)``, see ``spec.py``)::

    fused: y = x W_eff^T + b      one vcon_matmul, W tiles transformed in registers
    weff:  W_eff = blend_weight(W); y = F.linear(x, W_eff, b)      (cuBLAS)

Low rank (``y = beta (x W^T + b) + (1 - beta) ((x V^T) U^T + b)``)::

    t' = (1 - beta) x V^T                              thin vcon_matmul, (M, r)
    fused: y = [x | t'] . [beta W | U]^T + b           one vcon_matmul over K + r
    weff:  y = x (beta W)^T + b, then y += t' U^T      (cuBLAS)

t' is also what the backward takes for dU = dY^T t' (``keep_t=True`` returns it), which spares
the backward that thin GEMM.

Example usage::

    y = linear_forward(x, w, b, beta, thr, scales, None, None, None, spec)
    y, t = linear_forward(x, w, b, beta, thr, scales, None, u, v, lowrank_spec, keep_t=True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .blend_weight import blend_weight
from .vcon_matmul import B_IS_WT
from .vcon_matmul import EPI_ONE_MINUS_BETA
from .vcon_matmul import vcon_matmul
from .weight_state import WeightState


def lowrank_t(x: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``(1 - beta) x V^T`` in x's dtype, (M, r): scaled in fp32 before its one rounding."""
    t = torch.empty(x.shape[0], v.shape[0], dtype=x.dtype, device=x.device)
    return vcon_matmul(x, v.t(), t, beta=beta, epilogue=EPI_ONE_MINUS_BETA)


def linear_forward(x, weight, bias, beta, threshold, scales, mask, u, v, spec, keep_t=False):
    """y (M, N) for x (M, K) and weight (N, K); ``dispatch.choose`` picks the strategy.

    With ``keep_t``: ``(y, t')``, t' the low-rank layer's (M, r) activation (None for other layers).
    """
    if spec.lowrank:
        y, t = _lowrank_forward(x, weight, bias, beta, threshold, scales, mask, u, v, spec)
        return (y, t) if keep_t else y
    y = _blended_forward(x, weight, bias, beta, threshold, scales, mask, spec)
    return (y, None) if keep_t else y


def _lowrank_forward(x, weight, bias, beta, threshold, scales, mask, u, v, spec):
    m = x.shape[0]
    state = WeightState(weight, beta, threshold, scales, mask, spec)
    t = lowrank_t(x, v, beta)
    if dispatch.choose(m, spec, x.dtype) == "fused":
        y = torch.empty(m, weight.shape[0], dtype=x.dtype, device=x.device)
        return vcon_matmul(x, weight.t(), y, state=state, b_is_w=B_IS_WT, lowrank=(t, u.t()), bias=bias), t
    w_beta = blend_weight(state, scale_by_beta=True)
    return F.linear(x, w_beta, bias).addmm_(t, u.t()), t


def _blended_forward(x, weight, bias, beta, threshold, scales, mask, spec):
    m = x.shape[0]
    state = WeightState(weight, beta, threshold, scales, mask, spec)
    if dispatch.choose(m, spec, x.dtype) == "fused":
        y = torch.empty(m, weight.shape[0], dtype=x.dtype, device=x.device)
        return vcon_matmul(x, weight.t(), y, state=state, b_is_w=B_IS_WT, bias=bias)
    return F.linear(x, blend_weight(state), bias)
