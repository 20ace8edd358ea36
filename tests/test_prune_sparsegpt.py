"""SparseGPT on single layers: beats magnitude/Wanda, exact sparsity, N:M, damping, dead inputs."""

import logging

import pytest
import torch

from sparsecraft.errors import SparsecraftError
from sparsecraft.prune.magnitude import magnitude_mask
from sparsecraft.prune.masks import LayerTarget, nm_valid, prune_count
from sparsecraft.prune.sparsegpt import inverse_cholesky, sparsegpt_prune
from sparsecraft.prune.stats import LayerStats, relative_error
from sparsecraft.prune.wanda import wanda_mask


def _layer(rows=48, cols=64, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few outlier channels, like LLM activations
    x = torch.randn(tokens, 16, generator=g) @ torch.randn(16, cols, generator=g)
    x += 0.5 * torch.randn(tokens, cols, generator=g)
    x[:, :3] *= 8
    w = torch.randn(rows, cols, generator=g)
    stats = LayerStats(cols, with_hessian=True)
    for chunk in x.split(512):
        stats.update(chunk)
    return w, x, stats


def _err(w, new, x):
    return float((x @ (w - new).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("target", [LayerTarget(0.5), LayerTarget(0.7), LayerTarget(nm=(2, 4))])
def test_sparsegpt_beats_magnitude_and_wanda(target):
    w, x, stats = _layer()
    new, keep, info = sparsegpt_prune(w, stats.hessian, target.sparsity, nm=target.nm, blocksize=16)
    mag = w * magnitude_mask(w, target)
    wan = w * wanda_mask(w, stats.sqnorm, target)
    e_sgpt, e_mag, e_wanda = _err(w, new, x), _err(w, mag, x), _err(w, wan, x)
    assert e_sgpt < e_wanda < e_mag
    # the exact Hessian form of the engine's error measure agrees with a direct computation
    assert relative_error(w, new, stats)[0] == pytest.approx(e_sgpt, rel=1e-3)
    assert torch.equal(new == 0, ~keep) or bool(((new == 0) | keep).all())
    assert not bool(new[~keep].any())


def test_sparsegpt_exact_count_per_block_and_segments():
    w, _, stats = _layer(rows=30, cols=40)
    new, keep, _ = sparsegpt_prune(w, stats.hessian, [0.5, 0.25], blocksize=16, segments=[10, 20])
    for start, stop, s in [(0, 10, 0.5), (10, 30, 0.25)]:
        for c0 in range(0, 40, 16):
            block = keep[start:stop, c0 : c0 + 16]
            assert int((~block).sum()) == prune_count(block.numel(), s)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 3)])
def test_sparsegpt_nm_valid(nm):
    w, _, stats = _layer(rows=8, cols=48)
    new, keep, _ = sparsegpt_prune(w, stats.hessian, nm=nm, blocksize=128)
    assert nm_valid(new, *nm)
    assert (keep.reshape(8, -1, nm[1]).sum(-1) == nm[0]).all()


def test_dead_inputs_are_zeroed_and_pruned_first():
    w, x, stats = _layer(rows=8, cols=32)
    h = stats.hessian.clone()
    h[5, :] = 0
    h[:, 5] = 0
    new, keep, info = sparsegpt_prune(w, h, 0.5, blocksize=8)
    assert info["dead_inputs"] == 1
    assert not keep[:, 5].any()
    assert torch.isfinite(new).all()


def test_non_pd_hessian_raises_damping_and_logs(caplog):
    h = torch.ones(16, 16)  # rank one
    h[0, 0] = -1.0  # indefinite beyond what 1% of the mean diagonal fixes
    with caplog.at_level(logging.WARNING):
        upper, damp, _ = inverse_cholesky(h, 0.01, name="layerX")
    assert damp > 0.01
    assert "layerX: Hessian not positive definite" in caplog.text
    assert torch.isfinite(upper).all()


def test_hopeless_hessian_is_an_error_not_a_fallback():
    h = torch.tensor([[1.0, 100.0], [100.0, 1.0]])  # eigenvalue -99: no sane damping fixes it
    with pytest.raises(SparsecraftError, match="not positive definite"):
        inverse_cholesky(h, 0.01, name="layerY")
    with pytest.raises(SparsecraftError, match="NaN or Inf"):
        inverse_cholesky(torch.full((4, 4), float("nan")), 0.01)


def test_bf16_hessian_partials_give_the_same_solution_quality():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.3 * torch.randn(
        4096, 64, generator=g
    )
    x = x.bfloat16()
    s32 = LayerStats(64, with_hessian=True)
    s16 = LayerStats(64, with_hessian=True, hessian_matmul_dtype=torch.bfloat16)
    for chunk in x.split(1024):
        s32.update(chunk)
        s16.update(chunk)
    w = torch.randn(32, 64, generator=g)
    e32 = relative_error(w, sparsegpt_prune(w, s32.hessian, 0.5)[0], s32)[0]
    e16 = relative_error(w, sparsegpt_prune(w, s16.hessian, 0.5)[0], s32)[0]
    # near-singular inputs (rank 8 + small noise) are the hard case for rounded partial sums
    assert e16 == pytest.approx(e32, rel=0.05)


@pytest.mark.parametrize("width", [12, 600])  # 600: the Hessian is summed in triangular blocks
def test_layer_stats_match_direct_computation(width):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, width, generator=g)
    flat = x.reshape(-1, width).double()
    for dtype in (torch.float32, torch.bfloat16):  # bf16: the fast mode's bf16 products
        st = LayerStats(width, with_hessian=True, hessian_matmul_dtype=torch.bfloat16)
        st.update(x[0].to(dtype))
        _ = st.hessian  # reading it in between must not disturb the sums that follow
        st.update(x[1:].to(dtype))
        ref = flat if dtype == torch.float32 else x.reshape(-1, width).to(dtype).double()
        assert st.count == 150
        exact = dtype == torch.float32
        rtol = 1e-5 if exact else 1e-2
        torch.testing.assert_close(st.mean.double(), ref.mean(0), rtol=rtol, atol=1e-5)
        torch.testing.assert_close(st.sqnorm.double(), (ref**2).sum(0), rtol=rtol, atol=1e-5)
        torch.testing.assert_close(st.hessian.double(), ref.T @ ref, rtol=rtol, atol=1e-4 if exact else 0.5)
        assert torch.equal(st.hessian, st.hessian.T)
        torch.testing.assert_close(st.scaled_hessian().double(), 2 / 150 * ref.T @ ref, rtol=rtol,
                                   atol=1e-5 if exact else 1e-2)
    torch.testing.assert_close(st.var.double(), ref.var(0, unbiased=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_exact_update_is_the_exact_row_solution(nm):
    """Equal to a per-row brute-force solve on the kept columns; zero elsewhere; the same mask as
    plain SparseGPT and never a larger layer-wise error than its update."""
    from sparsecraft.prune.reconstruct import masked_least_squares

    g = torch.Generator().manual_seed(3)
    rows, cols = 12, 32
    x = torch.randn(600, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    h = x.t() @ x
    w = torch.randn(rows, cols, generator=g)
    sparsity = 0.6 if nm is None else 0.5
    new, keep, info = sparsegpt_prune(w, h, sparsity, nm=nm, blocksize=8)
    exact, keep2, info2 = sparsegpt_prune(w, h, sparsity, nm=nm, blocksize=8, exact_update=True)
    assert torch.equal(keep, keep2) and 0 < info2["exact_update_iters"] < 200
    hinv = inverse_cholesky(h, info["damping"], with_inverse=True)[3]
    tight, iters = masked_least_squares(w, hinv, keep, tol=1e-12, max_iters=500)
    assert 0 < iters < 500
    assert torch.equal(tight != 0, keep)
    hd = h.double() + info["damping"] * h.diagonal().double().mean() * torch.eye(cols, dtype=torch.float64)
    for i in range(rows):
        s = keep[i].nonzero().squeeze(1)
        ref = torch.linalg.solve(hd[s][:, s], (w[i].double() @ hd)[s])
        torch.testing.assert_close(tight[i, s].double(), ref, rtol=1e-4, atol=1e-5)

    def err(a):
        d = (w - a).double()
        return float(((d @ hd) * d).sum())

    assert err(tight) <= err(exact) * (1 + 1e-6)
    assert err(exact) <= err(tight) * (1 + 1e-5)  # the default tolerance is close to the optimum
    assert err(exact) < err(new)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_equals_the_unbatched_column_loop(nm):
    """The lazy two-level updates give the textbook algorithm's result: every column processed in
    turn, each pruned weight's error spread at once onto all columns to its right."""
    w, _, stats = _layer(rows=20, cols=72, seed=5)
    h = stats.hessian
    new, keep, info = sparsegpt_prune(w, h, 0.6 if nm is None else 0.5, nm=nm, blocksize=32)
    upper = inverse_cholesky(h, info["damping"])[0].double()
    ref = w.double().clone()
    pruned = torch.zeros_like(keep)
    for i1 in range(0, 72, 32):
        i2 = min(i1 + 32, 72)
        d = torch.diagonal(upper)[i1:i2]
        if nm is None:  # the block's mask from the weights updated so far, exact count per block
            score = (ref[:, i1:i2] / d) ** 2
            k = prune_count(score.numel(), 0.6)
            block = torch.zeros(score.numel(), dtype=torch.bool)
            block[score.reshape(-1).argsort()[:k]] = True
            pruned[:, i1:i2] = block.view_as(score)
        for i in range(i1, i2):
            if nm is not None and (i - i1) % 4 == 0:
                score = (ref[:, i : i + 4] / d[i - i1 : i - i1 + 4]) ** 2
                pruned[:, i : i + 4].scatter_(1, score.argsort(1)[:, :2], True)
            err = ref[:, i] * pruned[:, i] / upper[i, i]
            ref[:, i:] -= err[:, None] * upper[i, i:][None, :]
    assert torch.equal(~keep, pruned)
    ref[pruned] = 0
    torch.testing.assert_close(new.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_exact_update_through_the_engine():
    from sparsecraft.models import build_random, prunable_linears, weight_matrix
    from sparsecraft.prune import PruneConfig, prune

    ids = torch.randint(3, 300, (4, 48), generator=torch.Generator().manual_seed(0))
    errs = {}
    for exact in (False, True):
        model, tok = build_random("tiny-llama")
        rep = prune(model, tok, PruneConfig(method="sparsegpt", sparsity=0.5, batch_size=2, blocksize=16,
                                            exact_update=exact), ids, progress=False)
        for layer in prunable_linears(model).values():
            assert abs(float((weight_matrix(layer) == 0).float().mean()) - 0.5) < 1e-3
        errs[exact] = rep["layers"][0]["rel_error"]  # block 0, q/k/v: identical inputs in both runs
    assert errs[True] <= errs[False]
    with pytest.raises(SparsecraftError, match="exact_update"):
        PruneConfig(method="wanda", sparsity=0.5, exact_update=True)
