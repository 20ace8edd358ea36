"""Compressed sparse tensors (bitmask, packed N:M, quantized codes) and compressed checkpoints.

Every compressed tensor class has ``from_dense``, ``to_dense``, ``to_tensors`` (flat dict of
tensors for safetensors), ``from_tensors(tensors, meta)`` (validating) and ``meta()``; see the
module docstrings of :mod:`.bitmask`, :mod:`.nm`, :mod:`.dense` and :mod:`.qinfo` for the exact
byte layout the kernels read.
"""

from .bitmask import BitmaskTensor
from .dense import QuantizedDenseTensor
from .nm import NMTensor
from .qinfo import QuantInfo, code_range, num_groups

FORMATS = {cls.FORMAT: cls for cls in (BitmaskTensor, NMTensor, QuantizedDenseTensor)}

CompressedTensor = BitmaskTensor | NMTensor | QuantizedDenseTensor


def tensor_from_stored(tensors: dict, meta: dict, where: str = "weight") -> CompressedTensor:
    """Rebuild any compressed tensor from its stored fields and metadata (validated)."""
    from ..errors import SparsecraftError

    cls = FORMATS.get(meta.get("format")) if isinstance(meta, dict) else None
    if cls is None:
        raise SparsecraftError(
            f"{where}: unknown compressed format in metadata {meta!r}; expected one of {sorted(FORMATS)}"
        )
    return cls.from_tensors(tensors, meta, where)


__all__ = [
    "BitmaskTensor",
    "NMTensor",
    "QuantizedDenseTensor",
    "QuantInfo",
    "FORMATS",
    "CompressedTensor",
    "code_range",
    "num_groups",
    "tensor_from_stored",
]
