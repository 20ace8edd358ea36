"""Capture the sparsity mask of a model, keep it during training, and check it afterwards.

A mask is a bool tensor in the parameter's own layout (True = weight kept), keyed by the
parameter's qualified name, so it can be re-found after accelerate/FSDP wrapped the model. Under
FSDP2 parameters are DTensors; the mask is then sharded exactly like its parameter.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..models.discovery import prunable_linears

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - very old torch
    DTensor = ()  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

NM_PATTERNS = ((2, 4), (4, 8), (1, 4), (1, 2))


def capture_masks(
    model: nn.Module,
    targets: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    warn_dense: bool = True,
) -> dict[str, torch.Tensor]:
    """Masks (weight != 0) of every prunable linear, keyed by parameter name ``<layer>.weight``."""
    masks = {}
    for name, layer in prunable_linears(model, targets, ignore).items():
        masks[f"{name}.weight"] = layer.weight.detach() != 0
    if warn_dense and masks and not any(bool((~m).any()) for m in masks.values()):
        warnings.warn(
            "the student has no zero weights in its prunable layers: there is no mask to keep, "
            "fine-tuning will train it as a dense model",
            UserWarning,
            stacklevel=2,
        )
    return masks


def detect_nm(mask: torch.Tensor) -> tuple[int, int] | None:
    """The tightest N:M pattern (along the input dimension) that a (out, in) mask satisfies, if any."""
    if mask.dim() != 2:
        return None
    for n, m in NM_PATTERNS:
        if mask.shape[1] % m:
            continue
        kept = mask.reshape(mask.shape[0], -1, m).sum(-1)
        if bool((kept <= n).all()) and bool((~mask).any()):
            return n, m
    return None


def mask_summary(masks: dict[str, torch.Tensor], layouts: dict[str, bool] | None = None) -> dict:
    """Totals and the N:M pattern shared by all layers (``None`` for unstructured or mixed)."""
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    patterns = set()
    for name, m in masks.items():
        mat = m.t() if layouts and layouts.get(name) else m  # Conv1D stores (in, out)
        patterns.add(detect_nm(mat))
    nm = patterns.pop() if len(patterns) == 1 else None
    return {
        "layers": len(masks),
        "weights": total,
        "zeros": zeros,
        "sparsity": zeros / total if total else 0.0,
        "nm": f"{nm[0]}:{nm[1]}" if nm else None,
    }


def transposed_layouts(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Which masked parameters are stored (in, out), i.e. belong to GPT-2 style Conv1D layers."""
    modules = dict(model.named_modules())
    return {name: not isinstance(modules[name.rsplit(".", 1)[0]], nn.Linear) for name in masks}


class MaskKeeper:
    """Applies captured masks to the live (possibly wrapped, possibly sharded) parameters."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        missing = [n for n in masks if n not in params]
        if missing:
            raise KeyError(f"mask for {missing[0]} has no parameter of that name in the model")
        self.names = list(masks)
        self.params = [params[n] for n in self.names]
        self.masks = [self._local(params[n], masks[n]) for n in self.names]

    @staticmethod
    def _local(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if isinstance(param, DTensor):
            # Every rank holds the same full mask (it loaded the same student), so no scatter is needed.
            mesh = param.device_mesh
            return distribute_tensor(mask.to(mesh.device_type), mesh, param.placements, src_data_rank=None)
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != parameter shape {tuple(param.shape)}")
        return mask.to(param.device)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for p, m in zip(self.params, self.masks):
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def apply(self) -> None:
        for p, m in zip(self.params, self.masks):
            p.mul_(m)


@dataclass
class MaskCheck:
    layers: int
    pruned_still_zero: bool  # the guarantee: no pruned weight came back
    identical: bool  # the zero pattern after training equals the captured one
    regrown: int  # pruned weights that are non-zero now (must be 0)
    new_zeros: int  # kept weights that happen to be exactly 0 now (harmless, counted)
    first_bad_layer: str | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def check_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> MaskCheck:
    """Compare the model's zeros with the captured masks. Collective under FSDP: call on every rank."""
    params = dict(model.named_parameters())
    regrown = new_zeros = 0
    first_bad = None
    for name, mask in masks.items():
        p = params[name]
        full = p.full_tensor() if isinstance(p, DTensor) else p
        nonzero = full.detach().cpu() != 0
        mask = mask.cpu()
        r = int((nonzero & ~mask).sum())
        z = int((~nonzero & mask).sum())
        regrown += r
        new_zeros += z
        if (r or z) and first_bad is None:
            first_bad = name
    return MaskCheck(
        layers=len(masks),
        pruned_still_zero=regrown == 0,
        identical=regrown == 0 and new_zeros == 0,
        regrown=regrown,
        new_zeros=new_zeros,
        first_bad_layer=first_bad,
    )
