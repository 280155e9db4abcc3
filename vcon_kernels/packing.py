"""Bit packing of small unsigned integers along the last dimension.

One layout for everything stored sub-byte (masks, int4/int2 codes, binary signs, N:M
indices): value ``i`` of a row lives in byte ``i * nbits // 8`` at bit offset
``(i * nbits) % 8`` (little-endian within the byte). Rows are padded with zeros to a
whole byte. Kernels that read a stored mask use the same layout (nbits = 1).
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (1, 2, 4, 8)


def packed_length(length: int, nbits: int) -> int:
    return (length * nbits + 7) // 8


def _check_bits(nbits: int) -> None:
    if nbits not in PACKABLE_BITS:
        raise ValueError(f"nbits must be one of {PACKABLE_BITS}, got {nbits!r}")


def pack_uint(values: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack unsigned ``values`` (< 2**nbits, any integer/bool dtype) along the last dim into uint8."""
    _check_bits(nbits)
    values = values.to(torch.uint8)
    if nbits == 8:
        return values.contiguous()
    per_byte = 8 // nbits
    length = values.shape[-1]
    pad = (-length) % per_byte
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values = values.reshape(*values.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, nbits, dtype=torch.uint8, device=values.device)
    return (values << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_uint(packed: torch.Tensor, nbits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: uint8 values of shape ``(..., length)``."""
    _check_bits(nbits)
    if nbits == 8:
        return packed[..., :length]
    shifts = torch.arange(0, 8, nbits, dtype=torch.uint8, device=packed.device)
    fields = (packed.unsqueeze(-1) >> shifts) & ((1 << nbits) - 1)
    return fields.reshape(*packed.shape[:-1], -1)[..., :length]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool (N, K) mask as uint8 (N, ceil(K/8))."""
    return pack_uint(mask, 1)


def unpack_mask(packed: torch.Tensor, length: int) -> torch.Tensor:
    return unpack_uint(packed, 1, length).bool()
