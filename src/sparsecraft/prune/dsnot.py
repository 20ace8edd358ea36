"""DSnoT: training-free prune-and-grow refinement of an existing mask (arXiv 2310.08915).

For output row ``i`` of a linear layer with input ``x`` the *expected reconstruction error* is

    e_i = sum_j (dense_ij - sparse_ij) * E[x_j]

(the dense layer's expected output minus the sparse one's; with SparseGPT the kept weights differ
from dense, so the sum runs over every column, not just the pruned ones).  Each cycle, in every
row that is still active, one swap is made:

* grow the pruned weight ``j`` whose contribution ``g_j = dense_ij * E[x_j]`` has the sign of
  ``e_i`` (so growing it moves ``e_i`` towards 0) and maximises ``|g_j| / Var[x_j]^gamma``: a large
  expected reduction of the error that is also reliable across inputs;
* prune the kept weight ``k`` of lowest Wanda importance ``|sparse_ik| * ||X_k||`` whose
  contribution ``p_k = sparse_ik * E[x_k]`` has the opposite sign of ``e_i`` (pruning it moves
  ``e_i`` towards 0 as well);

so ``e_i <- e_i - g_j + p_k``.  A row stops for good when ``|e_i|`` is at most the threshold, when
the swap would flip the sign of ``e_i`` (the paper's same-sign check; switch it off with
``without_same_sign``), when it has no candidate left, or after ``max_cycles`` cycles.  A weight
changes state at most once per refinement (a grown weight is never re-pruned, a newly pruned one
never re-grown), which rules out oscillation and lets the unstructured path pre-rank its
candidates once.  For N:M the grown and the pruned weight lie in the same M-group, so each
group keeps its count of kept weights; the row picks its best growth among groups that still
offer a pruning candidate.

All rows are processed in parallel; a row that has stopped stays unchanged.  Statistics come
from the engine's :class:`~sparsecraft.prune.stats.LayerStats` (``mean``, ``var``, ``sqnorm``,
``count``) accumulated in float32 over the calibration tokens.

Differences from the reference implementation, on purpose: the pruning candidates are ranked by
the current (possibly SparseGPT-updated) kept values, candidate lists never run past their end
(a row without a candidate simply stops), and zero-variance or dead input channels are handled
explicitly (no division by zero, no NaN/Inf).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..errors import SparsecraftError

__all__ = ["DSnoTConfig", "DSnoTStats", "TraceFn", "dsnot_refine", "expected_error"]

# Variance ratios below this (relative to the mean non-zero variance) are treated as this value:
# a zero-variance channel with a non-zero mean is the most reliable growth candidate there is,
# but must not give an infinite score.
_VAR_FLOOR = 1e-6
# Upper bound of the variance weight Var^-gamma (in units of the mean variance) so scores stay
# finite for any gamma.
_MAX_VAR_WEIGHT = 1e30


class DSnoTStats(Protocol):
    """What DSnoT reads from the engine's per-layer statistics (``LayerStats`` satisfies it)."""

    @property
    def count(self) -> int | float | Tensor: ...

    @property
    def mean(self) -> Tensor: ...

    @property
    def var(self) -> Tensor: ...

    @property
    def sqnorm(self) -> Tensor: ...


# trace(cycle, error, weight, mask): called after each cycle (1-based) with the running error
# (out,) float64 and the live working weight and mask; they must not be modified.
TraceFn = Callable[[int, Tensor, Tensor, Tensor], None]


@dataclass(frozen=True)
class DSnoTConfig:
    """Settings of the DSnoT refinement.

    max_cycles: at most this many prune-and-grow swaps per row (the paper's default is 50).
    update_threshold: a row stops once |e| is at most this (absolute, in output units).
    pow_of_var_regrowing: gamma in the growth score |dense_ij E[x_j]| / Var[x_j]^gamma (0 ignores
        the variance).
    skip_layer: regular expressions (``re.search`` on the model-relative layer name, as for the
        engine's ``ignore``) of layers that are not refined; None or empty refines every layer.
    without_same_sign: if True, a swap is made even when it flips the sign of e (the paper's
        ablation); by default a row stops instead.
    """

    max_cycles: int = 50
    update_threshold: float = 0.1
    pow_of_var_regrowing: float = 1.0
    skip_layer: str | tuple[str, ...] | None = None
    without_same_sign: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_cycles, bool) or not isinstance(self.max_cycles, int) or self.max_cycles < 0:
            raise SparsecraftError(
                f"DSnoT max_cycles={self.max_cycles!r}: expected a non-negative integer (default 50)"
            )
        thr = self.update_threshold
        if isinstance(thr, bool) or not isinstance(thr, int | float) or not math.isfinite(thr) or thr < 0:
            raise SparsecraftError(
                f"DSnoT update_threshold={thr!r}: expected a finite number >= 0 (default 0.1)"
            )
        gamma = self.pow_of_var_regrowing
        if (
            isinstance(gamma, bool)
            or not isinstance(gamma, int | float)
            or not math.isfinite(gamma)
            or gamma < 0
        ):
            raise SparsecraftError(
                f"DSnoT pow_of_var_regrowing={gamma!r}: expected a finite number >= 0 (default 1.0)"
            )
        if not isinstance(self.without_same_sign, bool):
            raise SparsecraftError(
                f"DSnoT without_same_sign={self.without_same_sign!r}: expected True or False"
            )
        patterns = self.skip_patterns
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise SparsecraftError(
                    f"DSnoT skip_layer pattern {p!r}: not a valid regular expression ({exc})"
                ) from None

    @property
    def skip_patterns(self) -> tuple[str, ...]:
        skip = self.skip_layer
        if skip is None:
            return ()
        if isinstance(skip, str):
            return (skip,)
        if isinstance(skip, Sequence) and all(isinstance(p, str) for p in skip):
            return tuple(skip)
        raise SparsecraftError(
            f"DSnoT skip_layer={skip!r}: expected None, a regular expression or a list of them "
            "(e.g. 'mlp' or ['q_proj', 'k_proj'])"
        )

    def applies_to(self, name: str) -> bool:
        """Whether the layer with this model-relative name is refined (not matched by skip_layer)."""
        return not any(re.search(p, name) for p in self.skip_patterns)


def expected_error(dense: Tensor, sparse: Tensor, mean: Tensor) -> Tensor:
    """e = (dense - sparse) @ E[x] per output row, in float64 (out,)."""
    return (dense.double() - sparse.double()) @ mean.double()


def _check_inputs(
    dense: Tensor, sparse: Tensor, mask: Tensor, stats: DSnoTStats, nm: tuple[int, int] | None
) -> tuple[Tensor, Tensor, Tensor]:
    if dense.dim() != 2:
        raise SparsecraftError(
            f"dsnot_refine: dense weight must be 2-D (out, in), got shape {tuple(dense.shape)}"
        )
    if sparse.shape != dense.shape or mask.shape != dense.shape:
        raise SparsecraftError(
            f"dsnot_refine: dense {tuple(dense.shape)}, sparse {tuple(sparse.shape)} and mask "
            f"{tuple(mask.shape)} must have the same (out, in) shape"
        )
    if mask.dtype != torch.bool:
        raise SparsecraftError(f"dsnot_refine: mask must be a bool tensor (True = kept), got {mask.dtype}")
    n_in = dense.shape[1]
    count = float(stats.count)
    if not count > 0:
        raise SparsecraftError(
            "dsnot_refine: the layer's statistics hold no calibration tokens (count=0); "
            "run calibration inputs through the layer first"
        )
    mean = stats.mean.detach().to(device=dense.device, dtype=torch.float32).reshape(-1)
    var = stats.var.detach().to(device=dense.device, dtype=torch.float32).reshape(-1)
    sqnorm = stats.sqnorm.detach().to(device=dense.device, dtype=torch.float32).reshape(-1)
    for label, v in (("mean", mean), ("var", var), ("sqnorm", sqnorm)):
        if v.numel() != n_in:
            raise SparsecraftError(
                f"dsnot_refine: statistics {label} has {v.numel()} entries but the weight has {n_in} inputs"
            )
        if not bool(torch.isfinite(v).all()):
            raise SparsecraftError(
                f"dsnot_refine: statistics {label} contain NaN or Inf; check the calibration activations"
            )
    if nm is not None:
        n, m = nm
        if not (isinstance(n, int) and isinstance(m, int) and 0 <= n < m):
            raise SparsecraftError(f"dsnot_refine: N:M pattern {n}:{m} needs integers 0 <= N < M (e.g. 2:4)")
        if n_in % m:
            raise SparsecraftError(
                f"dsnot_refine: input size {n_in} is not divisible by M={m}; an N:M swap needs whole groups"
            )
    return mean, var.clamp_min(0), sqnorm.clamp_min(0)


def _growth_score(dense: Tensor, mean: Tensor, var: Tensor, gamma: float) -> Tensor:
    """Signed growth score dense_ij E[x_j] / Var[x_j]^gamma (out, in), finite everywhere."""
    contrib = dense * mean
    if gamma == 0:
        return contrib
    positive = var[var > 0]
    ref = positive.mean() if positive.numel() else var.new_tensor(1.0)
    # Only the ranking within a row matters, so dividing by the mean variance first keeps the
    # weights in a safe range; the floor handles zero-variance channels.
    rel = (var / ref).clamp_min(_VAR_FLOOR)
    weight = torch.exp(-gamma * torch.log(rel)).clamp_max(_MAX_VAR_WEIGHT)
    return torch.nan_to_num(
        contrib * weight,
        nan=0.0,
        posinf=torch.finfo(torch.float32).max,
        neginf=-torch.finfo(torch.float32).max,
    )


_NEG_INF = float("-inf")


def dsnot_refine(
    dense: Tensor,
    sparse: Tensor,
    mask: Tensor,
    stats: DSnoTStats,
    config: DSnoTConfig,
    nm: tuple[int, int] | None = None,
    *,
    trace: TraceFn | None = None,
) -> tuple[Tensor, Tensor]:
    """Refine a layer's mask by prune-and-grow swaps that reduce the expected reconstruction error.

    dense, sparse: (out, in) float weights; ``sparse`` holds the method's kept values (zeros are
    forced where ``mask`` is False).  mask: (out, in) bool, True = kept.  nm: (N, M) for N:M
    patterns (swaps stay inside one M-group) or None for unstructured.  Returns (weight, mask):
    a grown weight takes its dense value, a newly pruned one becomes 0, the other kept weights
    keep their ``sparse`` value; every row (and every M-group) keeps its number of kept weights.
    The inputs are not modified.  Deterministic.
    """
    mean, var, sqnorm = _check_inputs(dense, sparse, mask, stats, nm)
    dense = dense.detach().float()
    mask = mask.detach().clone()
    weight = sparse.detach().float().masked_fill(~mask, 0.0)
    if config.max_cycles == 0 or dense.numel() == 0:
        return weight, mask

    error = expected_error(dense, weight, mean)
    if not bool(torch.isfinite(error).all()):
        raise SparsecraftError("dsnot_refine: the weights contain NaN or Inf; refusing to refine")

    score = _growth_score(dense, mean, var, float(config.pow_of_var_regrowing))
    # Growth keys are "larger is better" for both signs of e; non-candidates are -inf.
    pruned = ~mask
    grow_pos = torch.where(pruned & (score > 0), score, _NEG_INF)
    grow_neg = torch.where(pruned & (score < 0), -score, _NEG_INF)
    del score
    # Pruning keys: lowest Wanda importance first (stored negated so larger is better).  Pruning a
    # weight with contribution p changes e by +p, so for e > 0 we need p < 0 and vice versa.
    contrib_kept = weight * mean
    neg_wanda = -(weight.abs() * sqnorm.sqrt())
    prune_for_pos = torch.where(mask & (contrib_kept < 0), neg_wanda, _NEG_INF)  # used when e > 0
    prune_for_neg = torch.where(mask & (contrib_kept > 0), neg_wanda, _NEG_INF)  # used when e < 0
    del contrib_kept, neg_wanda, pruned

    if nm is None:
        _refine_unstructured(
            dense, weight, mask, mean, error, grow_pos, grow_neg, prune_for_pos, prune_for_neg, config, trace
        )
    else:
        _refine_nm(
            dense,
            weight,
            mask,
            mean,
            error,
            grow_pos,
            grow_neg,
            prune_for_pos,
            prune_for_neg,
            nm[1],
            config,
            trace,
        )
    return weight, mask


def _ranked(keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best (largest key) columns per row, best first, and how many of them are candidates."""
    # A stable descending sort gives ties in column order, hence a deterministic result.
    _, order = torch.sort(keys, dim=1, descending=True, stable=True)
    order = order[:, :k].contiguous()
    valid = torch.isfinite(keys).sum(dim=1).clamp_max(k)
    return order, valid


def _swap_step(
    dense: Tensor,
    weight: Tensor,
    mask: Tensor,
    mean: Tensor,
    error: Tensor,
    active: Tensor,
    have: Tensor,
    grow_idx: Tensor,
    prune_idx: Tensor,
    positive: Tensor,
    config: DSnoTConfig,
) -> Tensor:
    """Decide and apply one swap per row; returns the rows that swapped (and updates ``active``)."""
    rows = torch.arange(dense.shape[0], device=dense.device)
    g = dense[rows, grow_idx].double() * mean[grow_idx].double()
    p = weight[rows, prune_idx].double() * mean[prune_idx].double()
    after = error - g + p
    go = active & have & (error.abs() > config.update_threshold)
    if not config.without_same_sign:
        # stop rather than overshoot: the error must keep its sign (or land exactly on 0)
        go &= torch.where(positive, after >= 0, after <= 0)
    active &= go
    if bool(go.any()):
        r = rows[go]
        gi, pi = grow_idx[go], prune_idx[go]
        mask[r, gi] = True
        weight[r, gi] = dense[r, gi]
        mask[r, pi] = False
        weight[r, pi] = 0.0
        error[go] = after[go]
    return go


def _refine_unstructured(
    dense: Tensor,
    weight: Tensor,
    mask: Tensor,
    mean: Tensor,
    error: Tensor,
    grow_pos: Tensor,
    grow_neg: Tensor,
    prune_for_pos: Tensor,
    prune_for_neg: Tensor,
    config: DSnoTConfig,
    trace: TraceFn | None,
) -> None:
    # Each row makes at most max_cycles swaps and a weight changes state at most once, so the
    # max_cycles best candidates of each of the four kinds, ranked once, are all a row can use.
    k = min(config.max_cycles, dense.shape[1])
    lists = [_ranked(t, k) for t in (grow_pos, grow_neg, prune_for_pos, prune_for_neg)]
    (gp, gp_n), (gn, gn_n), (pp, pp_n), (pn, pn_n) = lists
    out = dense.shape[0]
    ptr = torch.zeros(4, out, dtype=torch.long, device=dense.device)  # next unused entry per list
    active = torch.ones(out, dtype=torch.bool, device=dense.device)
    for cycle in range(1, config.max_cycles + 1):
        positive = error > 0
        g_ptr = torch.where(positive, ptr[0], ptr[1])
        p_ptr = torch.where(positive, ptr[2], ptr[3])
        have = torch.where(positive, (g_ptr < gp_n) & (p_ptr < pp_n), (g_ptr < gn_n) & (p_ptr < pn_n))
        gc, pc = g_ptr.clamp_max(k - 1).unsqueeze(1), p_ptr.clamp_max(k - 1).unsqueeze(1)
        grow_idx = torch.where(positive, gp.gather(1, gc).squeeze(1), gn.gather(1, gc).squeeze(1))
        prune_idx = torch.where(positive, pp.gather(1, pc).squeeze(1), pn.gather(1, pc).squeeze(1))
        went = _swap_step(
            dense, weight, mask, mean, error, active, have, grow_idx, prune_idx, positive, config
        )
        step = went.long()
        ptr[0] += step * positive
        ptr[1] += step * ~positive
        ptr[2] += step * positive
        ptr[3] += step * ~positive
        if trace is not None:
            trace(cycle, error, weight, mask)
        if not bool(active.any()):
            break


def _refine_nm(
    dense: Tensor,
    weight: Tensor,
    mask: Tensor,
    mean: Tensor,
    error: Tensor,
    grow_pos: Tensor,
    grow_neg: Tensor,
    prune_for_pos: Tensor,
    prune_for_neg: Tensor,
    m: int,
    config: DSnoTConfig,
    trace: TraceFn | None,
) -> None:
    out, n_in = dense.shape
    groups = n_in // m
    dev = dense.device
    keys = (grow_pos, grow_neg, prune_for_pos, prune_for_neg)
    g3 = [t.view(out, groups, m) for t in keys]

    def group_scores(gp: Tensor, gn: Tensor, pp: Tensor, pn: Tensor) -> tuple[Tensor, Tensor]:
        # a group offers a swap for e > 0 if it has a positive growth and a pruning candidate
        # for e > 0; its score is its best growth key
        best_gp = gp.amax(dim=-1)
        best_gn = gn.amax(dim=-1)
        ok_p = torch.isfinite(pp.amax(dim=-1))
        ok_n = torch.isfinite(pn.amax(dim=-1))
        return (torch.where(ok_p, best_gp, _NEG_INF), torch.where(ok_n, best_gn, _NEG_INF))

    score_pos, score_neg = group_scores(*g3)
    rows = torch.arange(out, device=dev)
    offs = torch.arange(m, device=dev)
    active = torch.ones(out, dtype=torch.bool, device=dev)
    for cycle in range(1, config.max_cycles + 1):
        positive = error > 0
        vp, ip = score_pos.max(dim=1)
        vn, in_ = score_neg.max(dim=1)
        have = torch.where(positive, torch.isfinite(vp), torch.isfinite(vn))
        grp = torch.where(positive, ip, in_)
        cols = grp.unsqueeze(1) * m + offs  # (out, m) columns of the chosen group
        gkey = torch.where(positive.unsqueeze(1), grow_pos.gather(1, cols), grow_neg.gather(1, cols))
        pkey = torch.where(
            positive.unsqueeze(1), prune_for_pos.gather(1, cols), prune_for_neg.gather(1, cols)
        )
        grow_idx = cols.gather(1, gkey.argmax(dim=1, keepdim=True)).squeeze(1)
        prune_idx = cols.gather(1, pkey.argmax(dim=1, keepdim=True)).squeeze(1)
        went = _swap_step(
            dense, weight, mask, mean, error, active, have, grow_idx, prune_idx, positive, config
        )
        if bool(went.any()):
            r, gi, pi = rows[went], grow_idx[went], prune_idx[went]
            # each weight changes state once: the grown one stops being a growth candidate, the
            # pruned one a pruning candidate
            grow_pos[r, gi] = _NEG_INF
            grow_neg[r, gi] = _NEG_INF
            prune_for_pos[r, pi] = _NEG_INF
            prune_for_neg[r, pi] = _NEG_INF
            gsel = grp[went]
            sub = [t.view(out, groups, m)[r, gsel].unsqueeze(1) for t in keys]
            sp, sn = group_scores(*sub)
            score_pos[r, gsel] = sp.squeeze(1)
            score_neg[r, gsel] = sn.squeeze(1)
        if trace is not None:
            trace(cycle, error, weight, mask)
        if not bool(active.any()):
            break
