"""Hugging Face transformers integration.

* :class:`VCONCallback`: a ``TrainerCallback`` stepping a ``vk.VCONScheduler`` on optimizer
  steps and logging beta;
* :func:`convert` / :func:`matching_layers`: convert layers selected by module-name globs;
* :func:`save_pretrained_compressed` / :func:`from_pretrained_compressed`: save a finalized
  model (safetensors + ``config.json`` + ``vcon_compression.json``; plain ``from_pretrained``
  refuses such a folder) and load it back into its compressed modules, built on the meta
  device, without re-deriving anything;
* ``save_pretrained_compressed(model, dir, format="compressed-tensors")``: int4 / int8 weights
  in the compressed-tensors pack-quantized layout that transformers and vLLM load
  (``compressed_tensors.py``).

Example usage::

    from vcon_kernels.integrations import hf
    hf.convert(model, vk.Prune(sparsity=0.9), include=["*encoder.layer.*"])
    sched = vk.VCONScheduler(model, steps=300)
    Trainer(model, args, train_dataset=ds, callbacks=[hf.VCONCallback(sched)]).train()
    hf.save_pretrained_compressed(vk.finalize(model), "out/model")
"""

from .callback import VCONCallback
from .patterns import DEFAULT_EXCLUDE
from .patterns import convert
from .patterns import matching_layers
from .pretrained import from_pretrained_compressed
from .pretrained import save_pretrained_compressed

__all__ = ["DEFAULT_EXCLUDE", "VCONCallback", "convert", "from_pretrained_compressed", "matching_layers",
           "save_pretrained_compressed"]
