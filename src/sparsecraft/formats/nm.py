"""Packed N:M format: exactly N kept values per group of M input columns plus their positions.

Layout (the contract the CPU and Triton kernels read), for a weight of shape (out, in), in % M == 0
(otherwise storage is refused: no padding, use the bitmask format):
- ``values`` (out, in*N/M): the kept values of each M-group in column order; a group with fewer
  than N nonzeros keeps explicit zeros (the lowest free positions). Float values in the dense
  dtype, or codes: int8 (symmetric) / uint8 (asymmetric) for 8 bits, and for 4 bits uint8
  (out, ceil(in*N/M / 2)) nibbles, low nibble first, each row padded to an even count;
- ``indices`` uint8: each kept value's position 0..M-1 in its group, 2 bits each when M <= 4,
  4 bits when 4 < M <= 16, packed little-endian along the row, each row padded to a whole byte;
- quantized: ``scales`` (+ ``zeros``) per group of dense input columns, see :mod:`.qinfo`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SparsecraftError
from .bitmask import _check_2d, resolve_mask
from .meta import StoredTensor, parse_meta, require
from .packing import pack_int4, pack_subbyte, unpack_int4, unpack_subbyte
from .qinfo import QuantInfo, code_range, codes_from_dense


def index_bits(m: int) -> int:
    return 2 if m <= 4 else 4


def check_nm(n: int, m: int, in_features: int, where: str) -> None:
    if not (1 <= n < m <= 16):
        raise SparsecraftError(f"{where}: N:M = {n}:{m} unsupported; need 1 <= N < M <= 16 (e.g. 2:4)")
    if in_features % m:
        raise SparsecraftError(
            f"{where}: {in_features} input features are not divisible by M={m}; packed N:M storage "
            "refuses rather than pads — use the bitmask format for this layer"
        )


def nm_positions(keep: torch.Tensor, n: int, m: int, where: str = "weight") -> torch.Tensor:
    """(out, in) mask -> (out, in/M, N) sorted positions; refuses a mask that is not N:M."""
    out_f, in_f = keep.shape
    check_nm(n, m, in_f, where)
    groups = keep.view(out_f, in_f // m, m)
    counts = groups.sum(-1)
    over = counts > n
    if over.any():
        r, g = (int(v) for v in over.nonzero()[0])
        raise SparsecraftError(
            f"{where}: mask is not {n}:{m}: {int(over.sum())} groups of {m} columns keep more than {n} "
            f"weights (first: row {r}, columns {g * m}..{g * m + m - 1} keep {int(counts[r, g])}); "
            f"prune with an {n}:{m} pattern or use the bitmask format"
        )
    # kept positions first, then the lowest free ones as explicit zeros; then column order
    pos = torch.arange(m, dtype=torch.int32, device=keep.device)
    key = groups.to(torch.int32) * (2 * m) + (m - 1 - pos)
    return key.topk(n, dim=-1).indices.sort(-1).values


@dataclass
class NMTensor(StoredTensor):
    shape: tuple[int, int]
    dtype: torch.dtype
    n: int
    m: int
    values: torch.Tensor
    indices: torch.Tensor
    quant: QuantInfo | None = None

    FORMAT = "nm"

    @property
    def row_len(self) -> int:
        return self.shape[1] * self.n // self.m

    @classmethod
    def from_dense(
        cls,
        w: torch.Tensor,
        n: int = 2,
        m: int = 4,
        mask: torch.Tensor | None = None,
        quant: QuantInfo | None = None,
        where: str = "weight",
    ) -> NMTensor:
        _check_2d(w, where)
        w = w.detach()
        keep = resolve_mask(w, mask, where)
        idx = nm_positions(keep, n, m, where)
        if quant is None:
            if not w.is_floating_point():
                raise SparsecraftError(f"{where}: float weight expected, got {w.dtype}")
            src = w
        else:
            quant.validate(tuple(w.shape), where)
            src = codes_from_dense(w, quant, where)  # zeros map to the zero point: dequantize to 0
        return cls._build(tuple(w.shape), w.dtype, n, m, src, idx, quant)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        mask: torch.Tensor,
        quant: QuantInfo,
        dtype: torch.dtype,
        n: int = 2,
        m: int = 4,
        where: str = "weight",
    ) -> NMTensor:
        """Build from a quantizer's (out, in) codes and kept mask; padding slots dequantize to 0."""
        _check_2d(codes, where)
        quant.validate(tuple(codes.shape), where)
        mask = mask.to(device=codes.device, dtype=torch.bool)
        lo, hi = code_range(quant.bits, quant.symmetric)
        codes = codes.to(torch.int32)
        if mask.any() and (int(codes[mask].min()) < lo or int(codes[mask].max()) > hi):
            raise SparsecraftError(f"{where}: codes outside [{lo}, {hi}] for {quant.bits}-bit quantization")
        idx = nm_positions(mask, n, m, where)
        g = torch.arange(codes.shape[1], device=codes.device) // quant.group_size
        zero = quant.zeros[:, g].to(torch.int32) if quant.zeros is not None else torch.zeros_like(codes)
        src = torch.where(mask, codes, zero).to(quant.code_dtype)
        return cls._build(tuple(codes.shape), dtype, n, m, src, idx, quant)

    @classmethod
    def _build(cls, shape, dtype, n, m, src, idx, quant) -> NMTensor:
        out_f, in_f = shape
        vals = src.view(out_f, in_f // m, m).gather(-1, idx.long()).reshape(out_f, -1)
        if quant is not None and quant.bits == 4:
            vals = pack_int4(vals)
        indices = pack_subbyte(idx.reshape(out_f, -1).to(torch.uint8), index_bits(m))
        return cls(shape, dtype, n, m, vals.contiguous(), indices, quant)

    def positions(self) -> torch.Tensor:
        """(out, in/M, N) int64 positions inside each group."""
        out_f, in_f = self.shape
        idx = unpack_subbyte(self.indices, self.row_len, index_bits(self.m))
        return idx.view(out_f, in_f // self.m, self.n).long()

    def codes(self) -> torch.Tensor:
        """(out, in*N/M) unpacked codes (quantized only)."""
        if self.quant is None:
            raise SparsecraftError("codes(): this tensor holds float values, not quantized codes")
        if self.quant.bits == 8:
            return self.values
        return unpack_int4(self.values, self.row_len, self.quant.symmetric)

    def dense_mask(self) -> torch.Tensor:
        """Positions that hold a stored slot (explicit zeros included)."""
        out_f, in_f = self.shape
        keep = torch.zeros(out_f, in_f // self.m, self.m, dtype=torch.bool, device=self.values.device)
        keep.scatter_(-1, self.positions(), True)
        return keep.view(out_f, in_f)

    def to_dense(self) -> torch.Tensor:
        out_f, in_f = self.shape
        idx = self.positions()
        if self.quant is None:
            vals = self.values.to(self.dtype).view(out_f, -1, self.n)
        else:
            rows = torch.arange(out_f, device=idx.device).view(out_f, 1, 1).expand_as(idx)
            cols = torch.arange(0, in_f, self.m, device=idx.device).view(1, -1, 1) + idx
            vals = self.quant.dequantize_at(self.codes().view(out_f, -1, self.n), rows, cols).to(self.dtype)
        out = torch.zeros(out_f, in_f // self.m, self.m, dtype=self.dtype, device=idx.device)
        out.scatter_(-1, idx, vals)
        return out.view(out_f, in_f)

    def _own_meta(self) -> dict:
        return {"n": self.n, "m": self.m}

    def _own_tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "indices": self.indices}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict, where: str = "weight") -> NMTensor:
        shape, dtype, quant = parse_meta(t, meta, where)
        try:
            n, m = int(meta["n"]), int(meta["m"])
        except (KeyError, TypeError, ValueError):
            raise SparsecraftError(f"{where}: N:M metadata needs integer 'n' and 'm', got {meta!r}") from None
        out_f, in_f = shape
        check_nm(n, m, in_f, where)
        L = in_f * n // m
        if quant is None:
            values = require(t, "values", where, dtype, (out_f, L))
        elif quant.bits == 8:
            values = require(t, "values", where, quant.code_dtype, (out_f, L))
        else:
            values = require(t, "values", where, torch.uint8, (out_f, -(-L // 2)))
        b = index_bits(m)
        per = 8 // b
        indices = require(t, "indices", where, torch.uint8, (out_f, -(-L // per)))
        full = unpack_subbyte(indices, -(-L // per) * per, b)
        idx = full[:, :L].view(out_f, -1, n).to(torch.int32)
        if (full[:, L:] != 0).any() or (idx >= m).any() or (n > 1 and (idx.diff(dim=-1) <= 0).any()):
            raise SparsecraftError(
                f"{where}: N:M indices are out of range or not increasing within a group (corrupt file?)"
            )
        if quant is not None and quant.bits == 4 and L % 2 and (values[:, -1] >> 4).any():
            raise SparsecraftError(f"{where}: nonzero padding nibble in the int4 values (corrupt file?)")
        return cls(shape, dtype, n, m, values, indices, quant)
