"""The naive two-pass VCON: the test oracle and the "naive" benchmark baseline.

It runs the dense and the compressed module separately and blends their outputs,
``y = beta f(x) + (1 - beta) g(x)``, letting autograd do the rest: two (three for
prune+quantize) GEMMs forward, twice the backward, and the compressed weight copy kept
alive for backward. Deliberately simple and independent of the fused path: masks come
from ``topk`` index sets and an explicit N:M rank count, scales from a direct formula,
so a bug in ``torch_transforms.py`` does not hide in both.

Gradient modes, with C the compressed weight:

* ``"ste"``: the compressed path is ``W + (C(W) - W).detach()``, so the latent W gets the
  gradient at the blended weight unchanged (dW = dY^T X); for low rank a zero-valued term
  adds the missing ``(1 - beta) dY^T X`` to W.
* ``"exact"``: the compressed path is ``W * M`` (M constant) for pruning and
  ``Q(W).detach() + (W - W.detach()) * R`` for quantization (R: codes not clamped).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .configs import Compose
from .configs import LowRank
from .configs import Prune
from .configs import Quantize
from .configs import VCONConfig
from .functional import VCONState
from .packing import unpack_mask

Tensor = torch.Tensor


def reference_keep_mask(weight: Tensor, prune: Prune, stored_mask: Optional[Tensor] = None) -> Tensor:
    """The keep-mask by index sets: topk per layer/row, explicit rank count for N:M."""
    rows, cols = weight.shape
    if stored_mask is not None:
        return unpack_mask(stored_mask, cols)
    a = weight.detach().abs()
    keep = torch.zeros(rows * cols, dtype=torch.bool, device=weight.device)
    if prune.granularity == "layer":
        k = int(round(rows * cols * (1 - prune.sparsity)))
        keep[torch.topk(a.reshape(-1), k).indices] = True
        return keep.view(rows, cols)
    if prune.granularity == "row":
        k = int(round(cols * (1 - prune.sparsity)))
        keep = keep.view(rows, cols)
        keep.scatter_(1, torch.topk(a, k, dim=1).indices, True)
        return keep
    g = a.reshape(rows, cols // prune.m, prune.m)
    gi, gj = g.unsqueeze(-1), g.unsqueeze(-2)  # element i vs element j of the group
    idx = torch.arange(prune.m, device=weight.device)
    lower = (idx.view(1, -1) < idx.view(-1, 1))  # [i, j]: j < i
    rank = (gj > gi).sum(-1) + ((gj == gi) & lower).sum(-1)
    return (rank < prune.n).reshape(rows, cols)


def reference_fake_quant(w: Tensor, quant: Quantize):
    """(Q(w), R) by the direct formula; R is None for binary."""
    rows, cols = w.shape
    g = {"channel": cols, "group": quant.group_size, "tensor": rows * cols}[quant.granularity]
    groups = w.detach().reshape(-1, g)
    if quant.bits == 1:
        nonzero = (groups != 0).sum(1, keepdim=True).clamp_min(1)
        scale = (groups.abs().sum(1, keepdim=True) / nonzero).float().to(w.dtype)
        return (torch.sign(groups) * scale).reshape(rows, cols), None
    qmax, qmin = 2 ** (quant.bits - 1) - 1, -(2 ** (quant.bits - 1))
    scale = (groups.abs().amax(1, keepdim=True) / qmax).float().to(w.dtype)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(groups / safe)
    in_range = ((codes >= qmin) & (codes <= qmax)).reshape(rows, cols)
    return (codes.clamp(qmin, qmax) * scale).reshape(rows, cols), in_range


def _ste(w: Tensor, compressed: Tensor) -> Tensor:
    return w + (compressed - w).detach()


def _pruned_path(w2d, prune, mask, exact):
    keep = reference_keep_mask(w2d, prune, mask)
    return w2d * keep if exact else _ste(w2d, w2d.detach() * keep)


def _quant_path(w2d, quant, exact):
    cdt = torch.float64 if w2d.dtype == torch.float64 else torch.float32
    q, in_range = reference_fake_quant(w2d.detach().to(cdt), quant)
    q = q.to(w2d.dtype)
    if not exact:
        return _ste(w2d, q)
    r = torch.ones_like(w2d) if in_range is None else in_range.to(w2d.dtype)
    return q + (w2d - w2d.detach()) * r


def weight_paths(weight: Tensor, betas, config: VCONConfig, mask: Optional[Tensor] = None):
    """[(weight_i, coef_i)]: the layer is ``sum_i coef_i * layer(x, weight_i)``."""
    w2d = weight.reshape(weight.shape[0], -1)
    shape = weight.shape
    exact = config.grad == "exact"
    if isinstance(config, Prune):
        (bp,) = betas
        return [(weight, bp), (_pruned_path(w2d, config, mask, exact).view(shape), 1 - bp)]
    if isinstance(config, Quantize):
        (bq,) = betas
        return [(weight, bq), (_quant_path(w2d, config, exact).view(shape), 1 - bq)]
    if isinstance(config, Compose):
        bp, bq = betas
        pruned = _pruned_path(w2d, config.prune, mask, exact)
        w1 = bp * w2d + (1 - bp) * pruned
        quantized = _quant_path(w1, config.quantize, exact)
        return [(weight, bq * bp), (pruned.view(shape), bq * (1 - bp)), (quantized.view(shape), 1 - bq)]
    raise TypeError(f"no weight paths for {type(config).__name__}")


def _betas(beta, config):
    if isinstance(beta, Tensor):
        values = [float(v) for v in beta.reshape(-1)]
    else:
        values = [float(beta)]
    n = len(config.stage_names)
    return values * n if len(values) == 1 else values


def _blend(layer_fn, x, weight, bias, beta, config, state):
    state = state or VCONState()
    betas = _betas(beta, config)
    if isinstance(config, LowRank):
        (b,) = betas
        u, v = state.lowrank_u, state.lowrank_v
        lowrank = layer_fn(layer_fn(x, v), u, lowrank_second=True)
        if b == 0:  # the dense path is stopped, as in the authors' reference: W gets no gradient
            y = lowrank
        else:
            y = b * layer_fn(x, weight) + (1 - b) * lowrank
        # STE: a zero-valued term gives W also (1 - b) dY^T X.
        if config.grad == "ste" and b != 0:
            dense = layer_fn(x.detach(), weight)
            y = y + (1 - b) * (dense - dense.detach())
    else:
        y = sum(c * layer_fn(x, w) for w, c in weight_paths(weight, betas, config, state.mask))
    if bias is not None:
        y = y + (bias.view(1, -1, 1, 1) if y.dim() == 4 else bias)
    return y


def reference_linear(x, weight, bias, beta, config: VCONConfig, state: Optional[VCONState] = None) -> Tensor:
    """Naive two-pass ``vcon_linear`` (same arguments)."""

    def layer_fn(inp, w, lowrank_second=False):
        return F.linear(inp, w)

    return _blend(layer_fn, x, weight, bias, beta, config, state)


def reference_conv2d(x, weight, bias, beta, config: VCONConfig, state: Optional[VCONState] = None,
                     stride=1, padding=0, dilation=1, groups=1) -> Tensor:
    """Naive two-pass ``vcon_conv2d`` (same arguments)."""

    def layer_fn(inp, w, lowrank_second=False):
        if lowrank_second:
            return F.conv2d(inp, w)
        return F.conv2d(inp, w, None, stride, padding, dilation, groups)

    return _blend(layer_fn, x, weight, bias, beta, config, state)


class ReferenceVCON(torch.nn.Module):
    """Wraps a VCON layer and runs it the naive two-pass way (same parameters and state)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        if hasattr(layer, "in_features"):
            return reference_linear(x, layer.weight, layer.bias, layer.beta, layer.config, layer.state)
        if layer._input_pad is not None:
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            x = F.pad(x, layer._input_pad, mode=mode)
        return reference_conv2d(x, layer.weight, layer.bias, layer.beta, layer.config, layer.state,
                                layer.stride, layer._conv_padding, layer.dilation, layer.groups)
