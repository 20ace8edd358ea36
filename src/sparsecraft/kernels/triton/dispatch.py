"""Pick the kernel and its tile shape for one product y = x @ W^T, W a :class:`TritonWeight`,
for bitmask weights with 16-bit values a :class:`~.sliced.SlicedWeight`, for 2:4 weights with
16-bit or int4 values an :class:`~.mma24.MmaWeight`.

As measured on the H100 llama-7b chain (docs/results/gpu_kernels.md, runs 5 and 6), bitmask on the
H200 (runs 10-13):

* bitmask with 16-bit values: only the sliced layout (sliced.py, ``SLICED_LAYOUT``) is kept on the
  device (:func:`prepare_module`); batch 1..8 run its step-per-kept-value kernel, batch 9..16 its
  tensor-core kernel (``sliced_config``), larger batches decode it to a dense temporary
  (:func:`decompress`) for cuBLAS;
* 2:4 with fp16/bf16 values (inputs of the same dtype) or symmetric int4 codes (group a multiple of
  128, fp16 inputs), out % 16 == 0, in % 128 == 0, batch 1..16: the sparse tensor-core kernel
  (mma24.py, ``MMA_TILES``; H100 runs 15-19), on the mma.sp fragment layout that
  :func:`prepare_weight` keeps as the weight's only device copy;
* batch 1..``UNIT_MAX_BATCH`` (16): the 8-column unit kernels (gemv.py) for the other 2:4 weights
  (other shapes or input dtypes; in_features % 8 == 0), with the tile and variant of
  ``UNIT_TILES`` (FMA rows or, for larger batches, the tensor-core ``dot`` variant); other layouts
  at batch 1 run the per-element GEMV kernels (sparse_mm.py, ``USE_DOT=False``);
* other N:M layouts up to ``DOT_MAX_BATCH`` rows: the decode-then-``tl.dot`` kernel of sparse_mm.py;
* otherwise (anything above 16 rows, prefill): a dense weight and cuBLAS; the dense weight is a
  cached copy when the model was prepared with ``keep_dense=True`` (then no batch is slower than
  dense), else it is decoded on the fly by :func:`decompress`.

Everything here depends on shapes only (no host syncs, no data-dependent choices), so a decode
step can be captured in a CUDA graph; :func:`sparse_linear` calls custom ops
(``sparsecraft::triton_sparse_linear``, ``triton_sliced_linear``, ``triton_sliced_dense``), so
torch.compile treats each product as one opaque call (``triton_mma24_linear`` for the mma.sp layout).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import interpreted
from .layout import TILE, TritonWeight, prepare
from .mma24 import MmaWeight, mma24_mm, unpack
from .mma24 import supported as mma24_supported
from .sparse_mm import _out_buffer

DOT_MAX_BATCH = 16  # N:M rows up to which the dot kernel beats decode + cuBLAS (measured)


@dataclass(frozen=True)
class KernelConfig:
    bn: int
    bk: int
    bb: int  # padded batch per program; 1 means the multiply-add (non-dot) kernel
    num_warps: int
    split_k: int = 1
    num_stages: int = 2
    unit: bool = False  # the 8-column-unit 2:4 kernels of gemv.py (bk = 8 * units per tile; bb = batch tile)
    # unit-kernel variants (gemv.py), off by default: see docs/results/gpu_kernels.md for which were timed
    dot: bool = False  # batch rows on the tensor cores (bb >= 16, bn >= 16) instead of FMAs per row
    xrow: bool = False  # x loaded as a (rows, units) tile in the weights' register layout; mma: x
    # copied into fragment order first (batch > 1)
    prmt: bool = False  # 2:4 batch 1: byte-permute pick of x at the kept positions instead of selects
    mma: bool = False  # 2:4, batch <= 16: the sparse tensor-core kernel (mma24.py); bn = 16 * num_warps
    fixup: bool = False  # mma with K splits: the last split moves the sums out (no fill / conversion kernels)
    # bitmask: the sliced kernel (sliced.py) on segments of this many columns (0: off); bn = rows per
    # slice, bb = batch rows per program
    sliced: int = 0
    unroll: int = 1  # sliced: unroll factor of the step loop
    per_step: int = 4  # sliced: kept values a lane takes per step
    depth: int = 1  # mma: 128-column chunks loaded ahead of the one being multiplied (1-4)
    pdl: bool = False  # mma, sliced walk: programmatic dependent launch (sm_90; sparse_mm._pdl_start)
    k_warps: int = 1  # mma: warps sharing an m-tile (K split inside the program, summed in shared memory)


def _pow2_at_least(v: int, lo: int) -> int:
    p = lo
    while p < v:
        p *= 2
    return p


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def _bk_for(tw: TritonWeight, want: int) -> int:
    """Tile width: bitmask needs a multiple of TILE (its offset table); N:M at least 4 bytes of indices."""
    bk = want
    if tw.fmt == "bitmask":
        bk = max(bk, TILE)
    else:
        bk = max(bk, 16 * tw.m // tw.n)
    return bk


UNIT_MAX_BATCH = 16  # rows up to which the unit kernels run (measured at batch 1, 4 and 16)


def unit_config(tw: TritonWeight, batch: int, device: torch.device) -> KernelConfig:
    """Tile of the unit kernels (gemv.py) from the GPU tuning runs (``UNIT_TILES``); the batch tile is
    the batch rounded up to a power of two (16 for the tensor-core ``dot`` variant); K split as
    measured, or (0) until the grid covers the multiprocessors twice (skinny layers)."""
    out_f, in_f = tw.shape
    size = 1 if batch == 1 else 4 if batch <= 4 else 16
    bn, bk, warps, split, *flags = UNIT_TILES[(tw.fmt, tw.bits, size)]
    bb = 16 if "dot" in flags else _pow2_at_least(batch, 1)
    tiles = -(-in_f // bk)
    if split == 0:
        split = 1
        n_prog = -(-out_f // bn) * -(-batch // bb)
        while n_prog * split < 2 * _sm_count(device) and split * 2 <= tiles:
            split *= 2
    return KernelConfig(bn=bn, bk=bk, bb=bb, num_warps=warps, split_k=min(split, tiles), unit=True,
                        **{f: True for f in flags})


# (fmt, bits, batch size class 1 / 2-4 / 5-16) -> (rows, columns, warps, K split or 0 = automatic,
# variant flags...): the tile that won most layer shapes of the llama-7b chain in the H100 tuning
# run 6 (fp16 batch 1: run 17), batch 16 from the H200 runs 8-9 (docs/results/gpu_kernels.md);
# "dot" runs the batch rows on the tensor cores (batch padded to 16)
UNIT_TILES: dict[tuple[str, int, int], tuple] = {
    ("nm", 0, 1): (2, 512, 1, 0),
    ("nm", 4, 1): (4, 512, 2, 0, "xrow", "prmt"),
    ("nm", 0, 4): (32, 256, 4, 0, "dot"),
    ("nm", 4, 4): (8, 512, 4, 0),
    ("nm", 0, 16): (32, 256, 4, 4, "dot"),
    ("nm", 4, 16): (16, 256, 1, 4, "dot"),
}


# bitmask with 16-bit values: the sliced layout (sliced.py) at the setting that won the H200 probes
# of session 6 (docs/results/gpu_kernels.md, runs 10-12): 128-column segments, 64-row slices,
# 4 values per step. Batch 1-8: the step walk on two warps (unrolled twice at batch 1); batch 9-16:
# the tensor-core kernel on four warps (H200 run 13: at batch 8 the walk won at 70% and lost 3% at
# 50%, at batch 16 the tensor-core kernel won; batches 9-15 not measured). Batch 1 as programmatic
# dependent launches (H100 run 17, session 11: 70% 1.72x -> 1.97x dense, 50% 1.31x -> 1.45x)
SLICED_LAYOUT = dict(seg=128, rows=64, per_step=4)
SLICED_WALK_MAX_BATCH = 8
SLICED_MAX_BATCH = 16


# 2:4 on the sparse tensor cores (mma24.py): (bits, batch class 1 / 8 (2-8 rows, one n-tile) / 16
# (9-16 rows, two)) -> (tile for narrow layers, tile for wide ones); narrow: at most 2 m-tiles
# (16 rows) per multiprocessor. H100 run 19 (session 12, docs/results/gpu_kernels.md): warps that
# share an m-tile and sum in shared memory (k_warps) beat every grid K split for both value types,
# so fp16/bf16 2:4 weights now also live in the mma.sp layout alone (best tiles per shape, chain vs
# cuBLAS: int4 2.94x / 2.47x / 1.58x, fp16 1.85x / 1.62x / 1.43x at batch 1 / 4 / 16, where the
# unit kernels gave fp16 1.62x / 0.81x / 0.82x). Two m-tiles per program except the narrow batch-16
# layers; x in fragment order from 9 rows. Re-tuned on the fused shapes (q|k|v 12288 and gate|up
# 22016 rows; H100 run 26, session 16): int4 wide layers at batch 1 load 2 chunks ahead, not 3
# (chain of the best tile per shape 3.39x vs 3.04x with 3); fp16 wide layers at batch 1-8 on 4 warps
# (gate|up 35.9 us for 38.0 at batch 1, 39.9 for 42.1 at batch 4; q|k|v 0.7-1.1 us slower).
class MmaTile(NamedTuple):
    warps: int  # per program
    k_warps: int  # warps per m-tile (they split the program's K range; warps / k_warps m-tiles)
    depth: int  # chunks loaded ahead
    xfrag: bool = False  # batch > 1: x copied into fragment order first
    pdl: bool = True  # programmatic dependent launch


MMA_TILES: dict[tuple[int, int], tuple[MmaTile, MmaTile]] = {
    (4, 1): (MmaTile(16, 8, 2), MmaTile(8, 4, 2)),
    (4, 8): (MmaTile(16, 8, 2), MmaTile(8, 4, 2)),
    (4, 16): (MmaTile(8, 8, 2, xfrag=True), MmaTile(8, 4, 2, xfrag=True)),
    (0, 1): (MmaTile(4, 4, 3), MmaTile(4, 4, 3)),
    (0, 8): (MmaTile(4, 4, 3), MmaTile(4, 4, 3)),
    (0, 16): (MmaTile(8, 8, 2, xfrag=True), MmaTile(8, 4, 2, xfrag=True)),
}
# below this many warps per multiprocessor (small models' layers) K is also split over the grid; at
# 8, run 21 split the 4096-row fp16 layers (256 m-tiles x 4 warps) in two: 11.1 us for 7.8 unsplit
MMA_MIN_WARPS_PER_SM = 4


def sliced_config(batch: int) -> KernelConfig:
    """The sliced kernels' launch for ``batch`` (<= SLICED_MAX_BATCH) rows, on SLICED_LAYOUT."""
    lay = SLICED_LAYOUT
    if batch > SLICED_WALK_MAX_BATCH:
        return KernelConfig(bn=lay["rows"], bk=0, bb=16, num_warps=4, sliced=lay["seg"], dot=True,
                            per_step=lay["per_step"])
    return KernelConfig(bn=lay["rows"], bk=0, bb=_pow2_at_least(batch, 1), num_warps=2, sliced=lay["seg"],
                        unroll=2 if batch == 1 else 1, per_step=lay["per_step"], pdl=batch == 1)


def sliced_supported(tw: TritonWeight, x_dtype: torch.dtype | None = None) -> bool:
    """Whether the sliced kernel takes this weight: bitmask with float16/bfloat16 values and inputs."""
    half = (torch.float16, torch.bfloat16)
    return (tw.fmt == "bitmask" and tw.bits == 0 and tw.values.dtype in half
            and (x_dtype is None or x_dtype in half))


def default_config(tw: TritonWeight, batch: int, device: torch.device,
                   x_dtype: torch.dtype = torch.float16) -> KernelConfig:
    """Shape-only tile choice: the per-shape winners of the H100 tuning run (docs/results/gpu_kernels.md)."""
    out_f, in_f = tw.shape
    if batch <= SLICED_MAX_BATCH and sliced_supported(tw, x_dtype):
        return sliced_config(batch)
    if mma_runs(tw, batch, x_dtype):
        return mma_config(tw.mma_view(), batch)
    if batch <= UNIT_MAX_BATCH and unit_supported(tw, x_dtype):
        return unit_config(tw, batch, device)
    if batch == 1:
        bb = 1
        if tw.fmt == "bitmask":
            # one warp per program: the prefix sum stays inside the warp; 2 rows won on the 4096-row
            # layers, 4 on the 11008-row ones
            bn, bk, warps = (2 if out_f <= 8192 else 4), 256, 1
        else:
            bn, bk, warps = 4, 512, 2  # fp16 and int4 alike
    else:
        bb = 16 if batch <= 16 else 64
        if tw.fmt == "nm" and tw.bits == 4:
            bn, bk, warps = 16, 256, 4
        else:
            bn, bk, warps = (32, 256, 4) if bb == 16 else (64, 256, 8)
    bk = _bk_for(tw, bk)
    if tw.bits and tw.group_size < bk and bk % tw.group_size:
        bk = tw.group_size
    # split K until the grid covers the multiprocessors about twice over (skinny layers)
    n_prog = -(-out_f // bn) * -(-batch // bb)
    tiles = -(-in_f // bk)
    split = 1
    target = 2 * _sm_count(device)
    while n_prog * split < target and split * 2 <= tiles // 2:
        split *= 2
    return KernelConfig(bn=bn, bk=bk, bb=bb, num_warps=warps, split_k=split)


def _launch_args(tw: TritonWeight, dummy: torch.Tensor):
    return (
        tw.values, tw.meta,
        tw.row_offsets if tw.row_offsets is not None else dummy,
        tw.tile_offsets if tw.tile_offsets is not None else dummy,
        tw.scales if tw.scales is not None else dummy,
        tw.zeros if tw.zeros is not None else dummy,
    )


def _meta_stride(tw: TritonWeight) -> int:
    return tw.meta.shape[1]


def _constexprs(tw: TritonWeight, bk: int) -> dict:
    g = tw.group_size if tw.bits else bk
    if bk & (bk - 1) or (tw.fmt == "bitmask" and bk % TILE) or (tw.fmt == "nm" and bk * tw.n // tw.m < 16):
        raise ValueError(f"tile width {bk} does not fit the {tw.fmt} layout")
    if tw.bits and not (bk % g == 0 or g % bk == 0):
        raise ValueError(f"tile width {bk} and group size {g} must divide one another")
    return dict(FMT=0 if tw.fmt == "bitmask" else 1, NN=max(tw.n, 1), MM=max(tw.m, 1), QBITS=tw.bits,
                SYM=bool(tw.symmetric), G=g, TILE=TILE)


def sparse_mm(x: torch.Tensor, tw: TritonWeight, cfg: KernelConfig | None = None) -> torch.Tensor:
    """x (B, in) -> (B, out) = x @ W^T through the Triton kernels (no large-batch fallback)."""
    from .sparse_mm import sparse_mm_kernel

    x = x.contiguous()
    batch, in_f = x.shape
    out_f = tw.shape[0]
    cfg = cfg or default_config(tw, batch, x.device, x.dtype)
    if cfg.sliced:
        from .sliced import sliced_mm

        sw = tw.sliced_view(cfg.sliced, cfg.bn, cfg.per_step)
        return sliced_mm(x, sw, cfg.bb, cfg.num_warps, unroll=cfg.unroll, dot=cfg.dot, pdl=cfg.pdl)
    if cfg.unit:
        return unit_mm(x, tw, cfg)
    if cfg.mma:
        return _mma_mm(x, tw.mma_view(), cfg)
    dummy = tw.meta
    use_dot = cfg.bb > 1
    bb = cfg.bb if use_dot else 1
    out = _out_buffer(x, out_f, cfg.split_k)
    grid = (triton_cdiv(out_f, cfg.bn), cfg.split_k, triton_cdiv(batch, bb))
    sparse_mm_kernel[grid](
        x, out, *_launch_args(tw, dummy),
        batch, out_f, in_f, x.stride(0), out.stride(0),
        tw.vals_stride, _meta_stride(tw), tw.tile_offsets.shape[1] if tw.tile_offsets is not None else 1,
        tw.n_groups, cfg.split_k,
        **_constexprs(tw, cfg.bk), BN=cfg.bn, BK=cfg.bk, BB=bb, USE_DOT=use_dot, ATOMIC=cfg.split_k > 1,
        # the interpreter cannot multiply bf16 in tl.dot
        DOT_F32=x.dtype == torch.bfloat16 and interpreted(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.to(x.dtype)  # no copy unless split K summed in float32


def unit_supported(tw: TritonWeight, x_dtype: torch.dtype | None = None) -> bool:
    """Whether the unit kernels (gemv.py) take this weight: 2:4 with 16-bit float or int4 values,
    16-bit float inputs, in_features % 8 == 0."""
    if tw.fmt != "nm" or (tw.n, tw.m) != (2, 4) or tw.shape[1] % 8:
        return False
    if x_dtype is not None and x_dtype not in (torch.float16, torch.bfloat16):
        return False
    if tw.bits == 4:
        return tw.group_size % 8 == 0 and tw.values.shape[1] % 2 == 0
    return tw.bits == 0 and tw.values.dtype in (torch.float16, torch.bfloat16)


def unit_mm(x: torch.Tensor, tw: TritonWeight, cfg: KernelConfig) -> torch.Tensor:
    """x (B, in) -> (B, out) through the unit kernels of gemv.py (see :func:`unit_supported`)."""
    from .gemv import nm24_gemv_kernel

    if not unit_supported(tw, x.dtype):
        raise ValueError(f"the unit kernels do not take this weight with {x.dtype} inputs")
    x = x.contiguous()
    if x.data_ptr() % 16:  # x is read as int64 pairs
        x = x.clone()
    batch, in_f = x.shape
    out_f = tw.shape[0]
    bk = cfg.bk
    if bk % 8 or (bk // 8) & (bk // 8 - 1):
        raise ValueError(f"unit kernel tile width {bk}: 8 * a power of two")
    bb = max(1, cfg.bb)
    if cfg.dot and (bb < 16 or cfg.bn < 16):
        raise ValueError("the unit kernels' dot variant needs a batch tile and a row tile of 16 or more")
    out = _out_buffer(x, out_f, cfg.split_k)
    grid = (triton_cdiv(out_f, cfg.bn), cfg.split_k, triton_cdiv(batch, bb))
    interp = interpreted()
    vq = tw.values.view(torch.int16 if tw.bits == 4 else torch.int64)
    dummy = tw.meta
    nm24_gemv_kernel[grid](
        x, out, vq, tw.meta, tw.scales if tw.scales is not None else dummy,
        tw.zeros if tw.zeros is not None else dummy,
        batch, out_f, in_f, x.stride(0), out.stride(0), vq.shape[1], tw.meta.shape[1], tw.n_groups,
        cfg.split_k, QBITS=tw.bits, SYM=bool(tw.symmetric), G=tw.group_size if tw.bits else 8,
        VBF16=tw.values.dtype == torch.bfloat16, INTERP=interp, PRMT=cfg.prmt, BN=cfg.bn, U=bk // 8, BB=bb,
        ATOMIC=cfg.split_k > 1, BF16=x.dtype == torch.bfloat16, DOT=cfg.dot,
        DOT_F32=cfg.dot and x.dtype == torch.bfloat16 and interp, XROW=cfg.xrow,
        num_warps=cfg.num_warps, num_stages=1,
    )
    return out.to(x.dtype)  # no copy unless split K summed in float32


def decompress(tw, dtype: torch.dtype | None = None, bn: int | None = None, bk: int = 256) -> torch.Tensor:
    """Dense (out, in) weight decoded on the device of ``tw`` (a TritonWeight, SlicedWeight or MmaWeight)."""
    from .sparse_mm import decompress_kernel

    if isinstance(tw, MmaWeight):
        tw = unpack(tw)
    if not isinstance(tw, TritonWeight):
        from .sliced import sliced_dense

        return sliced_dense(tw, dtype)
    out_f, in_f = tw.shape
    # bitmask: one warp per program keeps the prefix sum inside the warp (as in the GEMV kernel)
    warps = 1 if tw.fmt == "bitmask" else 4
    bn = bn or (4 if tw.fmt == "bitmask" else 32)
    bk = _bk_for(tw, bk)
    dense = torch.empty(out_f, in_f, device=tw.values.device, dtype=dtype or tw.dtype)
    grid = (triton_cdiv(out_f, bn), triton_cdiv(in_f, bk))
    decompress_kernel[grid](
        dense, *_launch_args(tw, tw.meta), out_f, in_f, tw.vals_stride, _meta_stride(tw),
        tw.tile_offsets.shape[1] if tw.tile_offsets is not None else 1, tw.n_groups,
        **_constexprs(tw, bk), BN=bn, BK=bk, num_warps=warps,
    )
    return dense


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def use_kernel(tw: TritonWeight, batch: int) -> bool:
    """Whether a product of ``batch`` rows runs our kernels (else: dense weight + cuBLAS).

    Measured on the llama-7b chain (H100, docs/results/gpu_kernels.md): batch 1 always; up to
    ``UNIT_MAX_BATCH`` rows the unit kernels where they take the weight; other N:M layouts up to
    ``DOT_MAX_BATCH`` rows the decode-then-dot kernel; everything else decodes to a dense
    temporary and calls cuBLAS.
    """
    if batch == 1:
        return True
    if batch <= UNIT_MAX_BATCH and unit_supported(tw):
        return True
    return batch <= DOT_MAX_BATCH and tw.fmt == "nm"


def _sparse_linear_impl(x2: torch.Tensor, tw: TritonWeight, dense: torch.Tensor | None) -> torch.Tensor:
    batch = x2.shape[0]
    if batch == 1 or (dense is None and use_kernel(tw, batch)):
        return sparse_mm(x2, tw)
    w = dense if dense is not None else decompress(tw, x2.dtype)
    return x2 @ w.to(x2.dtype).t()


@torch.library.custom_op("sparsecraft::triton_sparse_linear", mutates_args=())
def _triton_sparse_linear(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, row_offsets: torch.Tensor | None,
    tile_offsets: torch.Tensor | None, scales: torch.Tensor | None, zeros: torch.Tensor | None,
    dense: torch.Tensor | None, is_bitmask: bool, out_features: int, in_features: int, n: int, m: int,
    bits: int, group_size: int, symmetric: bool,
) -> torch.Tensor:
    tw = TritonWeight("bitmask" if is_bitmask else "nm", (out_features, in_features), x.dtype, values, meta,
                      row_offsets, tile_offsets, n, m, bits, group_size, symmetric, scales, zeros)
    return _sparse_linear_impl(x, tw, dense)


@_triton_sparse_linear.register_fake
def _(x, values, meta, row_offsets, tile_offsets, scales, zeros, dense, is_bitmask, out_features,
      in_features, n, m, bits, group_size, symmetric):
    return x.new_empty(x.shape[0], out_features)


def mma_config(mw: MmaWeight, batch: int) -> KernelConfig:
    """Launch of the sparse tensor-core kernel (mma24.py) for ``batch`` <= 16 rows: ``MMA_TILES``."""
    out_f, in_f = mw.shape
    sms = _sm_count(mw.frags.device)
    narrow, wide = MMA_TILES[(mw.bits, _mma_class(batch))]
    tile = narrow if out_f // 16 <= 2 * sms else wide
    chunks = in_f // 128
    split = 1  # K split over the grid too where the warps would not fill the GPU (small layers)
    while (out_f // 16 * tile.k_warps * split < MMA_MIN_WARPS_PER_SM * sms
           and split * 2 * tile.k_warps <= chunks):
        split *= 2
    return KernelConfig(bn=16 * tile.warps // tile.k_warps, bk=0, bb=16, num_warps=tile.warps, split_k=split,
                        mma=True, depth=tile.depth, fixup=split > 1, xrow=tile.xfrag and batch > 1,
                        pdl=tile.pdl, k_warps=tile.k_warps)


def _mma_mm(x: torch.Tensor, mw: MmaWeight, cfg: KernelConfig, workspace: tuple | None = None):
    """The sparse tensor-core kernel with the launch of ``cfg`` (``mma=True``)."""
    return mma24_mm(x, mw, cfg.num_warps, cfg.split_k, cfg.depth, cfg.fixup, cfg.xrow, workspace=workspace,
                    interp=interpreted(), pdl=cfg.pdl, k_warps=cfg.k_warps)


def _mma_class(batch: int) -> int:
    return 1 if batch == 1 else 8 if batch <= 8 else 16


def mma_runs(tw, batch: int, x_dtype: torch.dtype | None) -> bool:
    """Whether ``batch`` rows of ``x_dtype`` go to the sparse tensor-core kernel (``MMA_TILES``);
    ``tw``: a TritonWeight or an MmaWeight."""
    if batch > 16 or (tw.bits, _mma_class(batch)) not in MMA_TILES:
        return False
    return x_dtype == tw.dtype if isinstance(tw, MmaWeight) else mma24_supported(tw, x_dtype)


@torch.library.custom_op("sparsecraft::triton_mma24_linear", mutates_args=("ws", "cnt"))
def _triton_mma24_linear(x: torch.Tensor, frags: torch.Tensor, meta: torch.Tensor,
                         scales: torch.Tensor | None, ws: torch.Tensor, cnt: torch.Tensor,
                         out_features: int, in_features: int, bits: int, group_size: int,
                         bf16: bool) -> torch.Tensor:
    """x (rows, in) @ W^T for a 2:4 weight in the mma.sp layout: its kernel where ``mma_runs``
    (``ws``, ``cnt``: the K-split workspace of ``mma_config``'s launch, zero again on return, or
    placeholders), else the decoded weight with cuBLAS."""
    mw = MmaWeight((out_features, in_features), frags, meta, bits, group_size, scales,
                   torch.bfloat16 if bf16 else torch.float16)
    rows = x.shape[0]
    if mma_runs(mw, rows, x.dtype):
        cfg = mma_config(mw, rows)
        return _mma_mm(x, mw, cfg, workspace=(ws, cnt))
    return x @ decompress(mw, x.dtype).t()


@_triton_mma24_linear.register_fake
def _(x, frags, meta, scales, ws, cnt, out_features, in_features, bits, group_size, bf16):
    return x.new_empty(x.shape[0], out_features)


def _mma_linear(x2: torch.Tensor, mw: MmaWeight, dense: torch.Tensor | None) -> torch.Tensor:
    rows = x2.shape[0]
    if dense is not None and rows > 1:
        return x2 @ dense.to(x2.dtype).t()
    ws = cnt = mw.placeholder()  # a mutated argument may not be None under torch.compile
    if mma_runs(mw, rows, x2.dtype):
        cfg = mma_config(mw, rows)
        if cfg.fixup and cfg.split_k > 1:  # made by a first, eager call (outside graph capture)
            ws, cnt = mw.workspace(cfg.num_warps // cfg.k_warps)
    return torch.ops.sparsecraft.triton_mma24_linear(x2, mw.frags, mw.meta, mw.scales, ws, cnt, *mw.shape,
                                                      mw.bits, mw.group_size, mw.dtype == torch.bfloat16)


def _sliced(values, words, start, steps, perm, out_features: int, in_features: int):
    from .sliced import SlicedWeight

    lay = SLICED_LAYOUT
    return SlicedWeight((out_features, in_features), lay["seg"], lay["rows"], lay["per_step"], values, words,
                        start, steps, perm)


@torch.library.custom_op("sparsecraft::triton_sliced_linear", mutates_args=("ws",))
def _triton_sliced_linear(x: torch.Tensor, values: torch.Tensor, words: torch.Tensor, start: torch.Tensor,
                          steps: torch.Tensor, perm: torch.Tensor, ws: torch.Tensor, out_features: int,
                          in_features: int) -> torch.Tensor:
    """Batch 1-16 through the sliced kernels (``ws``: their float32 workspace, zero again on return)."""
    from .sliced import sliced_mm

    cfg = sliced_config(x.shape[0])
    sw = _sliced(values, words, start, steps, perm, out_features, in_features)
    return sliced_mm(x, sw, cfg.bb, cfg.num_warps, unroll=cfg.unroll, ws=ws, dot=cfg.dot, pdl=cfg.pdl)


@_triton_sliced_linear.register_fake
def _(x, values, words, start, steps, perm, ws, out_features, in_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("sparsecraft::triton_sliced_accumulate", mutates_args=("sums",))
def _triton_sliced_accumulate(x: torch.Tensor, values: torch.Tensor, words: torch.Tensor, start: torch.Tensor,
                              steps: torch.Tensor, perm: torch.Tensor, sums: torch.Tensor, out_features: int,
                              in_features: int) -> None:
    """One row through the sliced walk, its float32 sums added into ``sums`` (1, out) (one kernel)."""
    from .sliced import sliced_mm

    cfg = sliced_config(1)
    sw = _sliced(values, words, start, steps, perm, out_features, in_features)
    sliced_mm(x, sw, cfg.bb, cfg.num_warps, unroll=cfg.unroll, out=sums, pdl=cfg.pdl)


@_triton_sliced_accumulate.register_fake
def _(x, values, words, start, steps, perm, sums, out_features, in_features):
    return None


@torch.library.custom_op("sparsecraft::triton_sliced_dense", mutates_args=())
def _triton_sliced_dense(values: torch.Tensor, words: torch.Tensor, start: torch.Tensor, steps: torch.Tensor,
                         perm: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The dense weight of a sliced one (larger batches: then cuBLAS)."""
    from .sliced import sliced_dense

    return sliced_dense(_sliced(values, words, start, steps, perm, out_features, in_features))


@_triton_sliced_dense.register_fake
def _(values, words, start, steps, perm, out_features, in_features):
    return values.new_empty(out_features, in_features)


def _sliced_linear(x2: torch.Tensor, sw, dense: torch.Tensor | None, sums: torch.Tensor | None = None):
    """x2 (rows, in) @ W^T for a sliced weight: its kernels up to SLICED_MAX_BATCH rows (16-bit
    inputs; one row with ``sums``: added into them), else ``dense`` or the decoded weight with
    cuBLAS."""
    from .sliced import _workspace

    rows = x2.shape[0]
    args = (sw.values, sw.words, sw.start, sw.steps, sw.perm)
    half = x2.dtype in (torch.float16, torch.bfloat16)
    if rows == 1 and half and sums is not None:
        torch.ops.sparsecraft.triton_sliced_accumulate(x2, *args, sums, *sw.shape)
        return sums.to(x2.dtype)
    if (rows == 1 or dense is None) and rows <= SLICED_MAX_BATCH and half:
        # the workspace of this batch size is made outside any graph capture by a first, eager call
        return torch.ops.sparsecraft.triton_sliced_linear(x2, *args, _workspace(sw, rows), *sw.shape)
    w = dense if dense is not None else torch.ops.sparsecraft.triton_sliced_dense(*args, *sw.shape)
    return x2 @ w.to(x2.dtype).t()


def sparse_linear(x: torch.Tensor, tw, bias: torch.Tensor | None = None,
                  dense: torch.Tensor | None = None, sums: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for x (..., in) on CUDA with W compressed: a TritonWeight, or for
    bitmask weights with 16-bit values a SlicedWeight (a TritonWeight of such a weight runs
    through its sliced view, built on first use).

    Custom ops (opaque to torch.compile, capturable in a CUDA graph). Batch 1 always runs our
    kernels; larger batches use ``dense`` (a cached dense copy of W) with cuBLAS when given, so
    they are never slower than dense; without it see :func:`use_kernel` (up to 16 rows for
    sliced weights). ``sums``: a sliced layer's zeroed (1, out) float32 buffer (:func:`attach_sums`)
    that batch 1 adds into.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if isinstance(tw, TritonWeight) and mma_runs(tw, 1, tw.dtype):
        tw = tw.mma_view()  # packed once and kept on tw
    if isinstance(tw, MmaWeight):
        y = _mma_linear(x2, tw, dense)
    elif not isinstance(tw, TritonWeight) or sliced_supported(tw):
        sw = tw if not isinstance(tw, TritonWeight) else tw.sliced_view(**SLICED_LAYOUT)
        y = _sliced_linear(x2, sw, dense, sums)
    else:
        y = torch.ops.sparsecraft.triton_sparse_linear(
            x2, tw.values, tw.meta, tw.row_offsets, tw.tile_offsets, tw.scales, tw.zeros, dense,
            tw.fmt == "bitmask", tw.shape[0], tw.shape[1], tw.n, tw.m, tw.bits, tw.group_size, tw.symmetric,
        )
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, tw.shape[0])


# ---------------------------------------------------------------------------------- SparseLinear
def supports(weight) -> bool:
    """Whether the Triton kernels take this compressed tensor (bitmask, or N:M with N, M powers of 2)."""
    fmt = getattr(weight, "FORMAT", None)
    if fmt == "bitmask":
        q = weight.quant
        return q is None or q.group_size in (16, 32, 64, 128, 256, 512)
    if fmt == "nm":
        n, m, q = weight.n, weight.m, weight.quant
        pow2 = n & (n - 1) == 0 and m & (m - 1) == 0
        return pow2 and (q is None or (q.group_size in (16, 32, 64, 128, 256, 512) and q.group_size % m == 0))
    return False


def prepare_weight(obj, device):
    """The device layout of a format object, the only copy on the device (every batch size reads
    it): a SlicedWeight for bitmask weights with 16-bit values, an MmaWeight for the 2:4 weights
    that the sparse tensor-core kernel takes with inputs of their dtype, else a TritonWeight."""
    tw = prepare(obj, device)
    if mma_runs(tw, 1, tw.dtype):
        return tw.mma_view()
    if not sliced_supported(tw):
        return tw
    from .sliced import _workspace

    sw = tw.sliced_view(**SLICED_LAYOUT)  # tw and its row-major tensors are dropped on return
    _workspace(sw, 1)
    return sw


def prepare_module(module, device, keep_dense: bool = False) -> bool:
    """Put a ``SparseLinear``'s weight on ``device`` in the Triton layout (once, at load time).

    ``keep_dense`` also keeps a dense copy for batches above 1 (cuBLAS: never slower than dense,
    at the cost of the dense weight's memory). Returns False for formats the kernels do not take.
    """
    if not supports(module.weight_compressed):
        return False
    module._cuda_weight = prepare_weight(module.weight_compressed, device)
    module._cuda_dense = (decompress(module._cuda_weight).contiguous() if keep_dense else None)
    module._cuda_bias = module.bias.detach().to(device) if module.bias is not None else None
    return True


def prepare_model(model: torch.nn.Module, device, keep_dense: bool = False) -> int:
    """:func:`prepare_module` on every SparseLinear of ``model``; returns how many use the kernels.

    Call before capturing CUDA graphs or compiling, so the one-time preparation stays outside.
    Members of a fused group (runtime.fuse) get no layout of their own: their group's stacked
    layer is prepared instead (once per group). Sliced layers then share one sums buffer
    (:func:`attach_sums`).
    """
    n, groups, called = 0, set(), []
    for mod in model.modules():
        if hasattr(mod, "weight_compressed") and hasattr(mod, "_cuda_weight"):
            group = getattr(mod, "_group", None)
            if group is not None and group.module is not None:
                if id(group) not in groups:
                    groups.add(id(group))
                    if prepare_module(group.module, device, keep_dense):
                        called.append(group.module)
                n += supports(mod.weight_compressed)
                continue
            if prepare_module(mod, device, keep_dense):
                n += 1
                called.append(mod)
    attach_sums(model, called)
    return n


def attach_sums(model: torch.nn.Module, layers: list) -> int:
    """Batch 1 of a sliced layer in one kernel: each sliced layer of ``layers`` gets its own columns
    of one (1, total) float32 buffer (``_cuda_sums``: the buffer and the first column) that a forward
    pre-hook on ``model`` zeroes once per forward; the walk adds its partial sums there and the
    layer returns them in the input's dtype (under torch.compile that conversion fuses into the next
    kernel), so no move-out kernel runs per product. This holds because a layer of a decoder stack
    runs once per forward of its model; layers registered in ``model`` more than once (shared) keep
    the per-call workspace. One buffer, sliced at call time, lets torch.compile see every layer's
    columns as views of one input, which it mutates in place (no copies). Returns how many layers
    take part."""
    from .sliced import SlicedWeight

    handle = getattr(model, "_sparsecraft_sums_hook", None)
    if handle is not None:
        handle.remove()
    seen: dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        seen[id(mod)] = seen.get(id(mod), 0) + 1
    users = [m for m in layers if isinstance(m._cuda_weight, SlicedWeight) and seen.get(id(m), 0) <= 1]
    for m in layers:
        m._cuda_sums = None
    if not users:
        return 0
    sizes = [m._cuda_weight.shape[0] for m in users]
    sums = torch.zeros(1, sum(sizes), device=users[0]._cuda_weight.values.device, dtype=torch.float32)
    col = 0
    for m, n in zip(users, sizes):
        m._cuda_sums = (sums, col)
        col += n

    def zero_sums(*_):  # returns None: a pre-hook's result would replace the model's inputs
        sums.zero_()

    model._sparsecraft_sums_hook = model.register_forward_pre_hook(zero_sums)
    return len(users)


def cuda_forward(module, x: torch.Tensor) -> torch.Tensor | None:
    """``SparseLinear`` forward on a CUDA tensor, or None where the caller's dense path must run
    (triton missing, format the kernels do not take, autograd needed)."""
    if (x.requires_grad and torch.is_grad_enabled()) or not supports(module.weight_compressed):
        return None
    tw = getattr(module, "_cuda_weight", None)
    if tw is None or (tw.frags if isinstance(tw, MmaWeight) else tw.values).device != x.device:
        try:
            import triton  # noqa: F401
        except ImportError:
            return None
        prepare_module(module, x.device, keep_dense=False)
        tw = module._cuda_weight
    bias = getattr(module, "_cuda_bias", None)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    sums = getattr(module, "_cuda_sums", None)
    if sums is not None:
        sums = sums[0].narrow(1, sums[1], tw.shape[0])
    return sparse_linear(x, tw, bias, getattr(module, "_cuda_dense", None), sums)
