"""``vk.explain(layer, x)``: which backend and strategy a VCON layer call would use.

Example usage::

    layer = vk.VCONLinear.from_linear(nn.Linear(512, 256), vk.Prune(sparsity=0.9))
    print(vk.explain(layer, torch.randn(64, 512)))
    # cpp (avx2): W_eff built in one vectorized pass ... [VCONLinear, prune (Prune(sparsity=0.9, ...)),
    # beta=(prune=1), input (64, 512) float32, weight (256, 512) float32, computes in float32 on cpu]
"""

from __future__ import annotations

import torch

from . import backends
from .autocast import autocast_dtype
from .autocast import is_autocast_on
from .modules.base import VCONLayerBase
from .modules.conv import VCONConv2d


def _input_shape_dtype(layer: VCONLayerBase, x):
    if isinstance(x, torch.Tensor):
        return tuple(x.shape), x.dtype
    if isinstance(x, (tuple, list, torch.Size)) and all(isinstance(d, int) and d >= 0 for d in x):
        return tuple(x), layer.weight.dtype
    raise TypeError(
        f"explain: x must be the input tensor or its shape (a tuple of non-negative ints), got {type(x).__name__}"
        + (f" {x!r}" if isinstance(x, (str, tuple, list)) else "")
    )


def _check_shape(layer: VCONLayerBase, shape) -> None:
    if isinstance(layer, VCONConv2d):
        if len(shape) != 4 or shape[1] != layer.in_channels:
            raise ValueError(f"explain: a VCONConv2d input must be (N, {layer.in_channels}, H, W), got {shape}")
    elif len(shape) == 0 or shape[-1] != layer.in_features:
        raise ValueError(f"explain: a VCONLinear input must be (..., {layer.in_features}), got {shape}")


def explain(layer: VCONLayerBase, x) -> str:
    """One line on how ``layer(x)`` runs: backend and kernel strategy, then [mode, beta, dtypes, device].

    ``x`` is the input tensor or its shape. Under ``torch.autocast`` the compute dtype is the
    autocast dtype (the layer casts its input; the weight stays in its own dtype).
    """
    if not isinstance(layer, VCONLayerBase):
        raise TypeError(f"explain expects a VCON layer (vk.VCONLinear, vk.VCONConv2d), got {type(layer).__name__}")
    shape, dtype = _input_shape_dtype(layer, x)
    _check_shape(layer, shape)
    device = layer.weight.device
    compute = dtype
    if is_autocast_on(device.type) and dtype.is_floating_point and dtype != torch.float64:
        compute = autocast_dtype(device.type)
    backend = backends.select(device.type)
    rows, cols = layer.weight_2d().shape
    spec = layer.spec()
    betas = ", ".join(f"{n}={b:.4g}" for n, b in zip(layer.stage_names, layer.beta.tolist()))
    head = (
        f"{type(layer).__name__}, {'+'.join(layer.stage_names)} ({layer.config}), beta=({betas}), "
        f"input {shape} {str(dtype).replace('torch.', '')}, weight {tuple(layer.weight.shape)} "
        f"{str(layer.weight.dtype).replace('torch.', '')}, computes in {str(compute).replace('torch.', '')} "
        f"on {device.type}"
    )
    if isinstance(layer, VCONConv2d) and backend.name != "triton":  # the Triton backend describes convs itself
        how = (f"{backend.name}: conv2d low rank as conv(x, V) then a 1x1 conv with U, blended with the dense conv"
               if spec.lowrank else f"{backend.name}: conv2d: blended weight built once, then one convolution")
    else:
        how = backend.explain(shape, (rows, cols), spec, device)
    return f"{how} [{head}]"
