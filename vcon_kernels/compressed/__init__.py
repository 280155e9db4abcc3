"""Finalized layers and their compressed weight storage formats."""

from .build import finalize_layer
from .modules import CompressedConv2d
from .modules import CompressedLinear
from .modules import LowRankConv2d
from .modules import LowRankLinear
from .modules import module_from_meta
from .sparse_quantized import NMQuantizedWeight
from .sparse_quantized import SparseQuantizedWeight
from .storage import DenseWeight
from .storage import NMSparseWeight
from .storage import QuantizedWeight
from .storage import SparseWeight
from .storage import storage_from_meta

__all__ = [
    "CompressedConv2d", "CompressedLinear", "DenseWeight", "LowRankConv2d", "LowRankLinear", "NMQuantizedWeight",
    "NMSparseWeight", "QuantizedWeight", "SparseQuantizedWeight", "SparseWeight", "finalize_layer",
    "module_from_meta", "storage_from_meta",
]
