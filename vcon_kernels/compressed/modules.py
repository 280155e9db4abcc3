"""Finalized (truly compressed) layers: what ``vk.finalize`` swaps VCON layers for.

* :class:`CompressedLinear`: a compressed weight storage (``storage.py``) plus the bias;
  its matmul (``matmul.py``) runs the C++ compressed kernels on CPU (decode GEMV over the
  codes, blocked dequantize + GEMM for prefill) and rebuilds the weight elsewhere.
* :class:`CompressedConv2d`: the weight rebuilt at each call (one C++ pass on CPU,
  ``matmul.dense_weight``), then ``F.conv2d``.
* :class:`LowRankLinear` / :class:`LowRankConv2d`: plain ``nn.Sequential`` of two standard
  layers (x -> V -> U), loadable without this package.

``compression_meta()`` of each returns a small JSON-able dict, and ``module_from_meta``
builds an empty module of the same shapes, ready for ``load_state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .matmul import compressed_linear
from .matmul import dense_weight
from .storage import WeightStorage
from .storage import storage_from_meta


class CompressedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` kept compressed (see ``matmul.py`` for the kernels).

    Example usage::

        final = vk.finalize(model)          # VCONLinear -> CompressedLinear
        final.half()                        # codes stay, fp32 scales stay, computes in fp16
    """

    def __init__(self, storage: WeightStorage, bias):
        super().__init__()
        self.out_features, self.in_features = storage.shape
        self.storage = storage
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (rebuilt; for inspection and interop, not stored)."""
        return self.storage.materialize()

    def forward(self, x):
        return compressed_linear(x, self.storage, self.bias)

    def compression_meta(self) -> dict:
        return {"module": "CompressedLinear", "storage": self.storage.meta(), "bias": self.bias is not None}

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class CompressedConv2d(nn.Module):
    """A 2-D convolution whose weight is rebuilt from a compressed storage at each call.

    The rebuild is O(weights) against the convolution's O(weights x output pixels); at batch 1
    on small feature maps ``materialize()``'s tensor ops cost 0.1-0.4 of the conv itself, the
    one-pass C++ dequantize a fraction of that (bench/INFER_NOTES.md).
    """

    def __init__(self, storage: WeightStorage, bias, conv_kwargs: dict):
        super().__init__()
        self.conv_kwargs = dict(conv_kwargs)
        for key, value in self.conv_kwargs.items():
            setattr(self, key, value)
        self.kernel_size = _pair(self.kernel_size)
        self.storage = storage
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        probe = nn.Conv2d(**{**self.conv_kwargs, "bias": False}, device="meta")
        self._reversed_padding_repeated_twice = probe._reversed_padding_repeated_twice
        self.weight_shape = tuple(probe.weight.shape)

    @property
    def weight(self) -> torch.Tensor:
        return dense_weight(self.storage).view(self.weight_shape)

    def forward(self, x):
        w = self.weight
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def compression_meta(self) -> dict:
        kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.conv_kwargs.items()}
        return {"module": "CompressedConv2d", "storage": self.storage.meta(), "bias": self.bias is not None,
                "conv": kwargs}

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")


class LowRankLinear(nn.Sequential):
    """``x -> Linear(K, r, bias=False) -> Linear(r, N)``: weights V (r, K) and U (N, r)."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, bias):
        rank, in_features = v.shape
        first = nn.Linear(in_features, rank, bias=False, device=v.device, dtype=v.dtype)
        second = nn.Linear(rank, u.shape[0], bias=bias is not None, device=u.device, dtype=u.dtype)
        with torch.no_grad():
            first.weight.copy_(v)
            second.weight.copy_(u)
            if bias is not None:
                second.bias.copy_(bias)
        super().__init__(first, second)

    def compression_meta(self) -> dict:
        return {"module": "LowRankLinear", "in_features": self[0].in_features, "rank": self[0].out_features,
                "out_features": self[1].out_features, "bias": self[1].bias is not None,
                "dtype": str(self[0].weight.dtype)}


class LowRankConv2d(nn.Sequential):
    """``x -> Conv2d(C, r, k, stride, padding, ...) -> Conv2d(r, N, 1)``: V then U."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, bias, conv_kwargs: dict):
        rank = v.shape[0]
        kw = dict(conv_kwargs)
        first = nn.Conv2d(kw["in_channels"], rank, kw["kernel_size"], kw["stride"], kw["padding"], kw["dilation"],
                          1, False, kw["padding_mode"], device=v.device, dtype=v.dtype)
        second = nn.Conv2d(rank, kw["out_channels"], 1, bias=bias is not None, device=u.device, dtype=u.dtype)
        with torch.no_grad():
            first.weight.copy_(v)
            second.weight.copy_(u)
            if bias is not None:
                second.bias.copy_(bias)
        super().__init__(first, second)
        self.conv_kwargs = kw

    def compression_meta(self) -> dict:
        kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.conv_kwargs.items()}
        return {"module": "LowRankConv2d", "rank": self[0].out_channels, "conv": kwargs,
                "bias": self[1].bias is not None, "dtype": str(self[0].weight.dtype)}


def module_from_meta(meta: dict, device=None) -> nn.Module:
    """An empty finalized module with the shapes in ``meta``, ready for ``load_state_dict``."""
    kind = meta.get("module")
    if kind in ("CompressedLinear", "CompressedConv2d"):
        storage = storage_from_meta(meta["storage"], device=device)
        bias = torch.zeros(storage.shape[0], dtype=storage.dtype, device=device) if meta["bias"] else None
        if kind == "CompressedLinear":
            return CompressedLinear(storage, bias)
        return CompressedConv2d(storage, bias, meta["conv"])
    dtype = getattr(torch, meta.get("dtype", "torch.float32").replace("torch.", ""))
    if kind == "LowRankLinear":
        u = torch.zeros(meta["out_features"], meta["rank"], dtype=dtype, device=device)
        v = torch.zeros(meta["rank"], meta["in_features"], dtype=dtype, device=device)
        bias = torch.zeros(meta["out_features"], dtype=dtype, device=device) if meta["bias"] else None
        return LowRankLinear(u, v, bias)
    if kind == "LowRankConv2d":
        conv = meta["conv"]
        k = _pair(conv["kernel_size"])
        u = torch.zeros(conv["out_channels"], meta["rank"], 1, 1, dtype=dtype, device=device)
        v = torch.zeros(meta["rank"], conv["in_channels"], *k, dtype=dtype, device=device)
        bias = torch.zeros(conv["out_channels"], dtype=dtype, device=device) if meta["bias"] else None
        return LowRankConv2d(u, v, bias, conv)
    raise ValueError(f"unknown finalized module {kind!r}")
