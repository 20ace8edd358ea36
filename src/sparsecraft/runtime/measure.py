"""Decode speed, greedy identity and memory of models run through transformers' ``generate``.

Everything goes through ``model.generate`` unchanged (KV cache on, greedy); timings of several
models are interleaved, one ``generate`` each in turn, so background load affects them alike, and
reported as medians.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

from ..models.discovery import is_linear, weight_matrix
from .linear import SparseLinear


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=getattr(model.generation_config, "eos_token_id", None) or 0,
        )


def greedy_tokens(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The ``new_tokens`` greedy continuation of ``prompt`` (1, L) as a 1-D tensor."""
    return _generate(model, prompt, new_tokens)[0, prompt.shape[1] :]


def greedy_identity(
    reference: nn.Module, model: nn.Module, prompt: torch.Tensor, new_tokens: int = 64
) -> dict:
    """Compare greedy continuations token by token; first_mismatch is None when identical."""
    a = greedy_tokens(reference, prompt, new_tokens)
    b = greedy_tokens(model, prompt, new_tokens)
    diff = (a != b).nonzero()
    first = int(diff[0]) if diff.numel() else None
    return {"identical": first is None, "first_mismatch": first, "tokens_compared": int(a.numel())}


def decode_speed(
    models: dict[str, nn.Module],
    prompt: torch.Tensor,
    new_tokens: int,
    repeats: int = 5,
    warmup: int = 1,
    torch_threads: dict[str, int] | None = None,
) -> dict[str, dict]:
    """Decode tokens/s of each model: (new_tokens - 1) / (t(generate N) - t(generate 1)), i.e. the
    prefill and first token excluded; medians over ``repeats`` interleaved runs. ``torch_threads``
    optionally sets torch's intra-op threads per model while it runs (the sparse kernels keep
    their own thread count)."""
    torch_threads = torch_threads or {}
    default_threads = torch.get_num_threads()

    def threads_for(name):
        torch.set_num_threads(torch_threads.get(name, default_threads))

    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 to separate decode from prefill")
    full: dict[str, list[float]] = defaultdict(list)
    first: dict[str, list[float]] = defaultdict(list)
    for _ in range(warmup):
        for name, m in models.items():
            threads_for(name)
            _generate(m, prompt, 4)
    for _ in range(repeats):
        for name, m in models.items():
            threads_for(name)
            t = time.perf_counter()
            _generate(m, prompt, 1)
            first[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            _generate(m, prompt, new_tokens)
            full[name].append(time.perf_counter() - t)
    torch.set_num_threads(default_threads)
    out = {}
    for name in models:
        t1, tn = statistics.median(first[name]), statistics.median(full[name])
        per_tok = max(tn - t1, 1e-9) / (new_tokens - 1)
        out[name] = {
            "tokens_per_s": round(1.0 / per_tok, 2),
            "ms_per_token": round(per_tok * 1e3, 3),
            "prefill_ms": round(t1 * 1e3, 2),
            "generate_s_median": round(tn, 3),
            "repeats": repeats,
            "torch_threads": torch_threads.get(name, default_threads),
        }
    return out


def weight_bytes(model: nn.Module) -> dict:
    """Bytes the model's weights occupy: all parameters/buffers (each storage once) + compressed
    tensors of SparseLinear layers; ``linear_bytes`` only the linears a decode step reads in full."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    linear = 0
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            nb = mod.weight_bytes()
            total += mod.weight_compressed.nbytes()
            linear += nb
        elif is_linear(mod):
            w = weight_matrix(mod)
            linear += w.numel() * w.element_size()
    return {"weight_bytes": total, "linear_bytes": linear}


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def collect() -> None:
    gc.collect()


@contextmanager
def layer_timer(model: nn.Module):
    """Time every linear layer's forward (dense nn.Linear or SparseLinear) while inside the block;
    yields a dict name -> list of seconds per call."""
    times: dict[str, list[float]] = defaultdict(list)
    handles = []
    starts: dict[str, float] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear) or is_linear(mod):

            def pre(_m, _i, name=name):
                starts[name] = time.perf_counter()

            def post(_m, _i, _o, name=name):
                times[name].append(time.perf_counter() - starts[name])

            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post))
    try:
        yield times
    finally:
        for h in handles:
            h.remove()


def layer_bytes(mod: nn.Module) -> int:
    if isinstance(mod, SparseLinear):
        return mod.weight_bytes()
    w = weight_matrix(mod)
    b = getattr(mod, "bias", None)
    return w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
