"""Functional forms of the VCON layers, for kernel authors and custom modules.

``vcon_linear(x, weight, bias, beta, config, state)`` computes

    y = x (beta W + (1 - beta) C(W))^T + b          (pruning, quantization, both)
    y = beta x W^T + (1 - beta) (x V^T) U^T + b      (low rank)

as one ``torch.ops.vcon.linear`` call (its first output) (plus one ``vcon::compute_state`` call for the
reductions a threshold or quantization scales need), with autograd. See ``spec.py`` for
the exact formulas and ``library.py`` for the ops. In eager mode on plain tensors the same
implementation runs without the op dispatcher (``eager.py``); the layers also cache their
state between weight updates (``state_cache.py``), which these stateless functions cannot.

Example usage::

    import vcon_kernels as vk
    cfg = vk.Prune(sparsity=0.5)
    y = vk.functional.vcon_linear(x, w, b, beta=0.3, config=cfg)
"""

from __future__ import annotations

import math
from typing import NamedTuple
from typing import Optional
from typing import Union

import torch

from . import eager
from . import library  # noqa: F401  (registers torch.ops.vcon)
from .autocast import eligible
from .autocast import is_autocast_on
from .configs import VCONConfig
from .library import keeps_t
from .spec import PRUNE_THRESHOLD
from .spec import TransformSpec

Tensor = torch.Tensor


class VCONState(NamedTuple):
    """Per-layer tensors besides the weight: a stored (bit-packed) keep-mask and low-rank factors."""

    mask: Optional[Tensor] = None
    lowrank_u: Optional[Tensor] = None
    lowrank_v: Optional[Tensor] = None


_EMPTY_STATE = VCONState()


def check_beta_value(value, where: str = "beta") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or not (0.0 <= value <= 1.0):
        raise ValueError(f"{where} must be in [0, 1], got {value!r}")
    return value


def as_beta(beta: Union[float, Tensor], num_stages: int, device) -> Tensor:
    """beta as the fp32 (num_stages,) tensor the ops take; a float applies to every stage."""
    if isinstance(beta, Tensor):
        if beta.numel() not in (1, num_stages):
            expected = "1 entry" if num_stages == 1 else f"1 or {num_stages} entries (one per stage)"
            raise ValueError(f"beta must have {expected}, got shape {tuple(beta.shape)}")
        beta = beta.to(device=device, dtype=torch.float32).reshape(-1)
        return beta.expand(num_stages).contiguous() if beta.numel() != num_stages else beta
    value = check_beta_value(beta)
    return torch.full((num_stages,), value, dtype=torch.float32, device=device)


def check_inputs(
    x: Tensor, weight: Tensor, in_features: int, name: str = "vcon_linear", dim: int = -1, what: str = "last"
) -> None:
    """Clear errors for inputs that F.linear / F.conv2d would reject with a cryptic message."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: input dtype must be float32, bfloat16, float16 or float64, got {x.dtype}"
        )
    if x.dtype != weight.dtype and not _autocast_casts(x, weight):
        raise TypeError(
            f"{name}: input dtype {x.dtype} does not match the weight dtype {weight.dtype}; "
            "cast the input or the module (module.to(dtype)), or run under torch.autocast"
        )
    if x.device != weight.device:
        raise ValueError(
            f"{name}: input is on {x.device} but the weights are on {weight.device}; move one of them"
        )
    if x.dim() == 0 or x.shape[dim] != in_features:
        raise ValueError(
            f"{name}: input's {what} dimension must be {in_features} (the layer's input features), "
            f"got shape {tuple(x.shape)}"
        )


def _autocast_casts(x: Tensor, weight: Tensor) -> bool:
    """Whether torch.autocast will bring ``x`` to the compute dtype of a ``weight`` layer (autocast.py)."""
    device_type = x.device.type
    return is_autocast_on(device_type) and eligible(x, device_type) and eligible(weight, device_type)


def check_params(weight: Tensor, bias: Optional[Tensor], ndim: int, name: str) -> None:
    """Clear errors for a weight or bias of the wrong rank, shape or dtype (functional API)."""
    if not isinstance(weight, Tensor) or weight.dim() != ndim or not weight.is_floating_point():
        got = f"{tuple(weight.shape)} {weight.dtype}" if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{name}: weight must be a {ndim}-D floating-point tensor, got {got}")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(
            f"{name}: bias must have shape ({weight.shape[0]},) and the weight dtype {weight.dtype}, "
            f"got {tuple(bias.shape)} {bias.dtype}"
        )


def layer_spec(config: VCONConfig, weight2d_shape, state: VCONState) -> TransformSpec:
    rows, cols = weight2d_shape
    return config.spec(rows, cols, stored_mask=state.mask is not None)


def needs_state(spec: TransformSpec) -> bool:
    """Whether the layer needs a threshold or scales (reductions over W) before its GEMM."""
    return spec.prune == PRUNE_THRESHOLD or spec.has_quant


def layer_state(weight2d: Tensor, beta: Tensor, spec: TransformSpec, mask: Optional[Tensor]):
    """(threshold, scales) of the current weight; empty tensors when the spec needs none."""
    if needs_state(spec):
        if eager.can_run(weight2d, beta, mask):
            return eager.compute_state(weight2d, beta, mask, spec)
        return torch.ops.vcon.compute_state(weight2d.detach(), beta, mask, *spec.as_args())
    empty = weight2d.new_empty(0, dtype=torch.float32)
    return empty, empty


def linear_call(x, weight, bias, beta, threshold, scales, state: VCONState, spec: TransformSpec) -> Tensor:
    """The blended linear op on prepared arguments: the eager fast path where it applies, else the op."""
    mask, u, v = state
    if eager.can_run(x, weight, bias, beta, mask, u, v):
        return eager.linear(x, weight, bias, beta, threshold, scales, mask, u, v, spec)
    keep_t = keeps_t(spec, u)  # the op's second output: the low-rank activation, kept for dU when U trains
    return torch.ops.vcon.linear(x, weight, bias, beta, threshold, scales, mask, u, v, *spec.as_args(), keep_t)[0]


def conv2d_call(x, weight, bias, beta, threshold, scales, state: VCONState, spec: TransformSpec,
                conv_args) -> Tensor:
    """The blended conv op on prepared arguments; ``conv_args`` = (stride, padding, dilation, groups) lists."""
    mask, u, v = state
    if eager.can_run(x, weight, bias, beta, mask, u, v):
        return eager.conv2d(x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args)
    stride, padding, dilation, groups = conv_args
    return torch.ops.vcon.conv2d(
        x, weight, bias, beta, threshold, scales, mask, u, v, stride, padding, dilation, groups, *spec.as_args(),
        keeps_t(spec, u),
    )[0]


def _prepare(weight2d_shape, weight, beta, config, state):
    state = _EMPTY_STATE if state is None else state
    spec = layer_spec(config, weight2d_shape, state)
    beta_t = as_beta(beta, spec.num_stages, weight.device)
    if spec.lowrank:
        empty = weight.new_empty(0, dtype=torch.float32)
        return spec, beta_t, empty, empty, state
    threshold, scales = layer_state(weight.reshape(weight2d_shape), beta_t, spec, state.mask)
    return spec, beta_t, threshold, scales, state


def _check_lowrank(spec, state, name):
    if spec.lowrank and (state.lowrank_u is None or state.lowrank_v is None):
        raise ValueError(f"{name}: a LowRank config needs state.lowrank_u and state.lowrank_v")


def vcon_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    beta: Union[float, Tensor],
    config: VCONConfig,
    state: Optional[VCONState] = None,
) -> Tensor:
    """The blended linear layer (see module docstring). ``x``: (..., K), ``weight``: (N, K)."""
    check_params(weight, bias, 2, "vcon_linear")
    check_inputs(x, weight, weight.shape[1])
    spec, beta_t, threshold, scales, state = _prepare(weight.shape, weight, beta, config, state)
    _check_lowrank(spec, state, "vcon_linear")
    return linear_call(x, weight, bias, beta_t, threshold, scales, state, spec)


def vcon_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    beta: Union[float, Tensor],
    config: VCONConfig,
    state: Optional[VCONState] = None,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
) -> Tensor:
    """The blended 2-D convolution: ``conv2d(x, beta W + (1 - beta) C(W))`` (integer padding only).

    Low rank: ``beta conv(x, W) + (1 - beta) conv1x1(conv(x, V), U)`` with V (r, C, kh, kw)
    and U (N, r, 1, 1).
    """
    if x.dim() != 4:
        raise ValueError(f"vcon_conv2d: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    check_params(weight, bias, 4, "vcon_conv2d")
    check_inputs(x, weight, weight.shape[1] * groups, "vcon_conv2d", dim=1, what="channel")
    rows = weight.shape[0]
    spec, beta_t, threshold, scales, state = _prepare((rows, weight[0].numel()), weight, beta, config, state)
    _check_lowrank(spec, state, "vcon_conv2d")
    return conv2d_call(x, weight, bias, beta_t, threshold, scales, state, spec,
                       conv_arguments(stride, padding, dilation, groups))


def conv_arguments(stride, padding, dilation, groups) -> tuple:
    """(stride, padding, dilation, groups) as the conv op takes them: three int lists and an int."""
    pair = torch.nn.modules.utils._pair
    return list(pair(stride)), list(pair(padding)), list(pair(dilation)), int(groups)


def blended_weight(
    weight: Tensor, beta: Union[float, Tensor], config: VCONConfig, state: Optional[VCONState] = None
) -> Tensor:
    """``beta W + (1 - beta) C(W)`` with autograd (STE or exact per the config); any weight shape."""
    rows = weight.shape[0]
    spec, beta_t, threshold, scales, state = _prepare((rows, weight[0].numel()), weight, beta, config, state)
    if spec.lowrank:
        raise ValueError("blended_weight: a LowRank layer has no single blended weight")
    w2d = weight.reshape(rows, -1)
    out = torch.ops.vcon.blend_weight(w2d, beta_t, threshold, scales, state.mask, *spec.as_args())
    return out.view_as(weight)


__all__ = ["VCONState", "vcon_linear", "vcon_conv2d", "blended_weight", "as_beta", "check_beta_value"]
