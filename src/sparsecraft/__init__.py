"""sparsecraft: make LLMs sparse without losing accuracy, then run them faster.

The Python API mirrors the CLI, one call per stage::

    import sparsecraft as sc
    model, tok = sc.load("smollm2-135m")
    sc.perplexity(model, tok, "wikitext2", seqlen=512, max_windows=40)
"""

from importlib import import_module

__version__ = "0.1.0"

# name -> module that defines it; imported on first use so `import sparsecraft` stays light.
_API = {
    "load": "sparsecraft.models",
    "save": "sparsecraft.models",
    "perplexity": "sparsecraft.eval",
    "calibration_windows": "sparsecraft.data",
    "eval_windows": "sparsecraft.data",
    "prune": "sparsecraft.prune",
    "PruneConfig": "sparsecraft.prune",
    "SparsecraftError": "sparsecraft.errors",
}


def __getattr__(name):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'sparsecraft' has no attribute {name!r}")


__all__ = sorted(_API)
