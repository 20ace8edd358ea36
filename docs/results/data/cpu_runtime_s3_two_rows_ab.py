"""A/B of two C sources of the CPU kernels in one process, interleaved: int8 bitmask 70% (RTN, group
128) at batch 1 on 30 SmolLM2-135M blocks in their fused shapes (q/k/v stacked, gate/up stacked),
2 threads; per block, median (min) of the passes. Usage: python ab_two_rows.py OLD.c [passes]."""

import ctypes
import dataclasses
import statistics
import subprocess
import sys
import time

import torch

from sparsecraft.formats.checkpoint import compress_weight
from sparsecraft.kernels.cpu import bind
from sparsecraft.kernels.cpu.build import COMMON_FLAGS, Desc, load_library
from sparsecraft.prune.masks import layer_mask
from sparsecraft.quant import rtn_quantize

old_src, passes = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15
so = old_src[:-2] + ".so"
subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", *COMMON_FLAGS, old_src, "-o", so], check=True)
old = ctypes.CDLL(so)
P, I64 = ctypes.c_void_p, ctypes.c_int64
old.sc_matmul.argtypes = [ctypes.POINTER(Desc), P, I64, I64, P, I64]
old.sc_matmul_rows.argtypes = [ctypes.POINTER(Desc), P, I64, P]
new = load_library("native")
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
libs = {"old": [], "new": []}
for _ in range(30):
    for name, (o, i) in SHAPES.items():
        w = torch.randn(o, i, generator=g) / i**0.5
        w = w * layer_mask(w.abs(), 0.7)
        qw = rtn_quantize(w, w != 0, bits=8, group_size=128)
        k = bind(compress_weight(qw.dequantize(), "bitmask", 2, 4, qw), threads=2)
        assert k.rows_fn is new.sc_matmul_rows
        libs["new"].append((name, k))
        libs["old"].append((name, dataclasses.replace(k, fn=old.sc_matmul, rows_fn=old.sc_matmul_rows)))
xs = {i: torch.randn(1, i, generator=g) for i in (576, 1536)}
for (_, a), (_, b) in zip(libs["old"], libs["new"]):  # same bits out
    x = xs[a.in_features]
    assert torch.equal(a.call_rows(x, 1), b.call_rows(x, 1))
times = {(v, n): [] for v in libs for n in list(SHAPES) + ["block"]}
for rep in range(passes + 1):
    for v, ks in libs.items():
        per = dict.fromkeys(SHAPES, 0.0)
        for name, k in ks:
            x = xs[k.in_features]
            t = time.perf_counter()
            k.call_rows(x, 1)
            per[name] += time.perf_counter() - t
        if rep:
            for name, s in per.items():
                times[(v, name)].append(s / 30 * 1e6)
            times[(v, "block")].append(sum(per.values()) / 30 * 1e6)
print(f"outputs bit-identical old vs new; {passes} interleaved passes, us per block-layer, median (min)")
for n in list(SHAPES) + ["block"]:
    o, nw = times[("old", n)], times[("new", n)]
    print(
        f"{n:8s} old {statistics.median(o):7.1f} ({min(o):6.1f})"
        f"  new {statistics.median(nw):7.1f} ({min(nw):6.1f})"
    )
