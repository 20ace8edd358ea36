"""Decode kernels (batch 1..16) for 2:4 weights that work on whole 8-column units instead of
per-element tiles.

A *unit* is 8 consecutive columns of one row. Every tensor the kernels read is viewed so that one
unit is one element, and every tile is a (BN rows, U units) array of the same shape, so the loads
and the arithmetic share one register layout (sm_90 TTGIR: no shared-memory layout conversion of
the weights; see ``XROW`` for x):

* float values: the unit's 4 stored values are one int64 (``values.view(int64)``), its four 2-bit
  indices one byte of ``indices``; int4 codes: the 4 nibbles are one int16.
* x: the unit's 8 inputs are two int64 (``x.view(int64)``), split into 16-bit fields with shifts.

Batch 1 multiplies in compressed space with selects instead of gathers: a group keeps positions
i0 < i1, so x[i0] is one of x0..x2 and x[i1] one of x1..x3. Batches of 2..BB expand the unit to its
8 dense weights once (selects) and apply them to every input row with FMAs.
int4: codes become floats with the 2**23 magic-number trick (``0x4B000000 | nibble`` is the float
2**23 + nibble); the group scale multiplies the unit's partial sum once.

The loop is software-pipelined by hand: the independent loads of the next tile are issued before
the current one is computed. K splits add float32 partial sums atomically (skinny layers).
Variants (constexpr flags, off by default; docs/results/gpu_kernels.md says which were timed):
``XROW`` loads x as a (BN, U) tile in the weights' layout (no per-iteration layout conversion),
``PRMT`` (batch 1) picks x at the kept positions with one byte permute per group, ``DOT`` runs
batch rows on the tensor cores from a tile assembled in registers.
Everything also runs under ``TRITON_INTERPRET=1`` on CPU tensors (``INTERP`` switches the inline
assembly, the byte permute, to arithmetic).

Bitmask weights with 16-bit values have their own kernels on the sliced layout (sliced.py); the
unit kernel that read the row-major bitmask layout (timed in runs 6-12) was removed in session 8.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sparse_mm import _write


@triton.jit
def _h2f(h, BF16: tl.constexpr):
    """int32 holding a 16-bit float pattern in its low bits -> float32."""
    if BF16:
        return (h << 16).to(tl.float32, bitcast=True)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _split4(q, BF16: tl.constexpr):
    """int64 holding 4 16-bit floats (little-endian) -> 4 float32."""
    lo = q.to(tl.int32)
    hi = (q >> 32).to(tl.int32)
    return _h2f(lo, BF16), _h2f(lo >> 16, BF16), _h2f(hi, BF16), _h2f(hi >> 16, BF16)


@triton.jit
def _x8(x64_ptr, u, umask, BF16: tl.constexpr):
    """The 8 inputs of units ``u`` (any shape) as float32, from the int64 view of x."""
    xa = tl.load(x64_ptr + 2 * u, mask=umask, other=0)
    xb = tl.load(x64_ptr + 2 * u + 1, mask=umask, other=0)
    x0, x1, x2, x3 = _split4(xa, BF16)
    x4, x5, x6, x7 = _split4(xb, BF16)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _prmt(a, b, sel, INTERP: tl.constexpr):
    """PTX ``prmt.b32``: result byte k = byte (nibble k of ``sel``) of the 8 bytes {b, a}."""
    if INTERP:
        ab = (a.to(tl.int64) & 0xFFFFFFFF) | (b.to(tl.int64) << 32)
        r = a * 0
        for k in tl.static_range(4):
            idx = ((sel >> (4 * k)) & 7).to(tl.int64)
            r = r | (((ab >> (idx * 8)) & 0xFF).to(tl.int32) << (8 * k))
        return r
    return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _magic(c, off):
    """nibble field c (0..15, int32) -> float32 c - off + 2**23 ... minus 2**23: exact small integers."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - off


@triton.jit
def _x_units(x64_ptr, rows, u, U_LIM, BB: tl.constexpr, XROW: tl.constexpr):
    """Batch 1: x of units ``u`` as two int64 (8 x 16 bits); batched kernels load x rows where they
    use them (L1/L2 hits) and get ``u`` back as placeholders."""
    if BB == 1:
        if XROW:
            # x as a (BN, U) tile (rows read the same addresses), in the weights' register layout;
            # a 1-D x tile may be converted through shared memory every iteration (sm_90 TTGIR of
            # some tiles, e.g. 4 rows x 64 units on 2 warps)
            xp = x64_ptr + (rows * 0)[:, None] + 2 * u[None, :]
            xm = ((rows * 0)[:, None] + u[None, :]) < U_LIM
        else:
            xp = x64_ptr + 2 * u
            xm = u < U_LIM
        xa = tl.load(xp, mask=xm, other=0)
        xb = tl.load(xp + 1, mask=xm, other=0)
    else:  # one return statement: the compiler requires one return type across all of them
        xa = u
        xb = u
    return xa, xb


# ------------------------------------------------------------------------------------------ 2:4
@triton.jit
def _nm24_load(kt, rows, rmask, U_LIM, vq_ptr, idx_ptr, s_ptr, z_ptr, x64_ptr, vs, ms, ng, stride_xb,
               b0, B, QBITS: tl.constexpr, SYM: tl.constexpr, G: tl.constexpr, U: tl.constexpr,
               BB: tl.constexpr, XROW: tl.constexpr):
    u = kt * U + tl.arange(0, U)
    m2 = rmask[:, None] & (u[None, :] < U_LIM)
    q = tl.load(vq_ptr + rows[:, None] * vs + u[None, :], mask=m2, other=0)
    ib = tl.load(idx_ptr + rows[:, None] * ms + u[None, :], mask=m2, other=0)
    if QBITS == 4:
        gi = (u * 8) // G
        s = tl.load(s_ptr + rows[:, None] * ng + gi[None, :], mask=m2, other=0.0)
        if SYM:
            z = s
        else:
            z = tl.load(z_ptr + rows[:, None] * ng + gi[None, :], mask=m2, other=0)
    else:
        s = q
        z = q
    xa, xb = _x_units(x64_ptr, rows, u, U_LIM, BB, XROW)
    return q, ib, s, z, xa, xb


@triton.jit
def _nm24_vals(q, s, z, QBITS: tl.constexpr, SYM: tl.constexpr, BF16: tl.constexpr):
    """The unit's 4 stored values as float32 (codes for int4: the scale is applied later)."""
    if QBITS == 4:
        h = q.to(tl.int32) & 0xFFFF
        if SYM:
            h = h ^ 0x8888  # two's-complement nibble n -> n + 8 in 0..15
            off = 8388616.0
        else:
            off = z.to(tl.float32) + 8388608.0
        return (_magic(h & 15, off), _magic((h >> 4) & 15, off), _magic((h >> 8) & 15, off),
                _magic((h >> 12) & 15, off))
    return _split4(q, BF16)


@triton.jit
def _program(x_ptr, N, K, stride_xb, split_k, BN: tl.constexpr, U: tl.constexpr, BB: tl.constexpr):
    """This program's rows, first batch row, unit-tile range [kt0, kt1) of its K split and the unit
    limit, x viewed as int64 (4 x 16-bit per element; batch 1: at its row), and the zeroed accumulator."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    b0 = tl.program_id(2) * BB
    U_ALL = K // 8
    n_kt = tl.cdiv(U_ALL, U)
    per = tl.cdiv(n_kt, split_k)
    kt0 = tl.program_id(1) * per
    kt1 = tl.minimum(kt0 + per, n_kt)
    U_LIM = tl.minimum(U_ALL, kt1 * U)
    x64_ptr = x_ptr.to(tl.pointer_type(tl.int64))
    if BB == 1:
        x64_ptr += b0 * (stride_xb // 4)
        acc = tl.zeros((BN, U), dtype=tl.float32)
    else:
        acc = tl.zeros((BN, BB), dtype=tl.float32)
    return rows, rmask, b0, kt0, kt1, U_LIM, x64_ptr, acc


@triton.jit
def nm24_gemv_kernel(
    x_ptr, out_ptr, vq_ptr, idx_ptr, s_ptr, z_ptr,
    B, N, K, stride_xb, stride_ob, vs, ms, ng, split_k,
    QBITS: tl.constexpr, SYM: tl.constexpr, G: tl.constexpr, BF16: tl.constexpr, VBF16: tl.constexpr,
    INTERP: tl.constexpr, BN: tl.constexpr, U: tl.constexpr, BB: tl.constexpr, ATOMIC: tl.constexpr,
    DOT: tl.constexpr = False, DOT_F32: tl.constexpr = False, XROW: tl.constexpr = False,
    PRMT: tl.constexpr = False,
):
    """y = x @ W^T, W 2:4 (float values or int4 codes), x (B, K) with K % 8 == 0."""
    rows, rmask, b0, kt0, kt1, U_LIM, x64_ptr, acc = _program(x_ptr, N, K, stride_xb, split_k, BN, U, BB)
    q, ib, s, z, xa, xb = _nm24_load(kt0, rows, rmask, U_LIM, vq_ptr, idx_ptr, s_ptr, z_ptr, x64_ptr,
                                     vs, ms, ng, stride_xb, b0, B, QBITS, SYM, G, U, BB, XROW)
    for kt in range(kt0, kt1):
        qc, ibc, sc, zc, xac, xbc = q, ib, s, z, xa, xb
        q, ib, s, z, xa, xb = _nm24_load(kt + 1, rows, rmask, U_LIM, vq_ptr, idx_ptr, s_ptr, z_ptr,
                                         x64_ptr, vs, ms, ng, stride_xb, b0, B, QBITS, SYM, G, U, BB, XROW)
        v0, v1, v2, v3 = _nm24_vals(qc, sc, zc, QBITS, SYM, VBF16)
        ibi = ibc.to(tl.int32)
        i0 = ibi & 3
        i1 = (ibi >> 2) & 3
        i2 = (ibi >> 4) & 3
        i3 = (ibi >> 6) & 3
        if BB == 1:
            if PRMT:
                # one byte permute picks x[i0] | x[i1] << 16 out of the group's four 16-bit inputs
                # (selector nibbles 2*i0, 2*i0+1, 2*i1, 2*i1+1); only the picked inputs are converted
                s0 = i0 * 0x22 + i1 * 0x2200 + 0x1010
                s1 = i2 * 0x22 + i3 * 0x2200 + 0x1010
                pa = _prmt(xac.to(tl.int32), (xac >> 32).to(tl.int32), s0, INTERP)
                pb = _prmt(xbc.to(tl.int32), (xbc >> 32).to(tl.int32), s1, INTERP)
                xa0 = _h2f(pa, BF16)
                xa1 = _h2f(pa >> 16, BF16)
                xb0 = _h2f(pb, BF16)
                xb1 = _h2f(pb >> 16, BF16)
            else:
                # kept positions i0 < i1 of each group: x at i0 is x0..x2, x at i1 is x1..x3
                x0, x1, x2, x3 = _split4(xac, BF16)
                x4, x5, x6, x7 = _split4(xbc, BF16)
                xa0 = tl.where(i0 == 0, x0, tl.where(i0 == 1, x1, x2))
                xa1 = tl.where(i1 == 1, x1, tl.where(i1 == 2, x2, x3))
                xb0 = tl.where(i2 == 0, x4, tl.where(i2 == 1, x5, x6))
                xb1 = tl.where(i3 == 1, x5, tl.where(i3 == 2, x6, x7))
            p = v0 * xa0 + v1 * xa1 + v2 * xb0 + v3 * xb1
            if QBITS == 4:
                acc += sc.to(tl.float32) * p
            else:
                acc += p
        else:
            if QBITS == 4:
                sf = sc.to(tl.float32)
                v0, v1, v2, v3 = v0 * sf, v1 * sf, v2 * sf, v3 * sf
            # dense weights of the unit's 8 columns, built once and applied to every input row
            w0 = tl.where(i0 == 0, v0, 0.0)
            w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, 0.0))
            w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, 0.0))
            w3 = tl.where(i1 == 3, v1, 0.0)
            w4 = tl.where(i2 == 0, v2, 0.0)
            w5 = tl.where(i2 == 1, v2, tl.where(i3 == 1, v3, 0.0))
            w6 = tl.where(i2 == 2, v2, tl.where(i3 == 2, v3, 0.0))
            w7 = tl.where(i3 == 3, v3, 0.0)
            if DOT:
                acc = _dot_rows(acc, w0, w1, w2, w3, w4, w5, w6, w7, x_ptr, kt, U_LIM, b0, B, stride_xb,
                                BB, U, DOT_F32)
            else:
                acc = _apply_rows(acc, w0, w1, w2, w3, w4, w5, w6, w7, x64_ptr, xac, U_LIM, b0, B, stride_xb,
                                  BF16, BB, XROW)
    _store(acc, out_ptr, rows, rmask, b0, B, stride_ob, BB, BN, ATOMIC)


@triton.jit
def _store(acc, out_ptr, rows, rmask, b0, B, stride_ob, BB: tl.constexpr, BN: tl.constexpr,
           ATOMIC: tl.constexpr):
    if BB == 1:
        _write(out_ptr + b0 * stride_ob + rows, tl.sum(acc, axis=1), rmask, ATOMIC)
    else:
        bi = b0 + tl.arange(0, BB)
        _write(out_ptr + bi[None, :] * stride_ob + rows[:, None], acc, (bi[None, :] < B) & rmask[:, None],
               ATOMIC)


@triton.jit
def _dot_rows(acc, w0, w1, w2, w3, w4, w5, w6, w7, x_ptr, kt, U_LIM, b0, B, stride_xb,
              BB: tl.constexpr, U: tl.constexpr, DOT_F32: tl.constexpr):
    """acc (BN, BB) += the tile's dense weights (BN, 8U), assembled from the unit columns in
    registers (joins), times x^T (8U, BB) on the tensor cores."""
    a0 = tl.join(w0, w4)  # joined dims, outermost first: (a, b, c) -> column 4a + 2b + c
    a1 = tl.join(w1, w5)
    a2 = tl.join(w2, w6)
    a3 = tl.join(w3, w7)
    c0 = tl.join(a0, a2)
    c1 = tl.join(a1, a3)
    w = tl.join(c0, c1)
    BN: tl.constexpr = w0.shape[0]
    w = tl.reshape(w, (BN, 8 * U))
    cols = kt * (8 * U) + tl.arange(0, 8 * U)
    bi = b0 + tl.arange(0, BB)
    xt = tl.load(x_ptr + bi[None, :] * stride_xb + cols[:, None],
                 mask=(cols[:, None] < U_LIM * 8) & (bi[None, :] < B), other=0.0)
    if DOT_F32:  # the interpreter multiplies bf16 as raw integers: use float32 there
        acc += tl.dot(w, xt.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(w.to(xt.dtype), xt)
    return acc


@triton.jit
def _apply_rows(acc, w0, w1, w2, w3, w4, w5, w6, w7, x64_ptr, u, U_LIM, b0, B, stride_xb,
                BF16: tl.constexpr, BB: tl.constexpr, XROW: tl.constexpr):
    """acc (BN, BB) += per input row b: sum over the tile of the unit weights times x[b] (row-reduced
    per tile, so every tensor keeps the (BN, U) layout; no 3-D broadcast)."""
    bcol = tl.arange(0, BB)
    if XROW:
        u = (w0 * 0).to(tl.int32) + u[None, :]  # (BN, U): x in the weights' register layout
    for j in tl.static_range(BB):
        xm = (u < U_LIM) & (u * 0 + b0 + j < B)
        x0, x1, x2, x3, x4, x5, x6, x7 = _x8(x64_ptr + (b0 + j) * (stride_xb // 4), u, xm, BF16)
        p = (w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3
             + w4 * x4 + w5 * x5 + w6 * x6 + w7 * x7)
        r = tl.sum(p, axis=1)
        acc += tl.where(bcol[None, :] == j, r[:, None], 0.0)
    return acc
