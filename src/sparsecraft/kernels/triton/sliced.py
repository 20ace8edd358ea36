"""Bitmask weights in a sliced, slot-major layout: loop steps per kept value, not per column.

A kernel that reads bitmask weights column by column (the row-major unit kernel of earlier
runs) pays as many instructions at 70% sparsity as at 50%. Here a lane walks the set bits of its
own row instead, and every warp-wide load stays coalesced:

* the K axis is cut into segments of ``seg`` columns; in each segment the rows are sorted by how
  many steps they need there and cut into slices of ``rows`` consecutive sorted rows, so the rows
  of a slice need about the same number of steps;
* a step takes the next ``per_step`` set bits of the lane's current 32-bit mask word (lowest
  first) and their values with one load: a slice stores its values slot-major (step k of every
  lane is one contiguous run of ``rows`` x ``per_step`` values) and its mask word-major the same way;
* a word whose bits run out inside a step leaves that step's other slots empty (stored as 0), an
  all-zero word costs one empty step, and an exhausted word is replaced by the next one (held in
  registers for segments of up to 128 columns), so the walk needs no inner loop.

Bytes: values padded to whole steps + 1/8 per weight (mask) + 2 per row and segment (the slices'
row order, int16); with 4 values per step, 128-column segments and 64-row slices 1.08x (50%) to
1.13x (70%) the row-major bitmask layout (9.9 / 6.7 bits per weight; 64-bit words would pad fewer
steps, 9.5 / 6.3 bits, but made the walk 26-35% slower in H100 run 27: docs/results/gpu_kernels.md).
Sums are added atomically (relaxed) to a float32 (out, batch) workspace that a second small kernel
moves to the result and clears. The same layout also feeds a tensor-core kernel for larger batches
(each mask word expanded to a dense tile in registers) and the decode to a dense weight, so it is the
only copy of a bitmask weight that the GPU keeps (dispatch.py: the walk up to batch 8, the
tensor-core kernel up to 16, decode + cuBLAS above; docs/results/gpu_kernels.md, runs 10-13). The
layout is built once from a bitmask weight (:func:`build`), on whichever device it lives on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ...errors import SparsecraftError
from ...formats.packing import pack_bits, unpack_bits
from . import interpreted
from .gemv import _h2f
from .sparse_mm import _pdl_start


@triton.jit
def _popc(v, INTERP: tl.constexpr):
    """Set bits of each int32 (``popc.b32`` on the GPU, arithmetic under the interpreter)."""
    if INTERP:
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        return (v * 0x01010101) >> 24
    return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)


@dataclass
class SlicedWeight:
    """A bitmask (out, in) weight in the sliced slot-major layout (see the module docstring)."""

    shape: tuple[int, int]
    seg: int  # columns per segment, a multiple of 32
    rows: int  # rows per slice (= lanes per program)
    per_step: int  # values a lane takes per step (1, 2 or 4), loaded together
    values: torch.Tensor  # (total steps * rows * per_step,) float16/bfloat16, slot-major per slice
    words: torch.Tensor  # int32 (n_seg, n_slice, seg // 32, rows): mask words, word-major per slice
    start: torch.Tensor  # int32 (n_seg, n_slice): first step-vector (per_step values) of the slice
    steps: torch.Tensor  # int32 (n_seg, n_slice): steps of the slice (its longest row)
    perm: torch.Tensor  # int16 (int32 from 32768 rows) (n_seg, n_slice * rows): output row of each lane
    # (>= out: padding)
    workspaces: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # by batch

    def tensors(self) -> list[torch.Tensor]:
        return [self.values, self.words, self.start, self.steps, self.perm]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def build(mask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], seg: int = 128,
          rows: int = 32, per_step: int = 4) -> SlicedWeight:
    """The sliced layout of a bitmask weight: ``mask`` uint8 (out, ceil(in/8)) LSB first, ``values``
    its kept values in row-major order (as :class:`sparsecraft.formats.BitmaskTensor` stores them)."""
    out_f, in_f = shape
    if seg % 32 or seg <= 0 or rows <= 0 or rows & (rows - 1) or per_step not in (1, 2, 4):
        raise SparsecraftError(
            f"sliced layout: seg={seg} must be a multiple of 32, rows={rows} a power of 2, "
            f"per_step={per_step} one of 1, 2, 4")
    if values.dtype not in (torch.float16, torch.bfloat16):
        raise SparsecraftError(f"sliced layout takes float16/bfloat16 values, not {values.dtype}")
    dev, p = mask.device, per_step
    n_seg = -(-in_f // seg)
    n_slice = -(-out_f // rows)
    kp, wps, outp = n_seg * seg, seg // 32, n_slice * rows
    bits = torch.zeros(out_f, kp, dtype=torch.bool, device=dev)
    bits[:, :in_f] = unpack_bits(mask, in_f)  # bits past in_f are not weights
    if int(bits.sum()) != values.numel():
        raise SparsecraftError(f"bitmask keeps {int(bits.sum())} values but {values.numel()} are stored")
    words = pack_bits(bits).view(torch.int32).view(out_f, n_seg, wps)  # little-endian: bit j = column j
    dense = torch.zeros(out_f, kp, dtype=values.dtype, device=dev)
    dense[bits] = values
    # a word takes ceil(kept / per_step) steps, at least one (an all-zero word: one step of zeros);
    # the kept value of rank r in its word goes to step (steps of earlier words) + r // p, slot r % p
    bw = bits.view(out_f, n_seg, wps, 32)
    groups = ((bw.sum(-1) + p - 1) // p).clamp(min=1)  # (out, n_seg, wps)
    count = groups.sum(-1)  # (out, n_seg)
    rank = torch.cumsum(bw, dim=-1) - 1
    r_idx, s_idx, w_idx, b_idx = bw.nonzero(as_tuple=True)
    rk = rank[r_idx, s_idx, w_idx, b_idx]
    step = (torch.cumsum(groups, -1) - groups)[r_idx, s_idx, w_idx] + rk // p
    order = torch.argsort(count.t(), dim=1, descending=True, stable=True)  # (n_seg, out)
    perm = torch.full((n_seg, outp), out_f, dtype=torch.int64, device=dev)
    perm[:, :out_f] = order
    cnt = torch.zeros(n_seg, outp, dtype=torch.int64, device=dev)
    cnt[:, :out_f] = torch.gather(count.t(), 1, order)
    steps = cnt.view(n_seg, n_slice, rows).amax(-1)  # (n_seg, n_slice)
    lmax = max(int(steps.max()) if steps.numel() else 0, 1)
    # table[s, row, k, j] = slot j of step k of that row in segment s (0 where nothing is kept)
    table = torch.zeros(n_seg, outp + 1, lmax, p, dtype=values.dtype, device=dev)
    table[s_idx, r_idx, step, rk % p] = dense.view(out_f, n_seg, wps, 32)[r_idx, s_idx, w_idx, b_idx]
    lanes = torch.gather(table, 1, perm.view(n_seg, outp, 1, 1).expand(-1, -1, lmax, p))
    lanes = lanes.view(n_seg, n_slice, rows, lmax, p).transpose(2, 3)  # (n_seg, n_slice, L, rows, p)
    keep = torch.arange(lmax, device=dev).view(1, 1, -1) < steps.unsqueeze(-1)
    flat = lanes[keep]  # slot-major per slice, slices in (segment, slice) order: (total steps, rows, p)
    if flat.numel() >= 2**31:
        raise SparsecraftError("a sliced weight with 2**31 or more stored values is beyond the kernel")
    sizes = (steps * rows).flatten()
    start = (torch.cumsum(sizes, 0) - sizes).view(n_seg, n_slice)  # in units of per_step values
    wpad = torch.zeros(n_seg, outp + 1, wps, dtype=torch.int32, device=dev)  # row out_f: padding lanes
    wpad[:, :out_f] = words.transpose(0, 1)
    w_sl = torch.gather(wpad, 1, perm.unsqueeze(-1).expand(-1, -1, wps))  # (n_seg, outp, wps)
    w_sl = w_sl.view(n_seg, n_slice, rows, wps).transpose(2, 3).contiguous()
    return SlicedWeight(
        shape=(out_f, in_f), seg=seg, rows=rows, per_step=p, values=flat.reshape(-1).contiguous(), words=w_sl,
        start=start.to(torch.int32).contiguous(), steps=steps.to(torch.int32).contiguous(),
        perm=perm.to(torch.int16 if out_f < 2**15 else torch.int32).contiguous(),
    )


@triton.jit
def _word(wptr, j: tl.constexpr, C: tl.constexpr, WPS: tl.constexpr):
    if j < WPS:
        return tl.load(wptr + j * C)
    return tl.zeros(wptr.shape, tl.int32)


@triton.jit
def _slot(q, j: tl.constexpr, P: tl.constexpr, BF16: tl.constexpr):
    """Slot j of a step's P packed 16-bit values (int16 / int32 / int64 for P = 1 / 2 / 4) as float32."""
    if P == 4:
        return _h2f((q >> (16 * j)).to(tl.int32), BF16)
    if P == 2:
        return _h2f(q >> (16 * j), BF16)
    return _h2f(q.to(tl.int32), BF16)


@triton.jit
def _slice(words_ptr, start_ptr, perm_ptr, C: tl.constexpr, WPS: tl.constexpr):
    """Program (slice, segment): its first step-vector, each lane's output row, its mask words."""
    sl = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    lane = tl.arange(0, C)
    rows = tl.load(perm_ptr + sl * C + lane).to(tl.int32)
    return sl, lane, tl.load(start_ptr + sl), rows, words_ptr + sl * (WPS * C) + lane


@triton.jit
def _add_sums(ptrs, acc, mask, RELAXED: tl.constexpr):
    """Atomic float32 adds; relaxed ones suffice: only a later kernel (the move-out) reads them."""
    if RELAXED:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@triton.jit
def sliced_gemv_kernel(x_ptr, out_ptr, vq_ptr, words_ptr, start_ptr, steps_ptr, perm_ptr,
                       B, N, stride_xb, stride_ob, stride_or,
                       SEG: tl.constexpr, C: tl.constexpr, P: tl.constexpr, BB: tl.constexpr,
                       BF16: tl.constexpr, INTERP: tl.constexpr, REG: tl.constexpr = True,
                       UNROLL: tl.constexpr = 1, RELAXED: tl.constexpr = True, PDL: tl.constexpr = False):
    """out[b, row] += sum over the segment's kept (row, col) of W[row, col] * x[b, col] (float32).

    A step takes the P lowest set bits of the lane's current 32-bit mask word (fewer where the word
    runs out: those slots hold 0) and its P values with one load. ``REG``: the segment's mask words
    (at most 4) are loaded into registers before the walk, so a step waits on no load but its own
    x and values; otherwise an exhausted word loads the next one inside the walk. (Loading the next
    steps' values ahead made the walk 5-20% slower in H100 run 17.) Sums are added atomically to a
    float32 ``out`` that is zero on entry."""
    WPS: tl.constexpr = SEG // 32
    sl, lane, start, rows, wptr = _slice(words_ptr, start_ptr, perm_ptr, C, WPS)
    steps = tl.load(steps_ptr + sl)
    vptr = vq_ptr + start + lane
    bi = tl.program_id(2) * BB + tl.arange(0, BB)
    bmask = bi < B
    xrow = x_ptr + tl.program_id(1) * SEG + bi * stride_xb
    if REG:
        tl.static_assert(WPS <= 4, "REG holds at most 4 mask words (segments of up to 128 columns)")
        m0 = _word(wptr, 0, C, WPS)
        m1 = _word(wptr, 1, C, WPS)
        m2 = _word(wptr, 2, C, WPS)
        m3 = _word(wptr, 3, C, WPS)
    w = tl.full((C,), -1, tl.int32)
    cur = tl.zeros((C,), tl.int32)
    acc = tl.zeros((C, BB), tl.float32)
    _pdl_start(PDL, INTERP)  # the slice's layout and mask words are loaded; x and the sums from here on
    for k in tl.range(0, steps, loop_unroll_factor=UNROLL):
        adv = cur == 0
        w += adv.to(tl.int32)
        if REG:
            nxt = tl.where(w == 0, m0, tl.where(w == 1, m1, tl.where(w == 2, m2, m3)))
            cur = tl.where(adv, tl.where(w < WPS, nxt, 0), cur)
        else:
            cur = tl.load(wptr + w * C, mask=adv & (w < WPS), other=cur)
        q = tl.load(vptr + k * C)
        for j in tl.static_range(P):
            bit = cur & (-cur)
            cur = cur ^ bit
            col = w * 32 + _popc(bit - 1, INTERP)
            xv = tl.load(xrow[None, :] + col[:, None], mask=(bit != 0)[:, None] & bmask[None, :], other=0.0)
            acc += _slot(q, j, P, BF16)[:, None] * xv.to(tl.float32)
    _add_sums(out_ptr + bi[None, :] * stride_ob + rows[:, None] * stride_or, acc,
              (rows < N)[:, None] & bmask[None, :], RELAXED)


@triton.jit
def _word_tile(v_ptr, wptr, j: tl.constexpr, off, start, lane, C: tl.constexpr, P: tl.constexpr,
               INTERP: tl.constexpr):
    """Word j of every lane's mask as a dense (32 columns, C lanes) tile of its weights, and ``off``
    (steps of the lane's earlier words) moved past it: the kept value of rank r in the word sits at
    step off + r // P, slot r % P (words take ceil(kept / P) steps, at least one)."""
    m = tl.load(wptr + j * C)
    b = tl.arange(0, 32)[:, None]
    rank = _popc(m[None, :] & ~(-1 << b), INTERP)  # kept columns of the lane before column b
    pos = (start + (off[None, :] + rank // P) * C + lane[None, :]) * P + rank % P
    v = tl.load(v_ptr + pos, mask=((m[None, :] >> b) & 1) != 0, other=0.0)
    return v, off + tl.maximum((_popc(m, INTERP) + P - 1) // P, 1)


@triton.jit
def sliced_dot_kernel(x_ptr, out_ptr, v_ptr, words_ptr, start_ptr, perm_ptr, B, N, K, stride_xb, stride_ob,
                      stride_or, SEG: tl.constexpr, C: tl.constexpr, P: tl.constexpr, BB: tl.constexpr,
                      INTERP: tl.constexpr, DOT_F32: tl.constexpr, RELAXED: tl.constexpr = True):
    """Batches of 9-16 rows on the tensor cores: each 32-column word of the segment is expanded to
    a dense (32, C) tile in registers (one predicated load per column, at the position
    :func:`_word_tile` computes) and multiplied with the (BB, 32) inputs; float32 sums are added
    atomically to ``out`` (zero on entry) as in :func:`sliced_gemv_kernel`."""
    WPS: tl.constexpr = SEG // 32
    sl, lane, start, rows, wptr = _slice(words_ptr, start_ptr, perm_ptr, C, WPS)
    bi = tl.program_id(2) * BB + tl.arange(0, BB)
    bmask = bi < B
    off = tl.zeros((C,), tl.int32)
    acc = tl.zeros((BB, C), tl.float32)
    for j in tl.static_range(WPS):
        v, off = _word_tile(v_ptr, wptr, j, off, start, lane, C, P, INTERP)
        col = tl.program_id(1) * SEG + j * 32 + tl.arange(0, 32)
        xt = tl.load(x_ptr + bi[:, None] * stride_xb + col[None, :], mask=bmask[:, None] & (col < K)[None, :],
                     other=0.0)
        if DOT_F32:  # the interpreter cannot multiply bf16 in tl.dot
            acc += tl.dot(xt.to(tl.float32), v.to(tl.float32))
        else:
            acc += tl.dot(xt.to(v.dtype), v)
    _add_sums(out_ptr + bi[:, None] * stride_ob + rows[None, :] * stride_or, acc,
              bmask[:, None] & (rows < N)[None, :], RELAXED)


@triton.jit
def sliced_dense_kernel(out_ptr, v_ptr, words_ptr, start_ptr, perm_ptr, N, K,
                        SEG: tl.constexpr, C: tl.constexpr, P: tl.constexpr, INTERP: tl.constexpr):
    """The dense (N, K) weight, one (slice, segment) block per program (prefill and large batches)."""
    WPS: tl.constexpr = SEG // 32
    sl, lane, start, rows, wptr = _slice(words_ptr, start_ptr, perm_ptr, C, WPS)
    off = tl.zeros((C,), tl.int32)
    for j in tl.static_range(WPS):
        v, off = _word_tile(v_ptr, wptr, j, off, start, lane, C, P, INTERP)
        col = tl.program_id(1) * SEG + j * 32 + tl.arange(0, 32)
        tl.store(out_ptr + rows[None, :] * K + col[:, None], v.to(out_ptr.dtype.element_ty),
                 mask=(rows < N)[None, :] & (col < K)[:, None])


@triton.jit
def _move_out_kernel(ws_ptr, out_ptr, n, N, stride_wb, stride_wr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = False, INTERP: tl.constexpr = False):
    """out (B, N) = ws in out's dtype, and ws = 0 again: one kernel instead of a cast and a fill."""
    _pdl_start(PDL, INTERP)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    w = ws_ptr + (i // N) * stride_wb + (i % N) * stride_wr
    tl.store(out_ptr + i, tl.load(w, mask=m).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(w, tl.zeros((BLOCK,), tl.float32), mask=m)


def _workspace(sw: SlicedWeight, batch: int) -> torch.Tensor:
    """The weight's float32 sums, (out, batch): the sums of one output row lie side by side, so a
    warp's atomic adds of several batch rows hit few cache lines. Zero between calls
    (:func:`_move_out_kernel` clears them); made on first use, so outside any CUDA graph capture."""
    if batch not in sw.workspaces:
        sw.workspaces[batch] = torch.zeros(sw.shape[0], batch, device=sw.values.device, dtype=torch.float32)
    return sw.workspaces[batch]


_PACKED = {1: torch.int16, 2: torch.int32, 4: torch.int64}  # a step's values, read as one integer


def sliced_mm(x: torch.Tensor, sw: SlicedWeight, bb: int = 1, num_warps: int = 1, reg: bool = True,
              unroll: int = 1, out: torch.Tensor | None = None, ws: torch.Tensor | None = None,
              dot: bool = False, relaxed: bool = True, pdl: bool = False) -> torch.Tensor:
    """x (B, in) -> (B, out) = x @ W^T; ``bb`` batch rows per program (a power of two; ``dot``: the
    tensor-core kernel, at least 16).

    Sums go to a persistent zeroed float32 workspace, and one small kernel moves them to the
    result and clears the workspace (two kernels per product, no fill). ``out`` given: the float32
    (B, out) sums are added to it and returned as they are (one kernel; dispatch.attach_sums). ``ws``: the
    (out, B) workspace, when the caller keeps it (the custom op of dispatch.py; any strides).
    ``relaxed``: relaxed atomic adds (else acquire-release, Triton's default). ``pdl`` (walk only):
    the walk and the move-out as programmatic dependent launches (sm_90), each starting while its
    predecessor finishes."""
    batch, in_f = x.shape
    if in_f != sw.shape[1] or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not fit a sliced weight {sw.shape}")
    if dot and bb < 16:
        raise ValueError("the sliced dot kernel needs a batch tile of 16 or more")
    x = x.contiguous()
    raw = out is not None
    acc = out if raw else (ws if ws is not None else _workspace(sw, batch)).t()  # (B, out), any strides
    n_seg, n_slice = sw.steps.shape
    grid = (n_slice, n_seg, -(-batch // bb))
    interp = interpreted()
    pdl = pdl and not dot
    launch = {"launch_pdl": True} if pdl else {}
    if dot:
        sliced_dot_kernel[grid](
            x, acc, sw.values, sw.words, sw.start, sw.perm, batch, sw.shape[0], in_f,
            x.stride(0), *acc.stride(),
            SEG=sw.seg, C=sw.rows, P=sw.per_step, BB=bb, INTERP=interp,
            DOT_F32=interp and sw.values.dtype == torch.bfloat16, RELAXED=relaxed, num_warps=num_warps,
        )
    else:
        sliced_gemv_kernel[grid](
            x, acc, sw.values.view(_PACKED[sw.per_step]), sw.words, sw.start, sw.steps, sw.perm,
            batch, sw.shape[0], x.stride(0), *acc.stride(),
            SEG=sw.seg, C=sw.rows, P=sw.per_step, BB=bb, BF16=sw.values.dtype == torch.bfloat16,
            INTERP=interp, REG=reg and sw.seg <= 128, UNROLL=unroll, RELAXED=relaxed, PDL=pdl,
            num_warps=num_warps, **launch,
        )
    if raw:
        return out
    y = torch.empty(batch, sw.shape[0], device=x.device, dtype=x.dtype)
    _move_out_kernel[(-(-y.numel() // 1024),)](acc, y, y.numel(), sw.shape[0], *acc.stride(), BLOCK=1024,
                                                PDL=pdl, INTERP=interp, num_warps=4, **launch)
    return y


def sliced_dense(sw: SlicedWeight, dtype: torch.dtype | None = None, num_warps: int = 4) -> torch.Tensor:
    """The dense (out, in) weight of a sliced weight, on its device."""
    out_f, in_f = sw.shape
    dense = torch.empty(out_f, in_f, device=sw.values.device, dtype=dtype or sw.values.dtype)
    n_seg, n_slice = sw.steps.shape
    sliced_dense_kernel[(n_slice, n_seg)](
        dense, sw.values, sw.words, sw.start, sw.perm, out_f, in_f,
        SEG=sw.seg, C=sw.rows, P=sw.per_step, INTERP=interpreted(), num_warps=num_warps,
    )
    return dense
