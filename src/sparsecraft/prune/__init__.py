"""One-shot pruning (magnitude, Wanda, SparseGPT with an optional exact least-squares update;
unstructured, N:M, OWL) and DSnoT refinement,
driven by the sequential engine (:mod:`sparsecraft.prune.engine`)."""

from .api import PruneConfig, prune, refine_model
from .engine import EngineOptions, EngineReport, LayerSolver, SolveResult, run_sequential
from .stats import LayerStats

__all__ = [
    "EngineOptions",
    "EngineReport",
    "LayerSolver",
    "LayerStats",
    "PruneConfig",
    "SolveResult",
    "prune",
    "refine_model",
    "run_sequential",
]
