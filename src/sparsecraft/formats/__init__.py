"""Compressed sparse tensors (bitmask, packed N:M, quantized codes) and compressed checkpoints.

Every compressed tensor class has ``from_dense``, ``to_dense``, ``to_tensors`` (flat dict of
tensors for safetensors), ``from_tensors(tensors, meta)`` (validating) and ``meta()``; see the
module docstrings of :mod:`.bitmask`, :mod:`.nm`, :mod:`.dense` and :mod:`.qinfo` for the exact
byte layout the kernels read. :mod:`.checkpoint` saves and loads whole models.
"""

from .bitmask import BitmaskTensor
from .checkpoint import (  # noqa: I001  (needs the names above)
    CompressConfig,
    CompressedLinear,
    compress_model,
    compress_weight,
    decompress,
    describe,
    is_compressed_dir,
    load_compressed,
    load_tensors,
    save_compressed,
)
from .dense import QuantizedDenseTensor
from .nm import NMTensor
from .qinfo import QuantInfo, QuantizedWeight, code_range, num_groups
from .registry import FORMATS, CompressedTensor, tensor_from_stored

load = load_compressed
save = save_compressed

__all__ = [
    "BitmaskTensor",
    "NMTensor",
    "QuantizedDenseTensor",
    "QuantInfo",
    "QuantizedWeight",
    "FORMATS",
    "CompressedTensor",
    "CompressConfig",
    "CompressedLinear",
    "code_range",
    "num_groups",
    "tensor_from_stored",
    "compress_model",
    "compress_weight",
    "decompress",
    "describe",
    "is_compressed_dir",
    "load",
    "load_compressed",
    "load_tensors",
    "save",
    "save_compressed",
]
