"""CPU kernels: small-batch products y = x @ W.T that read compressed weights directly.

See docs/kernels_cpu.md for the design and measurements.
"""

from .build import has_avx512, library_path, load_library
from .ops import (
    BoundKernel,
    bind,
    bind_bitmask,
    bind_dense,
    bind_nm,
    bind_qdense,
    bitmask_matmul,
    check_bitmask,
    check_nm,
    check_qdense,
    nm_matmul,
    stream_bandwidth,
    value_type,
)

__all__ = [
    "BoundKernel",
    "bind",
    "bind_qdense",
    "check_qdense",
    "bind_bitmask",
    "bind_dense",
    "bind_nm",
    "bitmask_matmul",
    "check_bitmask",
    "check_nm",
    "has_avx512",
    "library_path",
    "load_library",
    "nm_matmul",
    "stream_bandwidth",
    "value_type",
]
