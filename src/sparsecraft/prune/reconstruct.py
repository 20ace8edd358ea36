"""Exact weight update for a fixed mask: the least-squares reconstruction of each row.

Given a layer W (rows, cols), the Hessian H ∝ Σ x xᵀ of its inputs and a keep-mask, the kept
weights that minimise the layer-wise error ‖(W − Ŵ)X‖² are, per row i with kept columns S,

    Ŵ_{i,S} = (W H)_{i,S} · (H_{S,S})⁻¹        (Ŵ = 0 outside S).

SparseGPT's sequential OBS update only approximates this (each pruned weight's error is spread
onto the columns to its right only), so re-solving on SparseGPT's own mask lowers the calibration
error. H is damped as in the solve (λ = percdamp · mean diag H), which keeps every H_{S,S} well
conditioned.

Rows keep different column sets, so there is no shared factorisation; direct per-row solves
cost rows · |S|³/3 (minutes per model on a CPU). Instead all rows run conjugate gradients at
once, each iteration one (rows, cols) × (cols, cols) product with the mask applied, preconditioned
by diag H and started from the given weights (SparseGPT's solution is already close).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


@torch.no_grad()
def masked_least_squares(
    weight: Tensor,
    hessian: Tensor,
    keep: Tensor,
    damp: float,
    start: Tensor | None = None,
    max_iters: int = 200,
    tol: float = 1e-3,
) -> tuple[Tensor, int]:
    """The kept weights of every row re-solved (float32, zero outside ``keep``), and the number
    of iterations run.

    ``damp``: the damping fraction of the mean Hessian diagonal (use the one the solve settled
    on). ``start``: initial kept weights (default: ``weight`` masked). Stops when every row's
    residual norm is below ``tol`` times its right-hand side's, or after ``max_iters``. On
    SmolLM2's layers tol 1e-3 ends within 0.004% of the optimum's error (12-39 iterations).
    """
    if weight.device.type == "cpu":  # big products: every core helps (the engine solves on one)
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or threads)
        try:
            return _solve(weight, hessian, keep, damp, start, max_iters, tol)
        finally:
            torch.set_num_threads(threads)
    return _solve(weight, hessian, keep, damp, start, max_iters, tol)


def _solve(weight, hessian, keep, damp, start, max_iters, tol) -> tuple[Tensor, int]:
    device = weight.device
    h = hessian.to(device=device, dtype=torch.float32).clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0  # dead inputs, as in the solve
    diag += damp * diag.mean()
    m = keep.to(device=device, dtype=torch.float32)
    w = weight.to(torch.float32)
    b = (w @ h) * m  # right-hand sides (W H)_S
    x = (w if start is None else start.to(torch.float32)) * m
    r = b - (x @ h) * m
    inv_d = (1.0 / diag).unsqueeze(0) * m
    z = r * inv_d
    p = z.clone()
    rz = (r * z).sum(1)
    limit = (tol * b.norm(dim=1)) ** 2
    iters = 0
    while iters < max_iters and bool(((r * r).sum(1) > limit).any()):
        q = (p @ h) * m
        pq = (p * q).sum(1)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(1e-30), torch.zeros_like(pq)).unsqueeze(1)
        x.add_(alpha * p)
        r.sub_(alpha * q)
        z = r * inv_d
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz)).unsqueeze(1)
        p = z + beta * p
        rz = rz_new
        iters += 1
    return x * m, iters
