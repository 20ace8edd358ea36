"""Wanda (Sun et al., arXiv 2306.11695): score |W_ij| · ‖X_j‖₂, compared within each output row.

The "variant" option is the paper's adaptive alternative: one share α of each row's total score
is pruned in every row, α chosen for the whole layer so the layer sparsity is exact (see
:func:`~sparsecraft.prune.masks.variant_mask`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .engine import SolveResult
from .masks import LayerTarget, nm_mask, row_mask, variant_mask
from .stats import LayerStats


def wanda_scores(weight: Tensor, sqnorm: Tensor) -> Tensor:
    """|W| · ‖X_j‖ for (out, in) weights and the (in,) squared input column norms."""
    return weight.abs() * torch.sqrt(sqnorm.to(weight.device, torch.float32).clamp_min(0)).unsqueeze(0)


def wanda_mask(weight: Tensor, sqnorm: Tensor, target: LayerTarget, variant: bool = False) -> Tensor:
    scores = wanda_scores(weight, sqnorm)
    if target.nm is not None:
        return nm_mask(scores, *target.nm)
    if variant:
        return variant_mask(scores, target.sparsity)
    return row_mask(scores, target.sparsity)


class WandaSolver:
    needs_hessian = False

    def __init__(self, target_for: Callable[[str], LayerTarget], variant: bool = False):
        self.target_for = target_for
        self.variant = variant

    def solve(self, name: str, layer: nn.Module, weight: Tensor, stats: LayerStats) -> SolveResult:
        target = self.target_for(name)
        mask = wanda_mask(weight, stats.sqnorm, target, self.variant)
        return SolveResult(weight * mask, mask, {"target": target.sparsity})
