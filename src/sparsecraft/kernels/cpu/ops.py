"""Python face of the CPU kernels: validate compressed tensors once, then call with few µs overhead.

``bind_bitmask`` / ``bind_nm`` check a compressed weight against the layout contract (shapes,
dtypes, offsets, mask popcounts, index ranges) and return a ``BoundKernel`` that keeps the tensors
alive with their pointers and constant arguments pre-packed; calling it on an activation
``(B, in)`` fp32 tensor runs one ctypes call. ``bind_qdense`` / ``bind_dense`` do the same for
dense weights (quantized codes, or float values such as an unpruned lm_head). ``bitmask_matmul`` /
``nm_matmul`` are the one-shot conveniences (bind + call) used by tests and benchmarks.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from ...errors import SparsecraftError
from .build import Desc, load_library

VT_F32, VT_BF16, VT_F16, VT_I8, VT_U8, VT_I4, VT_U4 = range(7)
_FLOAT_VT = {torch.float32: VT_F32, torch.bfloat16: VT_BF16, torch.float16: VT_F16}
VT_NAMES = {
    VT_F32: "fp32",
    VT_BF16: "bf16",
    VT_F16: "fp16",
    VT_I8: "int8",
    VT_U8: "uint8",
    VT_I4: "int4",
    VT_U4: "uint4",
}


def value_type(values: torch.Tensor, bits: int | None, symmetric: bool = True, name: str = "values") -> int:
    """Kernel value-type code for a values tensor (float values, or int8/int4 codes)."""
    if bits is None:
        if values.dtype not in _FLOAT_VT:
            raise SparsecraftError(
                f"{name}: dtype {values.dtype} is not a float type; quantized codes need "
                "bits=8 or bits=4 (with scales)"
            )
        return _FLOAT_VT[values.dtype]
    if bits == 8:
        want = torch.int8 if symmetric else torch.uint8
        if values.dtype != want:
            raise SparsecraftError(
                f"{name}: int8 {'symmetric' if symmetric else 'asymmetric'} codes must be "
                f"{want}, got {values.dtype}"
            )
        return VT_I8 if symmetric else VT_U8
    if bits == 4:
        if values.dtype != torch.uint8:
            raise SparsecraftError(f"{name}: int4 codes must be uint8 nibble pairs, got {values.dtype}")
        return VT_I4 if symmetric else VT_U4
    raise SparsecraftError(
        f"{name}: bits={bits} not supported by the CPU kernels; use 8 or 4 (or None for floats)"
    )


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise SparsecraftError(msg)


def _check_cpu_contig(name: str, t: torch.Tensor) -> None:
    _need(t.device.type == "cpu", f"{name}: on {t.device}, the CPU kernels need CPU tensors")
    _need(t.is_contiguous(), f"{name}: not contiguous; call .contiguous() first")


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _check_quant(name: str, out: int, in_features: int, vt: int, scales, zeros, group_size: int) -> None:
    if vt < VT_I8:
        return
    _need(scales is not None, f"{name}: quantized codes need scales of shape (out, ceil(in/group_size))")
    _need(group_size > 0, f"{name}: group_size must be positive, got {group_size}")
    ng = -(-in_features // group_size)
    _need(
        tuple(scales.shape) == (out, ng),
        f"{name}: scales shape {tuple(scales.shape)} != {(out, ng)} "
        f"for in={in_features}, group_size={group_size}",
    )
    _need(scales.dtype == torch.float16, f"{name}: scales must be float16, got {scales.dtype}")
    _check_cpu_contig(f"{name}.scales", scales)
    asym = vt in (VT_U8, VT_U4)
    if asym:
        _need(zeros is not None, f"{name}: asymmetric codes need zeros of shape {(out, ng)}")
    if zeros is not None:
        _need(asym, f"{name}: zeros given for symmetric codes")
        _need(
            tuple(zeros.shape) == (out, ng) and zeros.dtype == torch.uint8,
            f"{name}: zeros must be uint8 {(out, ng)}, got {zeros.dtype} {tuple(zeros.shape)}",
        )
        _check_cpu_contig(f"{name}.zeros", zeros)


def check_bitmask(
    mask,
    values,
    row_offsets,
    shape,
    vt,
    scales=None,
    zeros=None,
    group_size=128,
    name: str = "bitmask tensor",
) -> None:
    """Raise SparsecraftError unless the tensors follow the bitmask layout contract for ``shape``."""
    out, in_features = (int(s) for s in shape)
    mb = -(-in_features // 8)
    _need(
        mask.dtype == torch.uint8 and tuple(mask.shape) == (out, mb),
        f"{name}: mask must be uint8 {(out, mb)} for a {(out, in_features)} weight, got "
        f"{mask.dtype} {tuple(mask.shape)}",
    )
    _need(
        row_offsets.dtype == torch.int64 and tuple(row_offsets.shape) == (out + 1,),
        f"{name}: row_offsets must be int64 ({out + 1},), got {row_offsets.dtype} {tuple(row_offsets.shape)}",
    )
    _need(values.dim() == 1, f"{name}: values must be 1-D, got shape {tuple(values.shape)}")
    for n, t in (("mask", mask), ("values", values), ("row_offsets", row_offsets)):
        _check_cpu_contig(f"{name}.{n}", t)
    counts = _POPCOUNT[mask.long()].sum(dim=1) if out else torch.zeros(0, dtype=torch.int64)
    if in_features % 8:
        pad = mask[:, -1] >> (in_features % 8)
        _need(not bool(pad.any()), f"{name}: mask has bits set beyond column {in_features} (row padding)")
    diffs = row_offsets[1:] - row_offsets[:-1]
    _need(int(row_offsets[0]) == 0, f"{name}: row_offsets[0] must be 0, got {int(row_offsets[0])}")
    if vt in (VT_I4, VT_U4):
        want = counts + counts % 2  # each row's codes padded to an even count
        _need(bool((row_offsets % 2 == 0).all()), f"{name}: int4 row_offsets must be even (rows padded)")
        slots = values.numel() * 2
    else:
        want = counts
        slots = values.numel()
    bad = (diffs != want).nonzero()
    _need(
        bad.numel() == 0,
        f"{name}: row {int(bad[0]) if bad.numel() else 0} has {int(diffs[bad[0]]) if bad.numel() else 0} "
        f"values but its mask keeps {int(want[bad[0]]) if bad.numel() else 0}: mask and values do not match",
    )
    _need(
        int(row_offsets[-1]) == slots,
        f"{name}: row_offsets[-1]={int(row_offsets[-1])} but values hold {slots} slots",
    )
    _check_quant(name, out, in_features, vt, scales, zeros, group_size)


def check_nm(
    values, indices, shape, n, m, vt, scales=None, zeros=None, group_size=128, name: str = "N:M tensor"
) -> None:
    """Raise SparsecraftError unless the tensors follow the packed N:M layout contract."""
    out, in_features = (int(s) for s in shape)
    _need(1 <= n <= m <= 16, f"{name}: need 1 <= N <= M <= 16, got {n}:{m}")
    _need(in_features % m == 0, f"{name}: in_features={in_features} is not a multiple of M={m}")
    L = in_features // m * n
    cols = (L + 1) // 2 if vt in (VT_I4, VT_U4) else L
    _need(
        tuple(values.shape) == (out, cols),
        f"{name}: values shape {tuple(values.shape)} != {(out, cols)} for {n}:{m} of {(out, in_features)}",
    )
    bits = 2 if m <= 4 else 4
    ib = -(-L * bits // 8)
    _need(
        indices.dtype == torch.uint8 and tuple(indices.shape) == (out, ib),
        f"{name}: indices must be uint8 {(out, ib)} ({bits}-bit packed), "
        f"got {indices.dtype} {tuple(indices.shape)}",
    )
    for nm_, t in (("values", values), ("indices", indices)):
        _check_cpu_contig(f"{name}.{nm_}", t)
    if out and L:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int64) * bits
        pos = ((indices.long().unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(out, -1)[:, :L]
        _need(bool((pos < m).all()), f"{name}: an index is >= M={m}")
        grp = pos.reshape(out, L // n, n)
        if n > 1:
            srt = grp.sort(dim=-1).values
            _need(
                bool((srt[..., 1:] != srt[..., :-1]).all()),
                f"{name}: a group repeats a position; each of the N kept values needs its own column",
            )
    _check_quant(name, out, in_features, vt, scales, zeros, group_size)


@dataclass(eq=False)
class BoundKernel:
    """A validated compressed weight ready to multiply: ``y = kernel(x)`` for x (B, in) fp32.

    The weight's constant arguments sit in a C descriptor built once, so a call is one ctypes
    call with six arguments (a few µs: the model calls 210 of these per token)."""

    fn: object  # ctypes sc_matmul (any strides)
    rows_fn: object  # ctypes sc_matmul_rows (contiguous rows)
    desc: Desc
    keep: tuple  # tensors whose memory the descriptor points into
    out_features: int
    in_features: int
    bias: torch.Tensor | None

    def __post_init__(self) -> None:
        self._ref = ctypes.byref(self.desc)
        self._rows_fn = self.rows_fn

    @property
    def threads(self) -> int:
        return int(self.desc.nthreads)

    @property
    def portable(self) -> bool:
        return bool(self.desc.force_scalar)

    def call_rows(self, x: torch.Tensor, rows: int, shape: tuple | None = None) -> torch.Tensor:
        """Hot path for a contiguous fp32 x holding ``rows`` rows of ``in_features``: no stride
        queries, no checks; the result has ``shape`` (default ``(rows, out_features)``)."""
        out = torch.empty(shape or (rows, self.out_features), dtype=torch.float32)
        if self._rows_fn(self._ref, x.data_ptr(), rows, out.data_ptr()):
            raise SparsecraftError("CPU kernel rejected its arguments")
        return out

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, in) float32 CPU, contiguous rows. Returns (B, out) float32."""
        B = x.shape[0]
        if out is None:
            out = torch.empty((B, self.out_features), dtype=torch.float32)
        rc = self.fn(self._ref, x.data_ptr(), B, x.stride(0), out.data_ptr(), out.stride(0))
        if rc != 0:
            raise SparsecraftError(f"CPU kernel rejected its arguments (code {rc})")
        return out


def _prep_bias(bias, out):
    if bias is None:
        return None
    _need(tuple(bias.shape) == (out,), f"bias shape {tuple(bias.shape)} != ({out},)")
    return bias.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _ptr(t):
    return t.data_ptr() if t is not None else None


def _bound(
    kind, vt, shape, meta, values, row_offsets, n, m, scales, zeros, group_size, bias, threads, variant
):
    out, in_features = (int(s) for s in shape)
    lib = load_library(variant)
    b = _prep_bias(bias, out)
    desc = Desc(
        kind=kind,
        vt=vt,
        out=out,
        in_=in_features,
        meta=_ptr(meta),
        values=_ptr(values),
        row_offsets=_ptr(row_offsets),
        n=n,
        m=m,
        scales=_ptr(scales),
        zeros=_ptr(zeros),
        group_size=int(group_size) if vt >= VT_I8 else 0,
        bias=_ptr(b),
        nthreads=int(threads),
        force_scalar=int(variant == "portable"),
    )
    return BoundKernel(
        lib.sc_matmul,
        lib.sc_matmul_rows,
        desc,
        (meta, values, row_offsets, scales, zeros, b),
        out,
        in_features,
        b,
    )


def bind_bitmask(
    mask,
    values,
    row_offsets,
    shape,
    *,
    bits=None,
    symmetric=True,
    scales=None,
    zeros=None,
    group_size=128,
    bias=None,
    threads=0,
    variant="native",
    check=True,
) -> BoundKernel:
    vt = value_type(values, bits, symmetric)
    if check:
        check_bitmask(mask, values, row_offsets, shape, vt, scales, zeros, group_size)
    return _bound(
        0, vt, shape, mask, values, row_offsets, 0, 0, scales, zeros, group_size, bias, threads, variant
    )


def bind_nm(
    values,
    indices,
    shape,
    n,
    m,
    *,
    bits=None,
    symmetric=True,
    scales=None,
    zeros=None,
    group_size=128,
    bias=None,
    threads=0,
    variant="native",
    check=True,
) -> BoundKernel:
    vt = value_type(values, bits, symmetric)
    if check:
        check_nm(values, indices, shape, n, m, vt, scales, zeros, group_size)
    return _bound(
        1, vt, shape, indices, values, None, int(n), int(m), scales, zeros, group_size, bias, threads, variant
    )


def check_qdense(
    values, shape, vt, scales=None, zeros=None, group_size=128, name: str = "dense tensor"
) -> None:
    """Raise SparsecraftError unless the tensors follow the dense layout contract: (out, in) float
    values, or (out, in) int8 / (out, ceil(in/2)) int4 codes with scales."""
    out, in_features = (int(s) for s in shape)
    cols = (in_features + 1) // 2 if vt in (VT_I4, VT_U4) else in_features
    _need(tuple(values.shape) == (out, cols), f"{name}: values shape {tuple(values.shape)} != {(out, cols)}")
    _check_cpu_contig(f"{name}.values", values)
    if vt < VT_I8:
        _need(scales is None and zeros is None, f"{name}: float values take no scales or zeros")
    _check_quant(name, out, in_features, vt, scales, zeros, group_size)


def bind_qdense(
    values,
    shape,
    *,
    bits=None,
    symmetric=True,
    scales=None,
    zeros=None,
    group_size=128,
    bias=None,
    threads=0,
    variant="native",
    check=True,
) -> BoundKernel:
    """A dense weight: quantized codes (bits=8/4 with scales) or, with bits=None, float values
    (fp32/bf16/fp16, e.g. an unpruned lm_head read at the memory's bandwidth)."""
    vt = value_type(values, bits, symmetric)
    if check:
        check_qdense(values, shape, vt, scales, zeros, group_size)
    return _bound(2, vt, shape, None, values, None, 0, 0, scales, zeros, group_size, bias, threads, variant)


def bind_dense(weight: torch.Tensor, *, bias=None, threads=0, variant="native") -> BoundKernel:
    """Our dense float kernel on a (out, in) fp32/bf16/fp16 weight (kept alive, not copied)."""
    _need(weight.dim() == 2, f"dense weight must be 2-D, got shape {tuple(weight.shape)}")
    return bind_qdense(weight, tuple(weight.shape), bias=bias, threads=threads, variant=variant)


def bind(ct, *, bias=None, threads: int = 0, variant: str = "native", check: bool = True) -> BoundKernel:
    """Bind a compressed tensor from :mod:`sparsecraft.formats` (BitmaskTensor, NMTensor or
    QuantizedDenseTensor) to the matching kernel."""
    from ...formats import BitmaskTensor, NMTensor, QuantizedDenseTensor

    q = getattr(ct, "quant", None)
    qkw = (
        {}
        if q is None
        else {
            "bits": q.bits,
            "symmetric": q.symmetric,
            "scales": q.scales,
            "zeros": q.zeros,
            "group_size": q.group_size,
        }
    )
    common = {"bias": bias, "threads": threads, "variant": variant, "check": check}
    if isinstance(ct, BitmaskTensor):
        return bind_bitmask(ct.mask, ct.values, ct.row_offsets, ct.shape, **qkw, **common)
    if isinstance(ct, NMTensor):
        return bind_nm(ct.values, ct.indices, ct.shape, ct.n, ct.m, **qkw, **common)
    if isinstance(ct, QuantizedDenseTensor):
        return bind_qdense(ct.values, ct.shape, **qkw, **common)
    raise SparsecraftError(
        f"no CPU kernel for {type(ct).__name__}; expected BitmaskTensor, NMTensor or "
        "QuantizedDenseTensor from sparsecraft.formats"
    )


def _as_rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    _need(x.shape[-1] == in_features, f"input has {x.shape[-1]} features, the weight expects {in_features}")
    _need(x.device.type == "cpu", f"input on {x.device}; the CPU kernels need a CPU tensor")
    return x.reshape(-1, in_features).to(torch.float32).contiguous()


def bitmask_matmul(x, mask, values, row_offsets, shape, **kw) -> torch.Tensor:
    """y = x @ W.T for a bitmask-compressed W of ``shape`` (out, in); x (..., in) -> (..., out) fp32."""
    k = bind_bitmask(mask, values, row_offsets, shape, **kw)
    return k(_as_rows(x, k.in_features)).reshape(*x.shape[:-1], k.out_features)


def nm_matmul(x, values, indices, shape, n, m, **kw) -> torch.Tensor:
    """y = x @ W.T for a packed N:M W of ``shape`` (out, in); x (..., in) -> (..., out) fp32."""
    k = bind_nm(values, indices, shape, n, m, **kw)
    return k(_as_rows(x, k.in_features)).reshape(*x.shape[:-1], k.out_features)


def stream_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5, threads: int = 0) -> dict:
    """STREAM-like copy and read bandwidth (GB/s, best of ``repeats``) on a buffer much larger than L3."""
    import time

    lib = load_library("native")
    n = nbytes // 4
    a = torch.ones(n, dtype=torch.float32)
    b = torch.empty_like(a)
    copy, read = [], []
    lib.sc_stream_copy(a.data_ptr(), b.data_ptr(), n, threads)  # first touch
    for _ in range(repeats):
        t = time.perf_counter()
        lib.sc_stream_copy(a.data_ptr(), b.data_ptr(), n, threads)
        copy.append(time.perf_counter() - t)
        t = time.perf_counter()
        lib.sc_stream_read(a.data_ptr(), n, threads)
        read.append(time.perf_counter() - t)
    return {"copy_gbs": 2 * n * 4 / min(copy) / 1e9, "read_gbs": n * 4 / min(read) / 1e9, "bytes": n * 4}
