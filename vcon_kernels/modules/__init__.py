"""VCON layers: thin modules holding parameters, beta and per-layer state."""

from .base import VCONLayerBase
from .conv import VCONConv2d
from .linear import VCONLinear

__all__ = ["VCONLayerBase", "VCONConv2d", "VCONLinear"]
