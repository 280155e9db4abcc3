"""``vk.explain(layer, x)``: which backend and strategy a VCON layer call would use."""

from __future__ import annotations

from . import backends
from .modules.base import VCONLayerBase


def explain(layer: VCONLayerBase, x) -> str:
    """A one-line description of how ``layer(x)`` runs (backend and kernel strategy)."""
    if not isinstance(layer, VCONLayerBase):
        raise TypeError(f"explain expects a VCON layer, got {type(layer).__name__}")
    backend = backends.select(layer.weight.device.type)
    shape = tuple(x.shape) if hasattr(x, "shape") else tuple(x)
    rows, cols = layer.weight_2d().shape
    return backend.explain(shape, (rows, cols), layer.spec(), layer.weight.device)
