"""One layer shape through the dispatcher (``sparse_linear``, batch 1), over and over, for Nsight Compute.

Four copies of a random weight of format FMT (``gpu_kernels.py``'s formats: nm24, nm24_int4, bitmask_50,
bitmask_70), each multiplied 8 times; profile one launch from the middle, e.g. (session 16):

    PYTHONPATH=src ncu -k regex:"mma24_kernel|sliced_gemv_kernel" --launch-skip 16 --launch-count 1 \\
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \\
        --section SchedulerStats --section MemoryWorkloadAnalysis \\
        python3 benchmarks/gpu_layer_profile.py nm24_int4 4096 4096

    python benchmarks/gpu_layer_profile.py FMT OUT IN [DEVICE]   # DEVICE cpu: under TRITON_INTERPRET=1
"""

from __future__ import annotations

import sys

import torch
from gpu_kernels import make_compressed

from sparsecraft.kernels.triton.dispatch import prepare_weight, sparse_linear


def main(argv: list[str]) -> int:
    fmt, out_f, in_f = argv[0], int(argv[1]), int(argv[2])
    dev = argv[3] if len(argv) > 3 else "cuda"
    weights = [prepare_weight(make_compressed(fmt, out_f, in_f, seed=i), dev) for i in range(4)]
    x = torch.randn(1, in_f, device=dev).half()
    for _ in range(8):
        for w in weights:
            y = sparse_linear(x, w)
    print(f"{fmt} ({out_f}, {in_f}) on {dev}: 32 products, mean |y| {float(y.float().abs().mean()):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
