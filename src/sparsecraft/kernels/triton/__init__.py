"""Triton GPU kernels for compressed (bitmask / N:M, float or int4/int8) weights.

``layout.prepare`` turns a format object into a :class:`~.layout.TritonWeight` once at load time;
``dispatch.sparse_linear`` is the per-call entry point used by ``SparseLinear`` on CUDA tensors.
Importing this package does not import triton; :func:`available` says whether it can run.
"""

from __future__ import annotations

import os


def available() -> bool:
    """True when triton is importable (the kernels also run on CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (kernels on CPU tensors; some use a float32 tl.dot then)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
