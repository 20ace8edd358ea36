"""One kernel call for sibling layers that a decoder block calls on the same input (q/k/v, gate/up).

Batch-1 decode pays a fixed cost per kernel call that is large next to a small layer's work: on
the CPU Python, ctypes and the OpenMP fork/join (and the k/v projections alone are too small to
gain from a second thread); on a GPU each kernel's ramp-up and tail, a few microseconds in which
the memory system is not yet or no longer busy. ``fuse_siblings`` stacks the rows of such
siblings into one compressed weight (their own weights become row views of it: nothing is copied)
and gives them a shared :class:`FusedGroup`: the first member a forward calls computes every
member's output in one kernel call, the others take their slice. Each output row is computed
exactly as before, so the results are bit-identical to the unfused layers.

Layers with a CPU kernel share one bound kernel; layers without one (they live on an accelerator)
share a stacked :class:`~.linear.SparseLinear` whose device layout is the only one prepared
(``kernels.triton.dispatch.prepare_model``). ``fuse_siblings(model, dense=True)`` does the same
for plain ``nn.Linear`` siblings (a dense baseline timed with the same number of products per block).

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
    """The stacked product of a group of layers and the outputs not yet taken: ``kernel`` (a bound
    CPU kernel, :meth:`output` with rows and leading shape) or ``module`` (a stacked SparseLinear or
    nn.Linear called on x, :meth:`output` without them)."""

    def __init__(self, sizes: list[int], kernel=None, module: nn.Module | None = None):
        self.kernel = kernel
        self.module = module
        self.sizes = sizes
        self.out_features = sum(sizes)
        self._x = None
        self._outs: list = [None] * len(sizes)

    def output(self, index: int, x: torch.Tensor, rows: int = 0, lead: tuple = ()) -> torch.Tensor:
        """Member ``index``'s output for x (CPU kernel: contiguous fp32, ``rows`` rows, leading
        shape ``lead``)."""
        outs = self._outs
        if x is self._x and outs[index] is not None:
            y, outs[index] = outs[index], None
            if all(o is None for o in outs):
                self._x = None  # every member served: keep no references
            return y
        if self.kernel is not None:
            y = self.kernel.call_rows(x, rows, lead + (self.out_features,))
        else:
            rows = x.numel() // x.shape[-1]
            y = self.module(x)
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


def _stacked_bias(biases: list, sizes: list[int]) -> torch.Tensor | None:
    """The members' biases end to end (zeros for a member without one), or None if none has one."""
    ref = next((b for b in biases if b is not None), None)
    if ref is None:
        return None
    return torch.cat([b.detach() if b is not None else ref.new_zeros(n) for b, n in zip(biases, sizes)])


def fuse(layers: list) -> bool:
    """Give SparseLinears that are always called on the same input one stacked product; False
    (and nothing changed) when their weights cannot be stacked or only some have a CPU kernel."""
    from ..kernels.cpu import bind
    from .linear import SparseLinear

    cpu = [layer.uses_cpu_kernel for layer in layers]
    if len(layers) < 2 or not _same(cpu):
        return False
    stacked = stack_rows([layer.weight_compressed for layer in layers])
    if stacked is None:
        return False
    sizes = [layer.out_features for layer in layers]
    bias = _stacked_bias([layer.bias for layer in layers], sizes)
    if cpu[0]:
        threads = layers[0]._kernel.threads
        group = FusedGroup(sizes, kernel=bind(stacked, bias=bias, threads=threads))
    else:  # the accelerator path: the stacked layer is the one whose device layout is prepared
        group = FusedGroup(sizes, module=SparseLinear(stacked, bias, layers[0].layer_type, kernels="torch"))
    r0 = 0
    for index, layer in enumerate(layers):
        r1 = r0 + layer.out_features
        layer.weight_compressed = slice_rows(stacked, r0, r1)  # views: the old copy is freed
        if cpu[0]:
            layer._kernel = bind(layer.weight_compressed, bias=layer.bias, threads=threads, check=False)
        layer._group, layer._group_index = group, index
        r0 = r1
    return True


class FusedDenseLinear(nn.Linear):
    """A dense ``nn.Linear`` sibling whose product comes from its :class:`FusedGroup` (the stacked
    weight; its own weight is a row view of it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.output(self._group_index, x)


def fuse_dense(parent: nn.Module, names: tuple[str, ...]) -> bool:
    """Stack the rows of ``parent``'s nn.Linear siblings ``names`` into one nn.Linear and replace
    each by a :class:`FusedDenseLinear` on a row view of it; False when they differ in input width,
    dtype or device."""
    layers = [getattr(parent, n) for n in names]
    ws = [layer.weight for layer in layers]
    if not (_same(w.shape[1] for w in ws) and _same(w.dtype for w in ws) and _same(w.device for w in ws)):
        return False
    stacked = nn.Linear(ws[0].shape[1], sum(w.shape[0] for w in ws), bias=False, device="meta")
    stacked.weight = nn.Parameter(torch.cat([w.detach() for w in ws]), requires_grad=False)
    sizes = [w.shape[0] for w in ws]
    bias = _stacked_bias([layer.bias for layer in layers], sizes)
    if bias is not None:
        stacked.bias = nn.Parameter(bias, requires_grad=False)
    group = FusedGroup(sizes, module=stacked)
    r0 = 0
    for index, (name, w) in enumerate(zip(names, ws)):
        r1 = r0 + w.shape[0]
        member = FusedDenseLinear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        member.weight = nn.Parameter(stacked.weight[r0:r1], requires_grad=False)  # a view: nothing copied
        if bias is not None:
            member.bias = nn.Parameter(stacked.bias[r0:r1], requires_grad=False)
        member._group, member._group_index = group, index
        setattr(parent, name, member)
        r0 = r1
    return True


def fuse_siblings(model: nn.Module, dense: bool = False) -> int:
    """Fuse every group of :data:`SIBLINGS` held by one parent module (SparseLinears; with
    ``dense`` plain nn.Linears too); returns the groups fused."""
    from .linear import SparseLinear

    fused = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            layers = [getattr(parent, n, None) for n in names]
            if all(isinstance(layer, SparseLinear) for layer in layers):
                fused += fuse(layers)
            elif dense and all(type(layer) is nn.Linear for layer in layers):
                fused += fuse_dense(parent, names)
    return fused
