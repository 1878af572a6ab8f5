"""Bit packing of signed integers of 2 to 8 bits into bytes (little-endian bit order).

Value ``i`` occupies bits ``[i*b, (i+1)*b)`` of the stream, where bit ``j`` of the stream is bit
``j % 8`` of byte ``j // 8``. Values are stored in two's complement of width ``b``. The packed
length of ``n`` values is ``ceil(n * b / 8)`` bytes; 8-bit values are stored as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack_signed(values: Tensor, bits: int) -> Tensor:
    """Flatten ``values`` (integers in [-2^(b-1), 2^(b-1) - 1]) and pack them into uint8."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    v = values.reshape(-1).to(torch.int64)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if v.numel() and (v.min() < lo or v.max() > hi):
        raise ValueError(f"values outside the {bits}-bit range [{lo}, {hi}]")
    u = v & ((1 << bits) - 1)  # two's complement, width `bits`
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((u[:, None] >> shifts) & 1).reshape(-1)  # one bit per element
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64))
    return (stream.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_signed(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_signed`: the first ``numel`` values as int8."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"expected {packed_nbytes(numel, bits)} uint8 bytes for {numel} {bits}-bit values, "
                         f"got {packed.numel()} {packed.dtype}")
    b = packed.to(torch.int64)
    stream = ((b[:, None] >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: numel * bits]
    u = (stream.reshape(numel, bits) << torch.arange(bits, dtype=torch.int64)).sum(dim=1)
    signed = torch.where(u >= (1 << (bits - 1)), u - (1 << bits), u)
    return signed.to(torch.int8)
