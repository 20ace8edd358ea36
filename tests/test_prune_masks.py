"""Mask selectors against brute force (stable-sort references), ties included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecraft.errors import SparsecraftError
from sparsecraft.prune.masks import (
    LayerTarget,
    layer_mask,
    nm_mask,
    nm_valid,
    parse_pattern,
    prune_count,
    row_mask,
    variant_mask,
)


def _scores(rows, cols, seed, levels):
    g = torch.Generator().manual_seed(seed)
    # few distinct levels -> many ties; a continuous draw otherwise
    if levels:
        return torch.randint(0, levels, (rows, cols), generator=g).float()
    return torch.rand(rows, cols, generator=g)


def _ref_lowest_rows(scores, k):
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: (scores[r, j].item(), j))
        for j in order[:k]:
            pruned[r, j] = True
    return ~pruned


shapes = st.tuples(st.integers(1, 7), st.integers(1, 24), st.integers(0, 10_000), st.sampled_from([0, 2, 3]))


@settings(max_examples=40, deadline=None)
@given(shapes, st.floats(0.0, 0.99))
def test_row_mask_matches_brute_force(shape, sparsity):
    rows, cols, seed, levels = shape
    s = _scores(rows, cols, seed, levels)
    mask = row_mask(s, sparsity)
    k = prune_count(cols, sparsity)
    assert torch.equal(mask, _ref_lowest_rows(s, k))
    assert (mask.sum(1) == cols - k).all()


@settings(max_examples=40, deadline=None)
@given(shapes, st.floats(0.0, 0.99))
def test_layer_mask_matches_brute_force(shape, sparsity):
    rows, cols, seed, levels = shape
    s = _scores(rows, cols, seed, levels)
    mask = layer_mask(s, sparsity)
    k = prune_count(rows * cols, sparsity)
    ref = _ref_lowest_rows(s.reshape(1, -1), k).reshape(rows, cols)
    assert torch.equal(mask, ref)
    assert int((~mask).sum()) == k


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 5),
    st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 3), (3, 5)]),
    st.integers(0, 10_000),
    st.sampled_from([0, 2]),
)
def test_nm_mask_matches_brute_force(rows, groups, nm, seed, levels):
    n, m = nm
    s = _scores(rows, groups * m, seed, levels)
    mask = nm_mask(s, n, m)
    ref = _ref_lowest_rows(s.reshape(-1, m), m - n).reshape(rows, groups * m)
    assert torch.equal(mask, ref)
    assert nm_valid(mask, n, m)
    assert (mask.reshape(rows, groups, m).sum(-1) == n).all()


def _ref_variant(s, sparsity):
    """Reference: every row's cumulative shares (same float32 arithmetic), the k smallest of the
    layer taken one by one in (share, position) order."""
    rows, cols = s.shape
    k = prune_count(rows * cols, sparsity)
    entries = []
    for r in range(rows):
        order = sorted(range(cols), key=lambda j: (s[r, j].item(), j))
        shares = torch.cumsum(s[r, order], 0) / s[r, order].sum()
        for j, share in zip(order, shares.tolist()):
            entries.append((share, r * cols + j, r, j))
    entries.sort(key=lambda e: (e[0], e[1]))
    pruned = torch.zeros_like(s, dtype=torch.bool)
    for _, _, r, j in entries[:k]:
        pruned[r, j] = True
    return ~pruned


@settings(max_examples=30, deadline=None)
@given(shapes, st.floats(0.0, 0.95))
def test_variant_mask_exact_count_and_prefix(shape, sparsity):
    rows, cols, seed, _ = shape
    s = _scores(rows, cols, seed, 0)  # continuous: cumulative shares have no float ties
    mask = variant_mask(s, sparsity)
    assert int((~mask).sum()) == prune_count(rows * cols, sparsity)
    # each row prunes a prefix of its ascending scores
    for r in range(rows):
        pruned_max = s[r][~mask[r]].max() if (~mask[r]).any() else -1
        kept_min = s[r][mask[r]].min() if mask[r].any() else 2
        assert pruned_max <= kept_min
    assert torch.equal(mask, _ref_variant(s, sparsity))


def test_all_zero_scores_still_hit_exact_count():
    s = torch.zeros(3, 16)
    assert int((~row_mask(s, 0.5)).sum()) == 24
    assert int((~layer_mask(s, 0.25)).sum()) == 12
    assert int((~variant_mask(s, 0.5)).sum()) == 24
    assert nm_valid(nm_mask(s, 2, 4), 2, 4)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_sparsity_message(bad):
    with pytest.raises(SparsecraftError, match=r"sparsity .* must be in \[0, 1\)"):
        row_mask(torch.rand(2, 4), bad)


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "2-4", "a:b"])
def test_bad_pattern_message(text):
    with pytest.raises(SparsecraftError, match="pattern"):
        parse_pattern(text)


def test_nm_indivisible_width_is_refused():
    with pytest.raises(SparsecraftError, match="not divisible by M=4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_layer_target():
    assert LayerTarget(nm=(2, 4)).sparsity == 0.5
    assert LayerTarget(0.7).nm is None
    with pytest.raises(SparsecraftError):
        LayerTarget(1.2)
