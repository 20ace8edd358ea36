"""DSnoT refinement: running error, invariants, brute-force agreement, degenerate inputs."""

from __future__ import annotations

import pytest
import torch

from sparsecraft.errors import SparsecraftError
from sparsecraft.prune.dsnot import DSnoTConfig, dsnot_refine, expected_error
from sparsecraft.prune.stats import LayerStats


def _stats(x: torch.Tensor) -> LayerStats:
    """The engine's statistics object, accumulated in batches as the engine does."""
    stats = LayerStats(x.shape[1])
    for chunk in x.split(16):
        stats.update(chunk)
    return stats


def _layer(out=12, n_in=32, nsamples=64, seed=0, offset=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g)
    # non-zero-mean inputs with channel-dependent scale: the regime DSnoT targets
    x = offset * torch.randn(n_in, generator=g) + torch.randn(nsamples, n_in, generator=g) * (
        0.3 + torch.rand(n_in, generator=g)
    )
    return w, x


def _wanda_mask(w, x, sparsity=None, nm=None):
    score = w.abs() * x.norm(dim=0)
    if nm is None:
        k = int(w.shape[1] * sparsity)
        idx = torch.sort(score, dim=1, stable=True)[1][:, :k]
        return torch.ones_like(w, dtype=torch.bool).scatter_(1, idx, False)
    n, m = nm
    g = score.view(w.shape[0], -1, m)
    idx = torch.topk(g, m - n, dim=-1, largest=False)[1]
    return torch.ones_like(g, dtype=torch.bool).scatter_(-1, idx, False).view_as(w)


def _brute(dense, sparse, mask, stats, cfg: DSnoTConfig, nm=None):
    """One row at a time, every candidate re-examined every cycle: the rule written plainly."""
    dense, sparse = dense.double(), sparse.double()
    mean, var, norm = stats.mean.double(), stats.var.double(), stats.sqnorm.double().sqrt()
    m = nm[1] if nm else dense.shape[1]
    weight = torch.where(mask, sparse, torch.zeros_like(sparse))
    new_mask = mask.clone()
    for i in range(dense.shape[0]):
        changed = torch.zeros(dense.shape[1], dtype=torch.bool)
        e = float((dense[i] - weight[i]) @ mean)
        for _ in range(cfg.max_cycles):
            if abs(e) <= cfg.update_threshold:
                break
            s = 1.0 if e > 0 else -1.0
            contrib_kept = weight[i] * mean
            prunable = mask[i] & ~changed & (contrib_kept * s < 0)
            score = dense[i] * mean / var**cfg.pow_of_var_regrowing
            growable = ~mask[i] & ~changed & (score * s > 0)
            group_ok = prunable.view(-1, m).any(1).repeat_interleave(m)
            growable &= group_ok
            if not growable.any():
                break
            j = int(torch.where(growable, score * s, torch.tensor(-float("inf"))).argmax())
            lo = j // m * m
            wanda = (weight[i] * norm).abs()
            cand = torch.full_like(wanda, float("inf"))
            cand[lo : lo + m] = torch.where(prunable[lo : lo + m], wanda[lo : lo + m], float("inf"))
            k = int(cand.argmin())
            after = e - float(dense[i, j] * mean[j]) + float(weight[i, k] * mean[k])
            if not cfg.without_same_sign and after * s < 0:
                break
            new_mask[i, j], new_mask[i, k] = True, False
            weight[i, j], weight[i, k] = dense[i, j], 0.0
            changed[j] = changed[k] = True
            e = after
    return weight.float(), new_mask


CFG = DSnoTConfig(update_threshold=1e-3)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_running_error_matches_recomputation(nm):
    w, x = _layer()
    mask = _wanda_mask(w, x, 0.6, nm)
    sparse = w * mask
    stats = _stats(x)
    mean = stats.mean.double()  # the float32 statistics define e; recompute from them exactly
    seen = []

    def trace(cycle, error, weight, m):
        direct = (w.double() - weight.double()) @ mean  # independent of expected_error
        torch.testing.assert_close(error, direct, rtol=1e-9, atol=1e-9)
        seen.append(cycle)

    _, new_mask = dsnot_refine(w, sparse, mask, stats, CFG, nm, trace=trace)
    assert seen and seen == list(range(1, len(seen) + 1))
    assert not torch.equal(new_mask, mask)  # something was swapped, so the check had teeth


@pytest.mark.parametrize("nm", [None, (2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force(nm, seed):
    w, x = _layer(out=10, n_in=64, seed=seed)
    mask = _wanda_mask(w, x, 0.7, nm)
    # SparseGPT-like kept values that differ from dense
    sparse = (w + 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(9))) * mask
    cfg = DSnoTConfig(max_cycles=6, update_threshold=1e-3)
    got_w, got_m = dsnot_refine(w, sparse, mask, _stats(x), cfg, nm)
    ref_w, ref_m = _brute(w, sparse, mask, _stats(x), cfg, nm)
    assert torch.equal(got_m, ref_m)
    torch.testing.assert_close(got_w, ref_w)
    assert not torch.equal(got_m, mask)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_without_same_sign_matches_brute_force(nm):
    w, x = _layer(out=16, n_in=24, seed=3)
    mask = _wanda_mask(w, x, 0.5, nm)
    cfg = DSnoTConfig(max_cycles=10, update_threshold=1e-3, without_same_sign=True)
    got_w, got_m = dsnot_refine(w, w * mask, mask, _stats(x), cfg, nm)
    ref_w, ref_m = _brute(w, w * mask, mask, _stats(x), cfg, nm)
    assert torch.equal(got_m, ref_m)
    torch.testing.assert_close(got_w, ref_w)
    # without the check the error is allowed to change sign, and here it does in some row
    e0 = expected_error(w, w * mask, _stats(x).mean)
    e1 = expected_error(w, got_w, _stats(x).mean)
    assert bool((e0 * e1 < 0).any())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_counts_values_and_same_sign(nm):
    w, x = _layer(out=40, n_in=64, seed=5)
    mask = _wanda_mask(w, x, 0.5, nm)
    sparse = (w * 1.1) * mask  # kept values differ from dense, as after SparseGPT
    stats = _stats(x)
    e0 = expected_error(w, sparse, stats.mean)
    errors = []
    new_w, new_mask = dsnot_refine(
        w, sparse, mask, stats, CFG, nm, trace=lambda c, e, wt, m: errors.append(e.clone())
    )
    assert torch.equal(new_mask.sum(1), mask.sum(1))
    if nm:
        kept = new_mask.view(40, -1, 4).sum(-1)
        assert torch.equal(kept, mask.view(40, -1, 4).sum(-1))
        assert bool((kept == 2).all())
    assert bool((new_w[~new_mask] == 0).all())
    grown = new_mask & ~mask
    still = new_mask & mask
    assert grown.any()
    assert torch.equal(new_w[grown], w[grown])
    assert torch.equal(new_w[still], sparse[still])
    # the same-sign check: |e| never grows and e never changes sign
    prev = e0
    for e in errors:
        assert bool((e.abs() <= prev.abs() + 1e-12).all())
        assert bool((e * e0 >= 0).all())
        prev = e
    assert bool((prev.abs() < e0.abs()).any())


def test_deterministic():
    w, x = _layer(out=30, n_in=48, seed=7)
    mask = _wanda_mask(w, x, 0.6)
    a = dsnot_refine(w, w * mask, mask, _stats(x), DSnoTConfig())
    b = dsnot_refine(w, w * mask, mask, _stats(x), DSnoTConfig())
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_inputs_not_modified():
    w, x = _layer()
    mask = _wanda_mask(w, x, 0.5)
    sparse = w * mask
    copies = (w.clone(), sparse.clone(), mask.clone())
    dsnot_refine(w, sparse, mask, _stats(x), CFG)
    assert torch.equal(w, copies[0]) and torch.equal(sparse, copies[1]) and torch.equal(mask, copies[2])


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_dead_and_constant_channels(nm):
    w, x = _layer(out=16, n_in=32, seed=2)
    x[:, :4] = 0.0  # dead channels: mean 0, variance 0, norm 0
    x[:, 4:8] = 2.5  # constant channels: variance 0, non-zero mean
    mask = _wanda_mask(w, x, 0.5, nm)
    for gamma in (3.0, 0.0, 1.0):
        cfg = DSnoTConfig(update_threshold=1e-3, pow_of_var_regrowing=gamma)
        new_w, new_mask = dsnot_refine(w, w * mask, mask, _stats(x), cfg, nm)
        assert bool(torch.isfinite(new_w).all())
        assert torch.equal(new_mask.sum(1), mask.sum(1))
        # a dead channel's weight changes nothing in e, so it is never grown
        assert not bool((new_mask[:, :4] & ~mask[:, :4]).any())
    if nm is None:
        # zero-variance channels with a non-zero mean are the most reliable growth candidates
        assert bool((new_mask & ~mask)[:, 4:8].any())


def test_all_dead_input_is_a_no_op():
    w = torch.randn(6, 16)
    x = torch.zeros(10, 16)
    mask = _wanda_mask(w, torch.randn(10, 16), 0.5)
    new_w, new_mask = dsnot_refine(w, w * mask, mask, _stats(x), DSnoTConfig())
    assert torch.equal(new_mask, mask) and torch.equal(new_w, w * mask)


def test_reduces_reconstruction_error_in_most_rows():
    w, x = _layer(out=64, n_in=128, nsamples=256, seed=11, offset=1.5)
    mask = _wanda_mask(w, x, 0.7)
    new_w, _ = dsnot_refine(w, w * mask, mask, _stats(x), DSnoTConfig(update_threshold=1e-3))
    before = ((w - w * mask) @ x.T).norm(dim=1)
    after = ((w - new_w) @ x.T).norm(dim=1)
    changed = after != before
    assert changed.float().mean() > 0.5
    assert (after[changed] < before[changed]).float().mean() > 0.75
    assert after.norm() < 0.9 * before.norm()


def test_stopping_rules():
    w, x = _layer(seed=4)
    mask = _wanda_mask(w, x, 0.6)
    sparse = w * mask
    e = expected_error(w, sparse, x.double().mean(0))
    high = DSnoTConfig(update_threshold=float(e.abs().max()) + 1.0)
    assert torch.equal(dsnot_refine(w, sparse, mask, _stats(x), high)[1], mask)
    assert torch.equal(dsnot_refine(w, sparse, mask, _stats(x), DSnoTConfig(max_cycles=0))[1], mask)
    one = dsnot_refine(w, sparse, mask, _stats(x), DSnoTConfig(max_cycles=1, update_threshold=0))[1]
    assert bool(((one != mask).sum(1) <= 2).all())


def test_bad_input_messages():
    w, x = _layer(n_in=30)
    mask = _wanda_mask(w, x, 0.5)
    with pytest.raises(SparsecraftError, match="divisible by M=4"):
        dsnot_refine(w, w * mask, mask, _stats(x), CFG, (2, 4))
    with pytest.raises(SparsecraftError, match="bool"):
        dsnot_refine(w, w * mask, mask.float(), _stats(x), CFG)
    with pytest.raises(SparsecraftError, match="inputs"):
        dsnot_refine(w, w * mask, mask, _stats(x[:, :20]), CFG)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(SparsecraftError, match="NaN"):
        dsnot_refine(bad, bad * mask, mask, _stats(x), CFG)
    for kwargs, word in [
        ({"max_cycles": -1}, "max_cycles"),
        ({"max_cycles": 2.5}, "max_cycles"),
        ({"update_threshold": -0.1}, "update_threshold"),
        ({"pow_of_var_regrowing": float("nan")}, "pow_of_var_regrowing"),
        ({"skip_layer": "("}, "skip_layer"),
        ({"skip_layer": 3}, "skip_layer"),
    ]:
        with pytest.raises(SparsecraftError, match=word):
            DSnoTConfig(**kwargs)


def test_skip_layer_patterns():
    assert DSnoTConfig().applies_to("model.layers.0.mlp.down_proj")
    cfg = DSnoTConfig(skip_layer=("mlp", r"\.q_proj$"))
    assert not cfg.applies_to("model.layers.3.mlp.up_proj")
    assert not cfg.applies_to("model.layers.3.self_attn.q_proj")
    assert cfg.applies_to("model.layers.3.self_attn.k_proj")
    assert not DSnoTConfig(skip_layer="o_proj").applies_to("model.layers.1.self_attn.o_proj")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("without_same_sign", [False, True])
def test_cuda_matches_cpu(nm, without_same_sign):
    w, x = _layer(out=96, n_in=128, nsamples=256, seed=13)
    mask = _wanda_mask(w, x, 0.7, nm)
    cfg = DSnoTConfig(update_threshold=1e-3, without_same_sign=without_same_sign)
    stats = _stats(x)
    cpu_w, cpu_m = dsnot_refine(w, w * mask, mask, stats, cfg, nm)
    dev = torch.device("cuda")
    gpu_w, gpu_m = dsnot_refine(w.to(dev), (w * mask).to(dev), mask.to(dev), stats, cfg, nm)
    assert gpu_m.device.type == "cuda"
    assert torch.equal(gpu_m.cpu(), cpu_m)
    torch.testing.assert_close(gpu_w.cpu(), cpu_w)
    assert not torch.equal(cpu_m, mask)


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("perturb", [0.0, 0.3])  # 0.3: kept values moved as SparseGPT does
def test_variance_guard_never_raises_expected_squared_error(nm, perturb):
    w, x = _layer(out=24, n_in=64, nsamples=128, seed=3, offset=0.5)
    mask = _wanda_mask(w, x, 0.6, nm)
    g = torch.Generator().manual_seed(5)
    sparse = (w + perturb * torch.randn(w.shape, generator=g)) * mask
    stats = _stats(x)
    mean, var = stats.mean.double(), stats.var.double()

    def q(weight):  # e² + Σ_j (dense_j − w_j)² Var_j per row
        d = w.double() - weight.double()
        return (d @ mean) ** 2 + (d * d) @ var

    history = [q(sparse)]
    cfg = DSnoTConfig(update_threshold=0.0, variance_guard=True)
    new_w, new_mask = dsnot_refine(w, sparse, mask, stats, cfg, nm,
                                   trace=lambda c, e, wt, m: history.append(q(wt)))
    for before, after in zip(history, history[1:]):
        assert bool((after <= before + 1e-9 * before.abs().clamp_min(1)).all())
    assert not torch.equal(new_mask, mask)  # the guard still lets useful swaps through
    assert torch.equal(new_mask.sum(1), mask.sum(1))
    assert float(q(new_w).sum()) < float(history[0].sum())
