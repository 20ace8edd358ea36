"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against a dense float64 reference."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from sparsecraft.kernels.triton import dispatch, layout  # noqa: E402
from sparsecraft.kernels.triton.dispatch import KernelConfig, decompress, sparse_mm  # noqa: E402

formats = pytest.importorskip("sparsecraft.formats")


def _quantize(w: torch.Tensor, keep: torch.Tensor, bits: int, g: int, sym: bool):
    """Per-group RTN codes (dense (out,in) int32) and fp16 scales/zeros; dequantized fp32 weight."""
    out_f, in_f = w.shape
    ng = -(-in_f // g)
    pad = ng * g - in_f
    wp = torch.nn.functional.pad(w.float(), (0, pad)).view(out_f, ng, g)
    if sym:
        qmax = 127 if bits == 8 else 7
        scales = (wp.abs().amax(-1) / qmax).clamp_min(1e-4).half()
        zeros = torch.zeros(out_f, ng, dtype=torch.uint8)
        lo, hi = (-127, 127) if bits == 8 else (-8, 7)
    else:
        lo, hi = 0, (1 << bits) - 1
        mn, mx = wp.amin(-1), wp.amax(-1)
        scales = ((mx - mn) / hi).clamp_min(1e-4).half()
        zeros = torch.round(-mn / scales.float()).clamp(lo, hi).to(torch.uint8)
    s_full = scales.float().repeat_interleave(g, 1)[:, :in_f]
    z_full = zeros.float().repeat_interleave(g, 1)[:, :in_f]
    codes = torch.round(w.float() / s_full + z_full).clamp(lo, hi).to(torch.int32)
    codes = torch.where(keep, codes, z_full.to(torch.int32))  # pruned weights dequantize to exactly 0
    deq = (codes - z_full) * s_full
    return codes, scales, (None if sym else zeros), deq


def _random_nm_keep(out_f, in_f, n, m, gen):
    scores = torch.rand(out_f, in_f // m, m, generator=gen)
    idx = scores.topk(n, dim=-1).indices.sort(-1).values  # kept positions, ascending in each group
    keep = torch.zeros(out_f, in_f // m, m, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.view(out_f, in_f), idx.view(out_f, -1)


def _make(fmt, out_f, in_f, dtype, bits=0, g=32, sym=True, sparsity=0.6, n=2, m=4, seed=0):
    """A random compressed weight as a TritonWeight plus its dense float64 reference."""
    from sparsecraft.formats.packing import pack_bits, pack_int4, pack_subbyte

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    if fmt == "bitmask":
        keep = torch.rand(out_f, in_f, generator=gen) >= sparsity
    else:
        keep, idx = _random_nm_keep(out_f, in_f, n, m, gen)
    if bits:
        codes, scales, zeros, ref = _quantize(w, keep, bits, g, sym)
        qkw = dict(bits=bits, group_size=g, symmetric=sym, scales=scales, zeros=zeros)
    else:
        w = w.to(dtype)
        ref = w.float() * keep
        codes, qkw = None, {}
    ref = ref.double() * keep
    if fmt == "bitmask":
        counts = keep.sum(1)
        if bits == 4:  # each row's run of codes padded to an even count
            counts = counts + counts % 2
        row_offsets = torch.zeros(out_f + 1, dtype=torch.int64)
        row_offsets[1:] = torch.cumsum(counts, 0)
        rows = []
        for i in range(out_f):
            r = (codes[i] if bits else w[i])[keep[i]]
            if bits == 4 and r.numel() % 2:
                r = torch.cat([r, r.new_zeros(1)])
            rows.append(r)
        flat = torch.cat(rows)
        if bits == 4:
            values = pack_int4(flat.view(1, -1)).view(-1)
        elif bits == 8:
            values = flat.to(torch.int8 if sym else torch.uint8)
        else:
            values = flat
        tw = layout.from_bitmask(pack_bits(keep), values, row_offsets, (out_f, in_f), dtype, **qkw)
    else:
        cols = (torch.arange(in_f // m).repeat_interleave(n) * m).view(1, -1) + idx
        src = codes if bits else w
        vals = torch.gather(src, 1, cols)
        if bits == 4:
            values = pack_int4(vals)
        elif bits == 8:
            values = vals.to(torch.int8 if sym else torch.uint8)
        else:
            values = vals
        indices = pack_subbyte(idx.to(torch.uint8), 2 if m <= 4 else 4)
        tw = layout.from_nm(values, indices, n, m, (out_f, in_f), dtype, **qkw)
    return tw, ref


def _check(y: torch.Tensor, ref: torch.Tensor, tol: float):
    assert torch.isfinite(y).all()
    err = (y.double() - ref).norm() / ref.norm()
    assert err < tol, f"relative error {err:.2e} >= {tol}"


CASES = [
    # fmt, out, in, dtype, bits, group, sym, n, m
    ("bitmask", 40, 600, torch.float16, 0, 32, True, 2, 4),
    ("bitmask", 33, 520, torch.bfloat16, 0, 32, True, 2, 4),
    ("bitmask", 24, 576, torch.float16, 8, 64, True, 2, 4),
    ("bitmask", 24, 576, torch.float16, 4, 128, True, 2, 4),
    ("bitmask", 17, 300, torch.float16, 4, 32, False, 2, 4),
    ("nm", 40, 576, torch.float16, 0, 32, True, 2, 4),
    ("nm", 33, 520, torch.bfloat16, 0, 32, True, 2, 4),
    ("nm", 24, 512, torch.float16, 0, 32, True, 4, 8),
    ("nm", 24, 576, torch.float16, 4, 128, True, 2, 4),
    ("nm", 20, 320, torch.float16, 8, 32, False, 2, 4),
    ("nm", 18, 256, torch.float16, 4, 64, False, 4, 8),
]


def _id(c):
    return f"{c[0]}-{c[1]}x{c[2]}-{str(c[3])[6:]}-q{c[4]}g{c[5]}{'s' if c[6] else 'a'}-{c[7]}of{c[8]}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernels_match_dense_reference(case):
    fmt, out_f, in_f, dtype, bits, g, sym, n, m = case
    tw, ref_w = _make(fmt, out_f, in_f, dtype, bits, g, sym, n=n, m=m, seed=out_f + in_f)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    # decompress reproduces the dense weight
    dense = decompress(tw, torch.float32)
    assert torch.allclose(dense.double(), ref_w, atol=1e-2 * ref_w.abs().max().item())
    gen = torch.Generator().manual_seed(1)
    bk = 256 if fmt == "bitmask" else 64
    for batch, cfg in [
        (1, KernelConfig(bn=8, bk=bk, bb=1, num_warps=4)),
        (1, KernelConfig(bn=16, bk=bk, bb=1, num_warps=4, split_k=2)),  # split K, atomic adds
        (5, KernelConfig(bn=16, bk=bk, bb=16, num_warps=4)),
        (19, KernelConfig(bn=16, bk=bk, bb=16, num_warps=4, split_k=2)),  # two batch tiles
    ]:
        x = torch.randn(batch, in_f, generator=gen).to(dtype)
        y = sparse_mm(x, tw, cfg)
        assert y.shape == (batch, out_f) and y.dtype == dtype
        _check(y, x.double() @ ref_w.t(), tol)


def test_sparse_linear_dispatch_shapes_and_bias():
    tw, ref_w = _make("nm", 24, 256, torch.float16, seed=3)
    x = torch.randn(2, 3, 256).half()
    bias = torch.randn(24).half()
    y = dispatch.sparse_linear(x, tw, bias)
    assert y.shape == (2, 3, 24)
    _check(y, (x.double() @ ref_w.t()) + bias.double(), 4e-3)


def test_tile_offsets_count_kept_values_before_each_tile():
    from sparsecraft.formats.packing import pack_bits

    keep = torch.rand(5, 700) > 0.3
    offs = layout.tile_offsets_from_mask(pack_bits(keep), 700, tile=256)
    want = torch.stack([keep[:, :0].sum(1), keep[:, :256].sum(1), keep[:, :512].sum(1)], 1)
    assert torch.equal(offs, want.to(torch.int32))


def test_layout_rejects_bad_shapes():
    from sparsecraft.errors import SparsecraftError

    with pytest.raises(SparsecraftError, match="powers of two"):
        layout.from_nm(torch.zeros(2, 6), torch.zeros(2, 2, dtype=torch.uint8), 3, 4, (2, 8))
    with pytest.raises(SparsecraftError, match="mask"):
        layout.from_bitmask(torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(0), torch.zeros(3), (2, 8))
