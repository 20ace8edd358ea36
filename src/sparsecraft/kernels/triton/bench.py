"""The ``cuda`` runner of ``sparsecraft bench``: decode tokens/s on a GPU, dense vs sparse formats.

Same arguments and result rows as the CPU runner in :mod:`sparsecraft.cli.bench`: the model
(optionally magnitude-pruned) runs in float16 on the device once densely (``F.linear`` / cuBLAS)
and once per format through ``SparseLinear``, whose CUDA path calls the Triton kernels (weights
prepared once by :func:`.dispatch.prepare_model`). Both go through the same ``generate`` call,
attention and KV cache. Tokens/s come from ``runtime.decode_speed`` (interleaved, medians);
``generate`` synchronises every step, so wall-clock timing is valid on the GPU. Float32 value
formats are stored as float16 here (the GPU model runs in float16).

Not measured in the session that wrote it (its device time was spent on the kernel benchmark);
per-layer rows are left empty on the GPU (``benchmarks/gpu_kernels.py`` times the layers).
"""

from __future__ import annotations

import gc

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


def run_cuda(args, specs, device: str | None = None) -> dict:
    """``device`` overrides ``args.device`` (tests run the plumbing on the CPU)."""
    from ...cli.bench import _load, _magnitude, parse_nm
    from ...runtime import convert, decode_speed, weight_bytes
    from .dispatch import prepare_model

    dev = torch.device(device or args.device)
    on_gpu = dev.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SparsecraftError(f"--device {args.device}: no CUDA device is visible here; use --device cpu")
    if on_gpu and not available():
        raise SparsecraftError(f"--device {args.device}: needs triton (pip install 'sparsecraft[gpu]')")
    n, m = parse_nm(args.nm)
    dtype = torch.float16 if on_gpu else torch.float32
    models, memory = {}, {}

    def base():
        model, _ = _load(args.model)
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

    if not args.no_dense:
        add("dense (torch)", lambda: base().to(dev, dtype))
    for spec in specs:
        kw = spec.convert_kwargs(n, m, args.group_size)
        if spec.values == "fp32" and on_gpu:
            kw["dtype"] = torch.float16
        add(spec.text, lambda kw=kw: convert(base(), **kw).to(dev, dtype))
    vocab = int(getattr(next(iter(models.values())).config, "vocab_size", 32000))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, max(vocab - 1, 1), (args.batch, args.prompt_len), generator=gen).to(dev)
    speed = decode_speed(models, prompt, args.new_tokens, repeats=args.repeats)
    base_name = "dense (torch)" if "dense (torch)" in speed else None
    variants = {}
    for name in models:
        row = {**speed[name], **memory[name], "layers": {}}
        if base_name:
            row["speedup_vs_dense"] = round(speed[name]["tokens_per_s"] / speed[base_name]["tokens_per_s"], 3)
        variants[name] = row
    copy = _copy_gbs(dev) if on_gpu else float("nan")
    return {
        "model": args.model,
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if on_gpu else ""),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "magnitude": args.magnitude,
        # the CPU runner's STREAM columns; on the GPU: half the copy rate (read only) and the copy rate
        "stream_read_gbs": round(copy / 2, 1),
        "stream_copy_gbs": round(copy, 1),
        "variants": variants,
    }
