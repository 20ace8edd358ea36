"""Perplexity over the standard evaluation windows (SparseGPT/Wanda protocol)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import eval_windows
from ..errors import SparsecraftError


def model_context(model) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def window_nll(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
               desc: str = "perplexity") -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens over (n, L) windows."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    batches = range(0, windows.shape[0], batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
            ids = windows[start : start + batch_size].to(device)
            logits = model(ids, use_cache=False).logits[:, :-1]
            targets = ids[:, 1:]
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                  reduction="sum")
            total_nll += nll.item()
            total_tokens += targets.numel()
    return total_nll, total_tokens


def perplexity(model, tokenizer, source: str = "wikitext2", seqlen: int = 512,
               max_windows: int | None = 40, batch_size: int = 4, progress: bool = True) -> float:
    """Token-weighted perplexity exp(Σ NLL / Σ tokens) over non-overlapping windows."""
    context = model_context(model)
    if context is not None and seqlen > context:
        raise SparsecraftError(f"seqlen {seqlen}: above the model's context of {context} tokens")
    windows = eval_windows(tokenizer, source, seqlen, max_windows)
    nll, tokens = window_nll(model, windows, batch_size, progress, desc=f"ppl {source}")
    ppl = math.exp(nll / tokens)
    if not math.isfinite(ppl):
        raise SparsecraftError(f"perplexity on {source} is not finite: the model produces NaN/Inf")
    return ppl
