"""Integrations: saving/loading finalized models (``saving``; also ``vk.save_compressed`` /
``vk.load_compressed``) and Hugging Face transformers (``hf``).

``vcon_kernels.integrations.hf`` imports transformers lazily (only when used), so importing
``vcon_kernels`` never needs it.
"""

from .saving import load_compressed
from .saving import save_compressed

__all__ = ["load_compressed", "save_compressed"]
