"""VCONLinear: ``nn.Linear`` whose weight fades into its compressed form.

Example usage::

    import vcon_kernels as vk
    layer = vk.VCONLinear.from_linear(nn.Linear(512, 256), vk.Quantize(bits=4))
    layer.set_beta(0.5)
    y = layer(x)              # x (W/2 + Q(W)/2)^T + b, one fused op
"""

from __future__ import annotations

import torch
from torch import nn

from ..configs import VCONConfig
from ..eager import linear_node
from ..functional import check_inputs
from ..functional import linear_call
from ..functional import vcon_linear
from .base import VCONLayerBase
from .base import check_config
from .base import check_finite


class VCONLinear(VCONLayerBase, nn.Linear):
    """A linear layer running dense and compressed paths as one blended op.

    An ``nn.Linear`` subclass, so code keyed on ``isinstance(m, nn.Linear)`` (PEFT target
    discovery, FSDP wrap policies, HF weight init) treats it as one. ``weight`` is the latent
    (dense, master) weight: code that calls ``F.linear(x, m.weight)`` itself instead of
    ``m(x)`` bypasses the blend; :meth:`effective_weight` is the weight the layer computes with.
    ``reset_parameters()`` re-initializes W and b as ``nn.Linear`` does and re-derives the
    stored mask and low-rank factors from the new weight.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        config: a ``vk.Prune``, ``vk.Quantize``, ``vk.LowRank`` or ``vk.Compose``.

    Forward: ``vk.functional.vcon_linear(x, weight, bias, beta, config, state)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: VCONConfig = None,
                 device=None, dtype=None):
        nn.Module.__init__(self)
        check_config(config)
        config.check_layer(out_features, in_features, "VCONLinear")
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._adopt(dense.weight, dense.bias, config)

    def _adopt(self, weight: nn.Parameter, bias, config: VCONConfig) -> None:
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.weight = weight
        self.bias = bias
        self._init_vcon_state(config)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: VCONConfig, name: str = "layer") -> VCONLinear:
        """Wrap an existing ``nn.Linear``; its weight and bias Parameters are shared, not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: from_linear expects an nn.Linear, got {type(linear).__name__}")
        check_config(config)
        config.check_layer(linear.out_features, linear.in_features, name)
        check_finite(linear.weight, name)
        layer = cls.__new__(cls)
        VCONLayerBase.__init__(layer)
        layer._adopt(linear.weight, linear.bias, config)
        layer.train(linear.training)
        return layer

    def _lowrank_shapes(self, rank: int):
        return (self.out_features, rank), (rank, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the graph computes state itself (the caches are eager-only)
            return vcon_linear(x, self.weight, self.bias, self.beta, self.config, self.state)
        spec = self.call_spec()
        threshold, scales = self.call_state(spec)
        node = linear_node(x, self.weight)
        if node is not None:  # a training call on the C++ backend: straight to its autograd node
            params, buffers = self._parameters, self._buffers
            try:
                return node(x, self.call_weight(spec), params.get("bias"), buffers["beta"], threshold, scales,
                            buffers.get("mask"), params.get("lowrank_u"), params.get("lowrank_v"),
                            self._spec_cache[4])
            except Exception:
                check_inputs(x, self.weight, self.in_features)  # a clear error for a bad input, else the node's
                raise
        check_inputs(x, self.weight, self.in_features)
        return linear_call(x, self.call_weight(spec), self.bias, self.beta, threshold, scales, self.state, spec)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        self._rederive_vcon_state()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._vcon_repr()}")
