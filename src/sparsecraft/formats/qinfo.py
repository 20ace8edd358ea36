"""Integer codes plus per-group scales (and zero points) along the input dimension.

Column j of the dense weight belongs to group j // group_size; the last group may be partial
(SmolLM2's 576 inputs are 4 * 128 + 64), so no padding or divisibility is ever needed.
Dequantized value = (code - zero) * scale, computed in float32 (exact: a <=9-bit integer times
an 11-bit fp16 mantissa fits in fp32's 24 bits) and then cast to the dense weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SparsecraftError

SUPPORTED_BITS = (4, 8)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Inclusive range of the integer codes: int8 sym [-127,127], int4 sym [-8,7], asym [0, 2^b-1]."""
    if bits not in SUPPORTED_BITS:
        raise SparsecraftError(f"num_bits={bits} is not supported; use 4 or 8")
    if symmetric:
        return (-127, 127) if bits == 8 else (-8, 7)
    return 0, (1 << bits) - 1


def num_groups(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


@dataclass
class QuantInfo:
    """Quantization parameters of one weight (out, in)."""

    bits: int
    group_size: int
    symmetric: bool
    scales: torch.Tensor  # (out, ceil(in/G)) float16
    zeros: torch.Tensor | None = None  # (out, ceil(in/G)) uint8, asymmetric only

    def validate(self, shape: tuple[int, int], where: str = "weight") -> None:
        out_f, in_f = shape
        code_range(self.bits, self.symmetric)
        if self.group_size <= 0:
            raise SparsecraftError(f"{where}: group_size must be positive, got {self.group_size}")
        want = (out_f, num_groups(in_f, self.group_size))
        if tuple(self.scales.shape) != want or self.scales.dtype != torch.float16:
            raise SparsecraftError(
                f"{where}: scales must be float16 of shape {want}, got {self.scales.dtype} "
                f"{tuple(self.scales.shape)}"
            )
        if not torch.isfinite(self.scales).all():
            raise SparsecraftError(f"{where}: scales contain inf or nan (corrupt file?)")
        if self.symmetric:
            if self.zeros is not None:
                raise SparsecraftError(f"{where}: symmetric quantization has no zero points")
        else:
            if self.zeros is None or tuple(self.zeros.shape) != want or self.zeros.dtype != torch.uint8:
                raise SparsecraftError(f"{where}: asymmetric quantization needs uint8 zeros of shape {want}")
            lo, hi = code_range(self.bits, False)
            if int(self.zeros.max()) > hi:
                raise SparsecraftError(f"{where}: zero point above {hi} for {self.bits}-bit codes")

    @property
    def code_dtype(self) -> torch.dtype:
        """dtype of unpacked codes: int8 for symmetric, uint8 for asymmetric."""
        return torch.int8 if self.symmetric else torch.uint8

    def meta(self) -> dict:
        return {"num_bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def _params_at(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = cols // self.group_size
        scale = self.scales[rows, g].float()
        zero = (
            self.zeros[rows, g].to(torch.int32)
            if self.zeros is not None
            else torch.zeros_like(rows, dtype=torch.int32)
        )
        return scale, zero

    def dequantize_at(self, codes: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """float32 values of ``codes`` sitting at dense positions (rows, cols) (any equal shapes)."""
        scale, zero = self._params_at(rows, cols)
        return (codes.to(torch.int32) - zero).float() * scale

    def codes_at(self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Nearest codes (clamped to the code range) of ``values`` at dense positions (rows, cols)."""
        scale, zero = self._params_at(rows, cols)
        lo, hi = code_range(self.bits, self.symmetric)
        q = torch.round(values.float() / scale) + zero
        return q.clamp_(lo, hi).to(self.code_dtype)


def _positions(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) index of every element of the 2-D ``t`` (expanded views, on its device)."""
    out_f, in_f = t.shape
    rows = torch.arange(out_f, device=t.device).unsqueeze(1).expand(out_f, in_f)
    return rows, torch.arange(in_f, device=t.device).unsqueeze(0).expand(out_f, in_f)


def dequantize_dense(codes: torch.Tensor, q: QuantInfo) -> torch.Tensor:
    """(out, in) codes -> (out, in) float32 values."""
    rows, cols = _positions(codes)
    return q.dequantize_at(codes, rows, cols)


def codes_from_dense(w: torch.Tensor, q: QuantInfo, where: str = "weight") -> torch.Tensor:
    """Recover the (out, in) codes of a weight that lies on the grid of ``q``; refuse otherwise.

    The weight must equal (codes - zero) * scale after casting to its dtype, i.e. it must be the
    output of a quantizer with these very scales: anything else would be silently rounded.
    """
    rows, cols = _positions(w)
    codes = q.codes_at(w, rows, cols)
    bad = q.dequantize_at(codes, rows, cols).to(w.dtype) != w
    if bad.any():
        # a 16-bit weight is the rounded (code - zero) * scale: with 8-bit codes the rounding can
        # exceed half a step, so the nearest code may miss while its neighbour gives the value
        lo, hi = code_range(q.bits, q.symmetric)
        for step in (-1, 1):
            alt = (codes.to(torch.int16) + step).clamp(lo, hi).to(codes.dtype)
            hit = bad & (q.dequantize_at(alt, rows, cols).to(w.dtype) == w)
            codes = torch.where(hit, alt, codes)
            bad &= ~hit
    if bad.any():
        n = int(bad.sum())
        raise SparsecraftError(
            f"{where}: {n} values are not on the {q.bits}-bit grid of the given scales; quantize the "
            "weight with sparsecraft.quant (rtn/gptq) and pass its scales, or store it unquantized"
        )
    return codes


@dataclass
class QuantizedWeight:
    """A quantizer's output for one (out, in) weight: codes everywhere (the zero point where the
    mask is False, so every pruned weight dequantizes to exactly 0), parameters and the mask."""

    codes: torch.Tensor  # (out, in) int8 (symmetric) / uint8 (asymmetric)
    info: QuantInfo
    mask: torch.Tensor  # (out, in) bool, True = kept

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in); exactly zero outside the mask."""
        v = dequantize_dense(self.codes, self.info)
        return torch.where(self.mask, v, torch.zeros((), dtype=v.dtype, device=v.device))
