"""Exact weight update for a fixed mask: the least-squares reconstruction of each row.

Given a layer W (rows, cols), the Hessian H ∝ Σ x xᵀ of its inputs and a keep-mask, the kept
weights that minimise the layer-wise error ‖(W − Ŵ)X‖² are, per row i with kept columns S,

    Ŵ_{i,S} = (W H)_{i,S} · (H_{S,S})⁻¹        (Ŵ = 0 outside S),

i.e. one small symmetric positive-definite solve per row. SparseGPT's sequential OBS update only
approximates this (each pruned weight's error is spread onto the columns to its right only), so
re-solving on SparseGPT's own mask can only lower the calibration error. H is damped as in the
solve (λ = percdamp · mean diag H), which also keeps every H_{S,S} well conditioned.

Rows keep different numbers of weights (SparseGPT chooses its mask per block over all rows), so
rows are solved in batches padded to the largest count: padded slots get an identity block and a
zero right-hand side, hence a zero solution.
"""

from __future__ import annotations

import torch
from torch import Tensor

# elements of one batch of padded row systems (rows × K × K), float64
CHUNK_ELEMENTS = 2**25


@torch.no_grad()
def masked_least_squares(weight: Tensor, hessian: Tensor, keep: Tensor, damp: float) -> Tensor:
    """The kept weights of every row re-solved exactly (float32 result, zero outside ``keep``).

    ``damp``: the damping fraction of the mean Hessian diagonal (use the one the solve settled
    on: H + λI is then positive definite, and so is every principal submatrix of it).
    """
    rows, cols = weight.shape
    device = weight.device
    h = hessian.to(device=device, dtype=torch.float64).clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0  # dead inputs, as in the solve
    diag += damp * diag.mean()
    w = weight.to(torch.float64)
    rhs_all = w @ h  # (W H)_i for every row
    keep = keep.to(device=device, dtype=torch.bool)
    counts = keep.sum(1)
    width = int(counts.max()) if rows else 0
    out = torch.zeros(rows, cols, dtype=torch.float64, device=device)
    if width == 0:
        return out.float()
    # kept columns first (in column order), then the pruned ones as padding
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=device).unsqueeze(0) < counts.unsqueeze(1)
    eye = torch.eye(width, dtype=torch.float64, device=device)
    step = max(1, CHUNK_ELEMENTS // (width * width))
    for r0 in range(0, rows, step):
        idx, ok = order[r0 : r0 + step], valid[r0 : r0 + step]
        pair = ok.unsqueeze(2) & ok.unsqueeze(1)
        a = torch.where(pair, h[idx.unsqueeze(2), idx.unsqueeze(1)], eye)
        b = torch.gather(rhs_all[r0 : r0 + step], 1, idx) * ok
        sol = torch.cholesky_solve(b.unsqueeze(2), torch.linalg.cholesky(a)).squeeze(2)
        out[r0 : r0 + step].scatter_(1, idx, sol * ok)
    return out.float()
