"""Format name -> tensor class, and rebuilding any compressed tensor from stored fields."""

from __future__ import annotations

from ..errors import SparsecraftError
from .bitmask import BitmaskTensor
from .dense import QuantizedDenseTensor
from .nm import NMTensor

FORMATS = {cls.FORMAT: cls for cls in (BitmaskTensor, NMTensor, QuantizedDenseTensor)}

CompressedTensor = BitmaskTensor | NMTensor | QuantizedDenseTensor


def tensor_from_stored(tensors: dict, meta: dict, where: str = "weight") -> CompressedTensor:
    """Rebuild any compressed tensor from its stored fields and metadata (validated)."""
    cls = FORMATS.get(meta.get("format")) if isinstance(meta, dict) else None
    if cls is None:
        raise SparsecraftError(
            f"{where}: unknown compressed format in metadata {meta!r}; expected one of {sorted(FORMATS)}"
        )
    return cls.from_tensors(tensors, meta, where)
