"""Validation of stored per-tensor metadata and fields (shared by the formats)."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import SparsecraftError
from .qinfo import QuantInfo, num_groups

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class StoredTensor:
    """``meta``, ``to_tensors`` and ``nbytes`` of a compressed format, from its ``FORMAT``,
    ``shape``, ``dtype``, ``quant`` and the two hooks below."""

    def _own_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _own_meta(self) -> dict:
        return {}

    def meta(self) -> dict:
        m = {"format": self.FORMAT, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}
        m.update(self._own_meta())
        if self.quant is not None:
            m["quant"] = self.quant.meta()
        return m

    def to_tensors(self) -> dict[str, torch.Tensor]:
        t = self._own_tensors()
        if self.quant is not None:
            t.update(self.quant.tensors())
        return t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def to(self, device: torch.device | str):
        """A copy with every field (quantization parameters included) on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        if self.quant is not None:
            q = self.quant
            moved["quant"] = dataclasses.replace(
                q, scales=q.scales.to(device), zeros=q.zeros.to(device) if q.zeros is not None else None)
        return dataclasses.replace(self, **moved)


def require(
    t: dict[str, torch.Tensor], key: str, where: str, dtype: torch.dtype, shape: tuple[int, ...] | None
) -> torch.Tensor:
    if key not in t:
        raise SparsecraftError(f"{where}: stored field '{key}' is missing (corrupt or incomplete file)")
    x = t[key]
    if x.dtype != dtype:
        raise SparsecraftError(f"{where}: field '{key}' has dtype {x.dtype}, expected {dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise SparsecraftError(f"{where}: field '{key}' has shape {tuple(x.shape)}, expected {tuple(shape)}")
    return x


def parse_meta(
    t: dict[str, torch.Tensor], meta: dict, where: str
) -> tuple[tuple[int, int], torch.dtype, QuantInfo | None]:
    try:
        shape = tuple(int(s) for s in meta["shape"])
        dtype = DTYPES[meta["dtype"]]
    except (KeyError, TypeError, ValueError) as e:
        raise SparsecraftError(f"{where}: bad metadata {meta!r} ({e})") from None
    if len(shape) != 2 or min(shape) <= 0:
        raise SparsecraftError(f"{where}: bad shape {shape} in metadata")
    q = meta.get("quant")
    if q is None:
        return shape, dtype, None
    try:
        bits, gs, sym = int(q["num_bits"]), int(q["group_size"]), bool(q["symmetric"])
    except (KeyError, TypeError, ValueError) as e:
        raise SparsecraftError(f"{where}: bad quantization metadata {q!r} ({e})") from None
    if gs <= 0:
        raise SparsecraftError(f"{where}: group_size must be positive, got {gs}")
    ng = num_groups(shape[1], gs)
    scales = require(t, "scales", where, torch.float16, (shape[0], ng))
    zeros = None if sym else require(t, "zeros", where, torch.uint8, (shape[0], ng))
    quant = QuantInfo(bits, gs, sym, scales, zeros)
    quant.validate(shape, where)
    return shape, dtype, quant
