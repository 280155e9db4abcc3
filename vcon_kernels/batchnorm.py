"""Each path its own BatchNorm: VCON for convolutions that feed a BatchNorm.

A VCON conv outputs ``beta f(x) + (1 - beta) g(x)``. When a BatchNorm follows it, the
shared BatchNorm renormalizes that blend per channel in train mode, so the network never
sees how far the blend drifts from the dense function, while the running statistics
(used in eval mode and after finalization) follow a moving mixture they cannot track.
Measured on EfficientNet-Lite0 (experiments/RESULTS.md): low-rank VCON ended 18 points
*below* one-shot this way.

:class:`SplitBatchNorm2d` replaces the BatchNorm after such a conv and blends the
*normalized* paths instead (the paper's block-level formulation, f and g being the whole
conv + BN block)::

    y = beta BN_f(conv(x, W)) + (1 - beta) BN_g(g(x))

``BN_f`` is the original BatchNorm, ``BN_g`` a copy that learns the compressed path's
statistics and affine parameters; ``vk.finalize`` keeps ``BN_g`` as a plain
``nn.BatchNorm2d`` after the compressed conv. ``BN_g``'s running statistics warm up as a
cumulative average (momentum ``max(momentum, 1/n)`` at its n-th batch), so they hold the
compressed path's statistics from the first step instead of the dense model's.

``vk.convert`` does this by default for every converted ``Conv2d`` whose next module (in
registration order, with no other conv or linear in between) is a ``BatchNorm2d`` with as
many features as the conv has output channels, for single-stage configs (``Prune``,
``Quantize``, ``LowRank``; a ``Compose`` has no single g path). Opt out with
``vk.convert(..., split_batchnorm=False)``. If at run time the BatchNorm does not receive
the conv's output itself (something runs in between), it warns once and applies both
BatchNorms to what it receives, which is still exact at beta = 1 and beta = 0.

Cost: while 0 < beta <= 1 in training, and 0 < beta < 1 in eval, the conv runs twice
(dense and compressed paths separately) and both outputs are kept for backward; at
beta = 0 it is the usual single fused op. The gradients of the compressed path follow the
config's ``grad`` mode.

Example usage::

    model = vk.convert(cnn, vk.LowRank(rank_ratio=0.25))          # conv -> BN pairs split
    sched = vk.VCONScheduler(model, steps=200)
    ...
    model = vk.finalize(model)                                    # compressed conv + BN_g
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .functional import vcon_conv2d

# Leaf modules that end the search for the BatchNorm after a conv: another layer with weights.
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


class SplitBatchNorm2d(nn.Module):
    """``beta BN_f(f) + (1 - beta) BN_g(g)`` after a VCON conv (see the module docstring).

    ``dense`` is the original BatchNorm (its parameters and buffers, shared), ``compressed``
    its copy for the compressed path. Built by ``vk.convert``; not meant to be built by hand.
    """

    def __init__(self, bn: nn.BatchNorm2d, conv, conv_name: str, bn_name: str):
        super().__init__()
        self.dense = bn
        self.compressed = copy.deepcopy(bn)
        if self.compressed.num_batches_tracked is not None:
            self.compressed.num_batches_tracked.zero_()  # the warm-up counts from here
        self.compressed.train(bn.training)
        # Plain attributes, not submodules: the conv belongs to the model tree already.
        self.__dict__["conv"] = conv
        self.__dict__["_stash"] = None
        self.conv_name, self.bn_name = conv_name, bn_name
        self._warned = False

    # -- the conv side (called from VCONConv2d.forward) ---------------------------------------
    def conv_paths(self, conv, x: torch.Tensor) -> torch.Tensor:
        """The conv's output (the usual blend) and, stashed for :meth:`forward`, each path alone."""
        beta = conv.beta[0]
        b = float(beta)
        if b == 0.0:  # call_weight: a low-rank conv's stopped W gets no gradient, as without the split
            g = vcon_conv2d(x, conv.call_weight(conv.call_spec()), conv.bias, conv.beta, conv.config, conv.state,
                            conv.stride, conv._conv_padding, conv.dilation, conv.groups)
            self.__dict__["_stash"] = (g, None, g, beta)
            return g
        if b == 1.0 and not self.training:  # eval before the transition: the dense block alone
            f = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv._conv_padding, conv.dilation, conv.groups)
            self.__dict__["_stash"] = (f, f, None, beta)
            return f
        # Training at beta = 1 runs g too, so that BN_g's statistics are warm when the transition starts.
        f = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv._conv_padding, conv.dilation, conv.groups)
        g = vcon_conv2d(x, conv.weight, conv.bias, torch.zeros_like(conv.beta), conv.config, conv.state,
                        conv.stride, conv._conv_padding, conv.dilation, conv.groups)
        y = torch.lerp(g, f, beta.to(g.dtype))  # what a shared BatchNorm would see (used only on a mismatch)
        self.__dict__["_stash"] = (y, f, g, beta)
        return y

    # -- the BatchNorm side ------------------------------------------------------------------
    def _bn_g(self, g: torch.Tensor) -> torch.Tensor:
        bn = self.compressed
        if not (self.training and bn.track_running_stats):
            return bn(g)
        bn.num_batches_tracked.add_(1)
        n = int(bn.num_batches_tracked)
        momentum = 1.0 / n if bn.momentum is None else max(bn.momentum, 1.0 / n)
        return F.batch_norm(g, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, momentum, bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stash = self.__dict__["_stash"]
        self.__dict__["_stash"] = None
        if stash is not None and x is stash[0]:
            _, f, g, beta = stash
        else:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"vk.convert paired BatchNorm {self.bn_name} with VCON conv {self.conv_name}, but it does not "
                    "receive that conv's output directly (something runs in between): both BatchNorms normalize "
                    "what it receives instead. Pass split_batchnorm=False to vk.convert to keep one BatchNorm.",
                    stacklevel=2,
                )
            beta = self.__dict__["conv"].beta[0]
            f = g = x
            if float(beta) == 0.0:
                f = None
            elif float(beta) == 1.0 and not self.training:
                g = None
        if f is None:
            return self._bn_g(g)
        out_f = self.dense(f)
        if g is None:
            return out_f
        out_g = self._bn_g(g)
        return torch.lerp(out_g, out_f, beta.to(out_f.dtype))

    def extra_repr(self) -> str:
        return f"after {self.conv_name}: beta * dense(f) + (1 - beta) * compressed(g)"


def _leaves(model: nn.Module):
    for name, module in model.named_modules():
        if not module._modules:  # leaf modules, in registration (= usual execution) order
            yield name, module


def batchnorm_pairs(model: nn.Module, convs: dict) -> list:
    """[(conv name, conv, BN name, BN)] for each conv in ``convs`` ({id: module}) directly followed by a
    ``BatchNorm2d`` of matching width (no other conv or linear in between, in registration order)."""
    pairs, pending = [], None
    for name, module in _leaves(model):
        if isinstance(module, nn.BatchNorm2d) and type(module).forward is nn.BatchNorm2d.forward:
            if pending is not None and module.num_features == pending[1].out_channels:
                pairs.append((*pending, name, module))
            pending = None
        elif id(module) in convs:
            pending = (name, module)
        elif isinstance(module, (_LAYERS, nn.modules.batchnorm._NormBase)):
            pending = None
    return pairs


def split_batchnorms(model: nn.Module, old_to_new: dict) -> dict:
    """{id(BN): (BN, SplitBatchNorm2d)} for the converted convs that feed a BatchNorm.

    ``old_to_new``: {id(original conv): (original conv, VCON conv)} as built by ``vk.convert``
    (the pairs are found on the original model, before any swap); links each VCON conv to its
    split BatchNorm. Multi-stage configs are left with their BatchNorm (no single g path).
    """
    convs = {key: old for key, (old, new) in old_to_new.items()
             if isinstance(old, nn.Conv2d) and len(new.stage_names) == 1}
    replacements = {}
    for conv_name, conv, bn_name, bn in batchnorm_pairs(model, convs):
        new_conv = old_to_new[id(conv)][1]
        split = SplitBatchNorm2d(bn, new_conv, conv_name, bn_name)
        new_conv.__dict__["split_batchnorm"] = split
        replacements[id(bn)] = (bn, split)
    return replacements


def finalize_batchnorms(model: nn.Module) -> dict:
    """{id(split): (split, BN_g)}: what ``vk.finalize`` puts in place of each split BatchNorm."""
    return {id(m): (m, m.compressed) for m in model.modules() if isinstance(m, SplitBatchNorm2d)}


def split_batchnorm_of(conv) -> Optional[SplitBatchNorm2d]:
    """The split BatchNorm a VCON conv feeds (None: none, or the opt-out)."""
    return conv.__dict__.get("split_batchnorm")


__all__ = ["SplitBatchNorm2d", "batchnorm_pairs", "finalize_batchnorms", "split_batchnorm_of", "split_batchnorms"]
