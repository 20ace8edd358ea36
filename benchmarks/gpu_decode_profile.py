"""Where one compiled decode step's GPU time goes: the kernels of a replayed step, dense and sparse.

The models are built as ``sparsecraft bench --device cuda`` builds them (``kernels.triton.bench.
build_models``: random or real weights, magnitude-pruned, siblings fused for dense and sparse
alike). Each runs ``runtime.static_greedy`` (compiled step, one CUDA graph per step) twice under
``torch.profiler``, with ``--short`` and ``--long`` new tokens; the difference of the two profiles'
kernel totals over the difference in steps is what one replayed step runs (prefill, warm-up steps
and compilation cancel out). Printed per model: the step time, the kernels per step and their summed
duration, and the kernels that take most of it, grouped as linears (our kernels or cuBLAS) and the rest.

    PYTHONPATH=src python benchmarks/gpu_decode_profile.py --magnitude 0.7 --formats bitmask-fp16
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

from sparsecraft.cli.bench import parse_format
from sparsecraft.kernels.triton.bench import build_models
from sparsecraft.runtime import static_greedy

OURS = ("mma24_kernel", "sliced_", "_move_out_kernel", "_fragment_x_kernel", "sparse_mm_kernel")  # ours
CUBLAS = ("gemv", "gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")  # cuBLAS's products (dense)


def kernel_totals(model, prompt, new_tokens: int) -> tuple[dict, float]:
    """{kernel name: (launches, microseconds)} over a whole ``static_greedy`` call, and its step time."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        _, seconds = static_greedy(model, prompt, new_tokens, compile=True)
        torch.cuda.synchronize()
    tot = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            tot[e.name][0] += 1
            tot[e.name][1] += e.time_range.elapsed_us()
    return dict(tot), seconds


def kind(name: str) -> str:
    low = name.lower()
    if any(k in low for k in OURS):
        return "ours"
    if any(k in low for k in CUBLAS):
        return "cuBLAS"
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama-7b")
    ap.add_argument("--magnitude", default="0.7")
    ap.add_argument("--formats", nargs="+", default=["bitmask-fp16"])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=40)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    build_args = argparse.Namespace(model=args.model, magnitude=args.magnitude, nm="2:4", group_size=128,
                                    no_fuse=False, no_dense=False)
    models, _ = build_models(build_args, [parse_format(f) for f in args.formats], torch.device("cuda"))
    vocab = int(getattr(next(iter(models.values())).config, "vocab_size", 32000))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab - 1, (1, args.prompt_len), generator=gen).cuda()
    print(f"{args.model}, magnitude {args.magnitude}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    print(f"per replayed step: profiles of {args.long} and {args.short} new tokens, differenced")
    report = {"command": " ".join(sys.argv), "models": {}}
    for name, model in models.items():
        short, _ = kernel_totals(model, prompt, args.short)
        long, seconds = kernel_totals(model, prompt, args.long)
        steps = args.long - args.short
        per = {}
        for k in long:
            n = (long[k][0] - short.get(k, (0, 0.0))[0]) / steps
            us = (long[k][1] - short.get(k, (0, 0.0))[1]) / steps
            if n > 0.5:
                per[k] = (n, us)
        by_kind = collections.defaultdict(lambda: [0.0, 0.0])
        for k, (n, us) in per.items():
            by_kind[kind(k)][0] += n
            by_kind[kind(k)][1] += us
        total_n = sum(n for n, _ in per.values())
        total_us = sum(us for _, us in per.values())
        print(f"\n{name}: step {seconds * 1e3:.3f} ms; {total_n:.0f} kernels per step, "
              f"summed {total_us:.0f} us")
        for kd, (n, us) in sorted(by_kind.items(), key=lambda t: -t[1][1]):
            print(f"  {kd:7s} {n:6.0f} kernels  {us:8.1f} us  ({us / n:.2f} us each)")
        for k, (n, us) in sorted(per.items(), key=lambda t: -t[1][1])[: args.top]:
            print(f"    {us:8.1f} us  {n:5.0f}x  {us / n:6.2f} us  [{kind(k)}] {k[:110]}")
        report["models"][name] = {"step_ms": seconds * 1e3, "kernels": {k: list(v) for k, v in per.items()}}
    with open(os.path.join(args.out, "gpu_decode_profile.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
