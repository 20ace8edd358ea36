"""Mask-preserving quantizers: brute-force references, zeros preserved, exact storage."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecraft.errors import SparsecraftError
from sparsecraft.formats import BitmaskTensor, NMTensor, QuantizedDenseTensor
from sparsecraft.quant import QuantConfig, gptq_quantize, rtn_quantize

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sparse(gen, rows, cols, sparsity):
    w = torch.randn(rows, cols, generator=gen)
    return w * (torch.rand(rows, cols, generator=gen) >= sparsity)


def _rtn_brute(w, mask, bits, g, sym):
    """Element-by-element reference of the grid rules in quant/rtn.py."""
    rows, cols = w.shape
    hi = (127 if bits == 8 else 7) if sym else (1 << bits) - 1
    lo = (-127 if bits == 8 else -8) if sym else 0
    out = torch.zeros(rows, cols)
    for r in range(rows):
        for g0 in range(0, cols, g):
            kept = [float(w[r, j]) for j in range(g0, min(g0 + g, cols)) if mask[r, j]]
            if sym:
                amax = max([abs(v) for v in kept], default=0.0)
                s = float(torch.tensor(max(amax / hi, 2.0**-24) if amax > 0 else 1.0).half())
                z = 0
            else:
                mn, mx = min(kept + [0.0]), max(kept + [0.0])
                s = float(torch.tensor(max((mx - mn) / hi, 2.0**-24) if mx > mn else 1.0).half())
                z = int(min(max(round(-mn / s), lo), hi))
            for j in range(g0, min(g0 + g, cols)):
                if mask[r, j]:
                    c = min(max(round(float(w[r, j]) / s) + z, lo), hi)
                    out[r, j] = (c - z) * s
    return out


@SETTINGS
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 30),
    bits=st.sampled_from([4, 8]),
    sym=st.booleans(),
    g=st.sampled_from([4, 8, 16]),
    sparsity=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_rtn_matches_brute_force_and_keeps_zeros(rows, cols, bits, sym, g, sparsity, seed):
    gen = torch.Generator().manual_seed(seed)
    w = _sparse(gen, rows, cols, sparsity)
    qw = rtn_quantize(w, None, bits, g, sym)
    deq = qw.dequantize()
    # torch.round and Python round both round half to even
    torch.testing.assert_close(deq, _rtn_brute(w, w != 0, bits, g, sym), rtol=0, atol=1e-6)
    assert (deq[w == 0] == 0).all()
    zero = qw.info.zeros if qw.info.zeros is not None else torch.zeros_like(qw.info.scales, dtype=torch.uint8)
    zpos = zero[:, torch.arange(cols) // g].to(torch.int64)
    assert torch.equal(qw.codes.to(torch.int64)[w == 0], zpos[w == 0])  # pruned -> zero point


def _correlated_inputs(gen, n, cols):
    a = torch.randn(cols, cols, generator=gen)
    return torch.randn(n, cols, generator=gen) @ a + 0.1 * torch.randn(n, cols, generator=gen)


@SETTINGS
@given(
    rows=st.integers(1, 6),
    cols=st.integers(2, 40),
    bits=st.sampled_from([4, 8]),
    sym=st.booleans(),
    g=st.sampled_from([4, 8, 32]),
    bs=st.sampled_from([4, 8, 16]),
    sparsity=st.floats(0, 0.9),
    seed=st.integers(0, 2**16),
)
def test_gptq_keeps_zeros_and_stores_exactly(rows, cols, bits, sym, g, bs, sparsity, seed):
    gen = torch.Generator().manual_seed(seed)
    w = _sparse(gen, rows, cols, sparsity)
    x = _correlated_inputs(gen, 3 * cols, cols)
    qw, _ = gptq_quantize(w, x.t() @ x, None, bits, g, sym, blocksize=bs)
    deq = qw.dequantize()
    assert (deq[w == 0] == 0).all() and torch.equal(qw.mask, w != 0)
    # every format stores exactly what the quantizer produced
    assert torch.equal(BitmaskTensor.from_codes(qw.codes, qw.mask, qw.info, torch.float32).to_dense(), deq)
    assert torch.equal(QuantizedDenseTensor.from_codes(qw.codes, qw.info, torch.float32).to_dense(), deq)
    assert torch.equal(BitmaskTensor.from_dense(deq, quant=qw.info).to_dense(), deq)


def _gptq_brute(w, h, mask, bits, g, sym, percdamp=0.01, perm=None):
    """Sequential OBS with explicit inverses of the remaining columns' Hessian, in float64.

    ``perm``: process the columns in this order (act-order), each on its group's grid fitted up
    front to the original weights (static groups); None: left to right, each group's grid fitted
    to the updated weights when the loop reaches it."""
    cols = w.shape[1]
    order = torch.arange(cols) if perm is None else perm
    static = None if perm is None else rtn_quantize(w, mask, bits, g, sym).info
    wd = w.double()[:, order].clone()
    h = h.double()[order][:, order]
    h += percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    out = torch.zeros_like(wd)
    lo, hi = ((-127, 127) if bits == 8 else (-8, 7)) if sym else (0, (1 << bits) - 1)
    scale = zero = None
    for j in range(cols):
        col = int(order[j])
        if static is not None:
            scale = static.scales[:, col // g].double()
            zero = None if static.zeros is None else static.zeros[:, col // g : col // g + 1]
        elif j % g == 0:
            wg = (wd[:, j : j + g] * mask[:, j : j + g]).float()  # the grid sees kept weights only
            ref = _rtn_brute(wg, mask[:, j : j + g], bits, g, sym)
            qw = rtn_quantize(wg, mask[:, j : j + g], bits, g, sym)
            scale, zero = qw.info.scales[:, 0].double(), qw.info.zeros
            assert torch.allclose(ref, qw.dequantize(), atol=1e-6)
        z = zero[:, 0].double() if zero is not None else torch.zeros_like(scale)
        c = (torch.round(wd[:, j] / scale) + z).clamp(lo, hi)
        q = torch.where(mask[:, col], (c - z) * scale, torch.zeros_like(scale))
        hinv = torch.linalg.inv(h[j:, j:])
        e = (wd[:, j] - q) / hinv[0, 0]
        wd[:, j:] -= e.unsqueeze(1) * hinv[0].unsqueeze(0)
        out[:, col] = q
    return out.float()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_gptq_matches_sequential_obs_reference(sym, sparsity):
    gen = torch.Generator().manual_seed(7)
    rows, cols, g = 6, 16, 8
    w = _sparse(gen, rows, cols, sparsity)
    x = _correlated_inputs(gen, 64, cols)
    h = x.t() @ x
    qw, _ = gptq_quantize(w, h, None, 4, g, sym, blocksize=4)
    want = _gptq_brute(w, h, w != 0, 4, g, sym)
    torch.testing.assert_close(qw.dequantize(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_act_order_matches_permuted_obs_with_static_grids(sym):
    """act-order = sequential OBS in order of decreasing diag(H), each column on its own group's
    grid fitted up front to the original weights; codes land at the original columns."""
    from sparsecraft.quant.gptq import act_order_perm

    gen = torch.Generator().manual_seed(11)
    rows, cols, g = 6, 16, 8
    w = _sparse(gen, rows, cols, 0.5)
    x = _correlated_inputs(gen, 64, cols) * torch.linspace(0.2, 3.0, cols)  # uneven channel energy
    h = x.t() @ x
    perm = act_order_perm(h)
    assert not torch.equal(perm, torch.arange(cols))
    qw, _ = gptq_quantize(w, h, None, 4, g, sym, blocksize=4, perm=perm)

    mask = w != 0
    grid = rtn_quantize(w, mask, 4, g, sym).info  # static grids from the original weights
    want = _gptq_brute(w, h, mask, 4, g, sym, perm=perm)
    torch.testing.assert_close(qw.dequantize(), want, rtol=0, atol=1e-4)
    assert torch.equal(qw.dequantize()[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(qw.info.scales, grid.scales)


def test_act_order_needs_gptq():
    with pytest.raises(SparsecraftError, match="act_order"):
        QuantConfig(bits=4, method="rtn", act_order=True)


def test_gptq_with_diagonal_hessian_is_rtn():
    gen = torch.Generator().manual_seed(1)
    w = _sparse(gen, 8, 40, 0.5)
    h = torch.diag(torch.rand(40, generator=gen) + 0.5)
    qw, _ = gptq_quantize(w, h, None, 4, 16, False)
    assert torch.equal(qw.dequantize(), rtn_quantize(w, None, 4, 16, False).dequantize())


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_gptq_beats_rtn_on_correlated_inputs(sparsity):
    gen = torch.Generator().manual_seed(3)
    w = _sparse(gen, 64, 128, sparsity)
    x = _correlated_inputs(gen, 512, 128)
    ref = x @ w.t()
    err = {}
    for name, deq in (
        ("rtn", rtn_quantize(w, None, 4, 32, True).dequantize()),
        ("gptq", gptq_quantize(w, x.t() @ x, None, 4, 32, True)[0].dequantize()),
    ):
        err[name] = float((x @ deq.t() - ref).norm() / ref.norm())
    assert err["gptq"] < 0.97 * err["rtn"], err


def test_nm_mask_survives_quantization():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 32, generator=gen)
    g = w.abs().view(8, 8, 4)
    w = w * torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, -1).indices, True).view(8, 32)
    x = _correlated_inputs(gen, 64, 32)
    qw, _ = gptq_quantize(w, x.t() @ x, None, 4, 16, True)
    t = NMTensor.from_codes(qw.codes, qw.mask, qw.info, torch.float32, 2, 4)
    assert torch.equal(t.to_dense(), qw.dequantize())


def test_bad_input():
    with pytest.raises(SparsecraftError, match="bits 3"):
        QuantConfig(bits=3)
    with pytest.raises(SparsecraftError, match="group_size"):
        QuantConfig(group_size=0)
    with pytest.raises(SparsecraftError, match="method"):
        QuantConfig(method="awq")
    w = torch.ones(2, 4)
    with pytest.raises(SparsecraftError, match="outside the mask"):
        rtn_quantize(w, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(SparsecraftError, match="NaN or Inf"):
        rtn_quantize(torch.full((2, 4), float("nan")))
    with pytest.raises(SparsecraftError, match=r"\(4, 4\) Hessian"):
        gptq_quantize(w, torch.eye(3))


@SETTINGS
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 40),
    bits=st.sampled_from([4, 8]),
    sym=st.booleans(),
    sparsity=st.floats(0, 0.9),
    seed=st.integers(0, 2**16),
)
def test_clip_search_never_increases_group_error(rows, cols, bits, sym, sparsity, seed):
    gen = torch.Generator().manual_seed(seed)
    w = _sparse(gen, rows, cols, sparsity)
    w[:, 0] *= 6  # an outlier column makes clipping worthwhile
    w = w * (w != 0)
    plain = rtn_quantize(w, None, bits, 8, sym).dequantize()
    clipped = rtn_quantize(w, None, bits, 8, sym, clip=True)
    deq = clipped.dequantize()
    assert (deq[w == 0] == 0).all()
    for g0 in range(0, cols, 8):
        e_plain = ((plain - w)[:, g0 : g0 + 8] ** 2).sum(1)
        e_clip = ((deq - w)[:, g0 : g0 + 8] ** 2).sum(1)
        assert (e_clip <= e_plain + 1e-6).all()
    assert torch.equal(
        BitmaskTensor.from_codes(clipped.codes, clipped.mask, clipped.info, torch.float32).to_dense(), deq
    )


@pytest.mark.parametrize("sym", [True, False])
def test_output_clip_picks_the_grid_with_the_least_output_error(sym):
    """fit_params with a Hessian: its grid's output error d H dᵀ is the smallest over the shrink
    candidates (brute force); the identity Hessian gives the weight-error search."""
    from sparsecraft.quant.rtn import CLIP_GRID, _grid, fit_params, quantize_columns

    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 16, generator=g) * (torch.rand(5, 16, generator=g) > 0.3)
    w[:, 3] *= 8
    mask = w != 0
    x = torch.randn(300, 16, generator=g) * torch.linspace(0.1, 3, 16)
    h = x.t() @ x
    s, z = fit_params(w, mask, 4, sym, clip=True, hessian=h)
    _, q = quantize_columns(w, mask, s, z, 4, sym)
    best = ((q - w) @ h * (q - w)).sum(-1)
    for shrink in CLIP_GRID:
        s2, z2 = _grid(w, 4, sym, shrink)
        _, q2 = quantize_columns(w, mask, s2, z2, 4, sym)
        assert (best <= ((q2 - w) @ h * (q2 - w)).sum(-1) + 1e-5).all()
    plain = fit_params(w, mask, 4, sym, clip=True)
    eye = fit_params(w, mask, 4, sym, clip=True, hessian=torch.eye(16))
    assert torch.equal(plain[0], eye[0])
    from sparsecraft.quant.gptq import act_order_perm

    for perm in (None, act_order_perm(h)):  # GPTQ's clip search (dynamic and static groups) keeps zeros
        deq = gptq_quantize(w, h, None, 4, 8, sym, blocksize=8, clip=True, perm=perm)[0].dequantize()
        assert (deq[~mask] == 0).all() and torch.isfinite(deq).all()


@pytest.mark.parametrize("sym", [True, False])
def test_refit_scales_is_the_least_squares_optimum_and_keeps_codes(sym):
    """Codes, zero points and mask unchanged; the output error never grows; the float scales
    solve the normal equations (checked by brute-force lstsq on one row)."""
    from sparsecraft.quant.refit import refit_scales

    g = torch.Generator().manual_seed(5)
    rows, cols, gs = 6, 40, 16  # 3 groups, the last partial
    x = torch.randn(500, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    h = x.t() @ x
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) > 0.5)
    qw, info = gptq_quantize(w, h, None, bits=4, group_size=gs, symmetric=sym, blocksize=16)
    new = refit_scales(qw, w, h, info["damping"])
    assert torch.equal(new.codes, qw.codes) and torch.equal(new.mask, qw.mask)
    if not sym:
        assert torch.equal(new.info.zeros, qw.info.zeros)
    assert (new.dequantize()[w == 0] == 0).all()
    hd = h.double() + info["damping"] * h.diagonal().double().mean() * torch.eye(cols, dtype=torch.float64)

    def err(v):
        d = (w - v).double()
        return ((d @ hd) * d).sum(1)

    assert (err(new.dequantize()) <= err(qw.dequantize()) + 1e-9).all()
    assert float(err(new.dequantize()).sum()) < float(err(qw.dequantize()).sum())
    # row 0 by brute force: columns of the design matrix are the groups' codes (minus zero points)
    d = qw.codes[0].double() - (qw.info.zeros[0].double().repeat_interleave(gs)[:cols] if not sym else 0)
    d = d * qw.mask[0]
    basis = torch.stack([d * ((torch.arange(cols) // gs) == k) for k in range(3)], 1)  # (cols, 3)
    chol = torch.linalg.cholesky(hd)
    s = torch.linalg.lstsq(chol.t() @ basis, chol.t() @ w[0].double()).solution
    torch.testing.assert_close(new.info.scales[0].double(), s.half().double(), rtol=2e-3, atol=1e-4)
