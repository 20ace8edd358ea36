"""Quantized dense format (no sparsity metadata): every weight stored as an integer code.

``values`` (out, in) int8 (symmetric) / uint8 (asymmetric) codes for 8 bits, or uint8
(out, ceil(in/2)) nibbles (low nibble first, rows padded to even) for 4 bits; plus ``scales``
(+ ``zeros``) as in :mod:`.qinfo`. Zeros stay exact zeros (0 is always on the grid), so this is
also a valid home for a sparse layer whose sparsity is too low for a mask to pay off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SparsecraftError
from .bitmask import _check_2d
from .meta import StoredTensor, parse_meta, require
from .packing import pack_int4, unpack_int4
from .qinfo import QuantInfo, code_range, codes_from_dense, dequantize_dense


@dataclass
class QuantizedDenseTensor(StoredTensor):
    shape: tuple[int, int]
    dtype: torch.dtype
    values: torch.Tensor
    quant: QuantInfo

    FORMAT = "dense"

    @classmethod
    def from_dense(cls, w: torch.Tensor, quant: QuantInfo, where: str = "weight") -> QuantizedDenseTensor:
        _check_2d(w, where)
        w = w.detach()
        quant.validate(tuple(w.shape), where)
        return cls.from_codes(codes_from_dense(w, quant, where), quant, w.dtype, where)

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, quant: QuantInfo, dtype: torch.dtype, where: str = "weight"
    ) -> QuantizedDenseTensor:
        _check_2d(codes, where)
        quant.validate(tuple(codes.shape), where)
        lo, hi = code_range(quant.bits, quant.symmetric)
        if int(codes.min()) < lo or int(codes.max()) > hi:
            raise SparsecraftError(f"{where}: codes outside [{lo}, {hi}] for {quant.bits}-bit quantization")
        vals = pack_int4(codes) if quant.bits == 4 else codes.to(quant.code_dtype).contiguous()
        return cls(tuple(codes.shape), dtype, vals, quant)

    def codes(self) -> torch.Tensor:
        if self.quant.bits == 8:
            return self.values
        return unpack_int4(self.values, self.shape[1], self.quant.symmetric)

    def to_dense(self) -> torch.Tensor:
        return dequantize_dense(self.codes(), self.quant).to(self.dtype)

    def _own_tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values}

    @classmethod
    def from_tensors(
        cls, t: dict[str, torch.Tensor], meta: dict, where: str = "weight"
    ) -> QuantizedDenseTensor:
        shape, dtype, quant = parse_meta(t, meta, where)
        if quant is None:
            raise SparsecraftError(f"{where}: the 'dense' compressed format needs quantization metadata")
        out_f, in_f = shape
        if quant.bits == 8:
            values = require(t, "values", where, quant.code_dtype, shape)
        else:
            values = require(t, "values", where, torch.uint8, (out_f, -(-in_f // 2)))
            if in_f % 2 and (values[:, -1] >> 4).any():
                raise SparsecraftError(f"{where}: nonzero padding nibble in the int4 values (corrupt file?)")
        return cls(shape, dtype, values, quant)
