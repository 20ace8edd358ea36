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


# ------------------------------------------------------------------------- 2:4 + int4, batch 1
# One 32-bit word of int4 codes holds the 8 kept values of 16 columns (4 groups of 4, low nibble
# first); its 16 index bits (one 4-bit code i0 | i1 << 2 per group) are one int16. The inline PTX
# below turns a word into its dot product with x in 55 PTX instructions (about 6 per value; the unit
# kernel above spends about 27): per group one byte permute copies the group's code byte into
# both 16-bit lanes, one masked OR makes the two nibbles fp16 1024 + n and 1024 + 16 n (the
# symmetric codes' sign bit flipped by an XOR in the same logic op), one fp16x2 FMA maps them to
# n - 8; a second byte permute picks x[i0] | x[i1] << 16 out of the group's four inputs (its
# selector, 0x1010 + 0x22 i0 + 0x2200 i1, built for two groups at once in the two 16-bit lanes);
# the four fp16x2 products of the word are summed in fp16x2 and the two lanes in float32.
def _int4_word_ptx() -> str:
    """The PTX text described above: straight-line code, one block of lines per group."""
    lines = [f"mov.b64 {{xa{2 * g}, xa{2 * g + 1}}}, ${3 + g};" for g in range(4)]  # x: 2 x 32 bits per group
    lines += ["mov.b32 cm, 0x2C003C00;", "mov.b32 ca, 0xD480E408;"]  # fp16x2 (1, 1/16) and (-1032, -72)
    for g in range(4):
        if g % 2 == 0:  # selectors of groups g and g + 1, one per 16-bit lane of s
            lines += [f"shr.b32 y, $2, {4 * g};", "and.b32 y, y, 0xFF;", "mul.lo.u32 y, y, 0x1001;",
                      "and.b32 t, y, 0x00030003;", "mad.lo.u32 s, t, 0x22, 0x10101010;",
                      "and.b32 t, y, 0x000C000C;", "mad.lo.u32 s, t, 0x880, s;"]
            sel = "s"
        else:
            lines.append("shr.b32 sel, s, 16;")
            sel = "sel"
        lines += [f"prmt.b32 t, $1, $1, {0x1111 * g:#06x};",  # code byte g in both lanes
                  "xor.b32 t, t, 0x00800008;", "and.b32 t, t, 0x00F0000F;", "or.b32 t, t, 0x64006400;",
                  "fma.rn.f16x2 w, t, cm, ca;",  # the group's two signed codes
                  f"prmt.b32 p, xa{2 * g}, xa{2 * g + 1}, {sel};",  # x[i0] | x[i1] << 16
                  "mul.rn.f16x2 acc, w, p;" if g == 0 else "fma.rn.f16x2 acc, w, p, acc;"]
    lines += ["mov.b32 {hl, hh}, acc;", "cvt.f32.f16 fl, hl;", "cvt.f32.f16 fh, hh;", "add.f32 fl, fl, fh;",
              "mov.b32 $0, fl;"]
    regs = [".reg .b32 xa0, xa1, xa2, xa3, xa4, xa5, xa6, xa7;", ".reg .b32 y, t, s, sel, w, p, acc, cm, ca;",
            ".reg .b16 hl, hh;", ".reg .f32 fl, fh;"]
    return "{\n" + "\n".join(regs + lines) + "\n}"


_INT4_WORD_PTX = _int4_word_ptx()


@triton.jit
def _int4_word_dot(q, ib, x0, x1, x2, x3, INTERP: tl.constexpr):
    """Dot product (float32) of one word of symmetric int4 2:4 codes ``q`` (int32), its index
    bits ``ib`` (int32, low 16 bits) and the word's 16 fp16 inputs (4 int64 ``x0..x3``, one per
    group), unscaled. The interpreter path computes the same with plain arithmetic."""
    if INTERP:
        acc = q.to(tl.float32) * 0.0
        for g in tl.static_range(4):
            xg = x0 if g == 0 else x1 if g == 1 else x2 if g == 2 else x3
            b = (q >> (8 * g)) & 0xFF
            c = (ib >> (4 * g)) & 15
            i0 = (c & 3).to(tl.int64)
            i1 = (c >> 2).to(tl.int64)
            xv0 = _h2f(((xg >> (16 * i0)) & 0xFFFF).to(tl.int32), False)
            xv1 = _h2f(((xg >> (16 * i1)) & 0xFFFF).to(tl.int32), False)
            v0 = (((b & 15) ^ 8) - 8).to(tl.float32)
            v1 = ((((b >> 4) & 15) ^ 8) - 8).to(tl.float32)
            acc += v0 * xv0 + v1 * xv1
        return acc
    r = tl.inline_asm_elementwise(_INT4_WORD_PTX, "=r,r,r,l,l,l,l", [q, ib, x0, x1, x2, x3],
                                  dtype=tl.int32, is_pure=True, pack=1)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _int4_word_load(kt, rows, rmask, W_LIM, q_ptr, ib_ptr, s_ptr, x64_ptr, qs, ibs, ng,
                    G: tl.constexpr, W: tl.constexpr, XCONT: tl.constexpr):
    w = kt * W + tl.arange(0, W)
    wm = (rows * 0)[:, None] + w[None, :]  # word index as a (BN, W) tile: x in the weights' layout
    m2 = rmask[:, None] & (wm < W_LIM)
    q = tl.load(q_ptr + rows[:, None] * qs + w[None, :], mask=m2, other=0)
    ib = tl.load(ib_ptr + rows[:, None] * ibs + w[None, :], mask=m2, other=0)
    s = tl.load(s_ptr + rows[:, None] * ng + ((w * 16) // G)[None, :], mask=m2, other=0.0)
    if XCONT:
        # the tile's x as one contiguous (BN, 4W) int64 load (vectorizable), split into 4 groups
        j = tl.arange(0, 4 * W)
        xj = (rows * 0)[:, None] + kt * (4 * W) + j[None, :]
        xt = tl.load(x64_ptr + xj, mask=xj < 4 * W_LIM, other=0)
        even, odd = tl.split(tl.reshape(xt, (xt.shape[0], W, 2, 2)))
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
    else:
        xm = wm < W_LIM
        x0 = tl.load(x64_ptr + 4 * wm, mask=xm, other=0)
        x1 = tl.load(x64_ptr + 4 * wm + 1, mask=xm, other=0)
        x2 = tl.load(x64_ptr + 4 * wm + 2, mask=xm, other=0)
        x3 = tl.load(x64_ptr + 4 * wm + 3, mask=xm, other=0)
    return q, ib, s, x0, x1, x2, x3


@triton.jit
def nm24_int4_word_kernel(
    x_ptr, out_ptr, q_ptr, ib_ptr, s_ptr, N, K, stride_xb, stride_ob, qs, ibs, ng, split_k,
    G: tl.constexpr, INTERP: tl.constexpr, BN: tl.constexpr, W: tl.constexpr, ATOMIC: tl.constexpr,
    XCONT: tl.constexpr = False,
):
    """y = x @ W^T for fp16 inputs x (K % 16 == 0), W 2:4 with symmetric int4 codes and fp16 group
    scales, read as (BN rows, W words) tiles; K split over the grid's second axis, one input row per
    index of the third (each re-reads the weights: meant for batch 1)."""
    # a tile of W words is one of 2W units: the unit kernels' program prologue, in units
    rows, rmask, b, kt0, kt1, U_LIM, x64_ptr, _ = _program(x_ptr, N, K, stride_xb, split_k, BN, 2 * W, 1)
    W_LIM = U_LIM // 2
    acc = tl.zeros((BN, W), dtype=tl.float32)
    q, ib, s, x0, x1, x2, x3 = _int4_word_load(kt0, rows, rmask, W_LIM, q_ptr, ib_ptr, s_ptr, x64_ptr,
                                               qs, ibs, ng, G, W, XCONT)
    for kt in range(kt0, kt1):  # the next tile's loads are issued before this one is computed
        qc, ibc, sc, x0c, x1c, x2c, x3c = q, ib, s, x0, x1, x2, x3
        q, ib, s, x0, x1, x2, x3 = _int4_word_load(kt + 1, rows, rmask, W_LIM, q_ptr, ib_ptr, s_ptr,
                                                   x64_ptr, qs, ibs, ng, G, W, XCONT)
        d = _int4_word_dot(qc, ibc.to(tl.int32) & 0xFFFF, x0c, x1c, x2c, x3c, INTERP)
        acc += sc.to(tl.float32) * d
    _store(acc, out_ptr, rows, rmask, b, b + 1, stride_ob, 1, BN, ATOMIC)
