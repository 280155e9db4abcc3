"""Save a finalized Hugging Face model and load it back into its compressed modules.

``save_pretrained_compressed(model, dir)`` writes the folder of
:mod:`vcon_kernels.integrations.saving` (``vcon_model.safetensors`` + ``vcon_compression.json``)
plus ``config.json`` (and the tokenizer, if given). ``config.json`` carries two markers so
that plain ``AutoModel*.from_pretrained(dir)`` refuses instead of building the dense model
with random weights:

* ``quantization_config = {"quant_method": "vcon_kernels", "loader": ...}`` (transformers warns
  "Unknown quantization type, got vcon_kernels" and would otherwise carry on);
* ``transformers_weights``: a text naming this module's loader; transformers 5 reads it as the
  weights file name and raises ``ValueError`` with that text (older versions ignore it and fail
  with "no file named model.safetensors", since the weights file has another name).

``from_pretrained_compressed(dir)`` builds the architecture from ``config.json`` on the meta
device (no dense weights allocated or initialized), swaps in the compressed modules and
loads every tensor with ``assign=True``: nothing is re-derived.

``save_pretrained_compressed(model, dir, format="compressed-tensors")`` writes instead the
open format that ``transformers`` (with the ``compressed-tensors`` package) and vLLM load
(see :mod:`vcon_kernels.integrations.hf.compressed_tensors`).

Example usage::

    model = vk.finalize(model)
    save_pretrained_compressed(model, "out/minilm-int4", tokenizer=tok)
    model = from_pretrained_compressed("out/minilm-int4")
    save_pretrained_compressed(model, "out/minilm-int4-ct", tokenizer=tok, format="compressed-tensors")
    # elsewhere, without vcon_kernels: AutoModelForSequenceClassification.from_pretrained("out/minilm-int4-ct")
"""

from __future__ import annotations

import json
import os

import torch

from ..saving import load_compressed
from ..saving import read_compression_config
from ..saving import save_compressed

LOADER = "vcon_kernels.integrations.hf.from_pretrained_compressed"
QUANT_METHOD = "vcon_kernels"
FORMATS = ("vcon", "compressed-tensors")
REFUSAL = (f"this folder holds a vcon_kernels compressed model (vcon_model.safetensors), which plain from_pretrained "
           f"cannot load: use {LOADER}(path), or export it with save_pretrained_compressed(model, path, "
           "format='compressed-tensors')")


def _require_transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("from_pretrained_compressed needs transformers: pip install transformers") from None
    return transformers


def _check_model(model) -> None:
    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise TypeError("save_pretrained_compressed expects a transformers PreTrainedModel; use "
                        "vk.save_compressed for other modules")


def write_marker(directory: str) -> None:
    """Add the refusal markers (module docstring) to ``directory/config.json``."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "loader": LOADER,
                                     "weights": "vcon_model.safetensors", "metadata": "vcon_compression.json"}
    config["transformers_weights"] = REFUSAL
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def save_pretrained_compressed(model, directory: str, tokenizer=None, format: str = "vcon") -> str:
    """Save a finalized ``transformers`` model (+ tokenizer) to ``directory``; returns ``directory``.

    ``format="vcon"`` (default): every finalized format, loaded by :func:`from_pretrained_compressed`.
    ``format="compressed-tensors"``: int4 / int8 weights in the pack-quantized layout that plain
    transformers + compressed-tensors (and vLLM) load; other formats raise.
    """
    _check_model(model)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    if format == "compressed-tensors":
        from .compressed_tensors import save_compressed_tensors

        save_compressed_tensors(model, directory)
    else:
        save_compressed(model, directory, metadata={"transformers_class": type(model).__name__})
        model.config.save_pretrained(directory)
        write_marker(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _model_class(transformers, directory, config, meta):
    name = meta.get("transformers_class") or (config.architectures or [None])[0]
    model_class = getattr(transformers, name, None) if name else None
    if model_class is None:
        raise ValueError(f"{os.path.join(directory, 'config.json')} names no known model class ({name!r}); "
                         "pass model_class=")
    return model_class


def from_pretrained_compressed(directory: str, model_class=None, device=None):
    """The model saved by :func:`save_pretrained_compressed`, in eval mode, with its compressed modules.

    ``model_class`` defaults to the class recorded at save time; ``device`` to cpu.
    """
    transformers = _require_transformers()
    saved = read_compression_config(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    if model_class is None:
        model_class = _model_class(transformers, directory, config, saved.get("metadata", {}))
    if saved["format_version"] == 1:  # no non-persistent buffers in the file: build for real
        model = load_compressed(model_class(config), directory, device=device)
    else:  # the dtype of every tensor comes from the file (assign=True): the class's default dtype is irrelevant
        model = load_compressed(lambda: model_class(config), directory, device=device or torch.device("cpu"))
    return model.eval()  # load_compressed made its plain save_pretrained refuse, as vk.finalize does


__all__ = ["LOADER", "from_pretrained_compressed", "save_pretrained_compressed", "write_marker"]
