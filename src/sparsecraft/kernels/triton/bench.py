"""The ``cuda`` runner of ``sparsecraft bench``: decode tokens/s on a GPU, dense vs sparse formats.

Same arguments and result rows as the CPU runner in :mod:`sparsecraft.cli.bench`: the model
(optionally magnitude-pruned) runs in float16 on the device once densely (``F.linear`` / cuBLAS)
and once per format through ``SparseLinear``, whose CUDA path calls the Triton kernels (weights
prepared once by :func:`.dispatch.prepare_model`). Every model is timed twice, through the
same attention and KV-cache code each time:

* ``generate`` (eager, dynamic cache; ``runtime.decode_speed``, interleaved medians). On a GPU this
  mostly measures the host launching kernels, so dense and sparse come out alike;
* ``runtime.static_greedy``: static cache, one decode step replayed from a CUDA graph per token
  (``graph_*`` keys, interleaved medians): the time of the forward pass itself.

The model is built on the device in float16 (float32 value formats are stored as float16 there),
magnitude-pruned there once, and each format converts a copy of that pruned model. Unless
``--no-fuse``, q/k/v and gate/up are one product each (``runtime.fuse``) in every model, the
dense one included (``fuse_siblings(dense=True)``): all make the same number of products. Per-layer rows
are left empty on the GPU (``benchmarks/gpu_kernels.py`` times the layers).
"""

from __future__ import annotations

import copy
import gc
import statistics

import torch

from ...errors import SparsecraftError
from . import available


def _copy_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth, bytes read + written (the GPU's practical ceiling)."""
    n = 512 * 2**20
    src = torch.ones(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        dst.copy_(src)
    b.record()
    b.synchronize()
    return 10 * 2 * n * 2 / (a.elapsed_time(b) * 1e-3) / 1e9


def graph_speed(models: dict, prompt: torch.Tensor, new_tokens: int, repeats: int,
                compile: bool = False) -> dict[str, dict]:
    """Decode tokens/s of each model through ``static_greedy`` (CUDA graph on a GPU; ``compile``:
    torch.compile'd steps), medians of ``repeats`` interleaved runs, and whether its tokens equal
    ``generate``'s for the same model."""
    from ...runtime import static_greedy
    from ...runtime.measure import _generate

    seconds = {name: [] for name in models}
    same = {}
    for r in range(repeats):
        for name, model in models.items():
            tokens, s = static_greedy(model, prompt, new_tokens, compile=compile)
            seconds[name].append(s)
            if r == 0:
                reference = _generate(model, prompt, new_tokens)[:, prompt.shape[1] :]
                same[name] = bool(torch.equal(tokens, reference))
    return {
        name: {
            "graph_tokens_per_s": round(prompt.shape[0] / max(statistics.median(t), 1e-12), 2),
            "graph_ms_per_step": round(statistics.median(t) * 1e3, 3),
            "graph_tokens_equal_generate": same[name],
        }
        for name, t in seconds.items()
    }


def build_models(args, specs, dev: torch.device) -> tuple[dict, dict]:
    """The models ``sparsecraft bench`` compares, on ``dev``: the pruned dense model (fused siblings
    unless ``args.no_fuse``; left out with ``args.no_dense``) and one converted copy per format spec,
    prepared for the GPU kernels; and each one's memory figures."""
    from ...cli.bench import _magnitude, parse_nm
    from ...runtime import convert, weight_bytes
    from ...runtime.fuse import fuse_siblings
    from .dispatch import prepare_model

    on_gpu = dev.type == "cuda"
    n, m = parse_nm(args.nm)
    dtype = torch.float16 if on_gpu else torch.float32
    models, memory = {}, {}

    def pruned_dense():
        from ...models import load

        model, _ = load(args.model, dtype=dtype, device=dev)  # compressed dirs are decompressed
        _magnitude(model, args.magnitude)
        return model.eval()

    def add(name, build):
        gc.collect()
        before = 0
        if on_gpu:
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(dev)
        model = build()
        kernel_layers = prepare_model(model, dev) if on_gpu else 0
        wb = weight_bytes(model)
        memory[name] = {
            "resident_mb": round((torch.cuda.memory_allocated(dev) - before) / 2**20, 1) if on_gpu else 0.0,
            "weight_mb": round(wb["weight_bytes"] / 1e6, 2),
            "linear_weight_mb": round(wb["linear_bytes"] / 1e6, 2),
            "kernel_layers": kernel_layers,
        }
        models[name] = model

    add("dense (torch)", pruned_dense)  # every format converts a copy of this pruned model
    dense = models["dense (torch)"]
    for spec in specs:
        kw = spec.convert_kwargs(n, m, args.group_size) | {"fuse": not args.no_fuse}
        if spec.values == "fp32" and on_gpu:
            kw["dtype"] = torch.float16
        add(spec.text, lambda kw=kw: convert(copy.deepcopy(dense), **kw).to(dev, dtype))
    if args.no_dense:
        del models["dense (torch)"], memory["dense (torch)"], dense
    elif not args.no_fuse:  # the dense baseline makes as many products per block as the sparse models
        fuse_siblings(dense, dense=True)
    return models, memory


def run_cuda(args, specs, device: str | None = None) -> dict:
    """``device`` overrides ``args.device`` (tests run the plumbing on the CPU)."""
    from ...runtime import decode_speed

    dev = torch.device(device or args.device)
    on_gpu = dev.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SparsecraftError(f"--device {args.device}: no CUDA device is visible here; use --device cpu")
    if on_gpu and not available():
        raise SparsecraftError(f"--device {args.device}: needs triton (pip install 'sparsecraft[gpu]')")
    models, memory = build_models(args, specs, dev)
    vocab = int(getattr(next(iter(models.values())).config, "vocab_size", 32000))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, max(vocab - 1, 1), (args.batch, args.prompt_len), generator=gen).to(dev)
    speed = decode_speed(models, prompt, args.new_tokens, repeats=args.repeats)
    graph = graph_speed(models, prompt, args.new_tokens, args.repeats, compile=args.compile)
    base_name = "dense (torch)" if "dense (torch)" in speed else None
    variants = {}
    for name in models:
        row = {**speed[name], **graph[name], **memory[name], "layers": {}}
        if base_name:
            row["speedup_vs_dense"] = round(speed[name]["tokens_per_s"] / speed[base_name]["tokens_per_s"], 3)
            row["graph_speedup_vs_dense"] = round(
                graph[name]["graph_tokens_per_s"] / graph[base_name]["graph_tokens_per_s"], 3
            )
        variants[name] = row
    copy_gbs = _copy_gbs(dev) if on_gpu else float("nan")
    return {
        "model": args.model,
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if on_gpu else ""),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "magnitude": args.magnitude,
        "compiled": bool(args.compile),
        "fused": not args.no_fuse,
        # the CPU runner's STREAM columns; on the GPU: half the copy rate (read only) and the copy rate
        "stream_read_gbs": round(copy_gbs / 2, 1),
        "stream_copy_gbs": round(copy_gbs, 1),
        "variants": variants,
    }
