"""CPU kernels on compressed weights against dense matmul (float64 reference)."""

from __future__ import annotations

import pytest
import torch

from sparsecraft.errors import SparsecraftError
from sparsecraft.formats import BitmaskTensor, NMTensor, QuantInfo, QuantizedDenseTensor
from sparsecraft.formats.qinfo import code_range, num_groups
from sparsecraft.kernels.cpu import (
    bind,
    bind_bitmask,
    bind_dense,
    bind_nm,
    bitmask_matmul,
    check_qdense,
    has_avx512,
    nm_matmul,
)

VARIANTS = ["native", "portable"]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _reference(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y + bias.double() if bias is not None else y


def _sparse_weight(out_f, in_f, density, gen, empty_row=True, full_row=True, dtype=torch.float32):
    w = torch.randn(out_f, in_f, generator=gen)
    keep = torch.rand(out_f, in_f, generator=gen) < density
    if empty_row and out_f > 2:
        keep[1] = False
    if full_row and out_f > 3:
        keep[2] = True
    return (w * keep).to(dtype)


def _quant(out_f, in_f, bits, symmetric, group_size, gen, mask):
    ng = num_groups(in_f, group_size)
    scales = (torch.rand(out_f, ng, generator=gen) * 0.1 + 0.01).half()
    lo, hi = code_range(bits, symmetric)
    zeros = None if symmetric else torch.randint(lo, hi + 1, (out_f, ng), generator=gen).to(torch.uint8)
    codes = torch.randint(lo, hi + 1, (out_f, in_f), generator=gen)
    q = QuantInfo(bits=bits, group_size=group_size, symmetric=symmetric, scales=scales, zeros=zeros)
    return codes, q


SHAPES = [(1, 1), (5, 7), (9, 16), (33, 17), (64, 100), (23, 577), (130, 64)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmask_float_matches_dense(variant, dtype):
    gen = torch.Generator().manual_seed(0)
    for (out_f, in_f), density in zip(SHAPES, [1.0, 0.3, 0.5, 0.1, 0.7, 0.3, 0.05]):
        w = _sparse_weight(out_f, in_f, density, gen, dtype=dtype)
        ct = BitmaskTensor.from_dense(w)
        bias = torch.randn(out_f, generator=gen)
        k = bind(ct, bias=bias, variant=variant)
        for B in (1, 2, 3, 4, 5, 16, 17):
            x = torch.randn(B, in_f, generator=gen)
            ref = _reference(x, w.float(), bias)
            y = k(x)
            assert y.shape == (B, out_f)
            assert _rel_err(y, ref) <= 1e-5, (out_f, in_f, B, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_bitmask_quantized_matches_dense(variant, bits, symmetric):
    gen = torch.Generator().manual_seed(1)
    for (out_f, in_f), g in [((7, 200), 64), ((40, 576), 128), ((3, 31), 32), ((17, 96), 32)]:
        keep = torch.rand(out_f, in_f, generator=gen) < 0.35
        keep[0] = False
        keep[-1] = True
        codes, q = _quant(out_f, in_f, bits, symmetric, g, gen, keep)
        ct = BitmaskTensor.from_codes(codes, keep, q, torch.float32)
        w = ct.to_dense()
        k = bind(ct, variant=variant)
        for B in (1, 3, 6):
            x = torch.randn(B, in_f, generator=gen)
            assert _rel_err(k(x), _reference(x, w)) <= 1e-5, (out_f, in_f, B)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2), (3, 4), (2, 8), (8, 16)])
def test_nm_float_matches_dense(variant, n, m):
    gen = torch.Generator().manual_seed(2)
    for out_f, groups in [(1, 1), (5, 3), (19, 16), (8, 37)]:
        in_f = groups * m
        w = torch.randn(out_f, in_f, generator=gen)
        # keep the n largest per group, then drop a few more (groups with fewer nonzeros)
        top = w.abs().view(out_f, groups, m).topk(n, dim=-1).indices
        keep = torch.zeros(out_f, groups, m, dtype=torch.bool).scatter_(-1, top, True).view(out_f, in_f)
        keep &= torch.rand(out_f, in_f, generator=gen) < 0.9
        keep[0] = False
        w = w * keep
        ct = NMTensor.from_dense(w, n=n, m=m)
        k = bind(ct, variant=variant)
        for B in (1, 2, 5, 16):
            x = torch.randn(B, in_f, generator=gen)
            assert _rel_err(k(x), _reference(x, w)) <= 1e-5, (n, m, out_f, in_f, B)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_quantized_matches_dense(variant, bits, symmetric, n, m):
    gen = torch.Generator().manual_seed(3)
    for out_f, in_f, g in [(6, 200, 32), (11, 576, 128), (3, 24, 64)]:
        in_f -= in_f % m
        score = torch.rand(out_f, in_f, generator=gen)
        top = score.view(out_f, -1, m).topk(n, dim=-1).indices
        keep = torch.zeros(out_f, in_f // m, m, dtype=torch.bool).scatter_(-1, top, True).view(out_f, in_f)
        codes, q = _quant(out_f, in_f, bits, symmetric, g, gen, keep)
        ct = NMTensor.from_codes(codes, keep, q, torch.float32, n=n, m=m)
        w = ct.to_dense()
        k = bind(ct, variant=variant)
        for B in (1, 5):
            x = torch.randn(B, in_f, generator=gen)
            assert _rel_err(k(x), _reference(x, w)) <= 1e-5, (out_f, in_f, B)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_quantized_dense_matches_dense(variant, bits, symmetric):
    gen = torch.Generator().manual_seed(4)
    for out_f, in_f, g in [(9, 200, 64), (33, 35, 32), (4, 576, 128)]:
        codes, q = _quant(out_f, in_f, bits, symmetric, g, gen, None)
        ct = QuantizedDenseTensor.from_codes(codes, q, torch.float32)
        w = ct.to_dense()
        k = bind(ct, variant=variant)
        for B in (1, 4, 7):
            x = torch.randn(B, in_f, generator=gen)
            assert _rel_err(k(x), _reference(x, w)) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_float_kernel_matches_dense(variant, dtype):
    """The dense kernel (unpruned float weights, e.g. the lm_head): odd widths, batch 1..17."""
    gen = torch.Generator().manual_seed(7)
    for out_f, in_f in [(1, 1), (7, 15), (13, 64), (33, 577), (70, 200)]:
        w = torch.randn(out_f, in_f, generator=gen).to(dtype)
        bias = torch.randn(out_f, generator=gen)
        k = bind_dense(w, bias=bias, threads=2, variant=variant)
        for B in (1, 2, 3, 4, 5, 16, 17):
            x = torch.randn(B, in_f, generator=gen)
            assert _rel_err(k(x), _reference(x, w.float(), bias)) <= 1e-5, (out_f, in_f, B, dtype)
    with pytest.raises(SparsecraftError, match="no scales"):
        check_qdense(torch.randn(3, 4), (3, 4), 0, scales=torch.ones(3, 1).half())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_bitmask_64_column_words(variant, symmetric):
    """int8 codes go 64 columns per mask word: whole words, a ragged tail, empty and full words,
    the value buffer's end (a full last row), groups of 64 and 128."""
    gen = torch.Generator().manual_seed(8)
    for out_f, in_f, g in [(6, 192, 64), (5, 130, 64), (9, 576, 128), (3, 320, 128)]:
        keep = torch.rand(out_f, in_f, generator=gen) < 0.3
        keep[0, :64] = False
        keep[1, 64:128] = True
        keep[-1] = True
        codes, q = _quant(out_f, in_f, 8, symmetric, g, gen, keep)
        ct = BitmaskTensor.from_codes(codes, keep, q, torch.float32)
        w = ct.to_dense()
        k = bind(ct, variant=variant, threads=2)
        for B in (1, 2, 4, 5):
            x = torch.randn(B, in_f, generator=gen)
            assert _rel_err(k(x), _reference(x, w)) <= 1e-5, (out_f, in_f, g, B)


def test_native_and_portable_agree_on_threads():
    """Thread partitioning (nnz-balanced rows) must not change the result."""
    gen = torch.Generator().manual_seed(5)
    w = _sparse_weight(601, 512, 0.4, gen)  # 308K elements: above the single-thread threshold
    w[:200] = 0  # very uneven rows stress the dynamic split
    ct = BitmaskTensor.from_dense(w)
    x = torch.randn(3, 512, generator=gen)
    ys = [bind(ct, threads=t)(x) for t in (1, 2, 3)]
    for y in ys[1:]:
        assert torch.equal(y, ys[0])
    assert _rel_err(ys[0], _reference(x, w)) <= 1e-5


def test_avx512_is_used_when_the_cpu_has_it():
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "")
    needed = ("avx512f", "avx512bw", "avx512vl", "avx512_vbmi2", "bmi2")
    assert has_avx512("native") == all(f" {n}" in flags for n in needed)
    assert not has_avx512("portable")


def test_one_shot_helpers_keep_leading_dims():
    gen = torch.Generator().manual_seed(6)
    w = _sparse_weight(12, 40, 0.5, gen)
    ct = BitmaskTensor.from_dense(w)
    x = torch.randn(2, 3, 40, generator=gen)
    y = bitmask_matmul(x, ct.mask, ct.values, ct.row_offsets, ct.shape)
    assert y.shape == (2, 3, 12)
    assert _rel_err(y, _reference(x, w)) <= 1e-5
    wn = w.clone()
    wn.view(12, 10, 4)[..., 2:] = 0
    nt = NMTensor.from_dense(wn, n=2, m=4)
    y = nm_matmul(x, nt.values, nt.indices, nt.shape, 2, 4)
    assert _rel_err(y, _reference(x, wn)) <= 1e-5


# ------------------------------------------------------------------ refusals
def _bm():
    gen = torch.Generator().manual_seed(7)
    return BitmaskTensor.from_dense(_sparse_weight(6, 20, 0.5, gen))


def test_refuses_values_that_do_not_match_the_mask():
    ct = _bm()
    with pytest.raises(SparsecraftError, match="mask and values do not match|row_offsets"):
        bind_bitmask(ct.mask, ct.values[:-1], ct.row_offsets, ct.shape)
    bad_mask = ct.mask.clone()
    bad_mask[0, 0] ^= 1
    with pytest.raises(SparsecraftError, match="mask and values do not match"):
        bind_bitmask(bad_mask, ct.values, ct.row_offsets, ct.shape)


def test_refuses_mismatched_shapes_and_dtypes():
    ct = _bm()
    with pytest.raises(SparsecraftError, match="mask must be uint8"):
        bind_bitmask(ct.mask, ct.values, ct.row_offsets, (6, 40))
    with pytest.raises(SparsecraftError, match="row_offsets must be int64"):
        bind_bitmask(ct.mask, ct.values, ct.row_offsets.int(), ct.shape)
    with pytest.raises(SparsecraftError, match="not a float type"):
        bind_bitmask(ct.mask, ct.values.to(torch.int8), ct.row_offsets, ct.shape)
    with pytest.raises(SparsecraftError, match="padding"):
        m = ct.mask.clone()
        m[:, -1] |= 0x80  # column 23 of a 20-wide row
        bind_bitmask(m, ct.values, ct.row_offsets, ct.shape)
    k = bind(ct)
    with pytest.raises(SparsecraftError, match="features"):
        from sparsecraft.kernels.cpu.ops import _as_rows

        _as_rows(torch.randn(2, 21), k.in_features)


def test_refuses_bad_nm_and_quant():
    w = torch.randn(4, 16)
    w.view(4, 4, 4)[..., 2:] = 0
    ct = NMTensor.from_dense(w, n=2, m=4)
    with pytest.raises(SparsecraftError, match="not a multiple of M"):
        bind_nm(ct.values, ct.indices, (4, 18), 2, 4)
    with pytest.raises(SparsecraftError, match="values shape"):
        bind_nm(ct.values[:, :-1].contiguous(), ct.indices, ct.shape, 2, 4)
    dup = ct.indices.clone()
    dup[:] = 0  # every kept value claims position 0 of its group
    with pytest.raises(SparsecraftError, match="repeats a position"):
        bind_nm(ct.values, dup, ct.shape, 2, 4)
    gen = torch.Generator().manual_seed(8)
    codes, q = _quant(4, 16, 8, True, 32, gen, None)
    qt = QuantizedDenseTensor.from_codes(codes, q, torch.float32)
    with pytest.raises(SparsecraftError, match="scales"):
        from sparsecraft.kernels.cpu import bind_qdense

        bind_qdense(qt.values, qt.shape, bits=8, scales=q.scales.float(), group_size=32)
    with pytest.raises(SparsecraftError, match="non-contiguous|not contiguous"):
        bind_nm(ct.values.t().contiguous().t(), ct.indices, ct.shape, 2, 4)
    with pytest.raises(SparsecraftError, match="no CPU kernel"):
        bind(torch.zeros(3))
