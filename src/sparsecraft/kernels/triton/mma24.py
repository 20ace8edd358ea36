"""2:4 weights on the sparse tensor cores: ``mma.sp`` (m16n8k32) issued from Triton as inline PTX.

Triton exposes no sparse MMA, and its 2:4 decode kernels (gemv.py) spend tens of instructions per
kept value. ``mma.sp`` multiplies a 16 x 32 2:4 tile (stored as 16 x 16 values + 2-bit indices)
by a 32 x 8 dense tile in one warp instruction, so the weights only have to reach each lane's
registers in the instruction's fragment layout. :func:`pack` stores them that way once, so every
load is a plain coalesced one and no value moves between lanes or through shared memory.

The fragment layout (PTX ISA, "Matrix fragments for mma.sp.m16n8k32" with 16-bit types; lane
``l``, ``g = l // 4``, ``t = l % 4``, sparsity selector 0):

* A (16 rows x 16 kept values): register a0 holds kept values 2t, 2t+1 of row g, a1 the same of
  row g+8, a2 / a3 kept values 8+2t, 9+2t of rows g / g+8;
* the indices: lanes with t < 2 hold one 32-bit word, the 8 two-bit in-group positions of kept
  values 8t..8t+7 of row g (low half) and row g+8 (high half), little-endian as stored by
  ``sparsecraft.formats`` (group code i0 | i1 << 2); lanes t = 2, 3 are not read;
* B (32 columns x 8 input rows): register b_r holds x[g, 8r+2t], x[g, 8r+2t+1];
* C/D (16 x 8, float32): c0, c1 = rows g, input rows 2t, 2t+1; c2, c3 the same for row g+8.

One warp owns 16 output rows (an "m-tile") and walks K in chunks of 128 columns (4 MMAs). The
stored order puts each lane's operands of a step (16-bit values) or of a chunk (int4) in 16
consecutive bytes, so every lane fetches them with one 16-byte load (512 bytes per warp):
16-bit values are int32 (m-tiles, K/32 steps, 32 lanes, a0..a3); int4 codes int32 (m-tiles,
K/128 chunks, 32 lanes, 4 steps), 8 codes per lane and step in one word stored as ``code + 8``, so
that a mask and an OR make them fp16 ``1024 + u`` (or ``1024 + 16 u``) and one fp16x2 FMA maps
them to ``u - 8``, once for both n-tiles; the index words are int32 (m-tiles, chunks, 16 lanes
(g, t < 2), 4 steps); the int4 group scales (symmetric, group a multiple of 128) are int32
(m-tiles, groups, 8): the fp16 pair (row g, row g + 8), loaded with the chunk's operands. Batches
1..8 use one n8 tile, 9..16 two (the x tile is what is padded, the weights are read once). Each
int4 chunk's MMAs start from zero and the chunk sum is scaled per row into the float32
accumulator. K splits over the grid add float32 partial sums atomically (see :func:`mma24_mm`:
into a float32 output, or into a persistent workspace that the last split empties into the
output).

The lane a value lives in is read with ``%laneid`` / ``%tid.x`` and every address is computed from
it, so the kernel is correct for any register layout Triton gives its 1-D lane tensors as long as
each thread holds one element (the tensors have exactly 32 x num_warps elements).

Under ``TRITON_INTERPRET=1`` (CI) the inline PTX is replaced by arithmetic on the same fragments:
``_mma_emulated`` rebuilds each warp's dense tiles from the lanes' registers with tensor reshapes,
so the fragment addressing and :func:`pack` are checked on the CPU; the dequantizing PTX runs
through tests/ptx_emulator.py. Only the MMA instruction itself is checked on a GPU alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ...errors import SparsecraftError
from .gemv import _h2f
from .sparse_mm import _out_buffer, _pdl_start, _write

CHUNK = 128  # columns per loop iteration: 4 MMA steps of 32 columns


@dataclass
class MmaWeight:
    """A 2:4 weight in the mma.sp fragment layout (see the module docstring)."""

    shape: tuple[int, int]
    frags: torch.Tensor  # int32; 16-bit values (N/16, K/32, 32, 4 registers); int4 (N/16, K/128, 32, 4 steps)
    meta: torch.Tensor  # int32 (N/16, K/128, 16, 4): lane (g, t<2) of chunk c, 4 steps
    bits: int = 0
    group_size: int = 128
    scales: torch.Tensor | None = None  # int4: int32 (N/16, ceil(K/G), 8): fp16 scales of rows g | g + 8
    dtype: torch.dtype = torch.float16  # x's dtype the weight was packed for
    workspaces: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def workspace(self, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed float32 (16, out) partial sums and int32 arrival counters (one per program of a
        launch whose programs own ``tiles`` m-tiles each) of the kernel's K-split fixup; each call
        leaves them zeroed."""
        if tiles not in self.workspaces:
            dev = self.frags.device
            ws = self.workspaces.get("sums")  # one for all launches: each leaves it zeroed
            if ws is None:
                ws = self.workspaces["sums"] = torch.zeros(16, self.shape[0], device=dev, dtype=torch.float32)
            programs = triton.cdiv(self.shape[0] // 16, tiles)
            self.workspaces[tiles] = (ws, torch.zeros(programs, device=dev, dtype=torch.int32))
        return self.workspaces[tiles]

    def placeholder(self) -> torch.Tensor:
        """An empty float32 tensor on the weight's device, passed where no workspace is used."""
        if "none" not in self.workspaces:
            self.workspaces["none"] = torch.zeros(0, device=self.frags.device, dtype=torch.float32)
        return self.workspaces["none"]

    def nbytes(self) -> int:
        ts = [self.frags, self.meta] + ([self.scales] if self.scales is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def supported(tw, x_dtype: torch.dtype | None = None) -> bool:
    """Whether :func:`pack` takes this TritonWeight: 2:4, out % 16 == 0, in % 128 == 0, and either
    fp16/bf16 values with inputs of the same dtype or symmetric int4 with a group size that is a
    multiple of 128 and fp16 inputs."""
    if tw.fmt != "nm" or (tw.n, tw.m) != (2, 4) or tw.shape[0] % 16 or tw.shape[1] % CHUNK:
        return False
    if tw.bits == 0:
        return tw.values.dtype in (torch.float16, torch.bfloat16) and x_dtype in (None, tw.values.dtype)
    return (tw.bits == 4 and bool(tw.symmetric) and tw.group_size % CHUNK == 0
            and x_dtype in (None, torch.float16))


def pack(tw) -> MmaWeight:
    """The fragment layout of a 2:4 TritonWeight (on its device; one pass of reshapes)."""
    if not supported(tw):
        raise SparsecraftError("mma.sp layout: needs 2:4, out % 16 == 0, in % 128 == 0, fp16/bf16 values "
                               "or symmetric int4 with group size a multiple of 128")
    n_out, n_in = tw.shape
    mt, steps, chunks = n_out // 16, n_in // 32, n_in // CHUNK
    # kept value (row, k) with row = 16 mt + 8 rh + g and k = 16 s + 8 ch + 2 t + h
    if tw.bits == 0:
        v = tw.values.view(torch.int16).reshape(mt, 2, 8, steps, 2, 4, 2)  # mt rh g s ch t h
        v = v.permute(0, 3, 2, 5, 4, 1, 6).contiguous()  # mt s g t | ch rh h: register 2 ch + rh
        frags = v.view(torch.int32).reshape(mt, steps, 32, 4)
        scales = None
    else:
        b = tw.values.to(torch.int32)
        codes = torch.stack([b & 15, b >> 4], dim=-1).reshape(n_out, n_in // 2)  # low nibble first
        u = (codes ^ 8).reshape(mt, 2, 8, steps, 2, 4, 2)  # two's complement n -> n + 8
        u = u.permute(0, 3, 2, 5, 6, 4, 1).reshape(mt, steps, 32, 8)  # nibble 4 h + 2 ch + rh
        word = (u.to(torch.int64) << (4 * torch.arange(8, device=u.device))).sum(-1)
        word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
        frags = word.reshape(mt, chunks, 4, 32).transpose(2, 3).contiguous()  # mt c lane | step
        s16 = tw.scales.contiguous().view(torch.int16).reshape(mt, 2, 8, -1)  # mt rh g group
        scales = s16.permute(0, 3, 2, 1).contiguous().view(torch.int32).reshape(mt, -1, 8)
    idx = tw.meta.view(torch.int16).to(torch.int32) & 0xFFFF  # (N, K/16): 16 columns of one row
    pos = idx.unsqueeze(-1) >> torch.arange(0, 16, 2, device=idx.device) & 3  # (N, K/16, 8): i0, i1, ...
    if not bool((pos[..., 0::2] < pos[..., 1::2]).all()):
        raise SparsecraftError("mma.sp layout: every 2:4 group must list its positions in increasing order")
    idx = idx.reshape(mt, 2, 8, chunks, 4, 2)  # mt rh g c j p: rows g, g+8; step 4c+j; half p of it
    word = idx[:, 0] | (idx[:, 1] << 16)
    meta = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    meta = meta.permute(0, 2, 1, 4, 3).contiguous().reshape(mt, chunks, 16, 4)  # mt c | g p | j
    return MmaWeight((n_out, n_in), frags, meta, tw.bits, tw.group_size if tw.bits else CHUNK, scales,
                     torch.float16 if tw.bits else tw.values.dtype)


def unpack(mw: MmaWeight):
    """The row-major 2:4 TritonWeight of a packed one (the inverse of :func:`pack`: larger batches
    decode it for cuBLAS)."""
    from .layout import from_nm

    n_out, n_in = mw.shape
    mt, steps, chunks = n_out // 16, n_in // 32, n_in // CHUNK
    scales = None
    if mw.bits == 0:
        v = mw.frags.view(torch.int16).reshape(mt, steps, 8, 4, 2, 2, 2)  # mt s g t ch rh h
        values = v.permute(0, 5, 2, 1, 4, 3, 6).reshape(n_out, n_in // 2).view(mw.dtype)
    else:
        words = mw.frags.transpose(2, 3).reshape(mt, steps, 32)
        u = (words.unsqueeze(-1) >> (4 * torch.arange(8, device=words.device))) & 15
        u = u.reshape(mt, steps, 8, 4, 2, 2, 2).permute(0, 6, 2, 1, 5, 3, 4).reshape(n_out, n_in // 4, 2)
        codes = u ^ 8  # back to two's complement nibbles
        values = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
        s16 = mw.scales.view(torch.int16).reshape(mt, -1, 8, 2)  # mt group g rh
        scales = s16.permute(0, 3, 2, 1).reshape(n_out, -1).view(torch.float16)
    word = mw.meta.reshape(mt, chunks, 8, 2, 4).permute(0, 2, 1, 4, 3)  # mt g c j p
    idx = torch.stack([word & 0xFFFF, (word >> 16) & 0xFFFF], dim=1)  # mt rh g c j p
    idx = torch.where(idx >= 2**15, idx - 2**16, idx).to(torch.int16).reshape(n_out, n_in // 16)
    return from_nm(values, idx.view(torch.uint8), 2, 4, mw.shape, torch.float16 if mw.bits else mw.dtype,
                   bits=mw.bits, group_size=mw.group_size if mw.bits else 128, symmetric=True,
                   scales=scales)


# ------------------------------------------------------------------------------------------ PTX
def _dequant_ptx(src: str) -> list[str]:
    """Lines that turn the int32 code word ``src`` (8 nibbles u = code + 8, nibble 4h + 2ch + rh)
    into the fp16x2 A registers a0..a3 (values u - 8; exact)."""
    lines = ["mov.b32 k1, 0x3C003C00;", "mov.b32 k2, 0xE408E408;",  # fp16x2 1, -1032
             "mov.b32 k3, 0x2C002C00;", "mov.b32 k4, 0xD480D480;"]  # fp16x2 1/16, -72
    for j, w in ((0, src), (2, "q8")):
        if j == 2:
            lines.append(f"shr.b32 q8, {src}, 8;")
        lines += [f"and.b32 a{j}, {w}, 0x000F000F;", f"or.b32 a{j}, a{j}, 0x64006400;",
                  f"fma.rn.f16x2 a{j}, a{j}, k1, k2;",  # (1024 + u) - 1032
                  f"and.b32 a{j + 1}, {w}, 0x00F000F0;", f"or.b32 a{j + 1}, a{j + 1}, 0x64006400;",
                  f"fma.rn.f16x2 a{j + 1}, a{j + 1}, k3, k4;"]  # (1024 + 16 u) / 16 - 72
    return lines


def _mma_ptx(bf16: bool) -> str:
    """One MMA step: $0..$3 the float32 results, $4..$7 the A registers, $8 the index word,
    $9..$12 the B registers, $13..$16 the float32 C values."""
    ty = "bf16" if bf16 else "f16"
    # ordered metadata (PTX 8.5+): each group's two positions ascending, as the formats store them
    return (f"mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{ty}.{ty}.f32 "
            "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$9, $10, $11, $12}, {$13, $14, $15, $16}, $8, 0x0;")


def _dequant_asm() -> str:
    """The code word $4 -> the fp16x2 A registers $0..$3."""
    lines = [".reg .b32 a0, a1, a2, a3, q8, k1, k2, k3, k4;", *_dequant_ptx("$4")]
    return "{\n" + "\n".join(lines + [f"mov.b32 ${j}, a{j};" for j in range(4)]) + "\n}"


# ---------------------------------------------------------------------------------- the kernel
@triton.jit
def _lane_ids(ids, INTERP: tl.constexpr):
    """(lane, warp) of the thread that holds each element of ``ids`` (arange(0, 32 * num_warps))."""
    if INTERP:
        return ids % 32, ids // 32
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [ids], dtype=tl.int32, is_pure=True,
                                     pack=1)
    tid = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [ids], dtype=tl.int32, is_pure=True,
                                    pack=1)
    return lane, tid // 32


@triton.jit
def _split_pairs(r, BF16: tl.constexpr):
    """int32 register of two 16-bit floats -> (low, high) float32."""
    return _h2f(r, BF16), _h2f(r >> 16, BF16)


@triton.jit
def _rows(v, W: tl.constexpr):
    """Lane values (32 W,) -> (W, 8 g, 4 t)."""
    return tl.reshape(v, (W, 8, 4))


@triton.jit
def _pairs_to_cols(lo, hi, W: tl.constexpr):
    """Lane registers holding columns 2t, 2t+1 (lo, hi) -> (W, 8, 8) by column 2t + h."""
    return tl.reshape(tl.join(_rows(lo, W), _rows(hi, W)), (W, 8, 8))


@triton.jit
def _halves(a, b, W: tl.constexpr):
    """Two (W, 8, 8) column blocks -> (W, 8, 16): a then b."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 1, 3, 2)), (W, 8, 16))


@triton.jit
def _sparse_rows(c, e, W: tl.constexpr):
    """Dense (W, 8, 32) rows from kept values c (W, 8, 16) and the index words of lanes t = 0, 1
    (their low 16 bits, (W, 8, 2))."""
    sh = tl.arange(0, 8) * 2
    pos = tl.reshape((e[:, :, :, None] >> sh[None, None, None, :]) & 3, (W, 8, 16))
    k = (tl.arange(0, 16) // 2 * 4)[None, None, :] + pos
    hit = k[:, :, :, None] == tl.arange(0, 32)[None, None, None, :]
    return tl.sum(tl.where(hit, c[:, :, :, None], 0.0), axis=2)


@triton.jit
def _mma_emulated(a0l, a0h, a1l, a1h, a2l, a2h, a3l, a3h, e, b, c0, c1, c2, c3, W: tl.constexpr,
                  BF16: tl.constexpr):
    """What one mma.sp m16n8k32 computes, from each lane's registers as float32 (interpreter only):
    the warp's A rows and B columns are rebuilt from the fragments, multiplied, and handed back in
    the C layout. ``b`` is the 4 B registers (int32)."""
    top = _halves(_pairs_to_cols(a0l, a0h, W), _pairs_to_cols(a2l, a2h, W), W)  # rows g, 16 kept
    bot = _halves(_pairs_to_cols(a1l, a1h, W), _pairs_to_cols(a3l, a3h, W), W)  # rows g + 8
    et = tl.permute(tl.reshape(_rows(e, W), (W, 8, 2, 2)), (0, 1, 3, 2))  # (.., t % 2, t // 2)
    e01, _ = tl.split(et)  # lanes t = 0, 1
    dense_top = _sparse_rows(top, e01 & 0xFFFF, W)
    dense_bot = _sparse_rows(bot, (e01 >> 16) & 0xFFFF, W)
    b0, b1, b2, b3 = b
    cols = []
    for r in tl.static_range(4):
        br = b0 if r == 0 else b1 if r == 1 else b2 if r == 2 else b3
        lo, hi = _split_pairs(br, BF16)
        cols.append(_pairs_to_cols(lo, hi, W))  # (W, 8 input rows, 8 columns 2t + h of block r)
    xb = tl.reshape(tl.permute(tl.join(tl.join(cols[0], cols[1]), tl.join(cols[2], cols[3])),
                               (0, 1, 4, 3, 2)), (W, 8, 32))  # (W, input row, 8 r + 2 t + h)
    d_top = tl.sum(dense_top[:, :, None, :] * xb[:, None, :, :], axis=3)  # (W, 8 rows, 8 input rows)
    d_bot = tl.sum(dense_bot[:, :, None, :] * xb[:, None, :, :], axis=3)
    t0, t1 = tl.split(tl.reshape(d_top, (W, 8, 4, 2)))
    u0, u1 = tl.split(tl.reshape(d_bot, (W, 8, 4, 2)))
    L: tl.constexpr = 32 * W
    return (c0 + tl.reshape(t0, (L,)), c1 + tl.reshape(t1, (L,)), c2 + tl.reshape(u0, (L,)),
            c3 + tl.reshape(u1, (L,)))


@triton.jit
def _dequant_emulated(q):
    """The interpreter's version of ``_dequant_ptx``: code word -> 8 float32 (a0 lo, a0 hi, ...)."""
    vs = []
    for i in tl.static_range(8):
        vs.append((((q >> (4 * i)) & 15) - 8).to(tl.float32))
    # nibble 4h + 2ch + rh: a0 = (ch 0, rh 0), a1 = (ch 0, rh 1), a2 = (ch 1, rh 0), a3 = (ch 1, rh 1)
    return vs[0], vs[4], vs[1], vs[5], vs[2], vs[6], vs[3], vs[7]


@triton.jit
def _load4(p, INTERP: tl.constexpr):
    """The 4 int32 at p .. p + 3 (16-byte aligned, read-only during the kernel): one 16-byte load
    per thread."""
    if INTERP:
        return tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3)
    else:
        return tl.inline_asm_elementwise("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [p],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
                                         pack=1)


@triton.jit
def _x_regs(x32_ptr, lane, kcol, nt, B, xs32, ok, NT: tl.constexpr, XFRAG: tl.constexpr,
            INTERP: tl.constexpr):
    """B registers b0..b3 of n-tile nt at dense column kcol: x[n, kcol + 8r + 2t .. +1] as int32,
    from x itself (4-byte pieces of 8 rows), or with XFRAG from x in fragment order
    (:func:`fragment_x`: one 16-byte load per lane); zero where ``ok`` is False (a chunk past the
    warp's range: its weights were loaded from a clamped address and must add nothing)."""
    if XFRAG:
        b0, b1, b2, b3 = _load4(x32_ptr + (((kcol // 32) * NT + nt) * 32 + lane) * 4, INTERP)
        return tl.where(ok, b0, 0), tl.where(ok, b1, 0), tl.where(ok, b2, 0), tl.where(ok, b3, 0)
    else:
        n = nt * 8 + lane // 4
        base = x32_ptr + n * xs32 + kcol // 2 + lane % 4
        m = (n < B) & ok
        return (tl.load(base, mask=m, other=0), tl.load(base + 4, mask=m, other=0),
                tl.load(base + 8, mask=m, other=0), tl.load(base + 12, mask=m, other=0))


@triton.jit
def _fragment_x_kernel(x_ptr, out_ptr, B, n_out, xs32, NT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # out index (step, n-tile, lane, r)
    r = i % 4
    lane = (i // 4) % 32
    n = (i // 128) % NT * 8 + lane // 4
    col32 = (i // (128 * NT)) * 16 + r * 4 + lane % 4
    v = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + n * xs32 + col32, mask=(i < n_out) & (n < B), other=0)
    tl.store(out_ptr + i, v, mask=i < n_out)


def fragment_x(x: torch.Tensor, nt: int) -> torch.Tensor:
    """x (B <= 8 nt, K), contiguous, in the B-fragment order of the MMA steps (one kernel): int32
    (K/32, nt, 32 lanes, 4), lane (g, t) holding x[8 n-tile + g, 32 s + 8 r + 2 t .. +1] for
    r = 0..3; rows past B zero."""
    b, k = x.shape
    out = torch.empty(k // 32, nt, 32, 4, dtype=torch.int32, device=x.device)
    block = 1024
    _fragment_x_kernel[(triton.cdiv(out.numel(), block),)](x, out, b, out.numel(), x.stride(0) // 2, NT=nt,
                                                          BLOCK=block, num_warps=4)
    return out


# the inline PTX: module constants, as Triton requires
_PTX_H = tl.constexpr(_mma_ptx(False))
_PTX_B = tl.constexpr(_mma_ptx(True))
_PTX_DEQUANT = tl.constexpr(_dequant_asm())
_CONS_MMA = tl.constexpr(",".join(["=f"] * 4 + ["r"] * 9 + ["f"] * 4))


@triton.jit
def _a_operand(a, QBITS: tl.constexpr, BF16: tl.constexpr, INTERP: tl.constexpr):
    """A operand of one step from its stored form (4 int32 registers, or an int4 code word): the
    registers a0..a3 (GPU), or their 8 values as float32 (interpreter: a0 low, a0 high, a1 low, ..)."""
    if INTERP:
        if QBITS == 4:
            return _dequant_emulated(a)
        else:
            r0, r1, r2, r3 = a
            a0l, a0h = _split_pairs(r0, BF16)
            a1l, a1h = _split_pairs(r1, BF16)
            a2l, a2h = _split_pairs(r2, BF16)
            a3l, a3h = _split_pairs(r3, BF16)
            return a0l, a0h, a1l, a1h, a2l, a2h, a3l, a3h
    else:
        if QBITS == 4:
            return tl.inline_asm_elementwise(_PTX_DEQUANT, "=r,=r,=r,=r,r", [a],
                                             dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
                                             pack=1)
        else:
            return a


@triton.jit
def _mma_step(av, e, b, c, BF16: tl.constexpr, INTERP: tl.constexpr, W: tl.constexpr):
    """c (4 float32) += A @ B for one n-tile: ``av`` from :func:`_a_operand`, ``b`` the 4 B registers."""
    c0, c1, c2, c3 = c
    if INTERP:
        a0l, a0h, a1l, a1h, a2l, a2h, a3l, a3h = av
        return _mma_emulated(a0l, a0h, a1l, a1h, a2l, a2h, a3l, a3h, e, b, c0, c1, c2, c3, W, BF16)
    else:
        a0, a1, a2, a3 = av
        b0, b1, b2, b3 = b
        if BF16:
            ptx: tl.constexpr = _PTX_B
        else:
            ptx: tl.constexpr = _PTX_H
        return tl.inline_asm_elementwise(ptx, _CONS_MMA, [a0, a1, a2, a3, e, b0, b1, b2, b3, c0, c1, c2, c3],
                                         dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
                                         is_pure=True, pack=1)


@triton.jit
def _chunk_loads(c, mt, lane, a_ptr, e_ptr, s_ptr, S, C, ng, G: tl.constexpr, QBITS: tl.constexpr,
                 INTERP: tl.constexpr):
    """The loads of chunk c of m-tile mt: the A operands of its 4 steps, their index words and
    (int4) the group scales of the lane's rows. Addresses are clamped into the weight instead of
    masked (16-byte loads take no mask): chunks past the end are loaded and never used, and warps
    past the last m-tile read its tile and store nothing."""
    cc = tl.minimum(c, C - 1)
    if QBITS == 4:
        a = _load4(a_ptr + ((mt * C + cc) * 32 + lane) * 4, INTERP)  # the 4 steps' code words
        sc = tl.load(s_ptr + (mt * ng + (cc * 128) // G) * 8 + lane // 4)
    else:
        s0 = mt * S + 4 * cc
        p = a_ptr + (s0 * 32 + lane) * 4
        a = (_load4(p, INTERP), _load4(p + 128, INTERP), _load4(p + 256, INTERP), _load4(p + 384, INTERP))
        sc = lane
    # lanes t = 2, 3 load the words of t = 0, 1: the instruction reads them from t < 2 only
    e = _load4(e_ptr + ((mt * C + cc) * 16 + (lane // 4) * 2 + lane % 2) * 4, INTERP)
    return a, e, sc


@triton.jit
def _chunk(acc0, acc1, a, e, c, ok, lane, x32_ptr, B, xs32, QBITS: tl.constexpr, BF16: tl.constexpr,
           INTERP: tl.constexpr, W: tl.constexpr, NT: tl.constexpr, XFRAG: tl.constexpr):
    """The 4 MMAs of chunk ``c`` (per lane) for each n-tile, added to acc0 / acc1 (4 float32 each);
    int4: from zero (the caller scales the chunk sums). Each step's A operand is formed once for both
    n-tiles. Lanes with ``ok`` False add zeros."""
    if QBITS == 4:
        z = acc0[0] * 0.0
        d0 = (z, z, z, z)
        d1 = (z, z, z, z)
    else:
        d0 = acc0
        d1 = acc1
    # all x loads of the chunk first, so that their latencies overlap instead of adding up per step
    b0 = _x_regs(x32_ptr, lane, 128 * c, 0, B, xs32, ok, NT, XFRAG, INTERP)
    b1 = _x_regs(x32_ptr, lane, 128 * c + 32, 0, B, xs32, ok, NT, XFRAG, INTERP)
    b2 = _x_regs(x32_ptr, lane, 128 * c + 64, 0, B, xs32, ok, NT, XFRAG, INTERP)
    b3 = _x_regs(x32_ptr, lane, 128 * c + 96, 0, B, xs32, ok, NT, XFRAG, INTERP)
    if NT == 2:
        n0 = _x_regs(x32_ptr, lane, 128 * c, 1, B, xs32, ok, NT, XFRAG, INTERP)
        n1 = _x_regs(x32_ptr, lane, 128 * c + 32, 1, B, xs32, ok, NT, XFRAG, INTERP)
        n2 = _x_regs(x32_ptr, lane, 128 * c + 64, 1, B, xs32, ok, NT, XFRAG, INTERP)
        n3 = _x_regs(x32_ptr, lane, 128 * c + 96, 1, B, xs32, ok, NT, XFRAG, INTERP)
    for j in tl.static_range(4):
        av = _a_operand(a[j], QBITS, BF16, INTERP)
        b = b0 if j == 0 else b1 if j == 1 else b2 if j == 2 else b3
        d0 = _mma_step(av, e[j], b, d0, BF16, INTERP, W)
        if NT == 2:
            bn = n0 if j == 0 else n1 if j == 1 else n2 if j == 2 else n3
            d1 = _mma_step(av, e[j], bn, d1, BF16, INTERP, W)
    return d0, d1


@triton.jit
def _scale_add(acc, d, s_lo, s_hi):
    a0, a1, a2, a3 = acc
    d0, d1, d2, d3 = d
    return a0 + d0 * s_lo, a1 + d1 * s_lo, a2 + d2 * s_hi, a3 + d3 * s_hi


@triton.jit
def _store_tile(acc, out_ptr, row, nt, lane, mvalid, B, stride_ob, ATOMIC: tl.constexpr):
    """c0, c1 -> out[2t, 2t+1 of n-tile nt][row], c2, c3 -> row + 8."""
    n = nt * 8 + (lane % 4) * 2
    c0, c1, c2, c3 = acc
    for i in tl.static_range(4):
        v = c0 if i == 0 else c1 if i == 1 else c2 if i == 2 else c3
        _write(out_ptr + (n + i % 2) * stride_ob + row + (i // 2) * 8, v, mvalid & (n + i % 2 < B), ATOMIC)


@triton.jit
def _finish_tile(ws_ptr, out_ptr, row, nt, lane, mvalid, B, N, stride_ob):
    """Move n-tile nt of this lane's rows from the workspace to out, leaving zeros behind."""
    n = nt * 8 + (lane % 4) * 2
    for i in tl.static_range(4):
        nn = n + i % 2
        r = row + (i // 2) * 8
        m = mvalid & (nn < B)
        p = ws_ptr + nn * N + r
        v = tl.load(p, mask=m, other=0.0, cache_modifier=".cg")  # from L2, where the atomics added
        tl.store(p, tl.zeros_like(v), mask=m)
        tl.store(out_ptr + nn * stride_ob + r, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sum_tile(acc, KW: tl.constexpr, MW: tl.constexpr):
    """The 4 accumulators of all warps (32 W,) -> their sums over the KW warps that share an m-tile
    (32 MW,): element i sits in warp i // 32, and warp w takes K slot w // MW. One reduction
    through shared memory for all four."""
    a0, a1, a2, a3 = acc
    v = tl.join(tl.join(a0, a1), tl.join(a2, a3))  # (32 W, 2, 2)
    r = tl.sum(tl.reshape(v, (KW, 32 * MW, 2, 2)), axis=0)
    lo, hi = tl.split(r)
    s0, s1 = tl.split(lo)
    s2, s3 = tl.split(hi)
    return s0, s1, s2, s3


@triton.jit
def mma24_kernel(
    x_ptr, out_ptr, a_ptr, e_ptr, s_ptr, ws_ptr, cnt_ptr, B, N, K, stride_xb, stride_ob, ng, split_k,
    QBITS: tl.constexpr, G: tl.constexpr, BF16: tl.constexpr, NT: tl.constexpr, W: tl.constexpr,
    INTERP: tl.constexpr, ATOMIC: tl.constexpr, DEPTH: tl.constexpr = 1,  # 1..4
    FIXUP: tl.constexpr = False, XFRAG: tl.constexpr = False, PDL: tl.constexpr = False,
    KW: tl.constexpr = 1,
):
    """y (B <= 8 NT, N) = x @ W^T, W packed by :func:`pack`; each warp one 16-row m-tile, the grid
    (m-tiles / (W / KW), K splits) in 128-column chunks. With KW > 1, KW warps share an m-tile and
    take every KW-th chunk of the program's K range; their sums meet in shared memory (no atomics)."""
    MW: tl.constexpr = W // KW  # m-tiles per program
    lane, wid = _lane_ids(tl.arange(0, 32 * W), INTERP)
    mt = tl.program_id(0) * MW + wid % MW
    mtl = tl.minimum(mt, N // 16 - 1)  # the tile whose weights this warp loads
    kslot = wid // MW
    S = K // 32
    C = K // 128
    per = tl.cdiv(C, split_k)
    c0 = tl.program_id(1) * per
    c1 = tl.minimum(c0 + per, C)
    x32_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    xs32 = stride_xb // 2
    zero = lane.to(tl.float32) * 0.0
    acc0 = (zero, zero, zero, zero)
    acc1 = (zero, zero, zero, zero)
    # a queue of the warp's next DEPTH chunks' loads: each iteration consumes the oldest and issues one
    q1 = _chunk_loads(c0 + kslot, mtl, lane, a_ptr, e_ptr, s_ptr, S, C, ng, G, QBITS, INTERP)
    if DEPTH >= 2:
        q2 = _chunk_loads(c0 + kslot + KW, mtl, lane, a_ptr, e_ptr, s_ptr, S, C, ng, G, QBITS, INTERP)
    if DEPTH >= 3:
        q3 = _chunk_loads(c0 + kslot + 2 * KW, mtl, lane, a_ptr, e_ptr, s_ptr, S, C, ng, G, QBITS, INTERP)
    if DEPTH >= 4:
        q4 = _chunk_loads(c0 + kslot + 3 * KW, mtl, lane, a_ptr, e_ptr, s_ptr, S, C, ng, G, QBITS, INTERP)
    _pdl_start(PDL, INTERP)  # x and the outputs only from here on
    for c in range(c0, c1, KW):
        ck = c + kslot  # this warp's chunk
        ac, ec, scc = q1
        nxt = _chunk_loads(ck + DEPTH * KW, mtl, lane, a_ptr, e_ptr, s_ptr, S, C, ng, G, QBITS, INTERP)
        if DEPTH == 1:
            q1 = nxt
        elif DEPTH == 2:
            q1, q2 = q2, nxt
        elif DEPTH == 3:
            q1, q2, q3 = q2, q3, nxt
        else:
            q1, q2, q3, q4 = q2, q3, q4, nxt
        ok = ck < c1
        d0, d1 = _chunk(acc0, acc1, ac, ec, tl.minimum(ck, C - 1), ok, lane, x32_ptr, B, xs32, QBITS, BF16,
                        INTERP, W, NT, XFRAG)
        if QBITS == 4:
            s_lo, s_hi = _split_pairs(scc, False)
            acc0 = _scale_add(acc0, d0, s_lo, s_hi)
            if NT == 2:
                acc1 = _scale_add(acc1, d1, s_lo, s_hi)
        else:
            acc0 = d0
            acc1 = d1
    if KW > 1:  # the sums of an m-tile's warps; element i of the result: lane i % 32 of tile i // 32
        acc0 = _sum_tile(acc0, KW, MW)
        acc1 = _sum_tile(acc1, KW, MW)
        j = tl.arange(0, 32 * MW)
        lane = j % 32
        mt = tl.program_id(0) * MW + j // 32
    mvalid = mt < N // 16
    row = mt * 16 + lane // 4
    if FIXUP:
        # K splits: float32 partial sums into the zeroed workspace; the program that arrives last
        # at this row block's counter moves the sums to ``out`` and zeroes workspace and counter
        # (one kernel per product: no fill, no conversion kernel)
        _store_tile(acc0, ws_ptr, row, 0, lane, mvalid, B, N, True)
        if NT == 2:
            _store_tile(acc1, ws_ptr, row, 1, lane, mvalid, B, N, True)
        if not INTERP:  # the relaxed adds of every thread are ordered before the counter's release
            tl.inline_asm_elementwise("fence.acq_rel.gpu; // $0", "=r", [], dtype=tl.int32, is_pure=False,
                                      pack=1)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, sem="acq_rel")
        if arrived == split_k - 1:
            _finish_tile(ws_ptr, out_ptr, row, 0, lane, mvalid, B, N, stride_ob)
            if NT == 2:
                _finish_tile(ws_ptr, out_ptr, row, 1, lane, mvalid, B, N, stride_ob)
            tl.atomic_xchg(cnt_ptr + tl.program_id(0), 0)
    else:
        _store_tile(acc0, out_ptr, row, 0, lane, mvalid, B, stride_ob, ATOMIC)
        if NT == 2:
            _store_tile(acc1, out_ptr, row, 1, lane, mvalid, B, stride_ob, ATOMIC)


def mma24_mm(x: torch.Tensor, mw: MmaWeight, warps: int = 4, split_k: int = 1, depth: int = 1,
             fixup: bool = False, xfrag: bool = False, workspace: tuple | None = None,
             interp: bool = False, pdl: bool = False, k_warps: int = 1) -> torch.Tensor:
    """x (B <= 16, in) -> (B, out) = x @ W^T on the sparse tensor cores. With K splits the partial
    sums are added atomically: into a float32 output that is then converted (two more kernels), or
    with ``fixup`` into the weight's persistent workspace, emptied by the last split (one kernel;
    the workspace, ``workspace`` or else the weight's own, is allocated by the first such call, which
    must run outside CUDA graph capture).
    ``depth``: chunks whose loads are in flight ahead of the MMAs (1-4). ``xfrag`` (batch > 1): x is
    first copied into fragment order (:func:`fragment_x`). ``pdl``: launched as a programmatic
    dependent launch (sm_90): the first chunks' weights load while the previous kernel finishes.
    ``k_warps``: warps per m-tile (dividing ``warps``), each taking every k_warps-th chunk, summed in
    shared memory: a program covers warps / k_warps m-tiles over its whole K range."""
    batch, n_in = x.shape
    n_out = mw.shape[0]
    if batch > 16 or n_in != mw.shape[1] or x.dtype != mw.dtype:
        raise SparsecraftError(f"mma.sp kernel: batch <= 16 of {mw.dtype} rows with {mw.shape[1]} columns")
    if depth not in (1, 2, 3, 4):
        raise SparsecraftError(f"mma.sp kernel: depth {depth} (chunks loaded ahead) must be 1-4")
    if k_warps < 1 or warps % k_warps or k_warps & (k_warps - 1):
        raise SparsecraftError(f"mma.sp kernel: k_warps {k_warps} must be a power of two dividing "
                               f"warps {warps}")
    x = x.contiguous()
    if x.data_ptr() % 4:  # read as int32 pairs
        x = x.clone()
    split_k = max(1, min(split_k, n_in // CHUNK))
    tiles = warps // k_warps  # m-tiles per program
    grid = (triton.cdiv(n_out // 16, tiles), split_k)
    fixup = fixup and split_k > 1
    out = _out_buffer(x, n_out, 1 if fixup else split_k)  # the fixup writes x's dtype itself
    if fixup:
        ws, cnt = workspace if workspace is not None else mw.workspace(tiles)
    else:
        ws, cnt = mw.meta, mw.meta  # not read
    nt = 1 if batch <= 8 else 2
    xfrag = xfrag and batch > 1
    mma24_kernel[grid](
        fragment_x(x, nt) if xfrag else x, out, mw.frags, mw.meta,
        mw.scales if mw.scales is not None else mw.meta, ws, cnt,
        batch, n_out, n_in, x.stride(0), out.stride(0), mw.scales.shape[1] if mw.scales is not None else 1,
        split_k, QBITS=mw.bits, G=mw.group_size, BF16=x.dtype == torch.bfloat16, NT=nt,
        W=warps, INTERP=interp, ATOMIC=split_k > 1, DEPTH=depth, FIXUP=fixup, XFRAG=xfrag,
        PDL=pdl, KW=k_warps, num_warps=warps, num_stages=1, **({"launch_pdl": True} if pdl else {}),
    )
    return out.to(x.dtype)
