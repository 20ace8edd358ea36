"""Bit packing helpers shared by the compressed formats; vectorised torch, no per-element loops.

All packing is little-endian: the first element goes to the lowest bits of the first byte, and
each row is padded with zero bits to a whole byte.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool (rows, cols) -> uint8 (rows, ceil(cols/8)); bit j%8 of byte j//8 is mask[:, j]."""
    return pack_subbyte(mask.to(torch.uint8), 1)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (rows, nbytes) -> bool (rows, cols)."""
    return unpack_subbyte(packed, cols, 1).bool()


def pack_subbyte(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack small unsigned ints (rows, n), each < 2**bits, into uint8 (rows, ceil(n*bits/8))."""
    if bits not in (1, 2, 4):
        raise ValueError(f"bits must be 1, 2 or 4, got {bits}")
    per = 8 // bits
    rows, n = x.shape
    x = F.pad(x.to(torch.int32), (0, (-n) % per)).view(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=x.device) * bits
    # fields never overlap, so the sum equals the bitwise or
    return (x << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_subbyte(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_subbyte`: uint8 (rows, nbytes) -> uint8 (rows, n)."""
    if bits not in (1, 2, 4):
        raise ValueError(f"bits must be 1, 2 or 4, got {bits}")
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    fields = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(packed.shape[0], -1)[:, :n].to(torch.uint8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes (rows, n) in [-8, 15] -> uint8 (rows, ceil(n/2)) nibbles, low nibble first."""
    return pack_subbyte((codes.to(torch.int32) & 0xF).to(torch.uint8), 4)


def unpack_int4(packed: torch.Tensor, n: int, signed: bool) -> torch.Tensor:
    """Nibbles -> codes (rows, n): int8 in [-8, 7] when ``signed`` else uint8 in [0, 15]."""
    nib = unpack_subbyte(packed, n, 4)
    if signed:  # two's complement sign extension of a 4-bit field
        return ((nib.to(torch.int16) ^ 8) - 8).to(torch.int8)
    return nib
