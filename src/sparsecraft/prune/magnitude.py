"""Magnitude pruning: drop the weights of smallest |W|, per layer or per output row."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..errors import SparsecraftError
from .engine import SolveResult
from .masks import LayerTarget, layer_mask, nm_mask, row_mask
from .stats import LayerStats


def magnitude_mask(weight: Tensor, target: LayerTarget, scope: str = "layer") -> Tensor:
    """Keep-mask of ``weight`` (out, in) by |W|. N:M always compares within each group."""
    scores = weight.abs()
    if target.nm is not None:
        return nm_mask(scores, *target.nm)
    if scope == "layer":
        return layer_mask(scores, target.sparsity)
    if scope == "row":
        return row_mask(scores, target.sparsity)
    raise SparsecraftError(f"magnitude scope {scope!r}: choose 'layer' or 'row'")


class MagnitudeSolver:
    """Engine solver; needs no statistics (the engine still measures the reconstruction error)."""

    needs_hessian = False

    def __init__(self, target_for: Callable[[str], LayerTarget], scope: str = "layer"):
        self.target_for = target_for
        self.scope = scope

    def solve(self, name: str, layer: nn.Module, weight: Tensor, stats: LayerStats) -> SolveResult:
        target = self.target_for(name)
        mask = magnitude_mask(weight, target, self.scope)
        return SolveResult(weight * mask, mask, {"target": target.sparsity})
