"""Weight-only int8/int4 quantization that keeps every zero a zero (RTN and GPTQ-style, optionally
after activation-aware scaling)."""

from ..formats.qinfo import QuantInfo, QuantizedWeight
from .api import GPTQSolver, quantize_model
from .awq import awq_scale_model
from .gptq import gptq_quantize
from .rtn import QuantConfig, fit_params, rtn_quantize

__all__ = [
    "GPTQSolver",
    "QuantConfig",
    "QuantInfo",
    "QuantizedWeight",
    "awq_scale_model",
    "fit_params",
    "gptq_quantize",
    "quantize_model",
    "rtn_quantize",
]
