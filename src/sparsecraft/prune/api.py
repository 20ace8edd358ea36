"""Python API of one-shot pruning: ``prune(model, tokenizer, PruneConfig(...), calibration)``.

The config is validated when it is built (bad values raise ``SparsecraftError`` naming the field
and what would work). ``prune`` modifies the model in place and returns the report that the CLI
writes as ``sparsecraft.json``.

N:M on a layer whose input size is not divisible by M is refused before anything is pruned (the
message lists the layers; exclude them with ``ignore``), rather than silently skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import SparsecraftError
from ..models.discovery import decoder_blocks, layer_shape, prunable_linears
from .dsnot import DSnoTConfig, dsnot_refine
from .engine import EngineOptions, SolveResult, _as_result, run_sequential
from .magnitude import MagnitudeSolver
from .masks import LayerTarget, check_sparsity, parse_pattern
from .owl import OutlierSolver, owl_sparsities
from .sparsegpt import SparseGPTSolver
from .wanda import WandaSolver

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
PROFILES = ("uniform", "owl")
DTYPES = {
    "model": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class PruneConfig:
    """A one-shot pruning recipe. Exactly one of ``sparsity`` (unstructured) or ``pattern`` (N:M)."""

    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str | None = None  # "2:4": keep N of every M consecutive inputs
    profile: str = "uniform"  # or "owl" (per-block sparsity from outlier ratios)
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    magnitude_scope: str = "layer"  # magnitude compares per "layer" or per "row"
    wanda_variant: bool = False  # Wanda's adaptive per-row variant
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT dampening, fraction of the mean Hessian diagonal
    # SparseGPT: keep its mask, re-solve the kept weights exactly per row (prune.reconstruct)
    exact_update: bool = False
    refine: str | None = None  # "dsnot"
    dsnot: DSnoTConfig = field(default_factory=DSnoTConfig)
    calib: str = "c4"  # recorded in the recipe; used when no calibration is given
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    true_sequential: bool = False
    device: str = "auto"
    calib_dtype: str = "model"  # dtype of calibration forwards: model, float32, bfloat16, float16
    offload_dtype: str | None = None  # dtype of block inputs kept on the CPU (None: calib dtype)
    bf16_hessian: bool = False  # bf16 fast mode: Σ x xᵀ from bf16 products, fp32 sums
    batch_size: int = 8
    inputs_on: str = "auto"  # block inputs between passes: cpu, device, auto (device if they fit)
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None
    error_rows: int = 512  # tokens for the error measure when no Hessian is collected

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SparsecraftError(f"method {self.method!r}: choose one of {', '.join(METHODS)}")
        if (self.sparsity is None) == (self.pattern is None):
            raise SparsecraftError("give exactly one of sparsity (e.g. 0.5) or pattern (e.g. 2:4)")
        if self.sparsity is not None:
            self.sparsity = check_sparsity(self.sparsity)
        if self.pattern is not None:
            n, m = (
                parse_pattern(self.pattern)
                if isinstance(self.pattern, str)
                else parse_pattern(f"{self.pattern[0]}:{self.pattern[1]}")
            )
            self.pattern = f"{n}:{m}"
        if self.profile not in PROFILES:
            raise SparsecraftError(f"profile {self.profile!r}: choose one of {', '.join(PROFILES)}")
        if self.profile == "owl":
            if self.pattern is not None:
                raise SparsecraftError(
                    "profile owl: needs an unstructured --sparsity (N:M fixes every layer's sparsity)"
                )
            if not self.owl_m > 0:
                raise SparsecraftError(f"owl_m {self.owl_m}: must be > 0 (the paper uses 5)")
            if not 0 <= self.owl_lambda < 1:
                raise SparsecraftError(
                    f"owl_lambda {self.owl_lambda}: must be in [0, 1) (the paper uses 0.08)"
                )
        if self.magnitude_scope not in ("layer", "row"):
            raise SparsecraftError(f"magnitude_scope {self.magnitude_scope!r}: choose layer or row")
        if self.blocksize < 1:
            raise SparsecraftError(f"blocksize {self.blocksize}: must be >= 1 (SparseGPT uses 128)")
        if not 0 <= self.percdamp <= 10:
            raise SparsecraftError(f"percdamp {self.percdamp}: must be in [0, 10] (default 0.01 = 1%)")
        if self.exact_update and self.method != "sparsegpt":
            raise SparsecraftError(
                f"exact_update re-solves SparseGPT's kept weights; method {self.method!r} has no update"
            )
        if self.refine not in (None, "dsnot"):
            raise SparsecraftError(f"refine {self.refine!r}: the only refinement is dsnot")
        for key in ("nsamples", "seqlen", "batch_size", "error_rows"):
            if int(getattr(self, key)) < 1:
                raise SparsecraftError(f"{key} {getattr(self, key)}: must be >= 1")
        if self.seqlen < 2:
            raise SparsecraftError(f"seqlen {self.seqlen}: must be >= 2")
        if self.inputs_on not in ("cpu", "device", "auto"):
            raise SparsecraftError(f"inputs_on {self.inputs_on!r}: choose cpu, device or auto")
        if self.calib_dtype not in DTYPES:
            raise SparsecraftError(f"calib_dtype {self.calib_dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.offload_dtype is not None and DTYPES.get(self.offload_dtype) is None:
            raise SparsecraftError(
                f"offload_dtype {self.offload_dtype!r}: choose float32, bfloat16 or float16"
            )
        for key in ("targets", "ignore"):
            pats = getattr(self, key)
            if pats is not None:
                if isinstance(pats, str):
                    pats = (pats,)
                pats = tuple(pats)
                for p in pats:
                    try:
                        re.compile(p)
                    except re.error as e:
                        raise SparsecraftError(
                            f"{key} pattern {p!r}: not a regular expression ({e})"
                        ) from None
                setattr(self, key, pats)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.nm[0] / self.nm[1] if self.nm else float(self.sparsity)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dsnot"] = asdict(self.dsnot) if self.refine == "dsnot" else None
        return d

    def recipe_fingerprint(self) -> dict:
        """Fields that change the result (a checkpoint made with other values is refused)."""
        d = self.to_dict()
        for key in ("device", "batch_size", "error_rows", "inputs_on"):
            d.pop(key)
        return d


class DSnoTSolver:
    """Wraps a pruning solver: each layer's mask is refined by DSnoT right after the method made
    it. Without a base solver (``sparsecraft refine``) the mask is the layer's zeros and the dense
    weights come from ``dense_for(name)``."""

    def __init__(self, config: DSnoTConfig, nm: tuple[int, int] | None, base=None, dense_for=None):
        if base is None and dense_for is None:
            raise ValueError("DSnoTSolver needs a base solver or the dense weights")
        self.config, self.nm, self.base, self.dense_for = config, nm, base, dense_for
        self.needs_hessian = bool(getattr(base, "needs_hessian", False))

    def _refine(self, name: str, dense: Tensor, res: SolveResult, stats) -> SolveResult:
        if not self.config.applies_to(name):
            return res
        mask = res.mask if res.mask is not None else res.weight != 0
        t0 = time.perf_counter()
        weight, new_mask = dsnot_refine(dense, res.weight, mask, stats, self.config, self.nm)
        info = {**res.info, "dsnot_swaps": int((new_mask & ~mask).sum()), "dsnot_s": time.perf_counter() - t0}
        return SolveResult(weight, new_mask, info)

    def solve(self, name, layer, weight, stats):
        if self.base is None:
            dense = self.dense_for(name).to(weight.device, torch.float32)
            res = self._refine(name, dense, SolveResult(weight, weight != 0), stats)
            res.reference = dense
            return res
        dense = weight.clone()
        return self._refine(name, dense, _as_result(self.base.solve(name, layer, weight, stats)), stats)

    def solve_group(self, names, layers, weights, stats):
        if self.base is None or not hasattr(self.base, "solve_group"):
            return [self.solve(n, la, w, stats) for n, la, w in zip(names, layers, weights)]
        dense = [w.clone() for w in weights]
        results = [_as_result(r) for r in self.base.solve_group(names, layers, weights, stats)]
        return [self._refine(n, d, r, stats) for n, d, r in zip(names, dense, results)]


def _block_index(name: str, blocks_name: str) -> int:
    rest = name[len(blocks_name) + 1 :] if name.startswith(blocks_name + ".") else ""
    head = rest.split(".", 1)[0]
    return int(head) if head.isdigit() else -1


def check_layers(model: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    """The layers the recipe will prune; N:M on a width not divisible by M is refused up front."""
    layers = prunable_linears(model, config.targets, config.ignore)
    if not layers:
        raise SparsecraftError("no linear layer matches the targets/ignore patterns; nothing to prune")
    if config.nm is not None:
        m = config.nm[1]
        bad = [f"{n} (in={layer_shape(la)[1]})" for n, la in layers.items() if layer_shape(la)[1] % m]
        if bad:
            raise SparsecraftError(
                f"pattern {config.pattern}: input size not divisible by M={m} in {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; exclude them with --ignore or choose another M"
            )
    return layers


def engine_options(
    config: PruneConfig, checkpoint_dir=None, resume=False, progress=True, fingerprint: dict | None = None
) -> EngineOptions:
    return EngineOptions(
        device=config.device,
        forward_dtype=DTYPES[config.calib_dtype],
        batch_size=config.batch_size,
        offload_dtype=DTYPES[config.offload_dtype] if config.offload_dtype else None,
        true_sequential=config.true_sequential,
        targets=config.targets,
        ignore=config.ignore,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        fingerprint=fingerprint,
        error_rows=config.error_rows,
        inputs_on=config.inputs_on,
        bf16_hessian=config.bf16_hessian,
        progress=progress,
    )


def make_solver(config: PruneConfig, target_for):
    if config.method == "magnitude":
        solver = MagnitudeSolver(target_for, config.magnitude_scope)
    elif config.method == "wanda":
        solver = WandaSolver(target_for, config.wanda_variant)
    else:
        solver = SparseGPTSolver(target_for, config.blocksize, config.percdamp, config.exact_update)
    if config.refine == "dsnot":
        solver = DSnoTSolver(config.dsnot, config.nm, base=solver)
    return solver


def _owl_profile(
    model, calibration, config: PruneConfig, checkpoint_dir, resume, progress
) -> tuple[list[float], list[float], float]:
    """Per-block sparsities (and the outlier ratios) from a dense statistics walk; cached in the
    checkpoint directory so that a resumed run reuses them."""
    cache = Path(checkpoint_dir) / "owl.json" if checkpoint_dir else None
    if cache is not None and resume and cache.exists():
        saved = json.loads(cache.read_text())
        return saved["sparsities"], saved["ratios"], 0.0
    t0 = time.perf_counter()
    outlier = OutlierSolver(config.owl_m)
    run_sequential(model, calibration, outlier, engine_options(config, progress=progress))
    ratios = [outlier.ratios[i] for i in sorted(outlier.ratios)]
    sparsities = owl_sparsities(ratios, float(config.sparsity), config.owl_lambda)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sparsities": sparsities, "ratios": ratios}))
        os.replace(tmp, cache)
    return sparsities, ratios, time.perf_counter() - t0


def prune(
    model: nn.Module,
    tokenizer,
    config: PruneConfig,
    calibration: Tensor | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    model_name: str | None = None,
) -> dict:
    """Prune ``model`` in place following ``config``; returns the report (JSON-serialisable).

    ``calibration``: LongTensor (nsamples, seqlen) of token ids; by default the windows of
    ``config.calib`` made with ``tokenizer``. ``False`` prunes magnitude without any data (no
    forward passes; the reconstruction errors are then not measured).
    """
    t_start = time.perf_counter()
    if calibration is False:
        return _prune_data_free(model, config, model_name, t_start)
    if calibration is None:
        from ..data import calibration_windows

        calibration = calibration_windows(
            tokenizer, config.calib, config.nsamples, config.seqlen, config.seed
        )
    if not isinstance(calibration, Tensor) or calibration.dim() != 2:
        raise SparsecraftError("calibration: expected a LongTensor of shape (nsamples, seqlen)")
    check_layers(model, config)
    blocks_name, blocks = decoder_blocks(model)
    fingerprint = {
        "recipe": config.recipe_fingerprint(),
        "model": model_name or type(model).__name__,
        "calibration": int(calibration.sum()) if calibration.numel() else 0,
        "shape": list(calibration.shape),
    }

    block_sparsity: list[float] | None = None
    owl_info = None
    owl_s = 0.0
    if config.profile == "owl":
        block_sparsity, ratios, owl_s = _owl_profile(
            model, calibration, config, checkpoint_dir, resume, progress
        )
        owl_info = {
            "m": config.owl_m,
            "lambda": config.owl_lambda,
            "outlier_ratios": ratios,
            "block_sparsity": block_sparsity,
        }
        log.info("OWL block sparsities: %s", " ".join(f"{s:.3f}" for s in block_sparsity))

    nm = config.nm

    def target_for(name: str) -> LayerTarget:
        if nm is not None:
            return LayerTarget(nm=nm)
        if block_sparsity is not None:
            b = _block_index(name, blocks_name)
            if 0 <= b < len(block_sparsity):
                return LayerTarget(block_sparsity[b])
        return LayerTarget(float(config.sparsity))

    solver = make_solver(config, target_for)
    opts = engine_options(config, checkpoint_dir, resume, progress, fingerprint)
    rep = run_sequential(model, calibration, solver, opts)
    return build_report(config, rep, model_name, calibration, owl_info, owl_s, time.perf_counter() - t_start)


@torch.no_grad()
def _prune_data_free(model, config: PruneConfig, model_name, t_start: float) -> dict:
    from ..models.discovery import weight_matrix
    from .engine import EngineReport, LayerRecord, _peak_host_mib

    if config.method != "magnitude" or config.profile != "uniform" or config.refine:
        raise SparsecraftError(
            f"method {config.method} (profile {config.profile}, refine {config.refine}) "
            "needs calibration data; only uniform magnitude pruning runs without it"
        )
    layers = check_layers(model, config)
    target = LayerTarget(config.sparsity or 0.0, config.nm)
    solver = MagnitudeSolver(lambda name: target, config.magnitude_scope)
    rep = EngineReport(blocks=len(decoder_blocks(model)[1]), device="cpu", forward_dtype="none")
    for name, layer in layers.items():
        t0 = time.perf_counter()
        w = weight_matrix(layer)
        res = solver.solve(name, layer, w.float(), None)
        w.copy_(res.weight.to(w.dtype))
        dt = time.perf_counter() - t0
        rep.solve_s += dt
        rep.layers.append(
            LayerRecord(
                name, tuple(w.shape), float((w == 0).float().mean()), float("nan"), "none", dt, res.info
            )
        )
    rep.total_s = rep.solve_s
    rep.peak_host_mib = _peak_host_mib()
    return build_report(
        config, rep, model_name, torch.zeros(0, 0, dtype=torch.long), None, 0.0, time.perf_counter() - t_start
    )


def build_report(
    config: PruneConfig,
    rep,
    model_name,
    calibration: Tensor,
    owl_info,
    owl_s: float,
    wall_s: float,
    kind: str = "prune",
) -> dict:
    layers = []
    total_w = total_zero = 0
    for r in rep.layers:
        numel = r.shape[0] * r.shape[1]
        total_w += numel
        total_zero += round(r.sparsity * numel)
        layers.append(
            {
                "name": r.name,
                "shape": list(r.shape),
                "sparsity": r.sparsity,
                "target": r.info.get("target"),
                "rel_error": r.rel_error,
                "error_measure": r.error_measure,
                "solve_s": r.solve_s,
                **{k: v for k, v in r.info.items() if k != "target"},
            }
        )
    errors = [r.rel_error for r in rep.layers if r.rel_error == r.rel_error]  # NaN: not measured
    return {
        "kind": kind,
        "model": model_name,
        "recipe": config.to_dict(),
        "calibration": (
            {
                "source": config.calib,
                "nsamples": int(calibration.shape[0]),
                "seqlen": int(calibration.shape[1]),
                "seed": config.seed,
            }
            if calibration.numel()
            else None
        ),
        "summary": {
            "layers": len(layers),
            "sparsity": total_zero / max(total_w, 1),
            "target_sparsity": config.target_sparsity,
            "mean_rel_error": sum(errors) / len(errors) if errors else None,
            "max_rel_error": max(errors) if errors else None,
        },
        "owl": owl_info,
        "timing": {
            "forward_s": rep.forward_s,
            "statistics_s": rep.statistics_s,
            "solve_s": rep.solve_s,
            "checkpoint_s": rep.checkpoint_s,
            "error_s": rep.error_s,
            "owl_profile_s": owl_s,
            "engine_s": rep.total_s,
            "total_s": wall_s,
        },
        "memory": {"peak_host_mib": rep.peak_host_mib, "peak_device_mib": rep.peak_device_mib},
        "device": rep.device,
        "forward_dtype": rep.forward_dtype,
        "resumed_from_block": rep.resumed_from_block,
        "layers": layers,
    }


def refine_model(
    sparse_model: nn.Module,
    dense_model: nn.Module,
    calibration: Tensor,
    dsnot: DSnoTConfig,
    nm: tuple[int, int] | None = None,
    config: PruneConfig | None = None,
    *,
    checkpoint_dir=None,
    resume: bool = False,
    progress: bool = True,
    model_name: str | None = None,
) -> dict:
    """DSnoT on an already pruned model: each layer's mask is its zeros, grown weights take the
    dense model's values; statistics come from the refined earlier blocks (sequential walk)."""
    t_start = time.perf_counter()
    dense_layers = prunable_linears(dense_model)
    sparse_layers = prunable_linears(sparse_model)
    if set(dense_layers) != set(sparse_layers):
        raise SparsecraftError(
            "--dense: the dense model's layers do not match the sparse model's (another architecture?)"
        )
    for name, layer in sparse_layers.items():
        if layer_shape(layer) != layer_shape(dense_layers[name]):
            raise SparsecraftError(
                f"--dense: {name} has shape {layer_shape(dense_layers[name])} in the dense "
                f"model but {layer_shape(layer)} in the sparse one"
            )
    from ..models.discovery import weight_matrix

    def dense_for(name: str) -> Tensor:
        return weight_matrix(dense_layers[name])

    cfg = config or PruneConfig(method="magnitude", sparsity=0.0, refine="dsnot", dsnot=dsnot)
    solver = DSnoTSolver(dsnot, nm, base=None, dense_for=dense_for)
    fingerprint = {
        "refine": asdict(dsnot),
        "nm": nm,
        "calibration": int(calibration.sum()),
        "shape": list(calibration.shape),
        "model": model_name,
    }
    rep = run_sequential(
        sparse_model, calibration, solver, engine_options(cfg, checkpoint_dir, resume, progress, fingerprint)
    )
    report = build_report(
        cfg, rep, model_name, calibration, None, 0.0, time.perf_counter() - t_start, kind="refine"
    )
    report["recipe"] = {
        "method": "dsnot",
        "dsnot": asdict(dsnot),
        "pattern": f"{nm[0]}:{nm[1]}" if nm else None,
        "calib": cfg.calib,
        "nsamples": cfg.nsamples,
        "seqlen": cfg.seqlen,
        "seed": cfg.seed,
        "calib_dtype": cfg.calib_dtype,
    }
    report["summary"]["target_sparsity"] = None
    return report
