"""Storages of prune + quantize: only the kept weights' integer codes, their positions, the scales.

``Compose(Prune(...), Quantize(bits))`` computes ``Q(M * W)`` at beta = 0: the pruned weights
quantize to code 0. Storing every code (``QuantizedWeight``) keeps those zeros; these two
formats store the kept codes only:

* :class:`NMQuantizedWeight`: N:M pruning. int8 codes of the n kept weights of each group of
  m (N, K*n/m), their in-group positions packed (2 bits for m = 4), the fp32 scales. 2:4 +
  int8 is 5 bits per weight instead of 8.
* :class:`SparseQuantizedWeight`: unstructured pruning. CSR of the int8 codes (int16/int32
  columns, int64 row pointers) and the fp32 scales.

``integer_codes()`` (the dense (N, K) int8 codes), ``scales``, ``bits`` and ``group_size``
are the same as :class:`~vcon_kernels.compressed.storage.QuantizedWeight`'s, so code that
exports quantized weights reads all three alike. ``build.py`` picks these only when they
are smaller than the dense codes.

Example usage::

    st = NMQuantizedWeight(codes, keep, 2, 4, scales, spec, torch.float32)
    w = st.materialize()            # (N, K), equal to QuantizedWeight(codes, ...).materialize()
"""

from __future__ import annotations

import torch

from .. import torch_transforms as transforms
from ..packing import pack_uint
from ..packing import packed_length
from ..spec import TransformSpec
from .storage import _DTYPES
from .storage import IF_CSRQ
from .storage import IF_NMQ
from .storage import WeightStorage
from .storage import _check_csr
from .storage import _empty_csr
from .storage import _empty_nm
from .storage import _row_pointers
from .storage import _scatter_csr
from .storage import _scatter_nm


class _QuantizedCodes(WeightStorage):
    """Shared: bits, group size, fp32 scales and the dequantize of the dense codes."""

    def _init_quant(self, scales: torch.Tensor, spec: TransformSpec):
        if spec.bits < 2:
            raise ValueError(f"{type(self).__name__}: bits must be 2, 4 or 8 (binary keeps QuantizedWeight), "
                             f"got {spec.bits}")
        self.bits, self.group_size = spec.bits, spec.group_size
        self.register_buffer("scales", scales.to(torch.float32))

    @property
    def spec(self) -> TransformSpec:
        return TransformSpec(bits=self.bits, group_size=self.group_size)

    def materialize(self):
        cdt = transforms.compute_dtype(self.dtype)
        return transforms.dequantize(self.integer_codes(), self.scales, self.spec, cdt).to(self.dtype)

    def meta(self):
        return {**super().meta(), "bits": self.bits, "group_size": self.group_size}

    def extra_repr(self):
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


class NMQuantizedWeight(_QuantizedCodes):
    """N:M prune + quantize: kept int8 codes (N, K*n/m), packed in-group positions, scales."""

    format_name = "nm_quantized"

    def __init__(self, codes: torch.Tensor, keep: torch.Tensor, n: int, m: int, scales: torch.Tensor,
                 spec: TransformSpec, dtype: torch.dtype):
        super().__init__(codes.shape, dtype)
        rows, cols = codes.shape
        if cols % m:
            raise ValueError(f"NMQuantizedWeight: in_features {cols} is not a multiple of m = {m}")
        self.n, self.m = n, m
        self.index_bits = next(b for b in (1, 2, 4, 8) if (1 << b) >= m)
        groups = keep.reshape(rows, cols // m, m)
        positions = torch.sort(torch.where(groups, torch.arange(m, device=keep.device), m), dim=-1).values[..., :n]
        if bool((positions >= m).any()):
            raise ValueError(f"NMQuantizedWeight: keep must hold exactly {n} of every {m} weights")
        kept = codes.reshape(rows, cols // m, m).gather(-1, positions).reshape(rows, -1)
        self.register_buffer("codes", kept.to(torch.int8).contiguous())
        self.register_buffer("indices", pack_uint(positions.reshape(rows, -1), self.index_bits))
        self._init_quant(scales, spec)

    def integer_codes(self) -> torch.Tensor:
        return _scatter_nm(self, self.codes, torch.int8)

    def infer_args(self):
        return (IF_NMQ, self.codes, self.indices, None, self.scales, self.bits, self.spec.qmin, self.group_size,
                self.n, self.m, self.index_bits)

    def meta(self):
        return {**super().meta(), "n": self.n, "m": self.m}

    @staticmethod
    def nbytes_estimate(shape, n: int, m: int) -> int:
        rows, cols = shape
        kept = cols // m * n
        index_bits = next(b for b in (1, 2, 4, 8) if (1 << b) >= m)
        return rows * (kept + packed_length(kept, index_bits))

    @classmethod
    def from_meta(cls, meta, device=None):
        # Buffers at their stored sizes (no dense (N, K) codes or mask; works on the meta device).
        rows, cols = meta["shape"]
        n, m = meta["n"], meta["m"]
        spec = TransformSpec(bits=meta["bits"], group_size=meta["group_size"])
        storage = cls.__new__(cls)
        WeightStorage.__init__(storage, (rows, cols), _DTYPES[meta["dtype"]])
        _empty_nm(storage, "codes", torch.zeros(rows, cols // m * n, dtype=torch.int8, device=device), n, m)
        storage._init_quant(torch.zeros(spec.scales_shape(rows, cols), dtype=torch.float32, device=device), spec)
        return storage

    def extra_repr(self):
        return f"{super().extra_repr()}, n={self.n}, m={self.m}"


class SparseQuantizedWeight(_QuantizedCodes):
    """Unstructured prune + quantize: CSR of the int8 codes, plus the scales."""

    format_name = "csr_quantized"
    VALUES = "codes"

    def __init__(self, codes: torch.Tensor, keep: torch.Tensor, scales: torch.Tensor, spec: TransformSpec,
                 dtype: torch.dtype):
        super().__init__(codes.shape, dtype)
        rows, cols = codes.shape
        index_dtype = torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32
        self.register_buffer("codes", codes[keep].to(torch.int8).contiguous())
        self.register_buffer("col_indices", keep.nonzero()[:, 1].to(index_dtype))
        self.register_buffer("crow_indices", _row_pointers(keep))
        self._init_quant(scales, spec)
        self.register_load_state_dict_post_hook(_check_csr)

    def integer_codes(self) -> torch.Tensor:
        return _scatter_csr(self, self.codes, torch.int8)

    def infer_args(self):
        return (IF_CSRQ, self.codes, self.col_indices, self.crow_indices, self.scales, self.bits, self.spec.qmin,
                self.group_size, 0, 0, 0)

    def meta(self):
        return {**super().meta(), "nnz": int(self.codes.numel())}

    @staticmethod
    def nbytes_estimate(shape, nnz: int) -> int:
        rows, cols = shape
        index_bytes = 2 if cols <= torch.iinfo(torch.int16).max else 4
        return nnz * (1 + index_bytes) + (rows + 1) * 8

    @classmethod
    def from_meta(cls, meta, device=None):
        # Buffers at their stored sizes (no dense (N, K) codes or mask; works on the meta device).
        rows, cols = meta["shape"]
        spec = TransformSpec(bits=meta["bits"], group_size=meta["group_size"])
        storage = cls.__new__(cls)
        WeightStorage.__init__(storage, (rows, cols), _DTYPES[meta["dtype"]])
        _empty_csr(storage, "codes", torch.zeros(meta["nnz"], dtype=torch.int8, device=device), cols)
        storage._init_quant(torch.zeros(spec.scales_shape(rows, cols), dtype=torch.float32, device=device), spec)
        return storage
