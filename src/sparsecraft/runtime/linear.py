"""``SparseLinear``: an ``nn.Linear`` (or GPT-2 ``Conv1D``) whose weight stays compressed.

``y = x @ W.T + b`` with W (out, in) held as a :mod:`sparsecraft.formats` tensor (bitmask, packed
N:M or quantized dense). Dispatch, per call:

* CPU tensor, at most ``max_kernel_batch`` rows, no autograd needed -> the CPU kernels
  (:mod:`sparsecraft.kernels.cpu`), which read the compressed bytes directly;
* CUDA tensor -> :meth:`SparseLinear._forward_cuda` (the place for the Triton kernels);
* anything else (large batches such as perplexity windows, gradients) -> decompress and
  ``F.linear``: exact, and compute-bound work gains nothing from sparsity on this hardware.

Inference only: parameters are frozen and the kernel path has no backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparsecraftError
from ..formats import BitmaskTensor, NMTensor, QuantizedDenseTensor

# Rows up to which the CPU kernel runs; beyond, decompress + F.linear. Measured (1 thread, 1536x576 at
# 70%): the kernel takes 0.7 ms at 64 rows, 2.2 ms at 256, 16.5 ms at 1024, against 8.6 / 10.5 / 32 ms for
# decompress + F.linear (25 ms for F.linear alone at 1024), so prefill and perplexity windows stay on it.
DEFAULT_MAX_KERNEL_BATCH = 2048
KERNEL_CHOICES = ("auto", "cpu", "torch")


class SparseLinear(nn.Module):
    def __init__(
        self,
        weight: BitmaskTensor | NMTensor | QuantizedDenseTensor,
        bias: torch.Tensor | None = None,
        layer_type: str = "linear",
        threads: int = 0,
        max_kernel_batch: int = DEFAULT_MAX_KERNEL_BATCH,
        kernels: str = "auto",
    ):
        super().__init__()
        if not isinstance(weight, BitmaskTensor | NMTensor | QuantizedDenseTensor):
            raise SparsecraftError(
                "SparseLinear needs a compressed tensor from sparsecraft.formats, "
                f"got {type(weight).__name__}"
            )
        if kernels not in KERNEL_CHOICES:
            raise SparsecraftError(f"kernels={kernels!r}: choose one of {', '.join(KERNEL_CHOICES)}")
        if max_kernel_batch < 0:
            raise SparsecraftError(f"max_kernel_batch must be >= 0, got {max_kernel_batch}")
        self.weight_compressed = weight
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self._out_shape = (self.out_features,)
        self.layer_type = layer_type
        self.max_kernel_batch = int(max_kernel_batch)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise SparsecraftError(
                    f"bias shape {tuple(bias.shape)} does not match {self.out_features} outputs"
                )
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel = None
        if kernels in ("auto", "cpu"):
            from ..kernels.cpu import bind

            try:  # validates the compressed tensor against the layout contract, builds the library
                self._kernel = bind(weight, bias=bias, threads=threads)
            except SparsecraftError as e:
                if kernels == "cpu" or "compile" not in str(e) and "compiler" not in str(e):
                    raise
                # no C compiler: stay correct through the dense path (slow, but never wrong)
                self._kernel = None
        # the accelerator backend's prepared weight (e.g. a Triton layout), built on first use
        self._cuda_weight = None
        # siblings called on the same input share one stacked kernel call (runtime.fuse)
        self._group = None
        self._group_index = 0

    # ------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # hot path (decode: 210 calls per token): as few Python operations as possible
        k = self._kernel
        if k is not None and x.is_cpu and x.dtype == torch.float32 and x.is_contiguous():
            shape = x.shape
            if shape[-1] != self.in_features:
                raise SparsecraftError(
                    f"SparseLinear: input has {shape[-1]} features, expected {self.in_features}"
                )
            rows = x.numel() // self.in_features
            if rows <= self.max_kernel_batch and not (x.requires_grad and torch.is_grad_enabled()):
                if self._group is not None:
                    return self._group.output(self._group_index, x, rows, shape[:-1])
                return k.call_rows(x, rows, shape[:-1] + self._out_shape)
        return self._forward_other(x)

    def _forward_other(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise SparsecraftError(
                f"SparseLinear: input has {x.shape[-1]} features, expected {self.in_features}"
            )
        grad = x.requires_grad and torch.is_grad_enabled()
        if self._group is not None and self._kernel is None and not grad:
            return self._group.output(self._group_index, x)  # the stacked layer of an accelerator group
        if x.device.type == "cuda":
            return self._forward_cuda(x)
        rows = x.numel() // self.in_features
        if (
            x.is_cpu
            and self._kernel is not None
            and rows <= self.max_kernel_batch
            and not (x.requires_grad and torch.is_grad_enabled())
        ):
            y = self._kernel(x.reshape(rows, self.in_features).to(torch.float32).contiguous())
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return self._forward_dense(x)

    def _forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """CUDA dispatch: the Triton kernels (weight prepared once into ``self._cuda_weight``,
        see sparsecraft.kernels.triton.dispatch); decompress on the device where they do not apply."""
        from ..kernels.triton.dispatch import cuda_forward

        y = cuda_forward(self, x)
        return self._forward_dense(x) if y is None else y

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_weight(dtype=x.dtype, device=x.device)
        b = self.bias.to(device=x.device, dtype=x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)

    # ------------------------------------------------------------------------------ helpers
    def dense_weight(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """The (out, in) weight decompressed (a new tensor each call)."""
        w = self.weight_compressed.to_dense()
        return w.to(device=device or "cpu", dtype=dtype or w.dtype)

    def weight_bytes(self) -> int:
        """Bytes of the compressed weight (mask/indices, values, scales, zeros) plus bias."""
        b = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return int(self.weight_compressed.nbytes()) + b

    @property
    def uses_cpu_kernel(self) -> bool:
        return self._kernel is not None

    def extra_repr(self) -> str:
        t = self.weight_compressed
        fmt = t.FORMAT if not isinstance(t, NMTensor) else f"{t.n}:{t.m}"
        q = f", int{t.quant.bits} g{t.quant.group_size}" if t.quant is not None else f", {str(t.dtype)[6:]}"
        kern = "cpu-kernel" if self._kernel is not None else "dense-fallback"
        return (
            f"in={self.in_features}, out={self.out_features}, {fmt}{q}, bias={self.bias is not None}, {kern}"
        )


# Rows up to which DenseKernelLinear runs our dense kernel; beyond, torch's GEMM (compute-bound
# prefill). Measured on the lm_head (49152x576 fp32, 2 threads), see docs/results/cpu_runtime.md.
DEFAULT_DENSE_KERNEL_ROWS = 16


def _frozen_param(t: torch.Tensor | None) -> nn.Parameter | None:
    """t itself when it is already a Parameter (a tied weight stays shared), else wrapped, frozen."""
    return t if t is None or isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


class DenseKernelLinear(nn.Linear):
    """An unpruned float ``nn.Linear`` (e.g. the tied lm_head) run by sparsecraft's dense CPU kernel
    at small batch, which streams the weight at close to the machine's read bandwidth (torch's
    batch-1 GEMV reads it at a fraction of that); larger batches go to ``F.linear``.

    ``weight`` is the original Parameter (a tied embedding stays tied, nothing is copied); it is an
    ``nn.Linear`` to everything that inspects the model (layer discovery, timers, byte counts)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        threads: int = 0,
        max_kernel_batch: int = DEFAULT_DENSE_KERNEL_ROWS,
    ):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a fresh weight
        if weight.dim() != 2 or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise SparsecraftError(
                f"DenseKernelLinear needs a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}"
            )
        if max_kernel_batch < 0:
            raise SparsecraftError(f"max_kernel_batch must be >= 0, got {max_kernel_batch}")
        self.weight = _frozen_param(weight)
        self.bias = _frozen_param(bias)
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.threads = int(threads)
        self.max_kernel_batch = int(max_kernel_batch)
        self._kernel = None
        self._bound_ptr = None

    def _bind(self):
        from ..kernels.cpu import bind_dense

        w = self.weight.detach()
        if w.device.type != "cpu" or not w.is_contiguous():
            self._kernel, self._bound_ptr = None, None
            return None
        b = self.bias.detach() if self.bias is not None else None
        try:
            self._kernel = bind_dense(w, bias=b, threads=self.threads)
        except SparsecraftError as e:  # no C compiler: torch serves every call, as before
            if "compile" not in str(e) and "compiler" not in str(e):
                raise
            self.max_kernel_batch = 0
            return None
        self._bound_ptr = w.data_ptr()
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and x.dtype == torch.float32 and x.is_contiguous() and x.shape[-1] == self.in_features:
            rows = x.numel() // self.in_features
            grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
            if rows <= self.max_kernel_batch and not grad:
                k = self._kernel
                if k is None or self._bound_ptr != self.weight.data_ptr():  # re-tied or moved
                    k = self._bind()
                if k is not None:
                    return k.call_rows(x, rows, x.shape[:-1] + (self.out_features,))
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, {str(self.weight.dtype)[6:]}, "
            f"bias={self.bias is not None}, dense cpu-kernel up to {self.max_kernel_batch} rows"
        )
