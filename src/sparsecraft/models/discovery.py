"""Find the decoder blocks and the prunable linear layers of any Hugging Face causal LM.

No per-architecture tables: the decoder stack is the longest ``nn.ModuleList`` whose entries all
share one class, and a prunable layer is an ``nn.Linear`` or a GPT-2 style ``Conv1D`` inside a
block. Layer names are relative to their block (``self_attn.q_proj``) or to the model
(``model.layers.0.self_attn.q_proj``), and ``targets`` / ``ignore`` are regular expressions
matched against the model-relative name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import SparsecraftError

try:  # transformers' GPT-2 projection: y = x @ W + b with W of shape (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, ModuleList) of the model's decoder blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(isinstance(m, LINEAR_TYPES) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise SparsecraftError(
            f"{type(model).__name__}: no decoder block list found (expected an nn.ModuleList of "
            "identical blocks containing linear layers)"
        )
    return best


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def _selected(name: str, targets: Iterable[str] | None, ignore: Iterable[str] | None) -> bool:
    if targets and not any(re.search(p, name) for p in targets):
        return False
    return not (ignore and any(re.search(p, name) for p in ignore))


def block_linears(
    block: nn.Module,
    prefix: str = "",
    targets: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
) -> dict[str, nn.Module]:
    """Linear layers of one block, keyed by block-relative name, filtered on ``prefix + name``."""
    found = {}
    for name, module in block.named_modules():
        if is_linear(module) and _selected(f"{prefix}{name}", targets, ignore):
            found[name] = module
    return found


def prunable_linears(
    model: nn.Module,
    targets: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
) -> dict[str, nn.Module]:
    """All linear layers inside the decoder blocks, keyed by model-relative name.

    lm_head and embeddings are outside the blocks, hence excluded unless a ``targets`` pattern
    names them explicitly.
    """
    blocks_name, blocks = decoder_blocks(model)
    found: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}."
        for name, module in block_linears(block, prefix, targets, ignore).items():
            found[prefix + name] = module
    if targets:  # explicit targets may reach outside the blocks (e.g. lm_head)
        for name, module in model.named_modules():
            if is_linear(module) and name not in found and _selected(name, targets, ignore):
                found[name] = module
    return found


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out_features, in_features) view, whatever the layer type."""
    if isinstance(layer, nn.Linear):
        return layer.weight.data
    if Conv1D and isinstance(layer, Conv1D):
        return layer.weight.data.t()
    raise TypeError(f"not a linear layer: {type(layer).__name__}")


def set_weight_matrix(layer: nn.Module, w: torch.Tensor) -> None:
    """Write an (out, in) matrix back into the layer, keeping its dtype and storage layout."""
    target = weight_matrix(layer)
    target.copy_(w.to(dtype=target.dtype, device=target.device))


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    out_f, in_f = weight_matrix(layer).shape
    return int(out_f), int(in_f)
