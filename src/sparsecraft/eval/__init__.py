"""Evaluation: perplexity, zero-shot tasks (lm-eval scoring rules), GSM8K, and the suite over them."""

from .perplexity import perplexity, window_nll

__all__ = ["perplexity", "window_nll", "evaluate_tasks", "evaluate_gsm8k", "run_eval"]

_LAZY = {"evaluate_tasks": ".tasks", "evaluate_gsm8k": ".gsm8k", "run_eval": ".suite"}


def __getattr__(name):  # the task modules load their data files: import them on first use
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
