"""Exact weight update for a fixed mask: the least-squares reconstruction of each row.

Given a layer W (rows, cols), the damped Hessian H ∝ Σ x xᵀ + λI of its inputs and a keep-mask,
the weights Ŵ that minimise the layer-wise error (W − Ŵ) H (W − Ŵ)ᵀ with Ŵ = 0 on each row's
pruned columns P are (the optimal brain surgeon update for removing all of P at once)

    Ŵ = W − y H⁻¹,    y (H⁻¹)_{P,P} = W_P        (y zero outside P).

SparseGPT's sequential update only approximates this (each pruned weight's error is spread onto
the columns to its right only), so re-solving on SparseGPT's own mask lowers the calibration
error. Rows prune different columns, so there is no shared factorisation; direct per-row solves
cost rows · |P|³/3 (minutes per model on a CPU). Instead all rows run preconditioned conjugate
gradients at once, each iteration one (rows, cols) × (cols, cols) product with the mask applied.

Why this system and not the kept-weight one, H_{S,S} Ŵ_S = (W H)_S: on SmolLM2's layers CG on
(H⁻¹)_{P,P}, started at zero, reaches a given error 2-8× sooner than CG on H_{S,S} started at
SparseGPT's solution (both with the diagonal as preconditioner).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


@torch.no_grad()
def masked_least_squares(
    weight: Tensor,
    hessian_inverse: Tensor,
    keep: Tensor,
    max_iters: int = 200,
    tol: float = 1e-6,
) -> tuple[Tensor, int]:
    """The weights of every row re-solved on its ``keep`` columns (float32, zero elsewhere), and
    the number of iterations run.

    ``hessian_inverse``: (H + λI)⁻¹, the damped Hessian's inverse (``inverse_cholesky(...,
    with_inverse=True)``). Stops when an iteration lowers the layer's error by less than ``tol``
    times the error removed so far, or after ``max_iters``. On SmolLM2's layers tol 1e-6 ends
    within 1e-5 of the optimum's error (11-20 iterations).
    """
    if weight.device.type == "cpu":  # big products: every core helps (the engine solves on one)
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or threads)
        try:
            return _solve(weight, hessian_inverse, keep, max_iters, tol)
        finally:
            torch.set_num_threads(threads)
    return _solve(weight, hessian_inverse, keep, max_iters, tol)


def _solve(weight, hessian_inverse, keep, max_iters, tol) -> tuple[Tensor, int]:
    a = hessian_inverse.to(torch.float32)
    w = weight.to(device=a.device, dtype=torch.float32)
    m = (~keep).to(device=a.device, dtype=torch.float32)  # the unknowns: the pruned columns
    b = w * m
    y = torch.zeros_like(b)
    r = b.clone()
    inv_d = (1.0 / torch.diagonal(a)).unsqueeze(0) * m
    z = r * inv_d
    p = z.clone()
    rz = (r * z).sum(1)
    # With y0 = 0, y·b grows monotonically to the error that the optimum removes, and each
    # iteration adds α·rᵀz to it: their ratio says when further iterations stop paying.
    removed = torch.zeros((), dtype=torch.float64, device=a.device)
    iters = 0
    while iters < max_iters:
        q = (p @ a) * m
        pq = (p * q).sum(1)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(1e-30), torch.zeros_like(pq))
        y.addcmul_(alpha.unsqueeze(1), p)
        r.addcmul_(alpha.unsqueeze(1), q, value=-1.0)
        step = (alpha * rz).sum().double()
        removed += step
        iters += 1
        if bool(step <= tol * removed):
            break
        z = r * inv_d
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta.unsqueeze(1) * p
        rz = rz_new
    return (w - y @ a) * (1.0 - m), iters
