"""Save and load finalized models: safetensors weights + a small JSON of compression metadata.

A finalized model (``vk.finalize``) holds compressed modules (``CompressedLinear``,
``CompressedConv2d``, ``LowRankLinear``, ``LowRankConv2d``) whose tensors are integer
codes, packed bits, sparse values and indices, or low-rank factors. Saving writes

* ``model.safetensors``: the model's ``state_dict`` as it is (compressed tensors stay
  compressed, so the file is about the size ``vk.storage_bytes`` reports);
* ``vcon_compression.json``: ``{"format_version": 1, "modules": {name: meta}}`` with each
  compressed module's ``compression_meta()`` (shapes, formats, bit widths: a few hundred
  bytes per layer).

Loading takes the *dense* architecture (a freshly built model of the same class), swaps
each module named in the JSON for an empty module of the recorded format
(``vcon_kernels.compressed.module_from_meta``) and loads the tensors with
``strict=True``: nothing is re-derived from dense weights (no SVD, no thresholds, no
re-quantization) and a file that does not match the architecture is an error.

Example usage::

    model = vk.finalize(model)
    save_compressed(model, "out/model")
    fresh = load_compressed(build_dense_model(), "out/model")     # same outputs as ``model``
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from ..compressed import CompressedConv2d
from ..compressed import CompressedLinear
from ..compressed import LowRankConv2d
from ..compressed import LowRankLinear
from ..compressed import module_from_meta
from ..convert import vcon_layers

CONFIG_NAME = "vcon_compression.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
FINALIZED = (CompressedLinear, CompressedConv2d, LowRankLinear, LowRankConv2d)


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:  # pragma: no cover - depends on the environment
        from .deps import MissingDependency
        from .deps import pip_command

        raise MissingDependency(f"saving compressed models needs safetensors: {pip_command('safetensors')}") from None
    return st


def compression_metadata(model: nn.Module) -> dict:
    """{qualified name: compression_meta()} of every finalized module in ``model``."""
    pending = [name for name, _ in vcon_layers(model)]
    if pending:
        raise ValueError(
            f"the model still has VCON layers ({', '.join(pending[:3])}{', ...' if len(pending) > 3 else ''}); "
            "call vk.finalize(model) before saving it compressed"
        )
    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, FINALIZED):
            if not name:
                raise ValueError("the model itself is a single compressed layer; wrap it in a module to save it")
            modules[name] = module.compression_meta()
    if not modules:
        raise ValueError("the model has no finalized (compressed) modules; convert, train and vk.finalize it first")
    return modules


def save_compressed(model: nn.Module, directory: str, metadata: Optional[dict] = None) -> str:
    """Write ``model.safetensors`` and ``vcon_compression.json`` into ``directory``; returns ``directory``."""
    from .. import __version__

    modules = compression_metadata(model)
    os.makedirs(directory, exist_ok=True)
    _safetensors().save_model(model, os.path.join(directory, WEIGHTS_NAME))
    config = {"format_version": FORMAT_VERSION, "vcon_kernels_version": __version__, "modules": modules}
    if metadata:
        config["metadata"] = metadata
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=1)
    return directory


def read_compression_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; it was not written by save_compressed")
    with open(path) as f:
        config = json.load(f)
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {config.get('format_version')!r} is not supported "
                         f"(this vcon_kernels reads version {FORMAT_VERSION})")
    return config


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if attr not in parent._modules:
        raise ValueError(f"the model has no submodule {name!r}; was it saved from another architecture?")
    parent._modules[attr] = module


def load_compressed(model: nn.Module, directory: str, device=None) -> nn.Module:
    """Load a :func:`save_compressed` folder into ``model`` (the dense architecture); returns the model.

    ``device`` defaults to the device of the model's first parameter.
    """
    config = read_compression_config(directory)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    for name, meta in config["modules"].items():
        _set_submodule(model, name, module_from_meta(meta, device=device))
    missing, unexpected = _safetensors().load_model(model, os.path.join(directory, WEIGHTS_NAME), strict=True,
                                                    device=str(device))
    return model


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "compression_metadata", "load_compressed", "read_compression_config",
           "save_compressed"]
