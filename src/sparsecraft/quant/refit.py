"""Scales re-solved for the layer output once the integer codes are fixed.

GPTQ picks codes column by column and compensates each rounding error only on the columns after
it, with the group grids fixed before (act-order) or as the loop reaches them. Once the codes are
known, each row's output error is a quadratic in its group scales: with d_g the row's codes minus
zero points restricted to group g (zero elsewhere, and zero on pruned weights),

    ‖(w − Σ_g s_g d_g) X‖²  is minimised by  A s = b,  A_gh = d_g H d_hᵀ,  b_g = d_g H wᵀ,

one small (groups × groups) system per row. Codes and zero points stay as they are, so every
pruned weight is still exactly zero. Scales are stored as float16: a row keeps its old scales
when the rounded new ones do not lower its error (or come out non-positive).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats.qinfo import QuantInfo, QuantizedWeight, num_groups
from .rtn import FP16_MAX, FP16_TINY


def _group_sum(x: Tensor, g: int, ng: int) -> Tensor:
    """(..., cols) -> (..., ng): sums over each group of g columns (the last one may be partial)."""
    pad = ng * g - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], ng, g).sum(-1)


@torch.no_grad()
def refit_scales(qw: QuantizedWeight, weight: Tensor, hessian: Tensor, damp: float) -> QuantizedWeight:
    """``qw`` with each row's group scales re-solved against ``weight`` (the unquantized layer) on
    the damped Hessian (λ = damp · mean diag H, as in the quantizer)."""
    info = qw.info
    g = info.group_size
    rows, cols = qw.codes.shape
    ng = num_groups(cols, g)
    device = hessian.device
    h = hessian.to(dtype=torch.float64).clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    codes = qw.codes.to(device=device, dtype=torch.float64)
    group = torch.arange(cols, device=device) // g
    if info.zeros is not None:
        codes = codes - info.zeros.to(device=device, dtype=torch.float64)[:, group]
    d = codes * qw.mask.to(device)  # codes minus zero points; 0 on pruned weights
    w = weight.to(device=device, dtype=torch.float64)
    b = _group_sum(d * (w @ h), g, ng)  # (rows, ng)
    a = torch.empty(rows, ng, ng, dtype=torch.float64, device=device)
    for gi in range(ng):
        cs = slice(gi * g, min((gi + 1) * g, cols))
        a[:, :, gi] = _group_sum(d * (d[:, cs] @ h[cs, :]), g, ng)
    old = info.scales.to(device=device, dtype=torch.float64)
    active = torch.diagonal(a, dim1=1, dim2=2) > 0  # groups with a nonzero code
    pair = active.unsqueeze(2) & active.unsqueeze(1)
    eye = torch.eye(ng, dtype=torch.float64, device=device).expand_as(a)
    sol = torch.linalg.solve(torch.where(pair, a, eye), torch.where(active, b, old))
    new = torch.where(active & (sol > 0) & torch.isfinite(sol), sol, old)
    new16 = new.clamp(FP16_TINY, FP16_MAX).half()

    def row_error(s: Tensor) -> Tensor:  # ‖(w − ŵ)X‖² per row, up to the constant w H wᵀ
        s = s.to(torch.float64)
        return torch.einsum("rg,rgh,rh->r", s, a, s) - 2 * (s * b).sum(1)

    better = row_error(new16) < row_error(info.scales.to(device))
    scales = torch.where(better.unsqueeze(1), new16, info.scales.to(device)).cpu()
    return QuantizedWeight(qw.codes, QuantInfo(info.bits, g, info.symmetric, scales, info.zeros), qw.mask)
