"""Swap a model's linear layers for :class:`SparseLinear` modules holding compressed weights.

``convert(model, format="bitmask")`` compresses every linear inside the decoder blocks (the same
layers the pruners touch) from its zeros; ``bits=8``/``4`` first quantizes the kept weights
round-to-nearest (``sparsecraft.quant.rtn_quantize``, zeros stay zeros) unless the quantizer's own
results are passed in ``quantized``. Layers already held compressed (``CompressedLinear`` from
``formats.load_compressed(dense=False)``) are wrapped as they are. ``lm_head_int8`` replaces the
(unpruned, often tied) output projection with an int8 quantized dense copy; otherwise
``lm_head_kernel`` (default on) runs the float output projection through sparsecraft's dense CPU
kernel at small batch (same weights, same Parameter: it streams them at the memory's bandwidth,
where torch's batch-1 GEMV reaches a fraction of it). ``fuse`` (default on) gives sibling layers
called on the same input (q/k/v, gate/up) one stacked kernel call (:mod:`.fuse`).
The model is changed in place and returned; ``generate`` works unchanged (KV cache included).
Each layer is compressed on the device it lives on (a GPU compresses a 7B model in seconds); the
compressed form is kept on the host, and layers that lived on an accelerator get no CPU kernel
(on the CPU they would decompress per call).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SparsecraftError
from ..formats import QuantizedDenseTensor
from ..formats.checkpoint import CompressedLinear, compress_weight
from ..formats.qinfo import QuantizedWeight
from ..models.discovery import Conv1D, is_linear, prunable_linears, weight_matrix
from .fuse import fuse_siblings
from .linear import DEFAULT_DENSE_KERNEL_ROWS, DEFAULT_MAX_KERNEL_BATCH, DenseKernelLinear, SparseLinear

log = logging.getLogger(__name__)

FORMATS = ("bitmask", "nm", "auto")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class ConvertConfig:
    format: str = "bitmask"
    dtype: torch.dtype | None = None
    bits: int | None = None
    group_size: int = 128
    symmetric: bool = True
    n: int = 2
    m: int = 4
    lm_head_int8: bool = False
    lm_head_kernel: bool = True
    fuse: bool = True
    threads: int = 0
    max_kernel_batch: int = DEFAULT_MAX_KERNEL_BATCH

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SparsecraftError(f"format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.dtype is not None and self.dtype not in FLOAT_DTYPES:
            raise SparsecraftError(
                f"dtype {self.dtype}: choose torch.float32, torch.bfloat16 or torch.float16"
            )
        if self.bits not in (None, 4, 8):
            raise SparsecraftError(f"bits={self.bits}: choose None (float values), 8 or 4")
        if self.bits is not None and self.dtype is not None:
            raise SparsecraftError("give either dtype (float values) or bits (integer codes), not both")
        if self.group_size not in (32, 64, 128):
            raise SparsecraftError(f"group_size={self.group_size}: choose 32, 64 or 128")
        if not (1 <= self.n < self.m <= 16):
            raise SparsecraftError(f"N:M = {self.n}:{self.m}: need 1 <= N < M <= 16 (e.g. 2:4)")
        if self.threads < 0:
            raise SparsecraftError(f"threads={self.threads}: use 0 (torch's setting) or a positive count")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _layer_type(layer: nn.Module) -> str:
    return "conv1d" if Conv1D and isinstance(layer, Conv1D) else "linear"


def _compress(name: str, layer: nn.Module, cfg: ConvertConfig, qw: QuantizedWeight | None):
    from ..quant import rtn_quantize

    w = weight_matrix(layer).detach()  # compressed where the layer lives (a GPU is much faster)
    if cfg.bits is not None:
        if qw is None:
            qw = rtn_quantize(
                w, w != 0, bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric, where=name
            )
        w = qw.dequantize().to(w.dtype)
    elif cfg.dtype is not None:
        w = w.to(cfg.dtype)
    t = compress_weight(w, cfg.format, cfg.n, cfg.m, qw, where=name)
    return t.to("cpu") if t is not None else None  # the stored form lives on the host


@torch.no_grad()
def convert(
    model: nn.Module,
    format: str = "bitmask",
    dtype: torch.dtype | None = None,
    bits: int | None = None,
    group_size: int = 128,
    lm_head_int8: bool = False,
    *,
    lm_head_kernel: bool = True,
    fuse: bool = True,
    symmetric: bool = True,
    n: int = 2,
    m: int = 4,
    threads: int = 0,
    max_kernel_batch: int = DEFAULT_MAX_KERNEL_BATCH,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    quantized: dict[str, QuantizedWeight] | None = None,
) -> nn.Module:
    """Replace the decoder linears of ``model`` (in place) by SparseLinear; returns the model.

    format: ``bitmask`` | ``nm`` (N:M with ``n``/``m``; refuses a layer whose zeros are not N:M)
    | ``auto`` (smallest encoding per layer; a layer too dense to gain stays nn.Linear).
    dtype: store float values as float32/bfloat16/float16 (default: the weight's dtype).
    bits: 8 or 4 to store integer codes with per-``group_size`` scales (RTN unless ``quantized``
    holds the quantizer's results by layer name).
    lm_head_kernel: run the unpruned float lm_head through our dense kernel for up to
    ``DEFAULT_DENSE_KERNEL_ROWS`` rows (torch beyond); ignored with ``lm_head_int8``.
    fuse: one kernel call for q/k/v and for gate/up (bit-identical outputs, see runtime.fuse).
    """
    cfg = ConvertConfig(
        format,
        dtype,
        bits,
        group_size,
        symmetric,
        n,
        m,
        lm_head_int8,
        lm_head_kernel,
        fuse,
        threads,
        max_kernel_batch,
    )
    quantized = dict(quantized or {})
    names = list(prunable_linears(model, targets, ignore))
    if not names and not any(isinstance(mod, CompressedLinear) for mod in model.modules()):
        raise SparsecraftError(
            f"{type(model).__name__}: no linear layers matched targets={targets} ignore={ignore}"
        )
    kw = {"threads": cfg.threads, "max_kernel_batch": cfg.max_kernel_batch}
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover

        def tqdm(x, **_):
            return x

    modules = dict(model.named_modules())
    converted = kept_dense = 0
    for name in tqdm(names, desc="convert", disable=len(names) < 50):
        layer = modules[name]
        ct = _compress(name, layer, cfg, quantized.pop(name, None))
        if ct is None:  # "auto" found no gain: leave the dense layer
            kept_dense += 1
            continue
        # a layer on an accelerator runs its own kernels there: binding (and validating) the CPU
        # kernel would cost up to a second per 7B-sized layer for nothing
        kernels = "auto" if weight_matrix(layer).device.type == "cpu" else "torch"
        _set_module(model, name, SparseLinear(ct, layer.bias, _layer_type(layer), kernels=kernels, **kw))
        converted += 1
    for name, mod in list(model.named_modules()):
        if isinstance(mod, CompressedLinear):
            _set_module(model, name, SparseLinear(mod.weight_compressed, mod.bias, mod.layer_type, **kw))
            converted += 1
    if quantized:
        raise SparsecraftError(
            f"quantized results given for layers that were not converted: {sorted(quantized)[:3]}"
        )
    fused = fuse_siblings(model) if cfg.fuse else 0
    if cfg.lm_head_int8:
        _int8_lm_head(model, cfg)
    elif cfg.lm_head_kernel:
        _kernel_lm_head(model, cfg)
    log.info(
        "convert: %d layers -> SparseLinear (%s), %d left dense, %d sibling groups fused",
        converted,
        cfg.format,
        kept_dense,
        fused,
    )
    return model


def _int8_lm_head(model: nn.Module, cfg: ConvertConfig) -> None:
    """Output projection -> int8 quantized dense SparseLinear (symmetric RTN, per-group scales).

    A tied lm_head shares its matrix with the input embedding; the embedding keeps its float copy
    (a lookup reads one row per token), only the projection reads the int8 codes."""
    from ..quant import rtn_quantize

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not is_linear(head):
        raise SparsecraftError(f"{type(model).__name__}: no linear output projection (lm_head) to quantize")
    w = weight_matrix(head).detach().cpu().float()
    qw = rtn_quantize(
        w,
        torch.ones_like(w, dtype=torch.bool),
        bits=8,
        group_size=cfg.group_size,
        symmetric=True,
        where="lm_head",
    )
    ct = QuantizedDenseTensor.from_codes(qw.codes, qw.info, weight_matrix(head).dtype, where="lm_head")
    new = SparseLinear(
        ct, head.bias, _layer_type(head), threads=cfg.threads, max_kernel_batch=cfg.max_kernel_batch
    )
    if hasattr(model, "set_output_embeddings"):
        model.set_output_embeddings(new)
    else:  # pragma: no cover - every HF causal LM has it
        raise SparsecraftError(f"{type(model).__name__}: cannot replace the output projection")
    # the projection is no longer the embedding's matrix: keep transformers from re-tying them
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False


def _kernel_lm_head(model: nn.Module, cfg: ConvertConfig) -> None:
    """A float nn.Linear output projection on the CPU -> DenseKernelLinear over the same Parameter
    (tied embeddings stay tied). Anything else (Conv1D, already converted, on a GPU) is left alone."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or isinstance(head, DenseKernelLinear):
        return
    w = head.weight
    if w.device.type != "cpu" or w.dtype not in FLOAT_DTYPES or not w.is_contiguous():
        return
    new = DenseKernelLinear(w, head.bias, threads=cfg.threads, max_kernel_batch=DEFAULT_DENSE_KERNEL_ROWS)
    if hasattr(model, "set_output_embeddings"):
        model.set_output_embeddings(new)


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    return {n: mod for n, mod in model.named_modules() if isinstance(mod, SparseLinear)}
