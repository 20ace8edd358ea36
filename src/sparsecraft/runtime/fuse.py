"""One kernel call for sibling layers that a decoder block calls on the same input (q/k/v, gate/up).

Batch-1 decode pays a fixed cost per kernel call (Python, ctypes, the OpenMP fork/join) that is
large next to a small layer's work, and the k/v projections alone are too small to gain from a
second thread. ``fuse_siblings`` stacks the rows of such siblings into one compressed weight
(their own weights become row views of it: nothing is copied) and gives them a shared
:class:`FusedGroup`: the first member a forward calls computes every member's output in one
kernel call, the others take their slice. Each output row is computed exactly as before, so the
results are bit-identical to the unfused layers.

The cache is keyed on the input tensor object: a member called on any other tensor computes
afresh, so any call order stays correct. It assumes, as every transformers decoder does, that
the shared input is not modified in place between the siblings' calls.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..formats import BitmaskTensor, NMTensor, QuantizedDenseTensor

# sibling linears that transformers' decoder blocks apply to one and the same hidden state
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedGroup:
    """The stacked kernel of a group of SparseLinears and the outputs not yet taken."""

    def __init__(self, kernel, sizes: list[int]):
        self.kernel = kernel
        self.sizes = sizes
        self.out_features = sum(sizes)
        self._x = None
        self._outs: list = [None] * len(sizes)

    def output(self, index: int, x: torch.Tensor, rows: int, lead: tuple) -> torch.Tensor:
        """Member ``index``'s output for x (contiguous fp32, ``rows`` rows, leading shape ``lead``)."""
        outs = self._outs
        if x is self._x and outs[index] is not None:
            y, outs[index] = outs[index], None
            if all(o is None for o in outs):
                self._x = None  # every member served: keep no references
            return y
        y = self.kernel.call_rows(x, rows, lead + (self.out_features,))
        parts = list(y.split(self.sizes, dim=-1))
        if rows > 1:  # column slices of several rows are strided; callers may .view() them
            parts = [p.contiguous() for p in parts]
        y, parts[index] = parts[index], None
        self._x, self._outs = x, parts
        return y


def _same(values) -> bool:
    return len(set(values)) == 1


def stack_rows(cts: list):
    """The compressed tensors' rows stacked into one tensor of the same format, or None when they
    differ in format, input width, value type or quantization."""
    first = cts[0]
    qmeta = [None if c.quant is None else tuple(sorted(c.quant.meta().items())) for c in cts]
    if not (
        _same(type(c) for c in cts)
        and _same(c.shape[1] for c in cts)
        and _same(c.dtype for c in cts)
        and _same(c.values.dtype for c in cts)
        and _same(qmeta)
        and _same((c.n, c.m) if isinstance(c, NMTensor) else None for c in cts)
    ):
        return None
    shape = (sum(c.shape[0] for c in cts), first.shape[1])
    quant = first.quant
    if quant is not None:
        zeros = None if quant.zeros is None else torch.cat([c.quant.zeros for c in cts])
        quant = replace(quant, scales=torch.cat([c.quant.scales for c in cts]), zeros=zeros)
    values = torch.cat([c.values for c in cts])
    if isinstance(first, BitmaskTensor):
        starts = torch.tensor([0] + [int(c.row_offsets[-1]) for c in cts]).cumsum(0)
        offsets = torch.cat([c.row_offsets[:-1] + s for c, s in zip(cts, starts)] + [starts[-1:]])
        mask = torch.cat([c.mask for c in cts])
        return replace(first, shape=shape, mask=mask, values=values, row_offsets=offsets, quant=quant)
    if isinstance(first, NMTensor):
        indices = torch.cat([c.indices for c in cts])
        return replace(first, shape=shape, values=values, indices=indices, quant=quant)
    return replace(first, shape=shape, values=values, quant=quant)


def slice_rows(ct, r0: int, r1: int):
    """Rows r0..r1 of a compressed tensor as views of its storage (bitmask row offsets re-based)."""
    quant = ct.quant
    if quant is not None:
        zeros = None if quant.zeros is None else quant.zeros[r0:r1]
        quant = replace(quant, scales=quant.scales[r0:r1], zeros=zeros)
    shape = (r1 - r0, ct.shape[1])
    if isinstance(ct, BitmaskTensor):
        a, b = int(ct.row_offsets[r0]), int(ct.row_offsets[r1])
        per_byte = 2 if quant is not None and quant.bits == 4 else 1  # int4 offsets count nibbles
        return replace(
            ct,
            shape=shape,
            mask=ct.mask[r0:r1],
            values=ct.values[a // per_byte : b // per_byte],
            row_offsets=ct.row_offsets[r0 : r1 + 1] - a,
            quant=quant,
        )
    if isinstance(ct, NMTensor):
        return replace(ct, shape=shape, values=ct.values[r0:r1], indices=ct.indices[r0:r1], quant=quant)
    assert isinstance(ct, QuantizedDenseTensor)
    return replace(ct, shape=shape, values=ct.values[r0:r1], quant=quant)


def fuse(layers: list) -> bool:
    """Give SparseLinears that are always called on the same input one stacked kernel; False (and
    nothing changed) when their weights cannot be stacked or a layer has no CPU kernel."""
    from ..kernels.cpu import bind

    if len(layers) < 2 or not all(layer.uses_cpu_kernel for layer in layers):
        return False
    stacked = stack_rows([layer.weight_compressed for layer in layers])
    if stacked is None:
        return False
    threads = layers[0]._kernel.threads
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat(
            [layer.bias if layer.bias is not None else torch.zeros(layer.out_features) for layer in layers]
        )
    group = FusedGroup(bind(stacked, bias=bias, threads=threads), [layer.out_features for layer in layers])
    r0 = 0
    for index, layer in enumerate(layers):
        r1 = r0 + layer.out_features
        layer.weight_compressed = slice_rows(stacked, r0, r1)  # views: the old copy is freed
        layer._kernel = bind(layer.weight_compressed, bias=layer.bias, threads=threads, check=False)
        layer._group, layer._group_index = group, index
        r0 = r1
    return True


def fuse_siblings(model: nn.Module) -> int:
    """Fuse every group of :data:`SIBLINGS` held by one parent module; returns the groups fused."""
    from .linear import SparseLinear

    fused = 0
    for parent in model.modules():
        for names in SIBLINGS:
            layers = [getattr(parent, n, None) for n in names]
            if all(isinstance(layer, SparseLinear) for layer in layers):
                fused += fuse(layers)
    return fused
