"""Per-layer sparsity and N:M validity of a model's prunable linears."""

from __future__ import annotations

import torch

from .models import prunable_linears, weight_matrix


def nm_valid(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs of every row has at most n nonzeros."""
    out_f, in_f = weight.shape
    if in_f % m:
        return False
    return bool(((weight != 0).view(out_f, in_f // m, m).sum(-1) <= n).all())


def layer_report(model, targets=None, ignore=None) -> dict:
    layers = []
    total, zeros = 0, 0
    for name, layer in prunable_linears(model, targets, ignore).items():
        w = weight_matrix(layer)
        n_zero = int((w == 0).sum())
        layers.append({
            "name": name, "shape": list(w.shape), "sparsity": n_zero / w.numel(),
            "2:4": nm_valid(w, 2, 4), "4:8": nm_valid(w, 4, 8),
        })
        total += w.numel()
        zeros += n_zero
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "layers": layers,
        "num_layers": len(layers),
        "linear_params": total,
        "linear_sparsity": zeros / total if total else 0.0,
        "all_2:4": all(row["2:4"] for row in layers),
        "all_4:8": all(row["4:8"] for row in layers),
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_bytes": param_bytes,
    }
