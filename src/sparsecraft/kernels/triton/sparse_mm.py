"""Triton kernels: y = x @ W^T with W stored compressed (bitmask or packed N:M, float or int codes).

Each program owns BN output rows and a range of BK-column tiles (the grid is row tiles x K splits x
batch tiles; with several K splits the partial sums are added atomically into a float32 buffer, so
skinny layers still fill the GPU). Per tile:
* bitmask: the mask bits give each kept column its position in the row's compacted values
  (exclusive prefix sum + the precomputed per-tile offset), the values are gathered into a dense
  (BN, BK) tile in registers;
* N:M: the T = BK*N/M stored values are loaded contiguously with their in-group positions;
* batch 1 multiplies in place: bitmask against the dense x tile, N:M in compressed space against x
  gathered at the kept columns; batches of 2..BB expand the tile to dense and use ``tl.dot``.

The product is memory-latency bound, so the loop is software-pipelined by hand: the independent
loads of tile k+2 (mask / values / indices / scales) and the dependent loads of tile k+1 (gathered
values or gathered x) are issued before tile k is computed.

Every kernel also runs under ``TRITON_INTERPRET=1`` on CPU tensors (the tests do exactly that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FMT_BITMASK = 0
FMT_NM = 1


@triton.jit
def _unpack(packed, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """(R, C) int32 bytes -> (R, C * 8 // BITS) little-endian fields of BITS bits.

    2- and 4-bit fields use ``tl.interleave`` (join + reshape on a new minor axis, in registers): a
    3-D broadcast + reshape moved the bytes through shared memory (sm_90 TTGIR, Triton 3.9).
    """
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 4:
        out = tl.interleave(packed & MASK, (packed >> 4) & MASK)
    elif BITS == 2:
        out = tl.interleave(tl.interleave(packed & MASK, (packed >> 4) & MASK),
                            tl.interleave((packed >> 2) & MASK, (packed >> 6) & MASK))
    else:  # bits: a broadcast over the 8 positions measured cheaper than three interleaves
        sh = tl.arange(0, 8)
        out = tl.reshape((packed[:, :, None] >> sh[None, None, :]) & 1, (R, C * 8))
    return out


@triton.jit
def _dequant(code, s, z, BN: tl.constexpr, W: tl.constexpr, SPG: tl.constexpr, SYM: tl.constexpr):
    """codes (BN, W) int32 -> float32 (code - zero) * scale; W columns span SPG quant groups."""
    if SPG == 1:  # no reshape: it would cost a layout conversion through shared memory
        c = code.to(tl.float32)
        if not SYM:
            c = c - z
        w = c * s
    else:
        c3 = tl.reshape(code.to(tl.float32), (BN, SPG, W // SPG))
        if not SYM:
            c3 = c3 - z[:, :, None]
        w = tl.reshape(c3 * s[:, :, None], (BN, W))
    return w


@triton.jit
def _stage1(kt, rows, rmask, K, vals_ptr, meta_ptr, toff_ptr, scale_ptr, zero_ptr,
            vals_stride, meta_stride, n_tiles, n_groups,
            FMT: tl.constexpr, NN: tl.constexpr, MM: tl.constexpr, QBITS: tl.constexpr,
            SYM: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Loads of tile kt that depend on nothing else: (a0, a1, scales, zeros).

    K is the column limit of this program (its K split's end): tiles past it load nothing.

    bitmask: a0 = mask bytes (BN, BK/8), a1 = per-tile value offsets (BN,)
    N:M:     a0 = stored values or code bytes (BN, T or T/2), a1 = index bytes (BN, T*IB/8)
    """
    SPG: tl.constexpr = BK // G if BK > G else 1
    k0 = kt * BK
    m = rmask & (rows * 0 + k0 < K)
    if FMT == 0:
        bcols = k0 // 8 + tl.arange(0, BK // 8)
        a0 = tl.load(meta_ptr + rows[:, None] * meta_stride + bcols[None, :],
                     mask=m[:, None] & (bcols[None, :] * 8 < K), other=0)
        a1 = tl.load(toff_ptr + rows * n_tiles + k0 // TILE, mask=m, other=0)
    else:
        T: tl.constexpr = BK * NN // MM
        IB: tl.constexpr = 2 if MM <= 4 else 4
        t0 = k0 * NN // MM
        t_lim = K * NN // MM
        if QBITS == 4:
            tb = t0 // 2 + tl.arange(0, T // 2)
            a0 = tl.load(vals_ptr + rows[:, None] * vals_stride + tb[None, :],
                         mask=m[:, None] & (tb[None, :] < (t_lim + 1) // 2), other=0)
        else:
            tk = t0 + tl.arange(0, T)
            a0 = tl.load(vals_ptr + rows[:, None] * vals_stride + tk[None, :],
                         mask=m[:, None] & (tk[None, :] < t_lim), other=0)
        ib = t0 * IB // 8 + tl.arange(0, T * IB // 8)
        a1 = tl.load(meta_ptr + rows[:, None] * meta_stride + ib[None, :],
                     mask=m[:, None] & (ib[None, :] < (t_lim * IB + 7) // 8), other=0)
    if QBITS != 0:
        g = k0 // G + tl.arange(0, SPG)
        gm = m[:, None] & (g[None, :] * G < K)
        s = tl.load(scale_ptr + rows[:, None] * n_groups + g[None, :], mask=gm, other=0.0).to(tl.float32)
        if SYM:
            z = s
        else:
            z = tl.load(zero_ptr + rows[:, None] * n_groups + g[None, :], mask=gm, other=0).to(tl.float32)
    else:
        s = tl.zeros((BN, SPG), dtype=tl.float32)
        z = s
    return a0, a1, s, z


@triton.jit
def _bm_stage2(a0, a1, rstart, vals_ptr, QBITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Bitmask: positions of the kept columns and the gather of their values (or code bytes)."""
    bits = _unpack(a0.to(tl.int32), 1, BN, BK // 8)
    pref = tl.cumsum(bits, axis=1) - bits
    start = rstart + a1
    pos = start[:, None] + pref
    keep = bits != 0  # tiles past the limit loaded no mask bytes: nothing is gathered
    if QBITS == 4:
        raw = tl.load(vals_ptr + pos // 2, mask=keep, other=0)
    else:
        raw = tl.load(vals_ptr + pos, mask=keep, other=0)
    return raw, pos, keep


@triton.jit
def _bm_stage3(raw, pos, keep, s, z, QBITS: tl.constexpr, SYM: tl.constexpr, G: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr):
    """Bitmask: dense float32 (BN, BK) tile from the gathered values."""
    SPG: tl.constexpr = BK // G if BK > G else 1
    if QBITS == 0:
        w = raw.to(tl.float32)
    else:
        if QBITS == 8:
            code = raw.to(tl.int32)
        else:
            code = (raw.to(tl.int32) >> ((pos & 1) * 4)) & 15
            if SYM:
                code = (code ^ 8) - 8
        w = tl.where(keep, _dequant(code, s, z, BN, BK, SPG, SYM), 0.0)
    return w


@triton.jit
def _nm_values(a0, s, z, QBITS: tl.constexpr, SYM: tl.constexpr, NN: tl.constexpr, MM: tl.constexpr,
               G: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """N:M: float32 (BN, T) stored values (dequantized)."""
    SPG: tl.constexpr = BK // G if BK > G else 1
    T: tl.constexpr = BK * NN // MM
    if QBITS == 4:
        code = _unpack(a0.to(tl.int32), 4, BN, T // 2)
        if SYM:
            code = (code ^ 8) - 8
        v = _dequant(code, s, z, BN, T, SPG, SYM)
    elif QBITS == 8:
        v = _dequant(a0.to(tl.int32), s, z, BN, T, SPG, SYM)
    else:
        v = a0.to(tl.float32)
    return v


@triton.jit
def _nm_index(a1, MM: tl.constexpr, NN: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    T: tl.constexpr = BK * NN // MM
    IB: tl.constexpr = 2 if MM <= 4 else 4
    return _unpack(a1.to(tl.int32), IB, BN, T * IB // 8)


@triton.jit
def _nm_expand(v, idx, NN: tl.constexpr, MM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Scatter the N kept values of each M-group to their columns: dense (BN, BK), in registers."""
    v3 = tl.reshape(v, (BN, BK // MM, NN))
    i3 = tl.reshape(idx, (BN, BK // MM, NN))
    hit = i3[:, :, :, None] == tl.arange(0, MM)[None, None, None, :]
    w4 = tl.where(hit, v3[:, :, :, None], 0.0)
    return tl.reshape(tl.sum(w4, axis=2), (BN, BK))


@triton.jit
def _x_tile(x_ptr, kt, K, bidx, bmask, b0, stride_xb, BK: tl.constexpr, USE_DOT: tl.constexpr):
    """x tile (BK, BB) for the dot, or x row b0's (BK,) slice."""
    cols = kt * BK + tl.arange(0, BK)
    cm = cols < K
    if USE_DOT:
        xt = tl.load(x_ptr + bidx[None, :] * stride_xb + cols[:, None], mask=cm[:, None] & bmask[None, :],
                     other=0.0)
    else:
        xt = tl.load(x_ptr + b0 * stride_xb + cols, mask=cm, other=0.0)
    return xt


@triton.jit
def _mul_add(acc, w, xt, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    if USE_DOT:
        if DOT_F32:  # the interpreter multiplies bf16 as raw integers: use float32 there
            acc += tl.dot(w, xt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(w.to(xt.dtype), xt)
    else:
        acc += w * xt.to(tl.float32)[None, :]
    return acc


def _out_buffer(x: torch.Tensor, out_f: int, split_k: int) -> torch.Tensor:
    """(batch, out_f) output of a kernel launch: float32 zeros when K splits add into it atomically
    (:func:`_write`), else uninitialised in x's dtype."""
    if split_k > 1:
        return torch.zeros(x.shape[0], out_f, device=x.device, dtype=torch.float32)
    return torch.empty(x.shape[0], out_f, device=x.device, dtype=x.dtype)


@triton.jit
def _pdl_start(PDL: tl.constexpr, INTERP: tl.constexpr):
    """Programmatic dependent launch (sm_90; the kernel launched with ``launch_pdl``): let the next
    kernel of the stream be scheduled (its weight loads overlap this kernel's tail), then wait
    until the previous kernel has finished and its writes are visible. Whatever a kernel does before
    this call may read only its weights. The interpreter runs kernels one after another: no-op."""
    if PDL and not INTERP:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def _write(ptr, v, mask, ATOMIC: tl.constexpr):
    """Store ``v`` in the output's dtype, or add it atomically (float32 partial sums of K splits;
    relaxed: read by a later kernel, or after a fence and a release, see mma24's fixup)."""
    if ATOMIC:
        tl.atomic_add(ptr, v, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def sparse_mm_kernel(
    x_ptr, out_ptr,
    vals_ptr, meta_ptr, rowoff_ptr, toff_ptr, scale_ptr, zero_ptr,
    B, N, K, stride_xb, stride_ob,
    vals_stride, meta_stride, n_tiles, n_groups, split_k,
    FMT: tl.constexpr, NN: tl.constexpr, MM: tl.constexpr, QBITS: tl.constexpr,
    SYM: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr,
    USE_DOT: tl.constexpr, ATOMIC: tl.constexpr, DOT_F32: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    n_kt = tl.cdiv(K, BK)
    per = tl.cdiv(n_kt, split_k)
    kt0 = pid_k * per
    kt1 = tl.minimum(kt0 + per, n_kt)
    klim = tl.minimum(K, kt1 * BK)  # columns this program may read: its split ends here
    bidx = pid_b * BB + tl.arange(0, BB)
    bmask = bidx < B
    GATHER: tl.constexpr = (FMT == 1) and (not USE_DOT)  # N:M at batch 1: compressed-space product
    ACC_W: tl.constexpr = BK * NN // MM if GATHER else BK
    if USE_DOT:
        acc = tl.zeros((BN, BB), dtype=tl.float32)
    else:
        acc = tl.zeros((BN, ACC_W), dtype=tl.float32)

    if FMT == 0:
        rstart = tl.load(rowoff_ptr + rows, mask=rmask, other=0)
        # prologue: tile kt0 through stage 2, tile kt0+1 through stage 1
        a0, a1, sA, zA = _stage1(kt0, rows, rmask, klim, vals_ptr, meta_ptr, toff_ptr, scale_ptr,
                                 zero_ptr, vals_stride, meta_stride, n_tiles, n_groups,
                                 FMT, NN, MM, QBITS, SYM, G, TILE, BN, BK)
        xA = _x_tile(x_ptr, kt0, klim, bidx, bmask, pid_b, stride_xb, BK, USE_DOT)
        rawB, posB, keepB = _bm_stage2(a0, a1, rstart, vals_ptr, QBITS, BN, BK)
        sB, zB, xB = sA, zA, xA
        a0, a1, sA, zA = _stage1(kt0 + 1, rows, rmask, klim, vals_ptr, meta_ptr, toff_ptr,
                                 scale_ptr, zero_ptr, vals_stride, meta_stride, n_tiles, n_groups,
                                 FMT, NN, MM, QBITS, SYM, G, TILE, BN, BK)
        xA = _x_tile(x_ptr, kt0 + 1, klim, bidx, bmask, pid_b, stride_xb, BK, USE_DOT)
        for kt in range(kt0, kt1):
            rawC, posC, keepC, sC, zC, xC = rawB, posB, keepB, sB, zB, xB
            rawB, posB, keepB = _bm_stage2(a0, a1, rstart, vals_ptr, QBITS, BN, BK)
            sB, zB, xB = sA, zA, xA
            a0, a1, sA, zA = _stage1(kt + 2, rows, rmask, klim, vals_ptr, meta_ptr, toff_ptr,
                                     scale_ptr, zero_ptr, vals_stride, meta_stride, n_tiles, n_groups,
                                     FMT, NN, MM, QBITS, SYM, G, TILE, BN, BK)
            xA = _x_tile(x_ptr, kt + 2, klim, bidx, bmask, pid_b, stride_xb, BK, USE_DOT)
            w = _bm_stage3(rawC, posC, keepC, sC, zC, QBITS, SYM, G, BN, BK)
            acc = _mul_add(acc, w, xC, USE_DOT, DOT_F32)
    elif GATHER:
        tcol_rel = ((tl.arange(0, ACC_W) // NN) * MM)[None, :]
        xrow = x_ptr + pid_b * stride_xb
        a0, a1, sA, zA = _stage1(kt0, rows, rmask, klim, vals_ptr, meta_ptr, toff_ptr, scale_ptr,
                                 zero_ptr, vals_stride, meta_stride, n_tiles, n_groups,
                                 FMT, NN, MM, QBITS, SYM, G, TILE, BN, BK)
        idx = _nm_index(a1, MM, NN, BN, BK)
        xgB = tl.load(xrow + kt0 * BK + tcol_rel + idx, mask=rmask[:, None] & (tcol_rel < klim - kt0 * BK),
                      other=0.0)
        rawB, sB, zB = a0, sA, zA
        a0, a1, sA, zA = _stage1(kt0 + 1, rows, rmask, klim, vals_ptr, meta_ptr, toff_ptr,
                                 scale_ptr, zero_ptr, vals_stride, meta_stride, n_tiles, n_groups,
                                 FMT, NN, MM, QBITS, SYM, G, TILE, BN, BK)
        for kt in range(kt0, kt1):
            rawC, sC, zC, xgC = rawB, sB, zB, xgB
            idx = _nm_index(a1, MM, NN, BN, BK)
            k1 = (kt + 1) * BK
            xgB = tl.load(xrow + k1 + tcol_rel + idx, mask=rmask[:, None] & (tcol_rel < klim - k1), other=0.0)
            rawB, sB, zB = a0, sA, zA
            a0, a1, sA, zA = _stage1(kt + 2, rows, rmask, klim, vals_ptr, meta_ptr, toff_ptr,
                                     scale_ptr, zero_ptr, vals_stride, meta_stride, n_tiles, n_groups,
                                     FMT, NN, MM, QBITS, SYM, G, TILE, BN, BK)
            v = _nm_values(rawC, sC, zC, QBITS, SYM, NN, MM, G, BN, BK)
            acc += v * xgC.to(tl.float32)
    else:
        a0, a1, sA, zA = _stage1(kt0, rows, rmask, klim, vals_ptr, meta_ptr, toff_ptr, scale_ptr,
                                 zero_ptr, vals_stride, meta_stride, n_tiles, n_groups,
                                 FMT, NN, MM, QBITS, SYM, G, TILE, BN, BK)
        xA = _x_tile(x_ptr, kt0, klim, bidx, bmask, pid_b, stride_xb, BK, USE_DOT)
        for kt in range(kt0, kt1):
            c0, c1, sC, zC, xC = a0, a1, sA, zA, xA
            a0, a1, sA, zA = _stage1(kt + 1, rows, rmask, klim, vals_ptr, meta_ptr, toff_ptr,
                                     scale_ptr, zero_ptr, vals_stride, meta_stride, n_tiles, n_groups,
                                     FMT, NN, MM, QBITS, SYM, G, TILE, BN, BK)
            xA = _x_tile(x_ptr, kt + 1, klim, bidx, bmask, pid_b, stride_xb, BK, USE_DOT)
            v = _nm_values(c0, sC, zC, QBITS, SYM, NN, MM, G, BN, BK)
            w = _nm_expand(v, _nm_index(c1, MM, NN, BN, BK), NN, MM, BN, BK)
            acc = _mul_add(acc, w, xC, USE_DOT, DOT_F32)

    if USE_DOT:
        _write(out_ptr + bidx[None, :] * stride_ob + rows[:, None], acc, rmask[:, None] & bmask[None, :],
               ATOMIC)
    else:
        _write(out_ptr + pid_b * stride_ob + rows, tl.sum(acc, axis=1), rmask, ATOMIC)


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
    kt = tl.program_id(1)
    a0, a1, s, z = _stage1(kt, rows, rmask, K, vals_ptr, meta_ptr, toff_ptr, scale_ptr, zero_ptr,
                           vals_stride, meta_stride, n_tiles, n_groups,
                           FMT, NN, MM, QBITS, SYM, G, TILE, BN, BK)
    if FMT == 0:
        rstart = tl.load(rowoff_ptr + rows, mask=rmask, other=0)
        raw, pos, keep = _bm_stage2(a0, a1, rstart, vals_ptr, QBITS, BN, BK)
        w = _bm_stage3(raw, pos, keep, s, z, QBITS, SYM, G, BN, BK)
    else:
        v = _nm_values(a0, s, z, QBITS, SYM, NN, MM, G, BN, BK)
        w = _nm_expand(v, _nm_index(a1, MM, NN, BN, BK), NN, MM, BN, BK)
    cols = kt * BK + tl.arange(0, BK)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cols[None, :] < K))
