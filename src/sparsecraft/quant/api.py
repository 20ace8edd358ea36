"""Quantize a whole model in place: ``quantize_model(model, tokenizer, QuantConfig(...))``.

RTN needs no data. With ``awq`` the activation-aware scales are searched and folded into the model
first (:mod:`.awq`, the engine's walk with a read-only solver), then RTN or GPTQ quantizes the
scaled weights. GPTQ runs through the pruning engine's sequential walk
(:func:`sparsecraft.prune.engine.run_sequential`) with :class:`GPTQSolver`: each block's layers are
quantized from the Hessian of their real inputs, then the block is re-run so the next block sees
the quantized model's activations. The mask of every layer is its weight's zeros.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import Tensor, nn

from ..errors import SparsecraftError
from ..formats.qinfo import QuantizedWeight
from ..models.discovery import prunable_linears, set_weight_matrix, weight_matrix
from ..prune.engine import EngineOptions, SolveResult, run_sequential
from ..prune.sparsegpt import inverse_cholesky
from .awq import awq_scale_model
from .gptq import act_order_perm, gptq_quantize
from .refit import refit_scales
from .rtn import QuantConfig, rtn_quantize

log = logging.getLogger(__name__)


class GPTQSolver:
    """Engine solver: mask = the weight's zeros; result = the dequantized GPTQ weight."""

    needs_hessian = True

    def __init__(self, config: QuantConfig):
        self.config = config
        self.results: dict[str, QuantizedWeight] = {}

    def _one(
        self, name: str, weight: Tensor, upper: Tensor, perm: Tensor | None, damp_info: dict, hessian: Tensor
    ) -> SolveResult:
        c = self.config
        mask = weight != 0
        qw, _ = gptq_quantize(
            weight,
            hessian if c.clip else None,  # the factor is ``upper``; the Hessian serves the clip search
            mask,
            c.bits,
            c.group_size,
            c.symmetric,
            c.blocksize,
            c.percdamp,
            where=name,
            upper=upper,
            clip=c.clip,
            perm=perm,
        )
        if c.refit_scales:
            qw = refit_scales(qw, weight, hessian, damp_info["damping"])
        self.results[name] = qw
        return SolveResult(weight=qw.dequantize(), mask=mask, info=dict(damp_info))

    def _factor(self, name: str, weight: Tensor, stats) -> tuple[Tensor, Tensor | None, dict]:
        h = stats.hessian.to(weight.device)
        perm = act_order_perm(h) if self.config.act_order else None
        if perm is not None:
            h = h[perm][:, perm]
        upper, damp, dead = inverse_cholesky(h, self.config.percdamp, name)
        return upper, perm, {"damping": damp, "dead_inputs": int(dead.sum())}

    def solve(self, name, layer, weight, stats) -> SolveResult:
        return self.solve_group([name], [layer], [weight], stats)[0]

    def solve_group(self, names, layers, weights, stats) -> list[SolveResult]:
        upper, perm, info = self._factor(names[0], weights[0], stats)  # one factorisation for q/k/v
        return [self._one(n, w, upper, perm, info, stats.hessian) for n, w in zip(names, weights)]


def _dequantized_matches(layer: nn.Module, qw: QuantizedWeight) -> bool:
    w = weight_matrix(layer)
    return torch.equal(qw.dequantize().to(device=w.device, dtype=w.dtype), w.detach())


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    tokenizer,
    config: QuantConfig,
    calibration: Tensor | None = None,
    options: EngineOptions | None = None,
) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize every targeted linear layer in place; returns (per-layer results, report).

    The model's weights become exactly the dequantized values (cast to the model's dtype), so
    :func:`sparsecraft.formats.save_compressed` can store the codes losslessly.
    """
    t0 = time.perf_counter()
    layers = prunable_linears(model, config.targets, config.ignore)
    if not layers:
        raise SparsecraftError("no linear layers selected for quantization; check targets/ignore")
    zeros_before = {n: int((weight_matrix(m) == 0).sum()) for n, m in layers.items()}
    engine = None
    awq_report = None
    needs_calibration = config.method == "gptq" or config.awq
    if calibration is None and needs_calibration:
        from ..data import calibration_windows

        calibration = calibration_windows(
            tokenizer, config.calib, config.nsamples, config.seqlen, config.seed
        )
    if config.awq:
        awq_report = awq_scale_model(model, calibration, config, options)
    if config.method == "rtn":
        results = {}
        for name, layer in layers.items():
            qw = rtn_quantize(
                weight_matrix(layer),
                None,
                config.bits,
                config.group_size,
                config.symmetric,
                name,
                config.clip,
            )
            set_weight_matrix(layer, qw.dequantize())
            results[name] = qw
    else:
        solver = GPTQSolver(config)
        opts = dataclasses.replace(options or EngineOptions(), targets=config.targets, ignore=config.ignore)
        engine = run_sequential(model, calibration, solver, opts)
        results = solver.results
    missing = sorted(set(layers) - set(results))
    if missing:
        raise SparsecraftError(f"layers never reached by the calibration forward pass: {missing[:3]}")
    for name, layer in layers.items():
        if not _dequantized_matches(layer, results[name]):  # e.g. a fp16 model overflowing
            raise SparsecraftError(f"{name}: the stored weight differs from its dequantized codes")
        if int((weight_matrix(layer) == 0).sum()) < zeros_before[name]:
            raise SparsecraftError(f"{name}: quantization turned a zero into a nonzero (bug)")
    n_weights = sum(weight_matrix(m).numel() for m in layers.values())
    report = {
        "quantization": config.meta(),
        "layers": len(layers),
        "weights": n_weights,
        "sparsity_before": sum(zeros_before.values()) / n_weights,
        "sparsity_after": sum(int((weight_matrix(m) == 0).sum()) for m in layers.values()) / n_weights,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if awq_report is not None:
        report["awq"] = awq_report
    if needs_calibration:
        report["calibration"] = {
            "source": config.calib,
            "nsamples": int(calibration.shape[0]),
            "seqlen": int(calibration.shape[1]),
            "seed": config.seed,
        }
    if engine is not None:
        report["engine"] = {k: v for k, v in engine.to_dict().items() if k != "layers"}
        report["max_rel_error"] = max((r.rel_error for r in engine.layers), default=None)
    return results, report
