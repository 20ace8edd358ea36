"""OWL (Yin et al., arXiv 2310.05175): non-uniform layer-wise sparsity from outlier ratios.

For every decoder block, the outlier ratio is the share of Wanda scores |W_ij|·‖X_j‖ of all its
linear layers (computed on the dense model) that exceed M times their mean. Blocks with more
outliers are pruned less: the ratios are rescaled to [0, 2λ], centred, and subtracted from the
target sparsity, so the block sparsities span [S−λ, S+λ] and their mean is exactly S (every block
has the same number of prunable weights in a decoder stack, so the model sparsity is S too).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import SparsecraftError
from .engine import SolveResult
from .masks import check_sparsity
from .stats import LayerStats
from .wanda import wanda_scores


def outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """Share of all entries of ``scores`` (taken together) above ``m`` × their mean."""
    total = sum(float(s.double().sum()) for s in scores)
    numel = sum(s.numel() for s in scores)
    if numel == 0:
        return 0.0
    threshold = m * total / numel
    return sum(int((s > threshold).sum()) for s in scores) / numel


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios: spread ±λ around ``sparsity``, mean exact."""
    check_sparsity(sparsity)
    if not (0.0 <= lam < 1.0):
        raise SparsecraftError(f"OWL lambda {lam}: must be in [0, 1) (the paper uses 0.08)")
    r = torch.tensor(list(ratios), dtype=torch.float64)
    if r.numel() == 0:
        return []
    span = float(r.max() - r.min())
    if span == 0.0:
        return [float(sparsity)] * r.numel()
    scaled = (r - r.min()) / span * (2 * lam)
    out = sparsity - (scaled - scaled.mean())
    if float(out.min()) < 0.0 or float(out.max()) >= 1.0:
        raise SparsecraftError(
            f"OWL: sparsity {sparsity} ± lambda {lam} leaves [0, 1) for some blocks "
            f"({float(out.min()):.3f}..{float(out.max()):.3f}); lower --owl-lambda"
        )
    return [float(x) for x in out]


class OutlierSolver:
    """Dense statistics walk: leaves weights unchanged, records each block's outlier ratio."""

    needs_hessian = False
    modifies_weights = False  # the dense walk reuses its statistics pass outputs

    def __init__(self, m: float = 5.0):
        if not m > 0:
            raise SparsecraftError(f"OWL M {m}: must be > 0 (the paper uses 5)")
        self.m = m
        self.ratios: dict[int, float] = {}
        self._scores: list[Tensor] = []

    def solve(self, name: str, layer: nn.Module, weight: Tensor, stats: LayerStats) -> SolveResult:
        self._scores.append(wanda_scores(weight, stats.sqnorm))
        return SolveResult(weight)

    def end_block(self, index: int) -> None:
        self.ratios[index] = outlier_ratio(self._scores, self.m)
        self._scores = []

    def block_report(self, index: int) -> dict:
        return {"outlier_ratio": f"{self.ratios.get(index, float('nan')):.4f}"}
