"""Bundled and user text sources, and the token windows for calibration, training and evaluation."""

from .sources import (
    BUNDLED,
    EVAL_ONLY,
    NAMED,
    calibration_windows,
    eval_windows,
    load_text,
    tokenize,
)

__all__ = ["BUNDLED", "EVAL_ONLY", "NAMED", "calibration_windows", "eval_windows", "load_text", "tokenize"]
