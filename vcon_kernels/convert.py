"""Swap modules in place: ``convert`` (dense -> VCON) and ``finalize`` (VCON -> compressed).

Both validate and build every replacement first and swap only when all succeeded, so a
failed call leaves the model exactly as it was. A module reachable under several names
(shared layers) is replaced everywhere by the same new module; parameters are shared
with the original modules, so weight tying survives.

Example usage::

    import vcon_kernels as vk
    model = vk.convert(model, vk.Prune(sparsity=0.9), filter_fn=lambda mod, name: name != "head")
    sched = vk.VCONScheduler(model, steps=1000)
    ...  # train, calling sched.step() after each optimizer step
    model = vk.finalize(model)
"""

from __future__ import annotations

import warnings
from typing import Callable
from typing import Optional
from typing import Union

import torch
from torch import nn

from .compressed.build import finalize_layer
from .configs import VCONConfig
from .modules.base import VCONLayerBase
from .modules.conv import VCONConv2d
from .modules.linear import VCONLinear

ConfigOrFn = Union[VCONConfig, Callable[[str, nn.Module], Optional[VCONConfig]]]
CONVERTIBLE = (nn.Linear, nn.Conv2d)


def _references(model: nn.Module):
    """{id(module): (module, [(parent, attribute name, qualified name), ...])} for every submodule."""
    refs: dict = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is None:
                continue
            qualified = f"{parent_name}.{attr}" if parent_name else attr
            refs.setdefault(id(child), (child, []))[1].append((parent, attr, qualified))
    return refs


def _swap(model: nn.Module, replacements: dict) -> nn.Module:
    """Apply {id(old): (old, new)}; returns the new root if the root itself was replaced."""
    refs = _references(model)
    for key, (_, new) in replacements.items():
        for parent, attr, _ in refs.get(key, (None, []))[1]:
            parent._modules[attr] = new
    root = replacements.get(id(model))
    return root[1] if root is not None else model


def _config_for(config: ConfigOrFn, name: str, module: nn.Module) -> Optional[VCONConfig]:
    if isinstance(config, VCONConfig):
        return config
    chosen = config(name, module)
    if chosen is not None and not isinstance(chosen, VCONConfig):
        raise TypeError(f"{name}: the config function returned {type(chosen).__name__}, expected a config or None")
    return chosen


def convert(model: nn.Module, config: ConfigOrFn, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None):
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` (exact types) by its VCON layer; returns the model.

    Args:
        model: converted in place (the return value is the model, or the new layer when
            ``model`` itself is a single Linear/Conv2d).
        config: one config for every layer, or a function ``(name, module) -> config or
            None`` to compress layers differently (None leaves the layer dense).
        filter_fn: ``(module, name) -> bool``; only layers for which it returns True convert.

    Raises ``ValueError`` if the model already contains VCON layers, or if a layer cannot
    take the config (its name is in the message); warns and returns the model unchanged
    when nothing matches.
    """
    if not isinstance(config, VCONConfig) and not callable(config):
        raise TypeError(
            "config must be a vcon_kernels config (vk.Prune, vk.Quantize, vk.LowRank, vk.Compose) or a "
            f"function (name, module) -> config, got {type(config).__name__}"
        )
    already = [name for name, m in model.named_modules() if isinstance(m, VCONLayerBase)]
    if already:
        raise ValueError(
            f"model already contains VCON layers ({', '.join(already[:3])}{', ...' if len(already) > 3 else ''}); "
            "convert() runs once per model. To compress layers differently, pass config as a function "
            "(name, module) -> config or None."
        )
    replacements = {}
    for name, module in model.named_modules():
        if type(module) not in CONVERTIBLE or (filter_fn is not None and not filter_fn(module, name)):
            continue
        cfg = _config_for(config, name, module)
        if cfg is None:
            continue
        where = name or type(module).__name__
        if type(module) is nn.Linear:
            new = VCONLinear.from_linear(module, cfg, name=where)
        else:
            new = VCONConv2d.from_conv2d(module, cfg, name=where)
        replacements[id(module)] = (module, new)
    if not replacements:
        warnings.warn("vk.convert: no nn.Linear or nn.Conv2d matched; the model is returned unchanged", stacklevel=2)
        return model
    return _swap(model, replacements)


def vcon_layers(model: nn.Module):
    """[(name, layer)] of every VCON layer in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, VCONLayerBase)]


def finalize(model: nn.Module, force: bool = False) -> nn.Module:
    """Replace every VCON layer by its truly compressed module; returns the model.

    Quantized layers store integer codes (int4/int2/binary bit-packed) and fp32 scales;
    pruned layers store kept values and indices (CSR or N:M), or the dense weight when
    sparsity is too low for indices to pay off; low-rank layers become two small layers.
    Outputs equal the VCON layer at beta = 0. Raises if a layer's beta > 0 unless
    ``force=True``, and if the model has no VCON layer (for example finalized already).
    """
    layers = vcon_layers(model)
    if not layers:
        raise ValueError("vk.finalize: the model has no VCON layers (already finalized, or never converted)")
    replacements = {}
    for name, layer in layers:
        new = finalize_layer(layer, force=force, name=name or type(layer).__name__)
        new.train(layer.training)
        replacements[id(layer)] = (layer, new)
    return _swap(model, replacements)


@torch.no_grad()
def refresh_masks(model: nn.Module) -> None:
    """Re-derive every stored pruning mask from the current weights."""
    for _, layer in vcon_layers(model):
        layer.refresh_mask()


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()`` (shared storages counted once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.device) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total
