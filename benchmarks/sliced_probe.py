"""Probe of the sliced bitmask kernel (kernels/triton/sliced.py) on the llama-7b layer shapes.

Per shape and sparsity: 32 distinct layers in one CUDA graph, µs per layer, for dense cuBLAS,
the dispatcher's default and sliced variants (segment, rows, warps, values per step; unroll),
the tensor-core kernel (``--dot-warps``), each with relaxed or acquire-release atomic adds into an
(out, batch) or a (batch, out) workspace (``--atomics``), and the decode + cuBLAS path;
``raw`` rows accumulate into a preallocated float32 buffer (the kernel alone, no move-out kernel).

    python benchmarks/sliced_probe.py [--batch 1] [--sparsity 0.7,0.5] [--variants 128:64:2:4,...]
        [--dot-warps 4,8] [--atomics relaxed:out,acq_rel:batch]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gpu_kernels import SHAPES, clone_tw, log, make_compressed, rel_err, time_graph  # noqa: E402

from sparsecraft.kernels.triton import layout  # noqa: E402
from sparsecraft.kernels.triton.dispatch import decompress, sparse_mm  # noqa: E402
from sparsecraft.kernels.triton.sliced import sliced_mm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sparsity", default="0.7,0.5")
    ap.add_argument("--variants", default="128:32:1:4,128:64:2:4,64:32:1:4,64:64:2:4,128:128:4:4",
                    help="segment:rows:warps:values per step, comma separated")
    ap.add_argument("--unroll", default="1,2")
    ap.add_argument("--dot-warps", default="", help="warps of the tensor-core kernel (16 batch rows)")
    ap.add_argument("--atomics", default="relaxed:out", help="relaxed|acq_rel : out|batch (workspace major)")
    args = ap.parse_args()
    variants = [tuple(int(v) for v in s.split(":")) for s in args.variants.split(",")]
    unrolls = [int(u) for u in args.unroll.split(",")]
    dot_warps = [int(w) for w in args.dot_warps.split(",") if w]
    atomics = [tuple(a.split(":")) for a in args.atomics.split(",")]
    for sp in [float(s) for s in args.sparsity.split(",")]:
        for name, (o, k) in SHAPES.items():
            probe(sp, name, o, k, args.batch, variants, unrolls, dot_warps, atomics)
            torch.cuda.empty_cache()
    return 0


def probe(sp: float, name: str, o: int, k: int, b: int, variants: list, unrolls: list, dot_warps: list,
          atomics: list) -> None:
    obj = make_compressed(f"bitmask_{int(sp * 100)}", o, k, 7)
    tw = layout.prepare(obj, "cuda")
    layers = [clone_tw(tw) for _ in range(32)]
    dense = [torch.randn(o, k, device="cuda", dtype=torch.float16) for _ in range(32)]
    x = torch.randn(b, k, device="cuda", dtype=torch.float16)
    ref = x.float() @ obj.to_dense().cuda().float().t()
    bb = min(b, 16)

    def timed(label, fn):
        ms, _ = time_graph(lambda: [fn(i) for i in range(32)], reps=10)
        log(f"sp={sp} {name:8s} b={b} {label:40s} {ms / 32 * 1000:7.1f} us/layer")

    timed("dense cuBLAS", lambda i: F.linear(x, dense[i]))
    timed("dispatch default", lambda i: sparse_mm(x, layers[i]))
    runs = [(v, u, False) for v, u in itertools.product(variants, unrolls)]
    runs += [((128, 64, w, 4), 1, True) for w in dot_warps]
    for (seg, rows, warps, per), unroll, dot in runs:
        views = [lay.sliced_view(seg, rows, per) for lay in layers]
        bbk = 16 if dot else bb
        lab = f"sliced{' dot' if dot else ''} seg={seg} rows={rows} w={warps} p={per} u={unroll}"
        lab += f" bytes x{views[0].nbytes() / tw.nbytes():.3f}"
        for sem, major in atomics:
            relaxed = sem == "relaxed"
            ws = [torch.zeros(o, b, device="cuda") if major == "out" else torch.zeros(b, o, device="cuda").t()
                  for _ in range(32)]

            def run(i, views=views, bbk=bbk, warps=warps, unroll=unroll, dot=dot, relaxed=relaxed, ws=ws):
                return sliced_mm(x, views[i], bbk, warps, True, unroll, ws=ws[i], dot=dot, relaxed=relaxed)

            err = rel_err(run(0), ref)
            if err > 3e-3:
                log(f"WRONG {lab} {sem} {major}: {err:.2e}")
                continue
            timed(f"{lab} {sem} ws {major}-major", run)
        if unroll == 1 and not dot:
            bufs = [torch.zeros(b, o, device="cuda") for _ in range(32)]
            timed(lab + " raw", lambda i, views=views, warps=warps, bufs=bufs: sliced_mm(
                x, views[i], bb, warps, True, 1, out=bufs[i]))
    sviews = [lay.sliced_view(128, 64, 4) for lay in layers]
    timed("decode (sliced) + cuBLAS", lambda i: F.linear(x, decompress(sviews[i], x.dtype)))
    log(f"sp={sp} {name} bytes: bitmask {tw.nbytes() / 1e6:.2f} MB, dense {o * k * 2 / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
