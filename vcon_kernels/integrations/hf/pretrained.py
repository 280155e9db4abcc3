"""Save a finalized Hugging Face model and load it back into its compressed modules.

``save_pretrained_compressed`` writes the folder of :mod:`vcon_kernels.integrations.saving`
(``model.safetensors`` with the compressed tensors + ``vcon_compression.json``) plus the
model's ``config.json`` (and the tokenizer, if given), so the folder is self-describing.
``from_pretrained_compressed`` rebuilds the architecture from ``config.json``, swaps in
empty compressed modules from the JSON metadata and loads the tensors strictly: nothing
is re-derived. (``AutoModel.from_pretrained`` on such a folder would not understand the
compressed tensors; use this function.)

Example usage::

    model = vk.finalize(model)
    save_pretrained_compressed(model, "out/minilm-pruned", tokenizer=tok)
    model = from_pretrained_compressed("out/minilm-pruned")
"""

from __future__ import annotations

import os

from ..deps import require
from ..saving import load_compressed
from ..saving import read_compression_config
from ..saving import save_compressed


def save_pretrained_compressed(model, directory: str, tokenizer=None) -> str:
    """Save a finalized ``transformers`` model (+ tokenizer) to ``directory``; returns ``directory``."""
    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise TypeError("save_pretrained_compressed expects a transformers PreTrainedModel; use "
                        "vcon_kernels.integrations.save_compressed for other modules")
    save_compressed(model, directory, metadata={"transformers_class": type(model).__name__})
    model.config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def from_pretrained_compressed(directory: str, model_class=None, device=None):
    """The model saved by :func:`save_pretrained_compressed`, in eval mode, with its compressed modules."""
    transformers = require("transformers", "from_pretrained_compressed")
    meta = read_compression_config(directory).get("metadata", {})
    config = transformers.AutoConfig.from_pretrained(directory)
    if model_class is None:
        name = meta.get("transformers_class") or (config.architectures or [None])[0]
        model_class = getattr(transformers, name, None) if name else None
        if model_class is None:
            raise ValueError(f"{os.path.join(directory, 'config.json')} names no known model class ({name!r}); "
                             "pass model_class=")
    model = model_class(config)
    model = load_compressed(model, directory, device=device)
    return model.eval()


__all__ = ["from_pretrained_compressed", "save_pretrained_compressed"]
