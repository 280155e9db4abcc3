"""VCONConv2d: ``nn.Conv2d`` whose weight fades into its compressed form.

The blend acts on the weight viewed as (out_channels, in_channels/groups * kh * kw):
pruning rows are output channels, N:M groups and quantization groups run along that
flattened input axis. Grouped and depthwise convolutions work for pruning and
quantization. Low rank (groups = 1 only) is a kh x kw conv to r channels (V) followed by
a 1x1 conv (U).

Example usage::

    conv = vk.VCONConv2d.from_conv2d(nn.Conv2d(32, 64, 3, padding=1), vk.Prune(sparsity=0.8))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..configs import LowRank
from ..configs import VCONConfig
from ..functional import check_inputs
from ..functional import conv2d_call
from ..functional import conv_arguments
from ..functional import vcon_conv2d
from .base import VCONLayerBase
from .base import check_config
from .base import check_finite


def _check_conv_config(config: VCONConfig, conv: nn.Conv2d, name: str) -> None:
    check_config(config)
    if isinstance(config, LowRank) and conv.groups != 1:
        raise ValueError(
            f"{name}: LowRank needs groups=1 convolutions (got groups={conv.groups}); "
            "exclude grouped/depthwise convs with filter_fn"
        )
    cols = conv.weight[0].numel()
    config.check_layer(conv.out_channels, cols, name)


class VCONConv2d(VCONLayerBase, nn.Conv2d):
    """A 2-D convolution running dense and compressed paths as one blended op.

    An ``nn.Conv2d`` subclass (see :class:`VCONLinear` for what that means for ``weight``
    and ``reset_parameters``).

    Build it from an existing conv with :meth:`from_conv2d` (weights shared) or like
    ``nn.Conv2d`` with an extra ``config``. ``padding_mode`` other than "zeros" and string
    padding ("same"/"valid") are supported by padding the input explicitly.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", config: VCONConfig = None, device=None, dtype=None):
        nn.Module.__init__(self)
        dense = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                          padding_mode, device=device, dtype=dtype)
        _check_conv_config(config, dense, "VCONConv2d")
        self._adopt(dense, config)

    def _adopt(self, conv: nn.Conv2d, config: VCONConfig) -> None:
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups", "padding_mode"):
            setattr(self, attr, getattr(conv, attr))
        self.padding = conv.padding
        # nn.Conv2d attributes that its helpers (_conv_forward, __setstate__, repr) read.
        self.transposed = False
        self.output_padding = conv.output_padding
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self.weight = conv.weight
        self.bias = conv.bias
        # Explicit input padding for what convolution_backward cannot express with ints.
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            self._input_pad = tuple(conv._reversed_padding_repeated_twice)
            self._conv_padding = (0, 0)
        else:
            self._input_pad = None
            self._conv_padding = _pair(conv.padding)
        self._init_vcon_state(config)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, config: VCONConfig, name: str = "layer") -> VCONConv2d:
        """Wrap an existing ``nn.Conv2d``; its weight and bias Parameters are shared, not copied."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{name}: from_conv2d expects an nn.Conv2d, got {type(conv).__name__}")
        _check_conv_config(config, conv, name)
        check_finite(conv.weight, name)
        layer = cls.__new__(cls)
        VCONLayerBase.__init__(layer)
        layer._adopt(conv, config)
        layer.train(conv.training)
        return layer

    def _lowrank_shapes(self, rank: int):
        return (self.out_channels, rank, 1, 1), (rank, *self.weight.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._input_pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._input_pad, mode=mode)
        split = self.__dict__.get("split_batchnorm")  # set by vk.convert when a BatchNorm follows (batchnorm.py)
        if split is not None:
            return split.conv_paths(self, x)
        if torch.compiler.is_compiling():  # the graph computes state itself (the caches are eager-only)
            return vcon_conv2d(x, self.weight, self.bias, self.beta, self.config, self.state,
                               self.stride, self._conv_padding, self.dilation, self.groups)
        if x.dim() != 4:
            raise ValueError(f"vcon_conv2d: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
        check_inputs(x, self.weight, self.in_channels, "vcon_conv2d", dim=1, what="channel")
        spec = self.call_spec()
        threshold, scales = self.call_state(spec)
        conv_args = conv_arguments(self.stride, self._conv_padding, self.dilation, self.groups)
        return conv2d_call(x, self.call_weight(spec), self.bias, self.beta, threshold, scales, self.state, spec,
                           conv_args)

    def reset_parameters(self) -> None:
        nn.Conv2d.reset_parameters(self)
        self._rederive_vcon_state()

    def conv_kwargs(self) -> dict:
        """The ``nn.Conv2d`` constructor arguments of this layer (for finalization)."""
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
                    stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                    bias=self.bias is not None, padding_mode=self.padding_mode)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, {self._vcon_repr()}")
