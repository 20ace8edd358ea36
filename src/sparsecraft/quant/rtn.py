"""Mask-preserving weight-only quantization: group parameters and round-to-nearest.

The grid of a (row, group) is fitted to the group's *kept* weights only — pruned weights are
stored by the mask, not by codes, so they must not widen the range. Zero stays on the grid
(symmetric: code 0; asymmetric: the range is widened to include 0, so the zero point is an
integer in the code range), hence every pruned weight is exactly (zero - zero) * scale = 0.
Scales are rounded to float16 *before* the codes are chosen, so the stored scales reproduce the
quantizer's output exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SparsecraftError
from ..formats.qinfo import QuantInfo, QuantizedWeight, code_range, num_groups

METHODS = ("rtn", "gptq")
FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal)


@dataclass
class QuantConfig:
    """Weight-only quantization recipe (validated on construction)."""

    bits: int = 8
    group_size: int = 128
    symmetric: bool = True
    method: str = "rtn"
    # search a clipped range per (row, group) minimising the squared rounding error (GPTQ: of the
    # group's output, through the Hessian block of its inputs)
    clip: bool = False
    # GPTQ
    act_order: bool = False  # columns in order of decreasing Hessian diagonal, static group grids
    refit_scales: bool = False  # GPTQ: re-solve each row's group scales for its output (quant.refit)
    blocksize: int = 128
    percdamp: float = 0.01
    # activation-aware scaling (quant.awq) before RTN or GPTQ: α searched on awq_grid points in [0, 1)
    awq: bool = False
    awq_grid: int = 20
    # calibration (GPTQ and AWQ)
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise SparsecraftError(f"bits {self.bits}: choose 4 or 8")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise SparsecraftError(
                f"group_size {self.group_size}: must be a positive integer (32, 64 or 128)"
            )
        if self.method not in METHODS:
            raise SparsecraftError(f"method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.refit_scales and self.method != "gptq":
            raise SparsecraftError("refit_scales solves on the Hessian; it needs method='gptq'")
        if self.act_order and self.method != "gptq":
            raise SparsecraftError("act_order reorders GPTQ's columns; it needs method='gptq'")
        if not isinstance(self.awq_grid, int) or not (2 <= self.awq_grid <= 1000):
            raise SparsecraftError(
                f"awq_grid {self.awq_grid}: must be an integer in [2, 1000] (points α = k/grid searched)"
            )
        if self.blocksize <= 0:
            raise SparsecraftError(f"blocksize {self.blocksize}: must be positive")
        if not (0.0 <= self.percdamp <= 10.0):
            raise SparsecraftError(
                f"percdamp {self.percdamp}: must be in [0, 10] (fraction of mean diagonal)"
            )
        if self.nsamples < 1 or self.seqlen < 1:
            raise SparsecraftError("nsamples and seqlen must be >= 1")

    def meta(self) -> dict:
        return {
            "num_bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "method": self.method,
            "clip": self.clip,
            "act_order": self.act_order,
            "refit_scales": self.refit_scales,
            "awq": self.awq,
            **({"awq_grid": self.awq_grid} if self.awq else {}),
        }


def _to_fp16_scale(scale: Tensor, nonzero: Tensor) -> Tensor:
    """float32 scales -> float16, never 0 or inf (an all-zero group gets scale 1)."""
    s = scale.clamp(max=FP16_MAX)
    s = torch.where(nonzero, s.clamp(min=FP16_TINY), torch.ones_like(s))
    return s.half()


# Shrink factors tried by the clipping search (1.0 = the plain min/max grid, always a candidate).
CLIP_GRID = tuple(1.0 - 0.025 * k for k in range(21))


def _grid(wk: Tensor, bits: int, symmetric: bool, shrink: float) -> tuple[Tensor, Tensor | None]:
    lo, hi = code_range(bits, symmetric)
    if symmetric:
        absmax = wk.abs().amax(-1) * shrink
        return _to_fp16_scale(absmax / hi, absmax > 0), None
    xmin = wk.amin(-1).clamp(max=0.0) * shrink
    xmax = wk.amax(-1).clamp(min=0.0) * shrink
    scale16 = _to_fp16_scale((xmax - xmin) / hi, xmax > xmin)
    zero = torch.round(-xmin / scale16.float()).clamp(lo, hi)
    return scale16, zero.to(torch.uint8)


def fit_params(
    w: Tensor, mask: Tensor, bits: int, symmetric: bool, clip: bool = False, hessian: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Scale (float16) and zero point (uint8 or None) of each row of ``w`` (rows, cols), fitted to
    the entries where ``mask`` is True. Works on any (rows, groups, cols) by the last dimension.

    ``clip``: also try ranges shrunk by the factors in ``CLIP_GRID`` and keep, per row, the one
    with the smallest squared error over the kept entries (clipping a few outliers buys a finer
    grid for the rest; the plain range is a candidate, so the error never grows). With ``hessian``
    (cols, cols) ∝ Σ x xᵀ of the columns' inputs the error is the output's, d H dᵀ, not the weights'.
    """
    wk = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
    best_s, best_z = _grid(wk, bits, symmetric, 1.0)
    if not clip:
        return best_s, best_z
    def error(q: Tensor) -> Tensor:
        d = q - wk
        return ((d @ hessian) * d).sum(-1) if hessian is not None else (d**2).sum(-1)

    _, q = quantize_columns(wk, mask, best_s, best_z, bits, symmetric)
    best_err = error(q)
    for shrink in CLIP_GRID[1:]:
        s, z = _grid(wk, bits, symmetric, shrink)
        _, q = quantize_columns(wk, mask, s, z, bits, symmetric)
        err = error(q)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if best_z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def quantize_columns(
    w: Tensor, mask: Tensor, scale16: Tensor, zero: Tensor | None, bits: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """Codes and dequantized float32 values of ``w`` with per-row ``scale16``/``zero`` broadcast
    over the last dim. Pruned entries get the zero point, i.e. the value exactly 0."""
    lo, hi = code_range(bits, symmetric)
    s = scale16.float().unsqueeze(-1)
    z = zero.to(torch.float32).unsqueeze(-1) if zero is not None else torch.zeros_like(s)
    codes = (torch.round(w / s) + z).clamp_(lo, hi)
    codes = torch.where(mask, codes, z.expand_as(codes))
    return codes, (codes - z) * s


def _grouped(x: Tensor, g: int, fill) -> Tensor:
    rows, cols = x.shape
    pad = (-cols) % g
    if pad:
        x = torch.cat([x, torch.full((rows, pad), fill, dtype=x.dtype, device=x.device)], 1)
    return x.view(rows, -1, g)


def check_weight(w: Tensor, mask: Tensor | None, where: str) -> Tensor:
    if w.dim() != 2:
        raise SparsecraftError(f"{where}: expected an (out, in) weight, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise SparsecraftError(f"{where}: the weight contains NaN or Inf")
    if mask is None:
        return w != 0
    if mask.shape != w.shape:
        raise SparsecraftError(f"{where}: mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
    mask = mask.to(device=w.device, dtype=torch.bool)
    if ((w != 0) & ~mask).any():
        raise SparsecraftError(f"{where}: the weight has nonzeros outside the mask; apply the mask first")
    return mask


@torch.no_grad()
def rtn_quantize(
    w: Tensor,
    mask: Tensor | None = None,
    bits: int = 8,
    group_size: int = 128,
    symmetric: bool = True,
    where: str = "weight",
    clip: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest with per-(row, group) grids fitted to the kept weights.

    ``mask`` (True = kept) defaults to ``w != 0``. Returns codes for every position (the zero
    point where pruned), the quantization parameters and the mask; ``.dequantize()`` is the new
    weight, exactly zero wherever ``mask`` is False. ``clip``: see :func:`fit_params`.
    """
    w = w.detach().float()  # on its own device: a GPU quantizes a 7B model's layers in milliseconds
    mask = check_weight(w, mask, where)
    rows, cols = w.shape
    g = group_size
    wg, mg = _grouped(w, g, 0.0), _grouped(mask, g, False)
    scale16, zero = fit_params(wg, mg, bits, symmetric, clip)
    codes, _ = quantize_columns(wg, mg, scale16, zero, bits, symmetric)
    codes = codes.view(rows, -1)[:, :cols]
    info = QuantInfo(bits, g, symmetric, scale16, zero)
    assert scale16.shape == (rows, num_groups(cols, g))
    return QuantizedWeight(codes.to(info.code_dtype), info, mask)
