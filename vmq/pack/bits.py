"""Bit packing of small integers into bytes (little-endian bit order).

Value ``i`` occupies bits ``[i*b, (i+1)*b)`` of the stream, where bit ``j`` of the stream is bit
``j % 8`` of byte ``j // 8``. The packed length of ``n`` values is ``ceil(n * b / 8)`` bytes.

* :func:`pack_signed`: weights, 2 to 8 bits, two's complement of width ``b`` (8-bit values are
  stored as they are by the caller);
* :func:`pack_unsigned`: codebook indices, 1 to 16 bits.

Integer arithmetic only: the bytes are the same on every device (packing runs where the values are).
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def _pack_stream(u: Tensor, bits: int) -> Tensor:
    """Pack non-negative int64 values ``u`` (< 2^bits) into uint8."""
    shifts = torch.arange(bits, dtype=torch.int64, device=u.device)
    stream = ((u[:, None] >> shifts) & 1).reshape(-1)  # one bit per element
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64, device=u.device))
    return (stream.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def _unpack_stream(packed: Tensor, bits: int, numel: int) -> Tensor:
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"expected {packed_nbytes(numel, bits)} uint8 bytes for {numel} {bits}-bit values, "
                         f"got {packed.numel()} {packed.dtype}")
    b = packed.reshape(-1).to(torch.int64)
    stream = ((b[:, None] >> torch.arange(8, dtype=torch.int64, device=b.device)) & 1).reshape(-1)[: numel * bits]
    return (stream.reshape(numel, bits) << torch.arange(bits, dtype=torch.int64, device=b.device)).sum(dim=1)


def pack_signed(values: Tensor, bits: int) -> Tensor:
    """Flatten ``values`` (integers in [-2^(b-1), 2^(b-1) - 1]) and pack them into uint8."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    v = values.reshape(-1).to(torch.int64)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if v.numel() and (v.min() < lo or v.max() > hi):
        raise ValueError(f"values outside the {bits}-bit range [{lo}, {hi}]")
    return _pack_stream(v & ((1 << bits) - 1), bits)  # two's complement, width `bits`


def unpack_signed(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_signed`: the first ``numel`` values as int8."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    u = _unpack_stream(packed, bits, numel)
    signed = torch.where(u >= (1 << (bits - 1)), u - (1 << bits), u)
    return signed.to(torch.int8)


def pack_unsigned(values: Tensor, bits: int) -> Tensor:
    """Flatten ``values`` (integers in [0, 2^b - 1]) and pack them into uint8."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be 1..16, got {bits}")
    v = values.reshape(-1).to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"values outside the {bits}-bit range [0, {(1 << bits) - 1}]")
    return _pack_stream(v, bits)


def unpack_unsigned(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_unsigned`: the first ``numel`` values as int64."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be 1..16, got {bits}")
    return _unpack_stream(packed, bits, numel)
