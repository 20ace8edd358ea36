"""GPU-ready view of one compressed weight, built once at load time.

The stored formats (``sparsecraft.formats``) are used as they are, with one addition for bitmask
weights: ``tile_offsets`` int32 (out, ceil(in/TILE)), the number of kept values of the row before
each TILE-column tile. A K split of the GEMV kernel starts at any tile without scanning the row.
It costs 4 bytes per TILE columns of each row (TILE=256: 1/128 byte per weight, 0.8% of the fp16
dense bytes) and is counted in :meth:`TritonWeight.nbytes`. Row offsets are kept as int32.

:func:`prepare` takes a format object (duck-typed on the contract's field names) or, through
:func:`from_bitmask` / :func:`from_nm`, the raw tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ...errors import SparsecraftError

TILE = 256  # columns per tile_offsets entry; kernel tile widths are multiples of this for bitmask


@dataclass
class TritonWeight:
    """A compressed (out, in) weight as the Triton kernels read it."""

    fmt: str  # "bitmask" | "nm"
    shape: tuple[int, int]
    dtype: torch.dtype  # dense dtype (of the values, or of the dequantized weight)
    values: torch.Tensor  # float values, or int8/uint8 codes, or uint8 int4 nibble pairs
    meta: torch.Tensor  # bitmask: uint8 (out, ceil(in/8)); N:M: uint8 packed indices (out, bytes)
    row_offsets: torch.Tensor | None = None  # bitmask: int32 (out+1)
    tile_offsets: torch.Tensor | None = None  # bitmask: int32 (out, ceil(in/TILE))
    n: int = 0
    m: int = 0
    bits: int = 0  # 0: float values; 4 or 8: integer codes
    group_size: int = 128
    symmetric: bool = True
    scales: torch.Tensor | None = None  # (out, ceil(in/G)) float16
    zeros: torch.Tensor | None = None  # (out, ceil(in/G)) uint8
    # sliced layouts of this weight (sliced.py), by (seg, rows, per_step); a plain field, so that
    # torch.compile reads the cache without a graph break; not copied by to() or clone()
    sliced: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    mma: object = field(default=None, init=False, repr=False, compare=False)  # mma24.MmaWeight

    @property
    def vals_stride(self) -> int:
        """Elements (bytes for int4) per row of an N:M values tensor; 0 for bitmask."""
        return self.values.shape[1] if self.fmt == "nm" else 0

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1] if self.scales is not None else 1

    def tensors(self) -> dict[str, torch.Tensor]:
        d = {"values": self.values, "meta": self.meta}
        for k in ("row_offsets", "tile_offsets", "scales", "zeros"):
            t = getattr(self, k)
            if t is not None:
                d[k] = t
        return d

    def nbytes(self) -> int:
        """Bytes a full pass of the kernel streams from memory (every tensor above once)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def sliced_view(self, seg: int, rows: int, per_step: int = 4):
        """This bitmask weight in the sliced slot-major layout of ``sliced.py`` (built once per
        setting and kept on this object)."""
        from .sliced import build

        if self.fmt != "bitmask" or self.bits:
            raise SparsecraftError("the sliced layout takes bitmask weights with float values")
        key = (seg, rows, per_step)
        if key not in self.sliced:
            self.sliced[key] = build(self.meta, self.values, self.shape, seg, rows, per_step)
        return self.sliced[key]

    def mma_view(self):
        """This 2:4 weight in the mma.sp fragment layout of ``mma24.py`` (built once, kept here)."""
        if self.mma is None:
            from .mma24 import pack

            self.mma = pack(self)
        return self.mma

    def init_fields(self) -> dict:
        """The constructor's arguments that rebuild this weight (the layout caches are left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def to(self, device: torch.device | str) -> TritonWeight:
        kw = self.init_fields()
        for k, t in self.tensors().items():
            kw[k] = t.to(device)
        return TritonWeight(**kw)


def _check_quant(bits: int, group_size: int, scales, zeros, symmetric: bool, shape) -> None:
    if bits == 0:
        return
    if bits not in (4, 8):
        raise SparsecraftError(f"quantized weight has {bits}-bit codes; the Triton kernels take 4 or 8")
    if group_size not in (16, 32, 64, 128, 256, 512):
        raise SparsecraftError(f"group_size={group_size}: the Triton kernels take a power of two 16..512")
    if scales is None or tuple(scales.shape) != (shape[0], -(-shape[1] // group_size)):
        raise SparsecraftError(f"scales must have shape (out, ceil(in/{group_size})) for weight {shape}")
    if not symmetric and zeros is None:
        raise SparsecraftError("asymmetric quantization needs zero points")


def tile_offsets_from_mask(mask: torch.Tensor, cols: int, tile: int = TILE) -> torch.Tensor:
    """int32 (out, ceil(cols/tile)): kept values of each row before each tile (exclusive prefix)."""
    rows = mask.shape[0]
    n_tiles = -(-cols // tile)
    pad_bytes = n_tiles * tile // 8 - mask.shape[1]
    m = torch.nn.functional.pad(mask, (0, pad_bytes)) if pad_bytes > 0 else mask[:, : n_tiles * tile // 8]
    # popcount of each byte, then per-tile sums, then an exclusive running sum along the row
    bits = (m.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=mask.device, dtype=torch.int32)) & 1
    per_tile = bits.reshape(rows, n_tiles, tile).sum(-1, dtype=torch.int32)
    return (torch.cumsum(per_tile, dim=1, dtype=torch.int32) - per_tile).contiguous()


def from_bitmask(mask, values, row_offsets, shape, dtype=None, *, bits=0, group_size=128,
                 symmetric=True, scales=None, zeros=None) -> TritonWeight:
    out_f, in_f = shape
    if tuple(mask.shape) != (out_f, -(-in_f // 8)) or mask.dtype != torch.uint8:
        raise SparsecraftError(f"bitmask mask must be uint8 (out, ceil(in/8)) for weight {tuple(shape)}")
    if row_offsets.numel() != out_f + 1:
        raise SparsecraftError(f"row_offsets must have out+1={out_f + 1} entries")
    if int(row_offsets[-1]) >= 2**31:
        raise SparsecraftError("a bitmask weight with 2**31 or more values is beyond the Triton kernels")
    _check_quant(bits, group_size, scales, zeros, symmetric, shape)
    return TritonWeight(
        fmt="bitmask", shape=(out_f, in_f), dtype=dtype or (values.dtype if bits == 0 else torch.float16),
        values=values.contiguous(), meta=mask.contiguous(),
        row_offsets=row_offsets.to(torch.int32).contiguous(),
        tile_offsets=tile_offsets_from_mask(mask, in_f), bits=bits, group_size=group_size,
        symmetric=symmetric, scales=scales, zeros=zeros if not symmetric else None,
    )


def from_nm(values, indices, n, m, shape, dtype=None, *, bits=0, group_size=128, symmetric=True,
            scales=None, zeros=None) -> TritonWeight:
    out_f, in_f = shape
    for v in (n, m):
        if v & (v - 1) or v <= 0:
            raise SparsecraftError(f"{n}:{m} sparsity: the Triton kernels need N and M powers of two")
    if m > 16 or n >= m or in_f % m:
        raise SparsecraftError(f"{n}:{m} sparsity on in={in_f}: need N < M <= 16 and in % M == 0")
    if bits and group_size % m:
        raise SparsecraftError(f"group_size={group_size} must be a multiple of M={m}")
    _check_quant(bits, group_size, scales, zeros, symmetric, shape)
    return TritonWeight(
        fmt="nm", shape=(out_f, in_f), dtype=dtype or (values.dtype if bits == 0 else torch.float16),
        values=values.contiguous(), meta=indices.contiguous(), n=n, m=m, bits=bits,
        group_size=group_size, symmetric=symmetric, scales=scales, zeros=zeros if not symmetric else None,
    )


def _quant_kwargs(obj) -> dict:
    q = getattr(obj, "quant", None)
    if q is None:
        return {}
    return dict(bits=q.bits, group_size=q.group_size, symmetric=q.symmetric, scales=q.scales,
                zeros=getattr(q, "zeros", None))


def prepare(obj, device: torch.device | str | None = None) -> TritonWeight:
    """TritonWeight of a format object (BitmaskTensor / NMTensor of ``sparsecraft.formats``)."""
    if isinstance(obj, TritonWeight):
        return obj.to(device) if device is not None else obj
    if device is not None and hasattr(obj, "to_tensors"):
        obj = obj.to(device)  # the layout's own tensors are derived on the device
    if hasattr(obj, "mask") and hasattr(obj, "row_offsets"):
        tw = from_bitmask(obj.mask, obj.values, obj.row_offsets, tuple(obj.shape), obj.dtype,
                          **_quant_kwargs(obj))
    elif hasattr(obj, "indices"):
        tw = from_nm(obj.values, obj.indices, obj.n, obj.m, tuple(obj.shape), obj.dtype, **_quant_kwargs(obj))
    else:
        raise SparsecraftError(
            f"cannot run {type(obj).__name__} on the GPU: expected a bitmask or N:M tensor")
    return tw
