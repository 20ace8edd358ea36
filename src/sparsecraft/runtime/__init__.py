"""Sparse inference: SparseLinear modules on compressed weights, model conversion, decode measurement."""

from .convert import ConvertConfig, convert, sparse_layers
from .linear import DEFAULT_MAX_KERNEL_BATCH, DenseKernelLinear, SparseLinear
from .measure import decode_speed, greedy_identity, greedy_tokens, layer_timer, rss_bytes, weight_bytes
from .static_decode import static_greedy

__all__ = [
    "DEFAULT_MAX_KERNEL_BATCH",
    "ConvertConfig",
    "DenseKernelLinear",
    "SparseLinear",
    "convert",
    "decode_speed",
    "greedy_identity",
    "greedy_tokens",
    "layer_timer",
    "rss_bytes",
    "sparse_layers",
    "static_greedy",
    "weight_bytes",
]
