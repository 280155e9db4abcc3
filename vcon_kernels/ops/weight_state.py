"""The flat kernel arguments that describe a layer's weight transform (see ``transform.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..spec import PRUNE_MASK
from ..spec import PRUNE_NM
from ..spec import PRUNE_THRESHOLD
from ..spec import TransformSpec
from .transform import PRUNE_ELEMENTWISE
from .transform import PRUNE_NM_RANKS
from .transform import PRUNE_NONE
from .transform import QUANT_NONE
from .transform import QUANT_ON

_DUMMIES: dict = {}


def dummy(device: torch.device) -> torch.Tensor:
    """A 1-element fp32 tensor passed for pointer arguments a kernel variant never reads."""
    key = (device.type, device.index)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=torch.float32, device=device)
    return _DUMMIES[key]


def prune_kind(spec: TransformSpec) -> int:
    """The kernels' PRUNE constexpr: threshold and stored masks share one variant (a runtime flag)."""
    if spec.prune == PRUNE_NM:
        return PRUNE_NM_RANKS
    return PRUNE_ELEMENTWISE if spec.has_prune else PRUNE_NONE


@dataclass
class WeightState:
    """A 2-D weight (N, K) and everything its blended form depends on (device tensors only).

    Example usage::

        ws = WeightState(w, beta, threshold, scales, mask, spec)
        kernel[grid](..., **ws.kernel_args())

    ``PRUNE`` / ``QUANT`` (constexprs of the GEMM main loops) and ``prune_kind`` / ``quant_on``
    (the same values as runtime arguments, for the kernels that branch at run time).
    """

    weight: torch.Tensor
    beta: torch.Tensor
    threshold: Optional[torch.Tensor]
    scales: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    spec: TransformSpec

    @property
    def transforms(self) -> bool:
        return self.spec.has_prune or self.spec.has_quant

    def kernel_args(self) -> dict:
        w, spec = self.weight, self.spec
        rows, cols = w.shape
        d = dummy(w.device)
        thr = self.threshold if (spec.prune == PRUNE_THRESHOLD) else d
        mask = self.mask if spec.prune == PRUNE_MASK else d
        scales = self.scales if spec.has_quant else d
        if spec.has_quant and spec.group_size not in (0, cols):
            scale_row_stride, group_size = cols // spec.group_size, spec.group_size
        else:  # per tensor (one scale, row stride 0) or per channel (one per row)
            scale_row_stride = 1 if (spec.has_quant and spec.group_size == cols) else 0
            group_size = max(cols, 1)
        return dict(
            w_ptr=w, stride_wr=w.stride(0), stride_wc=w.stride(1), beta_ptr=self.beta,
            thr_ptr=thr, thr_stride=1 if (spec.prune == PRUNE_THRESHOLD and spec.per_row) else 0,
            mask_ptr=mask, mask_stride=mask.stride(0) if spec.prune == PRUNE_MASK else 0,
            stored_mask=int(spec.prune == PRUNE_MASK),
            nm_n=spec.nm_n if spec.prune == PRUNE_NM else 0,
            nm_m=spec.nm_m if spec.prune == PRUNE_NM else 1,
            scale_ptr=scales, scale_row_stride=scale_row_stride, group_size=group_size,
            binary=int(spec.bits == 1), qmin=float(spec.qmin), qmax=float(spec.qmax),
            prune_kind=prune_kind(spec), quant_on=QUANT_ON if spec.has_quant else QUANT_NONE,
            PRUNE=prune_kind(spec), QUANT=QUANT_ON if spec.has_quant else QUANT_NONE,
            scale_grouped=int(spec.has_quant and spec.group_size not in (0, cols)),
        )
