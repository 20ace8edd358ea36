"""Bitmask format: a packed 1-bit mask plus the kept values in row-major order.

Layout (the contract the CPU and Triton kernels read), for a weight of shape (out, in):
- ``mask`` uint8 (out, ceil(in/8)): bit j%8 of byte j//8 in row i is 1 iff W[i, j] is kept;
- ``values`` 1-D: the kept values in row-major order; float values in the dense dtype, or
  integer codes: int8 (symmetric) / uint8 (asymmetric) for 8 bits, and for 4 bits uint8 bytes
  holding two nibbles (low nibble first) where each row's run of codes is padded to an even
  count so every row starts on a byte;
- ``row_offsets`` int64 (out+1): row i is values[row_offsets[i]:row_offsets[i+1]] (for 4 bits
  these count code slots, i.e. nibbles, and are always even);
- quantized: ``scales`` (+ ``zeros``) per group of input columns, see :mod:`.qinfo`.

A zero is "not kept": negative zero is stored as +0.0 (numerically equal); every other value,
NaN and inf included, round-trips bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SparsecraftError
from .meta import StoredTensor, parse_meta, require
from .packing import pack_bits, pack_int4, unpack_bits, unpack_int4
from .qinfo import QuantInfo, code_range, codes_from_dense


def _check_2d(w: torch.Tensor, where: str) -> None:
    if w.dim() != 2:
        raise SparsecraftError(f"{where}: expected a 2-D (out, in) weight, got shape {tuple(w.shape)}")


def resolve_mask(w: torch.Tensor, mask: torch.Tensor | None, where: str) -> torch.Tensor:
    """The kept positions: ``w != 0`` by default; an explicit mask must cover every nonzero."""
    if mask is None:
        return w != 0
    if mask.shape != w.shape:
        raise SparsecraftError(f"{where}: mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
    mask = mask.bool()
    outside = (w != 0) & ~mask
    if outside.any():
        raise SparsecraftError(
            f"{where}: {int(outside.sum())} nonzero weights lie outside the given mask; apply the mask "
            "to the weight first (storing would drop them)"
        )
    return mask


@dataclass
class BitmaskTensor(StoredTensor):
    shape: tuple[int, int]
    dtype: torch.dtype  # dtype of the dense weight
    mask: torch.Tensor
    values: torch.Tensor
    row_offsets: torch.Tensor
    quant: QuantInfo | None = None

    FORMAT = "bitmask"

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        w: torch.Tensor,
        mask: torch.Tensor | None = None,
        quant: QuantInfo | None = None,
        where: str = "weight",
    ) -> BitmaskTensor:
        """Compress ``w`` (out, in). With ``quant`` the weight must lie on its grid (see qinfo)."""
        _check_2d(w, where)
        w = w.detach()
        keep = resolve_mask(w, mask, where)
        if quant is None:
            if not w.is_floating_point():
                raise SparsecraftError(f"{where}: float weight expected, got {w.dtype}")
            return cls._build(tuple(w.shape), w.dtype, keep, w[keep], None)
        quant.validate(tuple(w.shape), where)
        codes = codes_from_dense(w, quant, where)
        return cls._build(tuple(w.shape), w.dtype, keep, codes[keep], quant)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        mask: torch.Tensor,
        quant: QuantInfo,
        dtype: torch.dtype,
        where: str = "weight",
    ) -> BitmaskTensor:
        """Build from a quantizer's (out, in) codes and the kept mask (codes outside it are ignored)."""
        _check_2d(codes, where)
        quant.validate(tuple(codes.shape), where)
        mask = mask.to(device=codes.device, dtype=torch.bool)
        lo, hi = code_range(quant.bits, quant.symmetric)
        kept = codes[mask]
        if kept.numel() and (int(kept.min()) < lo or int(kept.max()) > hi):
            raise SparsecraftError(f"{where}: codes outside [{lo}, {hi}] for {quant.bits}-bit quantization")
        return cls._build(tuple(codes.shape), dtype, mask, kept.to(quant.code_dtype), quant)

    @classmethod
    def _build(cls, shape, dtype, keep, kept_values, quant) -> BitmaskTensor:
        counts = keep.sum(1, dtype=torch.int64)
        if quant is not None and quant.bits == 4:
            # pad each row's run of codes to an even count: scatter into a slot array
            slots = counts + counts % 2
            row_offsets = torch.cat([slots.new_zeros(1), slots.cumsum(0)])
            buf = torch.zeros(int(row_offsets[-1]), dtype=torch.int32, device=keep.device)
            buf[_slot_index(keep, row_offsets)] = kept_values.to(torch.int32)
            values = pack_int4(buf.unsqueeze(0)).squeeze(0)
        else:
            row_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            values = kept_values.contiguous()
        return cls(shape, dtype, pack_bits(keep), values, row_offsets, quant)

    # ---- access -------------------------------------------------------------------------
    def dense_mask(self) -> torch.Tensor:
        return unpack_bits(self.mask, self.shape[1])

    def codes(self) -> torch.Tensor:
        """The kept codes (quantized only), 1-D in row-major order, unpacked to int8/uint8."""
        if self.quant is None:
            raise SparsecraftError("codes(): this tensor holds float values, not quantized codes")
        if self.quant.bits == 8:
            return self.values
        nslots = int(self.row_offsets[-1])
        slots = unpack_int4(self.values.unsqueeze(0), nslots, self.quant.symmetric).squeeze(0)
        return slots[_slot_index(self.dense_mask(), self.row_offsets)]

    def to_dense(self) -> torch.Tensor:
        keep = self.dense_mask()
        out = torch.zeros(self.shape, dtype=self.dtype, device=keep.device)
        if self.quant is None:
            out[keep] = self.values.to(self.dtype)
            return out
        rows, cols = keep.nonzero(as_tuple=True)
        out[rows, cols] = self.quant.dequantize_at(self.codes(), rows, cols).to(self.dtype)
        return out

    @property
    def nnz(self) -> int:
        return int(self.dense_mask().sum())

    # ---- serialisation ------------------------------------------------------------------
    def _own_tensors(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask, "values": self.values, "row_offsets": self.row_offsets}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict, where: str = "weight") -> BitmaskTensor:
        """Rebuild from stored tensors, validating every field (a corrupt file must not load)."""
        shape, dtype, quant = parse_meta(t, meta, where)
        out_f, in_f = shape
        mask = require(t, "mask", where, torch.uint8, (out_f, -(-in_f // 8)))
        row_offsets = require(t, "row_offsets", where, torch.int64, (out_f + 1,))
        if quant is None:
            values = require(t, "values", where, dtype, None)
        elif quant.bits == 8:
            values = require(t, "values", where, quant.code_dtype, None)
        else:
            values = require(t, "values", where, torch.uint8, None)
        if values.dim() != 1:
            raise SparsecraftError(f"{where}: values must be 1-D, got shape {tuple(values.shape)}")
        keep = unpack_bits(mask, in_f)
        if in_f % 8 and (unpack_bits(mask, -(-in_f // 8) * 8)[:, in_f:]).any():
            raise SparsecraftError(f"{where}: mask has bits set in the row padding (corrupt file?)")
        counts = keep.sum(1, dtype=torch.int64)
        if quant is not None and quant.bits == 4:
            counts = counts + counts % 2
            want_len = int(counts.sum()) // 2
        else:
            want_len = int(counts.sum())
        if row_offsets[0] != 0 or not torch.equal(row_offsets.diff(), counts) or values.numel() != want_len:
            raise SparsecraftError(
                f"{where}: row_offsets / values do not match the mask's kept counts "
                "(corrupt or truncated file)"
            )
        return cls(shape, dtype, mask, values, row_offsets, quant)


def _slot_index(keep: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
    """Flat slot of every kept element (row-major): its row's offset plus its rank in the row."""
    rows, _ = keep.nonzero(as_tuple=True)
    rank = keep.to(torch.int64).cumsum(1)[keep] - 1
    return row_offsets[rows] + rank
