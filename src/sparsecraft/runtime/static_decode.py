"""Greedy decoding with a static KV cache and, on a GPU, every decode step replayed from one CUDA graph.

``generate`` in eager mode launches a few thousand small kernels per token of a 7B model and waits
on the host between them, so on a GPU it measures Python, not weight streaming. This is gpt-fast's
recipe on an unchanged Hugging Face model: transformers' ``StaticCache`` and attention code, a
prepared 4-D boolean mask (so transformers builds none, which would read GPU values on the host),
and one decode step (forward, argmax, cache position and mask update) captured once as a CUDA graph
and replayed per token. Dense and sparse models run through exactly the same code, so the ratio of
their tokens/s is the ratio of their forward passes. On the CPU the same step runs eagerly (tests).

``compile=True`` runs the decode step's forward through ``torch.compile`` (Inductor) before the graph
is captured: the norms, rotary embedding, residual adds and cache updates of a block become a few
fused kernels instead of dozens (at batch 1 each small kernel costs about as much as a whole small
layer's weights). sparsecraft's GPU kernels are custom ops, opaque to the compiler, so dense and
sparse models get the same compiled code around their linears.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..errors import SparsecraftError


def _masks(config, batch: int, rows: torch.Tensor, length: int):
    """(batch, 1, len(rows), length) bool masks: the query at position ``rows[i]`` sees keys
    0..rows[i]. Models with per-layer attention types take a dict by type, as their forward does
    (sliding windows never bind here: :func:`static_greedy` refuses windows shorter than the cache)."""
    keys = torch.arange(length, device=rows.device)[None, :]
    mask = (keys <= rows[:, None]).expand(batch, 1, rows.numel(), length)
    if getattr(config, "layer_types", None):
        return {kind: mask for kind in set(config.layer_types)}
    return mask


@torch.inference_mode()
def static_greedy(
    model: nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    cuda_graph: bool | None = None,
    compile: bool = False,
) -> tuple[torch.Tensor, float]:
    """Greedy continuation (batch, new_tokens) of ``prompt`` (batch, P) and the mean seconds of one
    decode step (the first new token comes from the prefill; on a GPU the two warm-up steps, which
    also compile, and the capture are not timed). ``cuda_graph`` defaults to ``prompt.is_cuda``;
    ``compile``: decode steps through ``torch.compile`` (the prefill stays eager)."""
    from transformers import StaticCache

    if new_tokens < 1:
        raise SparsecraftError(f"new_tokens must be >= 1, got {new_tokens}")
    window = getattr(model.config, "sliding_window", None)
    if window and window < prompt.shape[1] + new_tokens:
        raise SparsecraftError(
            f"static decoding covers full attention only; this model's sliding window ({window}) is "
            f"shorter than prompt + new tokens ({prompt.shape[1] + new_tokens}): use generate"
        )
    cuda_graph = prompt.is_cuda if cuda_graph is None else cuda_graph
    batch, plen = prompt.shape
    length = plen + new_tokens
    dev = prompt.device
    cache = StaticCache(config=model.config, max_cache_len=length)

    def forward(ids, positions, mask):  # positions: 1-D cache positions of ids' columns
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions[None].expand(batch, -1),
            cache_position=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].argmax(-1)

    positions = torch.arange(plen, device=dev)
    first = forward(prompt, positions, _masks(model.config, batch, positions, length))
    # one decode shape: compiled once, without dynamic shapes
    decode = torch.compile(forward, dynamic=False) if compile else forward
    tokens = torch.zeros(batch, new_tokens, dtype=torch.long, device=dev)
    tokens[:, 0] = first
    token = first[:, None].clone()  # the step's input, updated in place by the step itself
    pos = torch.full((1,), plen, dtype=torch.long, device=dev)

    def step():
        nxt = decode(token, pos, _masks(model.config, batch, pos, length))
        tokens.index_copy_(1, pos - (plen - 1), nxt[:, None])
        token.copy_(nxt[:, None])
        pos.add_(1)

    steps = new_tokens - 1
    if steps == 0:
        return tokens, 0.0
    # every call compiles afresh (a new cache, a new closure); a benchmark makes many such calls
    with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096):
        return _run_steps(step, steps, cuda_graph, dev, tokens, compile)


def _run_steps(step, steps: int, cuda_graph: bool, dev, tokens, compile: bool):
    if not cuda_graph:
        warm = 1 if compile and steps > 1 else 0  # the step that compiles is not timed
        for _ in range(warm):
            step()
        start = time.perf_counter()
        for _ in range(steps - warm):
            step()
        return tokens, (time.perf_counter() - start) / (steps - warm)

    # The first decode steps run eagerly on a side stream (Triton compiles, cuBLAS picks its
    # algorithms); they are real steps: some transformers versions keep their own cache-position
    # counter on the device, so a step cannot be undone and replayed.
    warm = min(2, steps - 1)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(warm):
            step()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # recorded, not run
    torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(steps - warm):
        graph.replay()
    torch.cuda.synchronize(dev)
    return tokens, (time.perf_counter() - start) / (steps - warm)
