"""The weight transforms of ``spec.py`` in plain torch: masks, thresholds, scales, fake quant.

These functions are the single source of truth for the math. The plain-torch backend,
the naive reference, and ``finalize`` all call them; the C++ and Triton backends are
tested against them.
"""

from __future__ import annotations

from typing import Optional

import torch

from .packing import unpack_mask
from .spec import PRUNE_MASK
from .spec import PRUNE_NM
from .spec import PRUNE_THRESHOLD
from .spec import TransformSpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Transforms run in fp32, or fp64 for fp64 weights (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kept_count(total: int, sparsity: float) -> int:
    return int(round(total * (1.0 - sparsity)))


def kth_largest(values: torch.Tensor, k: int, dim: Optional[int] = None) -> torch.Tensor:
    """The k-th largest entry (k >= 1) of non-negative ``values`` (flattened, or along ``dim``)."""
    if dim is None:
        flat = values.reshape(-1)
        return torch.kthvalue(flat, flat.numel() - k + 1).values.reshape(1)
    return torch.kthvalue(values, values.shape[dim] - k + 1, dim=dim).values


def prune_threshold(weight: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Threshold(s) t with keep-mask ``|W| >= t``: shape (1,) or (N,) when ``per_row``.

    The dtype is the compute dtype (fp32, or fp64 for fp64 weights): |W| of an fp32/bf16/fp16
    weight is exact in fp32, so the threshold is one of the weight magnitudes, never rounded.
    """
    cdt = compute_dtype(weight.dtype)
    absw = weight.detach().abs().to(cdt)
    n_rows, n_cols = absw.shape
    k = kept_count(n_cols if per_row else absw.numel(), sparsity)
    shape = (n_rows,) if per_row else (1,)
    if k == 0:
        return torch.full(shape, float("inf"), dtype=cdt, device=weight.device)
    return kth_largest(absw, k, dim=1 if per_row else None).reshape(shape)


def nm_keep_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest |W| of each m consecutive inputs; ties go to the lower index."""
    rows, cols = weight.shape
    groups = weight.detach().abs().reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
    keep.scatter_(-1, order, True)
    return keep.reshape(rows, cols)


def keep_mask(
    weight: torch.Tensor, threshold: Optional[torch.Tensor], mask: Optional[torch.Tensor], spec: TransformSpec
) -> torch.Tensor:
    """The bool keep-mask M of the prune stage (shape of ``weight``)."""
    if spec.prune == PRUNE_THRESHOLD:
        t = threshold.to(compute_dtype(weight.dtype)).reshape(-1, 1)
        return weight.detach().abs().to(t.dtype) >= t
    if spec.prune == PRUNE_NM:
        return nm_keep_mask(weight, spec.nm_n, spec.nm_m)
    if spec.prune == PRUNE_MASK:
        return unpack_mask(mask, weight.shape[1])
    raise ValueError(f"spec has no prune stage (prune={spec.prune})")


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View (N, K) as (rows, groups, group_len) matching the scale layout of the spec."""
    rows, cols = w.shape
    if group_size == 0:
        return w.reshape(1, 1, rows * cols)
    return w.reshape(rows, cols // group_size, group_size)


def quant_scales(w1: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    """fp32 scales of shape ``spec.scales_shape`` for the (already prune-blended) weight."""
    g = grouped(w1.detach().to(compute_dtype(w1.dtype)), spec.group_size)
    if spec.bits == 1:
        total = g.abs().sum(dim=-1)
        count = (g != 0).sum(dim=-1).clamp_min(1)
        scales = total / count
    else:
        scales = g.abs().amax(dim=-1) / spec.qmax
    return scales.to(torch.float32)


def quant_codes(w1: torch.Tensor, scales: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    """Integer codes of ``w1`` as a float tensor of w1's shape (before clamping for bits > 1).

    bits > 1: ``round(w1 / s')``; bits == 1: ``sign(w1)``.
    """
    if spec.bits == 1:
        return torch.sign(w1)
    g = grouped(w1, spec.group_size)
    s = scales.to(w1.dtype).unsqueeze(-1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(g / s).reshape(w1.shape)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, spec: TransformSpec, dtype: torch.dtype) -> torch.Tensor:
    """``codes * s`` computed in ``dtype`` (the compute dtype), shape of ``codes``."""
    g = grouped(codes.to(dtype), spec.group_size)
    return (g * scales.to(dtype).unsqueeze(-1)).reshape(codes.shape)


def fake_quant(w1: torch.Tensor, scales: torch.Tensor, spec: TransformSpec):
    """(Q(w1), R) with R the in-range mask of the exact gradient (None for binary)."""
    codes = quant_codes(w1, scales, spec)
    if spec.bits == 1:
        return dequantize(codes, scales, spec, w1.dtype), None
    in_range = (codes >= spec.qmin) & (codes <= spec.qmax)
    q = dequantize(codes.clamp(spec.qmin, spec.qmax), scales, spec, w1.dtype)
    return q, in_range


def betas(beta: torch.Tensor, spec: TransformSpec, dtype: torch.dtype):
    """(beta_prune, beta_quant) as 0-dim tensors of ``dtype`` (None where a stage is absent)."""
    b = beta.to(dtype)
    bp = b[0] if spec.has_prune else None
    bq = b[spec.quant_beta_index] if spec.has_quant else None
    return bp, bq


def prune_blend(w: torch.Tensor, keep: torch.Tensor, bp: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, w, bp * w)


def compute_state(
    weight: torch.Tensor, beta: torch.Tensor, mask: Optional[torch.Tensor], spec: TransformSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold, scales) for the current weight: see ``TransformSpec`` for the shapes."""
    n_rows, n_cols = weight.shape
    device = weight.device
    threshold = torch.empty(spec.threshold_shape(n_rows), dtype=compute_dtype(weight.dtype), device=device)
    if spec.prune == PRUNE_THRESHOLD:
        threshold = prune_threshold(weight, spec.sparsity, spec.per_row)
    if not spec.has_quant:
        return threshold, torch.empty(spec.scales_shape(n_rows, n_cols), dtype=torch.float32, device=device)
    cdt = compute_dtype(weight.dtype)
    w1 = weight.detach().to(cdt)
    if spec.has_prune:
        bp, _ = betas(beta, spec, cdt)
        w1 = prune_blend(w1, keep_mask(weight, threshold, mask, spec), bp)
    return threshold, quant_scales(w1, spec)


def blend_weight_with_coef(
    weight: torch.Tensor,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    scales: torch.Tensor,
    mask: Optional[torch.Tensor],
    spec: TransformSpec,
    want_weight: bool = True,
    want_coef: bool = False,
):
    """(W_eff in weight.dtype, exact-gradient coefficient dW_eff/dW in compute dtype or None)."""
    cdt = compute_dtype(weight.dtype)
    w = weight.detach().to(cdt)
    bp, bq = betas(beta, spec, cdt)
    coef = None
    if spec.has_prune:
        keep = keep_mask(weight, threshold, mask, spec)
        w = prune_blend(w, keep, bp)
        if want_coef:
            coef = torch.where(keep, torch.ones_like(w), bp.expand_as(w))
    if spec.has_quant:
        q, in_range = fake_quant(w, scales, spec)
        if want_coef and in_range is not None:
            qcoef = bq + (1 - bq) * in_range.to(cdt)
            coef = qcoef if coef is None else coef * qcoef
        w = bq * w + (1 - bq) * q if want_weight else None
    w_eff = w.to(weight.dtype) if want_weight else None
    return w_eff, coef
