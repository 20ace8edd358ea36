"""Pick the kernel and its tile shape for one product y = x @ W^T, W a :class:`TritonWeight`.

* batch 1: the multiply-add kernel (``USE_DOT=False``);
* batch 2..``DOT_MAX_BATCH``: the decode-then-``tl.dot`` kernel, batch padded to 16/32/64;
* larger batches (prefill): decode W to a dense temporary once and call cuBLAS — the product is
  compute-bound there and cuBLAS beats anything we decode on the fly (see docs/results/gpu_kernels.md;
  torch's semi-structured 2:4 only wins from about batch 8192, so it is not used).

Everything here depends on shapes only (no host syncs, no data-dependent choices), so a decode
step can be captured in a CUDA graph; :func:`sparse_linear` is registered as the custom op
``sparsecraft::triton_sparse_mm`` so torch.compile treats it as one opaque call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .layout import TILE, TritonWeight

# read once at import, like triton itself does: the interpreter cannot multiply bf16 in tl.dot
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DOT_MAX_BATCH = 16  # above this, decode + cuBLAS (chosen by measurement, docs/results/gpu_kernels.md)


@dataclass(frozen=True)
class KernelConfig:
    bn: int
    bk: int
    bb: int  # padded batch per program; 1 means the multiply-add (non-dot) kernel
    num_warps: int
    split_k: int = 1
    num_stages: int = 2


def _pow2_at_least(v: int, lo: int) -> int:
    p = lo
    while p < v:
        p *= 2
    return p


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


def default_config(tw: TritonWeight, batch: int, device: torch.device) -> KernelConfig:
    """Shape-only choice of tile shape, from the tuning runs on an H100 (docs/results/gpu_kernels.md)."""
    out_f, in_f = tw.shape
    q4 = tw.bits == 4
    if batch == 1:
        bb = 1
        if tw.fmt == "bitmask":
            bn, bk, warps = 4, 256, 1  # one warp: the prefix sum stays inside the warp
        elif q4:
            bn, bk, warps = 32, 128, 4
        else:
            bn, bk, warps = 16, 512, 8
    else:
        bb = 16 if batch <= 16 else 64
        if q4:
            bn, bk, warps = 32, 128, 4
        else:
            bn, bk, warps = (16, 256, 4) if bb == 16 else (32, 256, 4)
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
    cfg = cfg or default_config(tw, batch, x.device)
    dummy = tw.meta
    use_dot = cfg.bb > 1
    bb = cfg.bb if use_dot else 1
    if cfg.split_k > 1:
        out = torch.zeros(batch, out_f, device=x.device, dtype=torch.float32)
    else:
        out = torch.empty(batch, out_f, device=x.device, dtype=x.dtype)
    grid = (triton_cdiv(out_f, cfg.bn), cfg.split_k, triton_cdiv(batch, bb))
    sparse_mm_kernel[grid](
        x, out, *_launch_args(tw, dummy),
        batch, out_f, in_f, x.stride(0), out.stride(0),
        tw.vals_stride, _meta_stride(tw), tw.tile_offsets.shape[1] if tw.tile_offsets is not None else 1,
        tw.n_groups, cfg.split_k,
        **_constexprs(tw, cfg.bk), BN=cfg.bn, BK=cfg.bk, BB=bb, USE_DOT=use_dot, ATOMIC=cfg.split_k > 1,
        DOT_F32=_INTERPRET and x.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.to(x.dtype) if cfg.split_k > 1 else out


def decompress(tw: TritonWeight, dtype: torch.dtype | None = None, bn: int | None = None,
               bk: int = 256) -> torch.Tensor:
    """Dense (out, in) weight decoded on the device of ``tw``."""
    from .sparse_mm import decompress_kernel

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


def _sparse_linear_impl(x2: torch.Tensor, tw: TritonWeight) -> torch.Tensor:
    if x2.shape[0] <= DOT_MAX_BATCH:
        return sparse_mm(x2, tw)
    return x2 @ decompress(tw, x2.dtype).t()


@torch.library.custom_op("sparsecraft::triton_sparse_linear", mutates_args=())
def _triton_sparse_linear(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, row_offsets: torch.Tensor | None,
    tile_offsets: torch.Tensor | None, scales: torch.Tensor | None, zeros: torch.Tensor | None,
    is_bitmask: bool, out_features: int, in_features: int, n: int, m: int, bits: int, group_size: int,
    symmetric: bool,
) -> torch.Tensor:
    tw = TritonWeight("bitmask" if is_bitmask else "nm", (out_features, in_features), x.dtype, values, meta,
                      row_offsets, tile_offsets, n, m, bits, group_size, symmetric, scales, zeros)
    return _sparse_linear_impl(x, tw)


@_triton_sparse_linear.register_fake
def _(x, values, meta, row_offsets, tile_offsets, scales, zeros, is_bitmask, out_features, in_features,
      n, m, bits, group_size, symmetric):
    return x.new_empty(x.shape[0], out_features)


def sparse_linear(x: torch.Tensor, tw: TritonWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for x (..., in) on CUDA with W compressed: the SparseLinear entry point.

    One custom op (opaque to torch.compile, capturable in a CUDA graph): batch <= DOT_MAX_BATCH runs
    the Triton kernels, larger batches decode W once and use cuBLAS.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.sparsecraft.triton_sparse_linear(
        x2, tw.values, tw.meta, tw.row_offsets, tw.tile_offsets, tw.scales, tw.zeros,
        tw.fmt == "bitmask", tw.shape[0], tw.shape[1], tw.n, tw.m, tw.bits, tw.group_size, tw.symmetric,
    )
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, tw.shape[0])
