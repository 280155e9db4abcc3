"""Save and load finalized models: one safetensors file + a small JSON of compression metadata.

A finalized model (``vk.finalize``) holds compressed modules (``CompressedLinear``,
``CompressedConv2d``, ``LowRankLinear``, ``LowRankConv2d``) whose tensors are integer
codes, packed bits, sparse values and indices, or low-rank factors. ``save_compressed``
writes into a folder

* ``vcon_model.safetensors``: every tensor of the model as it is (compressed tensors stay
  compressed, so the file is about the size ``vk.storage_bytes`` reports), including the
  non-persistent buffers (e.g. a BERT's ``position_ids``), so that a model built on the
  meta device is complete after loading; tied tensors are stored once;
* ``vcon_compression.json``: ``{"format_version": 2, "modules": {name: meta}, ...}`` with
  each compressed module's ``compression_meta()`` (shapes, formats, bit widths: a few
  hundred bytes per layer).

The weights file is deliberately *not* called ``model.safetensors``: tools that look for
that name (``transformers.from_pretrained``) must fail, not load the compressed tensors
into a dense model and initialize the rest at random.

``load_compressed`` takes the *dense* architecture, preferably as a factory (a class or
a function returning the model): the factory runs under ``torch.device("meta")``, so the
dense weights are never allocated nor initialized; each module named in the JSON is
swapped for an empty module of the recorded format and every tensor is loaded with
``load_state_dict(strict=True, assign=True)``. Nothing is re-derived from dense weights
(no SVD, thresholds or re-quantization), and a file that does not match the architecture
is an error. (Every storage format builds its empty buffers on meta; a module that
cannot is built on the CPU, one layer at a time.)

Example usage::

    import vcon_kernels as vk
    model = vk.finalize(model)
    vk.save_compressed(model, "out/model")
    fresh = vk.load_compressed(MyNet, "out/model")               # same outputs as ``model``
    fresh = vk.load_compressed(lambda: MyNet(width=64), "out/model", device="cuda")
"""

from __future__ import annotations

import json
import os
from typing import Callable
from typing import Optional
from typing import Union

import torch
from torch import nn

from ..compressed import CompressedConv2d
from ..compressed import CompressedLinear
from ..compressed import LowRankConv2d
from ..compressed import LowRankLinear
from ..compressed import module_from_meta
from ..convert import guard_plain_save
from ..convert import vcon_layers

CONFIG_NAME = "vcon_compression.json"
WEIGHTS_NAME = "vcon_model.safetensors"
LEGACY_WEIGHTS_NAME = "model.safetensors"  # format_version 1 (read only)
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
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


def non_persistent_buffers(model: nn.Module) -> dict:
    """{qualified name: tensor} of the buffers ``state_dict`` leaves out."""
    out = {}
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            tensor = module._buffers.get(name)
            if tensor is not None:
                out[f"{prefix}.{name}" if prefix else name] = tensor
    return out


def _dedupe(tensors: dict):
    """(tensors to write, {alias: canonical}): safetensors stores a tensor once, views must be copies."""
    seen, aliases, out = {}, {}, {}
    storages = {}
    for name, tensor in tensors.items():
        if tensor.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (not loaded); nothing to save")
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr()
        key = (tensor.device, ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]  # the same tensor under two names (tied weights)
            continue
        seen[key] = name
        # A partial view of a storage another tensor also uses: write an independent copy.
        shared = tensor.numel() and storages.setdefault((tensor.device, ptr), name) != name
        full = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        out[name] = tensor.clone() if (shared or not full or not tensor.is_contiguous()) else tensor
    return out, aliases


def save_compressed(model: nn.Module, directory: str, metadata: Optional[dict] = None) -> str:
    """Write ``vcon_model.safetensors`` and ``vcon_compression.json`` into ``directory``; returns ``directory``.

    ``metadata``: a JSON-able dict stored as is (``read_compression_config(dir)["metadata"]``).
    """
    from .. import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_compressed: model must be an nn.Module, got {type(model).__name__}")
    modules = compression_metadata(model)
    buffers = non_persistent_buffers(model)
    tensors, aliases = _dedupe({**model.state_dict(keep_vars=False), **buffers})
    os.makedirs(directory, exist_ok=True)
    _safetensors().save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"format_version": FORMAT_VERSION, "vcon_kernels_version": __version__, "weights": WEIGHTS_NAME,
              "modules": modules, "non_persistent_buffers": sorted(buffers), "aliases": aliases}
    if metadata:
        config["metadata"] = metadata
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=1)
    return directory


def read_compression_config(directory: str) -> dict:
    """The parsed ``vcon_compression.json`` of a :func:`save_compressed` folder (version checked)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; it was not written by save_compressed")
    with open(path) as f:
        config = json.load(f)
    if config.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: format_version {config.get('format_version')!r} is not supported "
                         f"(this vcon_kernels reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    return config


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if attr not in parent._modules:
        raise ValueError(f"the model has no submodule {name!r}; was it saved from another architecture?")
    parent._modules[attr] = module


def _owner(model: nn.Module, name: str):
    prefix, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(prefix) if prefix else model), attr
    except AttributeError:
        raise ValueError(f"the model has no submodule for tensor {name!r}; was it saved from another "
                         "architecture?") from None


def _empty_module(meta: dict, device) -> nn.Module:
    """An empty finalized module on the meta device (assign=True replaces its tensors), else on the CPU."""
    try:
        return module_from_meta(meta, device="meta")
    except (NotImplementedError, RuntimeError):
        # Some storage constructors look at values (CSR's nonzero, binary's all-nonzero test):
        # build those on the CPU; this layer's temporaries are freed as soon as it is loaded.
        return module_from_meta(meta, device="cpu")


def _build(model_or_factory) -> tuple:
    """(model, built_on_meta)."""
    if isinstance(model_or_factory, nn.Module):
        return model_or_factory, False
    if not callable(model_or_factory):
        raise TypeError("load_compressed: model_or_factory must be an nn.Module (the dense architecture) or a "
                        f"callable returning one (a class or a function), got {type(model_or_factory).__name__}")
    try:
        with torch.device("meta"):
            model = model_or_factory()
    except NotImplementedError as exc:
        if "meta tensor" not in str(exc):
            raise
        raise ValueError("load_compressed: the factory moved or read tensor data (e.g. model.to(device)), which "
                         "cannot be done while it runs on the meta device; return the model unmoved and pass "
                         "device= to load_compressed, or pass a built model instead of a factory") from exc
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_compressed: the factory returned {type(model).__name__}, not an nn.Module")
    return model, True


def _default_device(model: nn.Module, on_meta: bool):
    if not on_meta:
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.device.type != "meta":
                return tensor.device
    return torch.device("cpu")


def load_compressed(model_or_factory: Union[nn.Module, Callable[[], nn.Module]], directory: str,
                    device=None) -> nn.Module:
    """Load a :func:`save_compressed` folder; returns the model with its compressed modules.

    ``model_or_factory``: the dense architecture. A factory (class or function, called
    with no arguments under ``torch.device("meta")``) never allocates the dense weights; a
    model instance is modified in place (its dense weights are dropped as they are replaced).
    ``device``: where the tensors go (default: the model's device, cpu for a factory).
    """
    config = read_compression_config(directory)
    model, on_meta = _build(model_or_factory)
    device = torch.device(device) if device is not None else _default_device(model, on_meta)
    legacy = config["format_version"] == 1
    if legacy and on_meta:
        raise ValueError(f"{directory} was written by an older vcon_kernels (format_version 1, no non-persistent "
                         "buffers): pass the built dense model instead of a factory, or save it again")
    for name, meta in config["modules"].items():
        _set_submodule(model, name, _empty_module(meta, device) if not legacy else module_from_meta(meta, device))
    weights = os.path.join(directory, config.get("weights", LEGACY_WEIGHTS_NAME))
    tensors = _safetensors().load_file(weights, device=str(device))
    buffers = {name: tensors.pop(name) for name in config.get("non_persistent_buffers", [])}
    aliases = config.get("aliases", {})
    for alias, canonical in aliases.items():
        tensors[alias] = tensors[canonical]
    model.load_state_dict(tensors, strict=True, assign=True)
    for name, tensor in buffers.items():
        owner, attr = _owner(model, name)
        if attr not in owner._buffers:
            raise ValueError(f"the model has no buffer {name!r}; was it saved from another architecture?")
        owner._buffers[attr] = tensor
    for alias, canonical in aliases.items():  # tied parameters: the very same Parameter object again
        (owner, attr), (src, src_attr) = _owner(model, alias), _owner(model, canonical)
        if attr in owner._parameters and src_attr in src._parameters:
            owner._parameters[attr] = src._parameters[src_attr]
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise ValueError(f"{directory} does not hold {', '.join(left[:5])}{', ...' if len(left) > 5 else ''}: "
                         "the architecture has tensors the saved model did not have")
    if not legacy:
        model.to(device)  # tensors the model created itself (none after a factory) follow
    guard_plain_save(model)  # a Hugging Face model's plain save_pretrained would lose the compressed weights
    return model


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "compression_metadata", "load_compressed", "non_persistent_buffers",
           "read_compression_config", "save_compressed"]
