"""Triton kernels: y = x @ W^T with W stored compressed (bitmask or packed N:M, float or int codes).

One kernel family decodes a (BN rows x BK columns) tile of W into registers and multiplies it:
* batch 1 (``USE_DOT=False``): multiply-add against the dense x tile, reduce once at the end;
* batch 2..BB (``USE_DOT=True``): ``tl.dot`` of the decoded tile with a (BK, BB) x tile (tensor cores).
The grid is (row tiles, K splits, batch tiles); with more than one K split the partial sums are
added atomically into a float32 buffer, so skinny layers still put work on every multiprocessor.

Layouts (see ``layout.py``): bitmask rows start at ``row_offsets`` (int32 here) and a per-row,
per-``TILE`` columns offset table (``tile_offsets``, counts kept values before each tile, relative to
the row start) lets any K split find its first value without scanning the row. N:M needs nothing
beyond the stored values and indices. Quantized values are codes with one scale (and zero) per
``G`` input columns; the tile width is a multiple or a divisor of ``G``.

Every kernel also runs under ``TRITON_INTERPRET=1`` on CPU tensors (the tests do exactly that).
"""

from __future__ import annotations

import triton
import triton.language as tl

FMT_BITMASK = 0
FMT_NM = 1


@triton.jit
def _unpack(packed, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """(R, C) int32 bytes -> (R, C * 8 // BITS) little-endian fields of BITS bits."""
    PER: tl.constexpr = 8 // BITS
    sh = tl.arange(0, PER) * BITS
    f = (packed[:, :, None] >> sh[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(f, (R, C * PER))


@triton.jit
def _dequant(code, rows, rmask, kgroup0, scale_ptr, zero_ptr, n_groups,
             BN: tl.constexpr, W: tl.constexpr, SPG: tl.constexpr, SYM: tl.constexpr):
    """codes (BN, W) int32 -> float32 (code - zero) * scale; W columns span SPG quant groups."""
    g = kgroup0 + tl.arange(0, SPG)
    gm = rmask[:, None] & (g[None, :] < n_groups)
    s = tl.load(scale_ptr + rows[:, None] * n_groups + g[None, :], mask=gm, other=0.0).to(tl.float32)
    c3 = tl.reshape(code.to(tl.float32), (BN, SPG, W // SPG))
    if not SYM:
        z = tl.load(zero_ptr + rows[:, None] * n_groups + g[None, :], mask=gm, other=0).to(tl.float32)
        c3 = c3 - z[:, :, None]
    return tl.reshape(c3 * s[:, :, None], (BN, W))


@triton.jit
def _nm_compressed(k0, rows, rmask, K, vals_ptr, meta_ptr, scale_ptr, zero_ptr,
                   vals_stride, meta_stride, n_groups,
                   NN: tl.constexpr, MM: tl.constexpr, QBITS: tl.constexpr, SYM: tl.constexpr,
                   G: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """N:M tile in compressed space: T = BK*N/M float32 values (BN, T) and their in-group positions."""
    SPG: tl.constexpr = BK // G if BK > G else 1
    T: tl.constexpr = BK * NN // MM
    IB: tl.constexpr = 2 if MM <= 4 else 4
    t0 = k0 * NN // MM
    t_lim = K * NN // MM
    if QBITS == 4:
        tb = t0 // 2 + tl.arange(0, T // 2)
        byte = tl.load(vals_ptr + rows[:, None] * vals_stride + tb[None, :],
                       mask=rmask[:, None] & (tb[None, :] < (t_lim + 1) // 2), other=0).to(tl.int32)
        code = _unpack(byte, 4, BN, T // 2)
        if SYM:
            code = (code ^ 8) - 8
        v = _dequant(code, rows, rmask, k0 // G, scale_ptr, zero_ptr, n_groups, BN, T, SPG, SYM)
    else:
        tk = t0 + tl.arange(0, T)
        raw = tl.load(vals_ptr + rows[:, None] * vals_stride + tk[None, :],
                      mask=rmask[:, None] & (tk[None, :] < t_lim), other=0)
        if QBITS == 8:
            v = _dequant(raw.to(tl.int32), rows, rmask, k0 // G, scale_ptr, zero_ptr, n_groups,
                         BN, T, SPG, SYM)
        else:
            v = raw.to(tl.float32)
    ib = t0 * IB // 8 + tl.arange(0, T * IB // 8)
    ibytes = tl.load(meta_ptr + rows[:, None] * meta_stride + ib[None, :],
                     mask=rmask[:, None] & (ib[None, :] < meta_stride), other=0).to(tl.int32)
    idx = _unpack(ibytes, IB, BN, T * IB // 8)
    return v, idx


@triton.jit
def _decode_tile(k0, rows, rmask, K,
                 vals_ptr, meta_ptr, rowoff_ptr, toff_ptr, scale_ptr, zero_ptr,
                 vals_stride, meta_stride, n_tiles, n_groups,
                 FMT: tl.constexpr, NN: tl.constexpr, MM: tl.constexpr, QBITS: tl.constexpr,
                 SYM: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    """Dense float32 (BN, BK) tile of W at rows ``rows``, columns k0..k0+BK (zeros past K)."""
    SPG: tl.constexpr = BK // G if BK > G else 1
    if FMT == 0:
        # ---- bitmask: bits -> exclusive prefix -> positions in the row's compacted values
        bcols = k0 // 8 + tl.arange(0, BK // 8)
        mb = tl.load(meta_ptr + rows[:, None] * meta_stride + bcols[None, :],
                     mask=rmask[:, None] & (bcols[None, :] < meta_stride), other=0).to(tl.int32)
        bits = _unpack(mb, 1, BN, BK // 8)
        pref = tl.cumsum(bits, axis=1) - bits
        rstart = tl.load(rowoff_ptr + rows, mask=rmask, other=0)
        toff = tl.load(toff_ptr + rows * n_tiles + k0 // TILE, mask=rmask, other=0)
        pos = (rstart + toff)[:, None] + pref
        keep = bits != 0
        if QBITS == 0:
            w = tl.load(vals_ptr + pos, mask=keep, other=0.0).to(tl.float32)
        else:
            if QBITS == 8:
                code = tl.load(vals_ptr + pos, mask=keep, other=0).to(tl.int32)
            else:
                byte = tl.load(vals_ptr + pos // 2, mask=keep, other=0).to(tl.int32)
                code = (byte >> ((pos & 1) * 4)) & 15
                if SYM:
                    code = (code ^ 8) - 8
            w = _dequant(code, rows, rmask, k0 // G, scale_ptr, zero_ptr, n_groups, BN, BK, SPG, SYM)
            w = tl.where(keep, w, 0.0)
    else:
        v, idx = _nm_compressed(k0, rows, rmask, K, vals_ptr, meta_ptr, scale_ptr, zero_ptr,
                                vals_stride, meta_stride, n_groups, NN, MM, QBITS, SYM, G, BN, BK)
        # scatter the N kept values of each M-group to their positions (in registers)
        v3 = tl.reshape(v, (BN, BK // MM, NN))
        i3 = tl.reshape(idx, (BN, BK // MM, NN))
        hit = i3[:, :, :, None] == tl.arange(0, MM)[None, None, None, :]
        w4 = tl.where(hit, v3[:, :, :, None], 0.0)
        w = tl.reshape(tl.sum(w4, axis=2), (BN, BK))
    return w


@triton.jit
def sparse_mm_kernel(
    x_ptr, out_ptr,
    vals_ptr, meta_ptr, rowoff_ptr, toff_ptr, scale_ptr, zero_ptr,
    B, N, K, stride_xb, stride_ob,
    vals_stride, meta_stride, n_tiles, n_groups,
    FMT: tl.constexpr, NN: tl.constexpr, MM: tl.constexpr, QBITS: tl.constexpr,
    SYM: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr,
    USE_DOT: tl.constexpr, SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr = False,
    GATHER_X: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    n_kt = tl.cdiv(K, BK)
    per = tl.cdiv(n_kt, SPLIT_K)
    kt0 = pid_k * per
    kt1 = tl.minimum(kt0 + per, n_kt)
    bidx = pid_b * BB + tl.arange(0, BB)
    bmask = bidx < B
    # GATHER_X (N:M, batch 1): multiply in compressed space, x gathered at the kept columns
    ACC_W: tl.constexpr = BK * NN // MM if GATHER_X else BK
    if USE_DOT:
        acc = tl.zeros((BN, BB), dtype=tl.float32)
    else:
        acc2 = tl.zeros((BN, ACC_W), dtype=tl.float32)
    for kt in range(kt0, kt1):
        k0 = kt * BK
        if GATHER_X:
            v, idx = _nm_compressed(k0, rows, rmask, K, vals_ptr, meta_ptr, scale_ptr, zero_ptr,
                                    vals_stride, meta_stride, n_groups, NN, MM, QBITS, SYM, G, BN, BK)
            tcol = k0 + (tl.arange(0, ACC_W) // NN) * MM
            xg = tl.load(x_ptr + pid_b * stride_xb + tcol[None, :] + idx,
                         mask=rmask[:, None] & (tcol[None, :] < K), other=0.0).to(tl.float32)
            acc2 += v * xg
        else:
            w = _decode_tile(k0, rows, rmask, K, vals_ptr, meta_ptr, rowoff_ptr, toff_ptr, scale_ptr,
                             zero_ptr, vals_stride, meta_stride, n_tiles, n_groups,
                             FMT, NN, MM, QBITS, SYM, G, TILE, BN, BK)
            cols = k0 + tl.arange(0, BK)
            cmask = cols < K
            if USE_DOT:
                xt = tl.load(x_ptr + bidx[None, :] * stride_xb + cols[:, None],
                             mask=cmask[:, None] & bmask[None, :], other=0.0)
                if DOT_F32:  # the interpreter multiplies bf16 as raw integers: use float32 there
                    acc += tl.dot(w, xt.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(w.to(xt.dtype), xt)
            else:
                xv = tl.load(x_ptr + pid_b * stride_xb + cols, mask=cmask, other=0.0).to(tl.float32)
                acc2 += w * xv[None, :]
    if USE_DOT:
        optr = out_ptr + bidx[None, :] * stride_ob + rows[:, None]
        omask = rmask[:, None] & bmask[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(optr, acc, mask=omask)
        else:
            tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        res = tl.sum(acc2, axis=1)
        optr = out_ptr + pid_b * stride_ob + rows
        if SPLIT_K > 1:
            tl.atomic_add(optr, res, mask=rmask)
        else:
            tl.store(optr, res.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def decompress_kernel(
    out_ptr, vals_ptr, meta_ptr, rowoff_ptr, toff_ptr, scale_ptr, zero_ptr,
    N, K, vals_stride, meta_stride, n_tiles, n_groups,
    FMT: tl.constexpr, NN: tl.constexpr, MM: tl.constexpr, QBITS: tl.constexpr,
    SYM: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):
    """Write the dense (N, K) weight: the large-batch path decodes once, then calls cuBLAS."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    k0 = tl.program_id(1) * BK
    w = _decode_tile(k0, rows, rmask, K, vals_ptr, meta_ptr, rowoff_ptr, toff_ptr, scale_ptr,
                     zero_ptr, vals_stride, meta_stride, n_tiles, n_groups,
                     FMT, NN, MM, QBITS, SYM, G, TILE, BN, BK)
    cols = k0 + tl.arange(0, BK)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cols[None, :] < K))
