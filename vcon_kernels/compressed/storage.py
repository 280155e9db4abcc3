"""Compressed weight storage formats of finalized layers.

Each format is an ``nn.Module`` holding buffers (so they are in ``state_dict`` and move with
``.to()``) and rebuilds the dense weight on the fly with :meth:`materialize`. The
rebuilt weight equals the VCON layer's weight at beta = 0 bit for bit, because it is
computed with the same arithmetic (``codes * scale`` in the compute dtype, then a cast).

* :class:`QuantizedWeight`: int8 codes, int4/int2 codes packed 2/4 per byte, binary as a
  packed sign bit (plus a packed non-zero bit when some weights are exactly 0, e.g.
  after pruning), and fp32 scales.
* :class:`SparseWeight`: CSR (kept values, int16/int32 column indices, row pointers).
* :class:`NMSparseWeight`: N:M-compressed values (N, K*n/m) plus packed in-group indices.
* :class:`DenseWeight`: the weight itself (pruning at low sparsity, where indices would
  cost more than they save).
* :class:`NMQuantizedWeight` (prune N:M + quantize): the int8 codes of the n kept weights of
  each group of m, their packed in-group positions and the scales (2:4 + int8: 5 bits/weight).
* :class:`SparseQuantizedWeight` (unstructured prune + quantize): CSR of the int8 codes.

dtypes: ``.to(dtype)`` / ``.half()`` / ``.to(device)`` move every buffer; integer codes stay
integer, floating values (dense, CSR, N:M) follow the cast, and quantization scales stay
fp32 (a bf16/fp16 scale would round, and fp16 would underflow small scales); the storage's
``dtype`` (the dtype of the weight it rebuilds and computes in) follows the cast.
``infer_args()`` is what the C++ kernels of ``matmul.py`` read (None: no kernel).

``meta()`` returns the small dict that, with an empty instance from ``from_meta``, lets a
``state_dict`` be loaded without re-deriving anything.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import torch_transforms as transforms
from ..packing import pack_uint
from ..packing import packed_length
from ..packing import unpack_uint
from ..spec import TransformSpec

# Format numbers of csrc/infer.h (InferFormat).
IF_Q8, IF_QPACK, IF_Q1, IF_NM, IF_NMQ, IF_CSR, IF_CSRQ = range(7)
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype)


def _row_pointers(keep: torch.Tensor) -> torch.Tensor:
    counts = keep.sum(dim=1)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64)


def _check_csr(storage, incompatible_keys=None) -> None:
    """Column indices in range and row pointers consistent (the C++ kernel indexes with them)."""
    rows, cols = storage.shape
    crow, col = storage.crow_indices, storage.col_indices
    nnz = col.numel()
    if crow.numel() != rows + 1 or nnz != storage._buffers[storage.VALUES].numel():
        raise ValueError(f"{type(storage).__name__}: crow_indices must have {rows + 1} entries and "
                         f"col_indices one per value")
    if crow.device.type == "cpu":  # on CUDA this would sync the host: the GPU path only gathers
        if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
            raise ValueError(f"{type(storage).__name__}: col_indices must lie in [0, {cols})")
        if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow.diff() < 0).any()):
            raise ValueError(f"{type(storage).__name__}: crow_indices must rise from 0 to nnz = {nnz}")


def _csr_index_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32


def _empty_csr(storage, values_name: str, values: torch.Tensor, cols: int) -> None:
    """Register CSR buffers for ``from_meta`` without a dense (N, K) temporary: ``values`` (nnz)
    and a consistent stand-in structure (rows filled in order, as a mask with its first nnz
    entries set would give), built in O(nnz + N); works on the meta device."""
    rows = storage.shape[0]
    nnz, device = values.numel(), values.device
    storage.register_buffer(values_name, values)
    storage.register_buffer("col_indices", (torch.arange(nnz, device=device) % cols).to(_csr_index_dtype(cols)))
    storage.register_buffer("crow_indices", (torch.arange(rows + 1, device=device) * cols).clamp_(max=nnz))
    storage.register_load_state_dict_post_hook(_check_csr)


def _nm_index_bits(m: int) -> int:
    return next(b for b in (1, 2, 4, 8) if (1 << b) >= m)


def _empty_nm(storage, values_name: str, values: torch.Tensor, n: int, m: int) -> None:
    """Register N:M buffers for ``from_meta``: ``values`` (N, K n/m) and zero in-group positions
    (a stand-in until loaded), no dense (N, K) temporary; works on the meta device."""
    storage.n, storage.m = n, m
    storage.index_bits = _nm_index_bits(m)
    storage.register_buffer(values_name, values)
    width = packed_length(values.shape[1], storage.index_bits)
    storage.register_buffer("indices", torch.zeros(values.shape[0], width, dtype=torch.uint8, device=values.device))


def _scatter_csr(storage, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense (N, K) matrix of a CSR storage; no host sync (output_size is known)."""
    rows, cols = storage.shape
    device = values.device
    row_index = torch.repeat_interleave(torch.arange(rows, device=device), storage.crow_indices.diff(),
                                        output_size=values.numel())
    dense = torch.zeros(storage.shape, dtype=dtype, device=device)
    dense[row_index, storage.col_indices.long()] = values.to(dtype)
    return dense


def _scatter_nm(storage, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense (N, K) matrix of an N:M storage (values: (N, K*n/m))."""
    rows, cols = storage.shape
    n, m = storage.n, storage.m
    positions = unpack_uint(storage.indices, storage.index_bits, values.shape[1]).long().reshape(rows, cols // m, n)
    dense = torch.zeros(rows, cols // m, m, dtype=dtype, device=values.device)
    dense.scatter_(-1, positions, values.to(dtype).reshape(rows, cols // m, n))
    return dense.reshape(rows, cols)


class WeightStorage(nn.Module):
    """Base class: a compressed (N, K) weight matrix."""

    format_name = "base"

    def __init__(self, shape, dtype: torch.dtype):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError

    def infer_args(self):
        """The arguments of ``_C.infer_linear`` after x (see matmul.py), or None: no C++ kernel."""
        return None

    def _apply(self, fn, recurse=True):
        # nn.Module.to / .half / .cuda land here: learn the new dtype from a probe, and keep
        # the quantization scales fp32 (converted from the original, so nothing rounds).
        first = next((b for b in self._buffers.values() if b is not None), None)
        device = first.device if first is not None else None
        scales = self._buffers.get("scales")
        super()._apply(fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=device)).dtype
        if scales is not None and self._buffers["scales"].dtype != torch.float32:
            self._buffers["scales"] = scales.to(device=self._buffers["scales"].device, dtype=torch.float32)
        return self

    def meta(self) -> dict:
        return {"format": self.format_name, "shape": list(self.shape), "dtype": _dtype_name(self.dtype)}

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}"


class DenseWeight(WeightStorage):
    format_name = "dense"

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape, weight.dtype)
        self.register_buffer("weight", weight.detach().clone())

    def materialize(self):
        return self.weight

    @classmethod
    def from_meta(cls, meta, device=None):
        return cls(torch.empty(meta["shape"], dtype=_DTYPES[meta["dtype"]], device=device))


class QuantizedWeight(WeightStorage):
    """Codes and fp32 scales of ``Q(W)`` (see ``spec.py``); ``spec`` carries bits and group size."""

    format_name = "quantized"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, spec: TransformSpec, dtype: torch.dtype):
        super().__init__(codes.shape, dtype)
        self.bits, self.group_size = spec.bits, spec.group_size
        if spec.bits == 8:
            self.register_buffer("codes", codes.to(torch.int8))
        elif spec.bits in (4, 2):
            self.register_buffer("codes", pack_uint((codes - spec.qmin).to(torch.uint8), spec.bits))
        else:
            self.register_buffer("codes", pack_uint(codes > 0, 1))
            nonzero = codes != 0
            self.register_buffer("nonzero", None if bool(nonzero.all()) else pack_uint(nonzero, 1))
        self.register_buffer("scales", scales.to(torch.float32))

    @property
    def spec(self) -> TransformSpec:
        return TransformSpec(bits=self.bits, group_size=self.group_size)

    def integer_codes(self) -> torch.Tensor:
        """The signed codes as int8 (N, K)."""
        cols = self.shape[1]
        spec = self.spec
        if self.bits == 8:
            return self.codes
        if self.bits in (4, 2):
            return unpack_uint(self.codes, self.bits, cols).to(torch.int8) + spec.qmin
        signs = unpack_uint(self.codes, 1, cols).to(torch.int8) * 2 - 1
        if self.nonzero is not None:
            signs = signs * unpack_uint(self.nonzero, 1, cols).to(torch.int8)
        return signs

    def materialize(self):
        cdt = transforms.compute_dtype(self.dtype)
        return transforms.dequantize(self.integer_codes(), self.scales, self.spec, cdt).to(self.dtype)

    def infer_args(self):
        if self.bits == 8:
            return (IF_Q8, self.codes, None, None, self.scales, 8, -128, self.group_size, 0, 0, 0)
        if self.bits in (4, 2):
            return (IF_QPACK, self.codes, None, None, self.scales, self.bits, self.spec.qmin, self.group_size, 0, 0, 0)
        return (IF_Q1, self.codes, self.nonzero, None, self.scales, 1, 0, self.group_size, 0, 0, 0)

    def meta(self):
        return {**super().meta(), "bits": self.bits, "group_size": self.group_size,
                "has_nonzero": getattr(self, "nonzero", None) is not None}

    @classmethod
    def from_meta(cls, meta, device=None):
        # The buffers at their stored sizes, zero-filled: no (N, K) int8 codes to pack (binary's
        # constructor also tests values, which the meta device cannot).
        rows, cols = meta["shape"]
        bits = meta["bits"]
        spec = TransformSpec(bits=bits, group_size=meta["group_size"])
        storage = cls.__new__(cls)
        WeightStorage.__init__(storage, (rows, cols), _DTYPES[meta["dtype"]])
        storage.bits, storage.group_size = bits, spec.group_size
        width = cols if bits == 8 else packed_length(cols, bits)
        storage.register_buffer("codes", torch.zeros(rows, width, dtype=torch.int8 if bits == 8 else torch.uint8,
                                                     device=device))
        if bits == 1:
            nonzero = torch.zeros(rows, width, dtype=torch.uint8, device=device) if meta.get("has_nonzero") else None
            storage.register_buffer("nonzero", nonzero)
        storage.register_buffer("scales", torch.zeros(spec.scales_shape(rows, cols), dtype=torch.float32,
                                                      device=device))
        return storage

    def extra_repr(self):
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


class SparseWeight(WeightStorage):
    """CSR storage of a pruned weight: only the kept values and their positions."""

    format_name = "csr"
    VALUES = "values"

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor):
        super().__init__(weight.shape, weight.dtype)
        rows, cols = weight.shape
        self.register_buffer("values", weight.detach()[keep].clone())
        self.register_buffer("col_indices", keep.nonzero()[:, 1].to(_csr_index_dtype(cols)))
        self.register_buffer("crow_indices", _row_pointers(keep))
        self.register_load_state_dict_post_hook(_check_csr)

    def materialize(self):
        return _scatter_csr(self, self.values, self.dtype)

    def infer_args(self):
        return (IF_CSR, self.values, self.col_indices, self.crow_indices, None, 0, 0, 0, 0, 0, 0)

    def meta(self):
        return {**super().meta(), "nnz": int(self.values.numel())}

    @classmethod
    def from_meta(cls, meta, device=None):
        rows, cols = meta["shape"]
        dtype = _DTYPES[meta["dtype"]]
        storage = cls.__new__(cls)
        WeightStorage.__init__(storage, (rows, cols), dtype)
        _empty_csr(storage, "values", torch.zeros(meta["nnz"], dtype=dtype, device=device), cols)
        return storage

    @staticmethod
    def nbytes_estimate(shape, nnz: int, element_size: int) -> int:
        rows, cols = shape
        index_bytes = 2 if cols <= torch.iinfo(torch.int16).max else 4
        return nnz * (element_size + index_bytes) + (rows + 1) * 8


class NMSparseWeight(WeightStorage):
    """N:M storage: the n kept values of each group of m, and their in-group index (packed)."""

    format_name = "nm"

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor, n: int, m: int):
        super().__init__(weight.shape, weight.dtype)
        rows, cols = weight.shape
        self.n, self.m = n, m
        self.index_bits = _nm_index_bits(m)
        groups = keep.reshape(rows, cols // m, m)
        # Positions of the kept entries inside each group, in increasing order.
        positions = torch.sort(torch.where(groups, torch.arange(m, device=keep.device), m), dim=-1).values[..., :n]
        values = weight.detach().reshape(rows, cols // m, m).gather(-1, positions)
        self.register_buffer("values", values.reshape(rows, -1).clone())
        self.register_buffer("indices", pack_uint(positions.reshape(rows, -1), self.index_bits))

    def materialize(self):
        return _scatter_nm(self, self.values, self.dtype)

    def infer_args(self):
        return (IF_NM, self.values, self.indices, None, None, 0, 0, 0, self.n, self.m, self.index_bits)

    def meta(self):
        return {**super().meta(), "n": self.n, "m": self.m}

    @classmethod
    def from_meta(cls, meta, device=None):
        rows, cols = meta["shape"]
        n, m = meta["n"], meta["m"]
        dtype = _DTYPES[meta["dtype"]]
        storage = cls.__new__(cls)
        WeightStorage.__init__(storage, (rows, cols), dtype)
        _empty_nm(storage, "values", torch.zeros(rows, cols // m * n, dtype=dtype, device=device), n, m)
        return storage

    def extra_repr(self):
        return f"{super().extra_repr()}, n={self.n}, m={self.m}"


FORMATS = {cls.format_name: cls for cls in (DenseWeight, QuantizedWeight, SparseWeight, NMSparseWeight)}


def storage_from_meta(meta: dict, device=None) -> WeightStorage:
    """An empty storage of the right format and shapes, ready for ``load_state_dict``."""
    from .sparse_quantized import NMQuantizedWeight  # builds on this module: imported late
    from .sparse_quantized import SparseQuantizedWeight

    formats = {**FORMATS, **{c.format_name: c for c in (NMQuantizedWeight, SparseQuantizedWeight)}}
    if meta.get("format") not in formats:
        raise ValueError(f"unknown storage format {meta.get('format')!r}; known: {sorted(formats)}")
    return formats[meta["format"]].from_meta(meta, device=device)
