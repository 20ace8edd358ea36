"""Mask selection from importance scores: pure functions, True = kept.

Every selector prunes an exact count, whatever the ties: below the k-th smallest score
everything goes, and among the scores equal to it the earliest positions go first, so the count
never drifts (a plain ``score <= t`` would prune every tied weight).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import SparsecraftError


def check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not (0.0 <= s < 1.0):
        raise SparsecraftError(f"sparsity {sparsity}: must be in [0, 1) (e.g. 0.5 for 50%)")
    return s


def check_nm(n: int, m: int) -> tuple[int, int]:
    if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 2 or n >= m:
        raise SparsecraftError(f"pattern {n}:{m}: need integers 1 <= N < M (e.g. 2:4 keeps 2 of every 4)")
    return n, m


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4)."""
    try:
        n_text, m_text = text.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise SparsecraftError(f"pattern {text!r}: write it as N:M, e.g. 2:4 or 4:8") from None
    return check_nm(n, m)


def prune_count(size: int, sparsity: float) -> int:
    """How many of ``size`` weights to prune for ``sparsity`` (nearest integer)."""
    return min(size, int(round(size * sparsity)))


def _lowest(scores: Tensor, k: int, check_nan: bool = True) -> Tensor:
    """Boolean mask of the ``k`` lowest entries along the last dim; among ties at the threshold
    the earliest positions are taken, so the count is exact (O(n) selection, no full sort)."""
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= scores.shape[-1]:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if check_nan and torch.isnan(scores).any():  # (a host sync: hot loops check their result instead)
        raise SparsecraftError("importance scores contain NaN (NaN weights or activations)")
    thresh = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    pruned = scores < thresh
    need = k - pruned.sum(-1, keepdim=True)
    tied = scores == thresh
    pruned |= tied & (torch.cumsum(tied, -1) <= need)
    return pruned


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep mask pruning exactly round(in · sparsity) lowest scores in every row."""
    check_sparsity(sparsity)
    return ~_lowest(scores.float(), prune_count(scores.shape[-1], sparsity))


def layer_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep mask pruning exactly round(numel · sparsity) lowest scores of the whole matrix."""
    check_sparsity(sparsity)
    flat = scores.float().reshape(-1)
    return ~_lowest(flat, prune_count(flat.numel(), sparsity)).reshape(scores.shape)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of each row."""
    check_nm(n, m)
    rows, cols = scores.shape
    if cols % m:
        raise SparsecraftError(f"input size {cols} is not divisible by M={m}: {n}:{m} does not apply")
    groups = scores.float().reshape(rows, cols // m, m)
    return (~_lowest(groups, m - n)).reshape(rows, cols)


def variant_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Wanda's "variant": each row prunes its lowest scores up to a share α of the row's total
    score, with one α for the whole layer chosen so that the layer sparsity is exact.

    For a given α, row r prunes the prefix of its ascending scores whose cumulative share
    c_rj = cumsum_rj / total_r is ≤ α. Since c_rj grows along the prefix, the union of those
    prefixes for the α that prunes exactly K weights is the set of the K smallest c_rj of the
    layer: one global selection instead of the paper's bisection on α.
    """
    check_sparsity(sparsity)
    s = scores.float()
    sorted_scores, order = torch.sort(s, dim=-1, stable=True)
    total = sorted_scores.sum(-1, keepdim=True)
    share = torch.cumsum(sorted_scores, -1) / torch.where(total > 0, total, torch.ones_like(total))
    flat_pruned = _lowest(share.reshape(-1), prune_count(s.numel(), sparsity)).reshape(s.shape)
    pruned = torch.zeros_like(flat_pruned).scatter_(-1, order, flat_pruned)
    return ~pruned


def mask_sparsity(mask: Tensor) -> float:
    return 1.0 - mask.float().mean().item()


def nm_valid(weight_or_mask: Tensor, n: int, m: int) -> bool:
    """Every group of ``m`` consecutive inputs in every row holds at most ``n`` non-zeros."""
    nz = weight_or_mask != 0
    rows, cols = nz.shape
    if cols % m:
        return False
    return bool((nz.reshape(rows, cols // m, m).sum(-1) <= n).all())


class LayerTarget:
    """What one layer must become: unstructured at ``sparsity``, or N:M when ``nm`` is set."""

    __slots__ = ("nm", "sparsity")

    def __init__(self, sparsity: float = 0.0, nm: tuple[int, int] | None = None):
        self.nm = check_nm(*nm) if nm is not None else None
        self.sparsity = 1.0 - nm[0] / nm[1] if nm is not None else check_sparsity(sparsity)

    def __repr__(self) -> str:
        return f"LayerTarget({self.nm[0]}:{self.nm[1]})" if self.nm else f"LayerTarget({self.sparsity:.4g})"
