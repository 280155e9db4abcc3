"""Turn one VCON layer into its finalized module (the compressed form it computes at beta = 0)."""

from __future__ import annotations

import torch
from torch import nn

from .. import torch_transforms as transforms
from ..configs import prune_stage
from ..functional import layer_state
from .modules import CompressedConv2d
from .modules import CompressedLinear
from .modules import LowRankConv2d
from .modules import LowRankLinear
from .sparse_quantized import NMQuantizedWeight
from .sparse_quantized import SparseQuantizedWeight
from .storage import DenseWeight
from .storage import NMSparseWeight
from .storage import QuantizedWeight
from .storage import SparseWeight


def _pruned_storage(w2d, keep, config):
    prune = prune_stage(config)
    if prune.granularity == "nm":
        return NMSparseWeight(w2d, keep, prune.n, prune.m)
    nnz = int(keep.sum())
    sparse_bytes = SparseWeight.nbytes_estimate(w2d.shape, nnz, w2d.element_size())
    if sparse_bytes < w2d.numel() * w2d.element_size():
        return SparseWeight(w2d, keep)
    return DenseWeight(torch.where(keep, w2d, torch.zeros_like(w2d)))


def _pruned_quantized_storage(codes, keep, scales, spec, dtype, config):
    """The kept codes only (N:M or CSR) where that is smaller than every code packed."""
    rows, cols = codes.shape
    packed_bytes = rows * ((cols * spec.bits + 7) // 8)
    prune = prune_stage(config)
    if prune.granularity == "nm":
        if NMQuantizedWeight.nbytes_estimate(codes.shape, prune.n, prune.m) < packed_bytes:
            return NMQuantizedWeight(codes, keep, prune.n, prune.m, scales, spec, dtype)
    elif SparseQuantizedWeight.nbytes_estimate(codes.shape, int(keep.sum())) < packed_bytes:
        return SparseQuantizedWeight(codes, keep, scales, spec, dtype)
    return QuantizedWeight(codes, scales, spec, dtype)


@torch.no_grad()
def build_storage(layer):
    """The compressed storage of ``C(W)`` for a (prune and/or quantize) VCON layer."""
    spec = layer.spec()
    w2d = layer.weight_2d().detach()
    zeros = torch.zeros_like(layer.beta)
    threshold, scales = layer_state(w2d, zeros, spec, layer.mask)
    if spec.has_quant:
        cdt = transforms.compute_dtype(w2d.dtype)
        w1 = w2d.to(cdt)
        keep = None
        if spec.has_prune:
            keep = transforms.keep_mask(w2d, threshold, layer.mask, spec)
            w1 = torch.where(keep, w1, torch.zeros_like(w1))
        codes = transforms.quant_codes(w1, scales, spec)
        if spec.bits > 1:
            codes = codes.clamp(spec.qmin, spec.qmax)
        if keep is not None and spec.bits > 1:
            return _pruned_quantized_storage(codes, keep, scales, spec, w2d.dtype, layer.config)
        return QuantizedWeight(codes, scales, spec, w2d.dtype)
    keep = transforms.keep_mask(w2d, threshold, layer.mask, spec)
    return _pruned_storage(w2d, keep, layer.config)


def finalize_layer(layer, force: bool = False, name: str = "layer") -> nn.Module:
    """The finalized module for one VCON layer; raises if any beta > 0 unless ``force``."""
    from ..modules.conv import VCONConv2d

    if not force and bool((layer.beta > 0).any()):
        betas = dict(zip(layer.stage_names, layer.beta.tolist()))
        raise ValueError(
            f"{name}: cannot finalize while beta > 0 ({betas}); step the scheduler to the end of the "
            "transition, or pass force=True to finalize as if beta were 0"
        )
    is_conv = isinstance(layer, VCONConv2d)
    bias = None if layer.bias is None else layer.bias.detach()
    if layer.spec().lowrank:
        u, v = layer.lowrank_u.detach(), layer.lowrank_v.detach()
        if is_conv:
            return LowRankConv2d(u, v, bias, layer.conv_kwargs())
        return LowRankLinear(u, v, bias)
    storage = build_storage(layer)
    if is_conv:
        return CompressedConv2d(storage, bias, layer.conv_kwargs())
    return CompressedLinear(storage, bias)
