"""Evaluation: perplexity, zero-shot tasks, GSM8K."""

from .perplexity import perplexity, window_nll

__all__ = ["perplexity", "window_nll"]
