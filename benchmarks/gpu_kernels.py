"""GPU benchmark: the per-token chain of all decoder linears of random:llama-7b.

32 blocks x (q, k, v, o, gate, up, down) = 224 distinct weights (13 GB in fp16, far beyond L2),
run back to back inside one CUDA graph per (format, batch): dense cuBLAS, torch semi-structured
2:4 (cuSPARSELt), and our Triton kernels at 50% / 70% bitmask, 2:4 fp16, 2:4 + int4 (group 128).
Per shape (all layers of that shape, again in one graph) and for the whole chain; GB/s against the
device's measured copy bandwidth (bytes read + written of a large device-to-device copy).

For our kernels each batch size first tries a few tile shapes per layer shape (all layers of that
shape in one graph) and keeps the fastest per shape; the chain then runs with those.

Weights are random, made on the GPU: one compressed template per (format, shape) is built with
``sparsecraft.formats`` (on the CPU), moved to the GPU and cloned into 32 distinct copies, so every
layer of the chain streams its own memory.

    python benchmarks/gpu_kernels.py                  # full run, writes --out (markdown + json)
    python benchmarks/gpu_kernels.py --check          # correctness only (small shapes, graphs, compile)
    python benchmarks/gpu_kernels.py --fused ...      # q|k|v and gate|up as one product each
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sparsecraft import formats
from sparsecraft.kernels.triton import dispatch, layout, mma24
from sparsecraft.kernels.triton.dispatch import KernelConfig, decompress, sparse_linear, sparse_mm

HIDDEN, INTER, BLOCKS = 4096, 11008, 32  # random:llama-7b
SHAPES = {"qkvo": (HIDDEN, HIDDEN), "gate_up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
BLOCK_ORDER = ["qkvo"] * 4 + ["gate_up"] * 2 + ["down"]
# --fused: the siblings that read the same input stacked into one weight (runtime.fuse's groups),
# for dense and sparse alike: 4 products per block instead of 7, the same bytes
FUSED_SHAPES = {"qkv": (3 * HIDDEN, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up2": (2 * INTER, HIDDEN),
                "down": (HIDDEN, INTER)}
FUSED_ORDER = ["qkv", "o", "gate_up2", "down"]
T0 = time.time()
QUICK = False  # --quick: one or two tiles per (format, batch)
results_tune: list[dict] = []  # every tuning candidate's time per layer shape (written to the json)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ---------------------------------------------------------------------------------------------
# weights
def _keep(fmt: str, out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    if fmt.startswith("bitmask"):
        sparsity = float(fmt.split("_")[1]) / 100
        return torch.rand(out_f, in_f, generator=gen) >= sparsity
    scores = torch.rand(out_f, in_f // 4, 4, generator=gen)
    idx = scores.topk(2, dim=-1).indices
    return torch.zeros(out_f, in_f // 4, 4, dtype=torch.bool).scatter_(-1, idx, True).view(out_f, in_f)


def make_compressed(fmt: str, out_f: int, in_f: int, seed: int, dtype=torch.float16):
    """(format object on CPU, its dense weight on CPU). fmt: bitmask_50, bitmask_70, nm24, nm24_int4."""
    gen = torch.Generator().manual_seed(seed)
    keep = _keep(fmt, out_f, in_f, gen)
    if fmt == "nm24_int4":
        g = 128
        codes = torch.randint(-8, 8, (out_f, in_f), generator=gen, dtype=torch.int8)
        scales = (torch.rand(out_f, -(-in_f // g), generator=gen) * 0.004 + 0.001).half()
        q = formats.QuantInfo(4, g, True, scales)
        obj = formats.NMTensor.from_codes(codes, keep, q, dtype, n=2, m=4)
    else:
        w = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(dtype) * keep
        if fmt.startswith("bitmask"):
            obj = formats.BitmaskTensor.from_dense(w, mask=keep)
        else:
            obj = formats.NMTensor.from_dense(w, n=2, m=4, mask=keep)
    return obj


def clone_tw(tw: layout.TritonWeight) -> layout.TritonWeight:
    kw = tw.init_fields()
    for k, t in tw.tensors().items():
        kw[k] = t.clone()
    return layout.TritonWeight(**kw)


# ---------------------------------------------------------------------------------------------
# timing
def time_graph(fn, reps: int = 20) -> tuple[float, bool]:
    """Median ms of one call of ``fn`` replayed from a CUDA graph (eager if capture fails)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graphed = True
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    except Exception as e:  # noqa: BLE001 - report and time eagerly
        log(f"  graph capture failed ({type(e).__name__}: {str(e)[:80]}); timing eagerly")
        torch.cuda.synchronize()
        graphed, run = False, fn
    for _ in range(3):
        run()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), graphed


def copy_bandwidth() -> float:
    n = 2 * 1024**3 // 2
    src = torch.randn(n, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms, _ = time_graph(lambda: dst.copy_(src), reps=20)
    return 2 * n * 2 / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------
# correctness
def rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def check(args) -> int:
    cases = [  # the mma, unit and sliced kernels' cases first (a deadline may cut the rest)
        ("nm", 64, 1024, torch.float16, 4, 128, True, 2, 4),
        ("nm", 48, 512, torch.float16, 0, 32, True, 2, 4),
        ("bitmask", 40, 600, torch.float16, 0, 32, True, 2, 4),
        ("bitmask", 33, 520, torch.bfloat16, 0, 32, True, 2, 4),
        ("nm", 40, 576, torch.float16, 0, 32, True, 2, 4),
        ("nm", 300, 4096, torch.float16, 4, 128, True, 2, 4),
        ("nm", 33, 520, torch.bfloat16, 0, 32, True, 2, 4),
        ("nm", 64, 1024, torch.bfloat16, 4, 128, False, 2, 4),
        ("bitmask", 24, 576, torch.float16, 8, 64, True, 2, 4),
        ("bitmask", 300, 4100, torch.float16, 4, 128, True, 2, 4),
        ("bitmask", 17, 300, torch.float16, 4, 32, False, 2, 4),
        ("nm", 24, 512, torch.float16, 0, 32, True, 4, 8),
        ("nm", 20, 320, torch.float16, 8, 32, False, 2, 4),
        ("nm", 18, 256, torch.float16, 4, 64, False, 4, 8),
    ]
    bad = 0
    # CUDA graph capture and torch.compile of a decode step: a bitmask layer as prepare_module keeps
    # it (the sliced layout only) at batch 1 and 3 (walk kernel), 12 (tensor-core kernel), 40 (decoded),
    # then a 2:4 int4 layer the same way (the mma.sp layout where MMA_TILES has it)
    objs = [make_compressed(f, 512, 1024, 1) for f in ("bitmask_70", "nm24_int4")]
    ws = [dispatch.prepare_weight(o, "cuda") for o in objs]
    print("check: device layouts", [type(w).__name__ for w in ws])
    refs = [o.to_dense().cuda().float() for o in objs]
    xs = [torch.randn(b, 1024, device="cuda", dtype=torch.float16) for b in (1, 3, 12, 40)]
    pairs = [(x, w, r) for w, r in zip(ws, refs, strict=True) for x in xs]

    def step():
        return [sparse_linear(x, w) for x, w, _ in pairs]

    ms, graphed = time_graph(step, reps=3)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = step()
    for x in xs:
        x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    e1 = max(rel_err(y, x.float() @ r.t()) for y, (x, _, r) in zip(yg, pairs, strict=True))
    wl = [w for _, w, _ in pairs]
    comp = torch.compile(lambda *a: [sparse_linear(x, w) * 2 for x, w in zip(a, wl, strict=True)],
                         fullgraph=True)
    ys = comp(*[x for x, _, _ in pairs])
    e2 = max(rel_err(y / 2, x.float() @ r.t()) for y, (x, _, r) in zip(ys, pairs, strict=True))
    ok = e1 < 3e-3 and e2 < 3e-3 and graphed
    bad += not ok
    print(
        f"check cuda-graph replay err {e1:.1e}, torch.compile(fullgraph) err {e2:.1e}: "
        f"{'OK' if ok else 'FAIL'}"
    )
    gen = torch.Generator().manual_seed(0)
    for fmt, out_f, in_f, dtype, bits, g, sym, n, m in cases:
        if args.deadline and time.time() - T0 > args.deadline:
            print(f"check {fmt} {out_f}x{in_f}: skipped (deadline)")
            continue
        if fmt == "bitmask":
            keep = torch.rand(out_f, in_f, generator=gen) >= 0.6
        else:
            idx = torch.rand(out_f, in_f // m, m, generator=gen).topk(n, -1).indices
            keep = (
                torch.zeros(out_f, in_f // m, m, dtype=torch.bool).scatter_(-1, idx, True).view(out_f, in_f)
            )
        if bits:
            lo, hi = formats.code_range(bits, sym)
            ng = formats.num_groups(in_f, g)
            codes = torch.randint(lo, hi + 1, (out_f, in_f), generator=gen)
            scales = (torch.rand(out_f, ng, generator=gen) * 0.1 + 0.01).half()
            zeros = None if sym else torch.randint(lo, hi + 1, (out_f, ng), generator=gen).to(torch.uint8)
            q = formats.QuantInfo(bits, g, sym, scales, zeros)
            obj = (
                formats.BitmaskTensor.from_codes(codes, keep, q, dtype)
                if fmt == "bitmask"
                else formats.NMTensor.from_codes(codes, keep, q, dtype, n=n, m=m)
            )
        else:
            w = (torch.randn(out_f, in_f, generator=gen) * keep).to(dtype)
            obj = (
                formats.BitmaskTensor.from_dense(w, mask=keep)
                if fmt == "bitmask"
                else formats.NMTensor.from_dense(w, n=n, m=m, mask=keep)
            )
        ref_w = obj.to_dense().cuda().double()
        tw = layout.prepare(obj, "cuda")
        bk = 256 if fmt == "bitmask" else 64
        cfgs = [None, KernelConfig(16, bk, 1, 4, split_k=2), KernelConfig(32, bk, 16, 4, split_k=2)]
        if dispatch.unit_supported(tw):
            cfgs += [KernelConfig(8, 512, 1, 4, split_k=2, unit=True), KernelConfig(8, 256, 8, 4, unit=True),
                     KernelConfig(4, 512, 16, 2, split_k=3, unit=True),
                     KernelConfig(4, 256, 1, 4, unit=True, xrow=True, prmt=True),
                     KernelConfig(16, 256, 16, 4, split_k=2, unit=True, dot=True)]
        if mma24.supported(tw, dtype):  # the sparse tensor-core kernel, batch <= 16
            cfgs += [KernelConfig(64, 0, 16, 4, mma=True), KernelConfig(32, 0, 16, 2, split_k=3, mma=True),
                     KernelConfig(16, 0, 16, 1, split_k=8, mma=True),
                     KernelConfig(64, 0, 16, 4, split_k=4, mma=True, depth=2, fixup=True),
                     KernelConfig(16, 0, 16, 1, split_k=3, mma=True, depth=4, fixup=True),
                     KernelConfig(64, 0, 16, 4, split_k=2, mma=True, depth=3, fixup=True, xrow=True),
                     KernelConfig(32, 0, 16, 8, mma=True, depth=2, pdl=True, k_warps=4),
                     KernelConfig(16, 0, 16, 16, split_k=2, mma=True, depth=3, fixup=True, k_warps=8),
                     KernelConfig(32, 0, 16, 16, mma=True, depth=2, pdl=True, k_warps=8),
                     KernelConfig(32, 0, 16, 32, mma=True, depth=2, pdl=True, k_warps=16, xrow=True)]
        if dispatch.sliced_supported(tw):  # the sliced tensor-core kernel (walk: the default at batch 1)
            cfgs += [KernelConfig(64, 0, 16, w, sliced=128, per_step=4, dot=True) for w in (2, 4, 8)]
        worst = 0.0
        for batch in (1, 5, 16, 64, 200):
            x = torch.randn(batch, in_f, device="cuda").to(dtype)
            ref = x.double() @ ref_w.t()
            for cfg in cfgs:
                if cfg is not None and (batch > 16 if cfg.mma else
                                        (cfg.bb == 1) != (batch == 1) or (cfg.unit and batch > 16)):
                    continue
                y = sparse_mm(x, tw, cfg) if cfg is not None else sparse_linear(x, tw)
                worst = max(worst, rel_err(y, ref) if torch.isfinite(y).all() else float("inf"))
        dense = decompress(tw, torch.float32).double()
        derr = rel_err(dense, ref_w)
        if dispatch.sliced_supported(tw):  # decoded from the sliced layout: exact
            derr = max(derr, 0.0 if torch.equal(decompress(dispatch.prepare_weight(obj, "cuda")).double(),
                                                ref_w) else 1.0)
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        ok = worst < tol and derr < (4e-3 if dtype == torch.bfloat16 else 1e-3)
        bad += not ok
        print(
            f"check {fmt:8s} {out_f}x{in_f} {str(dtype)[6:]:8s} q{bits} g{g} {'sym' if sym else 'asym'} "
            f"{n}:{m}  max rel err {worst:.2e}  decompress {derr:.1e}  {'OK' if ok else 'FAIL'}",
            flush=True,
        )
    print(f"check: {'all OK' if not bad else f'{bad} FAILED'}", flush=True)
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------
# chain benchmark
FORMATS = ["bitmask_50", "bitmask_70", "nm24", "nm24_int4"]
LABEL = {
    "dense": "dense cuBLAS fp16",
    "semi24": "torch semi-structured 2:4",
    "bitmask_50": "ours bitmask 50%",
    "bitmask_70": "ours bitmask 70%",
    "nm24": "ours 2:4 fp16",
    "nm24_int4": "ours 2:4 + int4 g128",
}


def build_chain(fmt: str, templates: dict):
    """224 distinct weights in block order: list of (shape_name, weight object)."""
    layers = []
    for _ in range(BLOCKS):
        for name in BLOCK_ORDER:
            t = templates.get(name)
            if fmt == "dense":
                w = torch.randn(*SHAPES[name], device="cuda", dtype=torch.float16) * 0.02
            elif fmt == "semi24":
                w = torch.sparse.to_sparse_semi_structured(t.clone())
            else:
                w = clone_tw(t)
            layers.append((name, w))
    return layers


def semi_bytes(w) -> int:
    tot = 0
    for attr in ("packed", "meta", "packed_t", "meta_t"):
        t = getattr(w, attr, None)
        if isinstance(t, torch.Tensor):
            tot += t.numel() * t.element_size()
    return tot


def layer_fn(fmt: str, w, cfg_for):
    if fmt == "dense":
        return lambda x: F.linear(x, w)
    if fmt == "semi24":
        return lambda x: F.linear(x, w)
    cfg = cfg_for(w)
    if cfg is None:
        return lambda x: sparse_linear(x, w)
    return lambda x: run_cfg(x, w, cfg)


def bench_chain(fmt, layers, batch, xs, cfg_for=lambda w: None, reps=10, shapes_only=False):
    """{'chain': ms, shape: ms per layer of that shape}, graphed flag."""
    res = {}
    graphed_all = True
    fns = [(name, layer_fn(fmt, w, cfg_for)) for name, w in layers]
    outs = []

    def run(sel):
        def f():
            outs.clear()
            for name, fn in fns:
                if sel is None or name == sel:
                    outs.append(fn(xs[name]))

        return f

    if not shapes_only:
        res["chain"], graphed_all = time_graph(run(None), reps=reps)
    for sname in SHAPES:
        ms, gr = time_graph(run(sname), reps=reps)
        res[sname] = ms / sum(1 for n, _ in layers if n == sname)
        graphed_all &= gr
    outs.clear()
    return res, graphed_all


def weight_bytes(fmt, layers) -> int:
    if fmt == "dense":
        return sum(w.numel() * w.element_size() for _, w in layers)
    if fmt == "semi24":
        return sum(semi_bytes(w) for _, w in layers)
    if fmt.startswith("bitmask"):  # what the GPU keeps and the kernels read: the sliced layout
        return sum(w.sliced_view(**dispatch.SLICED_LAYOUT).nbytes() for _, w in layers)
    return sum(w.nbytes() for _, w in layers)


DECODE_CUBLAS = KernelConfig(0, 0, 0, 0)  # candidate: decode to a dense temporary, then cuBLAS
DECODE_SLICED = KernelConfig(0, 0, 0, 0, sliced=dispatch.SLICED_LAYOUT["seg"])  # the same, sliced layout


def run_cfg(x, w, cfg):
    if cfg.bn == 0:
        return x @ decompress(w.sliced_view(**dispatch.SLICED_LAYOUT) if cfg.sliced else w, x.dtype).t()
    return sparse_mm(x, w, cfg)


def candidates(fmt: str, batch: int) -> list[KernelConfig]:
    """Tile shapes tried per (format, batch); the fastest per layer shape is kept (measured here).
    Earlier runs' candidates and their times: docs/results/gpu_kernels.md."""
    # bitmask: the sliced slot-major kernels (kernels/triton/sliced.py), the dispatcher's setting, at
    # batch 1 its neighbours from benchmarks/sliced_probe.py (session 6); up to 8 rows the walk, from
    # 4 rows the tensor-core kernel on 2, 4 and 8 warps; the decode from the sliced layout + cuBLAS
    # (the only candidate above 16 rows, as in the dispatcher)
    if fmt.startswith("bitmask"):
        if batch > dispatch.SLICED_MAX_BATCH:
            return [DECODE_SLICED]
        lay = dispatch.SLICED_LAYOUT
        s = [dispatch.sliced_config(batch)]
        if batch == 1:
            s += [KernelConfig(rows, 0, 1, warps, sliced=128, unroll=2, per_step=4)
                  for rows, warps in ((128, 4), (32, 1))]
            s.append(dataclasses.replace(s[0], pdl=False))  # session 11: launches not overlapped
        if 4 <= batch <= 8:
            s.append(KernelConfig(lay["rows"], 0, batch, 2, sliced=lay["seg"], per_step=lay["per_step"]))
        if batch >= 4:
            s += [KernelConfig(lay["rows"], 0, 16, w, sliced=lay["seg"], per_step=lay["per_step"], dot=True)
                  for w in (2, 4, 8)]
            s.append(DECODE_SLICED)
        s = list(dict.fromkeys(s))
        return s[:1] if QUICK else s
    # 2:4: the sparse tensor-core kernel (kernels/triton/mma24.py), the only one the dispatcher runs
    # since session 12 (the unit kernels and the grid K-split tiles that lost in runs 15-19 are no
    # longer tried). (warps, k_warps: warps per m-tile, chunks loaded ahead; no grid K split), all
    # with PDL; x in fragment order from 9 rows. 32-warp programs: every warp's chunks in flight at
    # once. (Session 16: a 64-register cap lost on every fused shape in run 26 and was removed; 3 or 4
    # chunks ahead on 8 or 16 warps per m-tile lost on every shape in run 29.)
    if batch > 16:
        return [DECODE_CUBLAS]
    kw_tiles = ((8, 4, 2), (8, 4, 3), (16, 8, 2), (4, 4, 3), (8, 8, 2), (16, 16, 2), (32, 16, 2), (32, 16, 1),
                (32, 8, 2))
    mma = [KernelConfig(16 * w // kw, 0, 16, w, mma=True, depth=depth, pdl=True, k_warps=kw, xrow=batch > 8)
           for w, kw, depth in kw_tiles]
    return mma[:2] if QUICK else mma + ([DECODE_CUBLAS] if batch > 1 else [])


def sliced_bytes_ratio(first: dict, cfg: KernelConfig) -> float:
    """Bytes of the sliced layout over the row-major bitmask layout, over the three shapes."""
    sl = sum(w.sliced_view(cfg.sliced, cfg.bn, cfg.per_step).nbytes() for w in first.values())
    return sl / sum(w.nbytes() for w in first.values())


def tune(fmt, layers, batch, xs, reps):
    """Best config per layer shape: {(out, in): (cfg, ms per layer)}; logs every candidate."""
    best = {}
    first = {n: next(w for m, w in layers if m == n) for n in SHAPES}
    refs = {n: (xs[n].float() @ decompress(w, torch.float32).t()) for n, w in first.items()}
    for cfg in candidates(fmt, batch):
        try:
            errs = [rel_err(run_cfg(xs[n], first[n], cfg), refs[n]) for n in SHAPES]
            if max(errs) > 3e-3:
                log(f"  WRONG {fmt} b={batch} {cfg}: rel err {max(errs):.2e}; skipped")
                continue
            res, _ = bench_chain(
                fmt, layers, batch, xs, cfg_for=lambda w, c=cfg: c, reps=reps, shapes_only=True
            )
        except Exception as e:  # noqa: BLE001 - a tile shape that does not compile is skipped
            log(f"  {fmt} b={batch} {cfg}: {type(e).__name__}: {str(e)[:100]}")
            continue
        log(
            f"  tune {fmt:10s} b={batch:3d} bn={cfg.bn:2d} bk={cfg.bk:4d} bb={cfg.bb:2d} w={cfg.num_warps}"
            f" s={cfg.split_k}"
            + "".join(f" {k}" for k in ("unit", "dot", "prmt", "mma", "fixup") if getattr(cfg, k))
            + (" xrow" if cfg.xrow and not cfg.mma else "")
            + (f" depth={cfg.depth}" + (" xfrag" if cfg.xrow else "") if cfg.mma else "")
            + (f" kw={cfg.k_warps}" if cfg.k_warps > 1 else "")
            + (" pdl" if cfg.pdl else "")
            + (f" sliced seg={cfg.sliced} p={cfg.per_step} u={cfg.unroll}"
               f" bytes x{sliced_bytes_ratio(first, cfg):.3f}"
               if cfg.sliced and cfg.bn else "")
            + f"{' decode+cuBLAS' if cfg.bn == 0 else ''}  "
            + " ".join(f"{n} {res[n] * 1000:6.1f}us" for n in SHAPES)
        )
        results_tune.append(dict(fmt=fmt, batch=batch, cfg=cfg.__dict__, **{n: res[n] for n in SHAPES}))
        for n, shp in SHAPES.items():
            if shp not in best or res[n] < best[shp][1]:
                best[shp] = (cfg, res[n])
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--batches", default="1,4,16,64,512")
    ap.add_argument("--formats", default="dense,semi24," + ",".join(FORMATS))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="fewer tuning candidates")
    ap.add_argument("--dispatch-only", action="store_true", help="no tuning: dense and the dispatcher")
    ap.add_argument("--deadline", type=float, default=0, help="seconds; skip work that starts later")
    ap.add_argument("--fused", action="store_true", help="q|k|v and gate|up stacked: 4 products per block")
    args = ap.parse_args()
    global QUICK, SHAPES, BLOCK_ORDER
    QUICK = args.quick
    if args.fused:
        SHAPES, BLOCK_ORDER = FUSED_SHAPES, FUSED_ORDER
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    prop = torch.cuda.get_device_properties(0)
    import triton

    log(
        f"device {prop.name}, {prop.multi_processor_count} SMs, torch {torch.__version__}, "
        f"triton {triton.__version__}"
    )
    if args.check:
        return check(args)

    bw = copy_bandwidth()
    log(f"copy bandwidth {bw:.0f} GB/s (read + write)")
    batches = [int(b) for b in args.batches.split(",")]
    fmts = args.formats.split(",")
    xs_by_batch = {
        b: {n: torch.randn(b, s[1], device="cuda", dtype=torch.float16) for n, s in SHAPES.items()}
        for b in batches
    }
    results = {
        "device": prop.name,
        "sms": prop.multi_processor_count,
        "copy_GBps": bw,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "command": " ".join(sys.argv),
        "shapes": SHAPES,
        "rows": [],
        "tuned": [],
        "tune_all": results_tune,
    }
    # templates (CPU formats objects -> GPU), one per shape and format
    templates = {}
    for fmt in fmts:
        if fmt == "dense":
            continue
        templates[fmt] = {}
        for i, (name, (o, k)) in enumerate(SHAPES.items()):
            if fmt == "semi24":
                templates[fmt][name] = make_compressed("nm24", o, k, 100 + i).to_dense().cuda()
                continue
            obj = make_compressed(fmt, o, k, 100 + i)
            tw = layout.prepare(obj, "cuda")
            templates[fmt][name] = tw
            # correctness of the real shapes against the formats' own dense weight
            ref_w = obj.to_dense().cuda().float()
            for b in (1, 16, 512):
                x = torch.randn(b, k, device="cuda", dtype=torch.float16)
                err = rel_err(sparse_linear(x, tw), x.float() @ ref_w.t())
                if err > 3e-3:
                    log(f"  WRONG {fmt} {name} batch {b}: rel err {err:.2e}")
                    return 1
            del ref_w
        log(f"templates {fmt} ready (checked vs formats.to_dense at batch 1/16/512)")

    for fmt in fmts:
        try:
            layers = build_chain(fmt, templates.get(fmt, {}))
        except Exception as e:  # noqa: BLE001 - a backend refusing the device is a result too
            log(f"{fmt}: cannot build: {type(e).__name__}: {str(e)[:200]}")
            results["rows"].append(dict(fmt=fmt, batch=0, error=f"{type(e).__name__}: {str(e)[:300]}"))
            continue
        wb = weight_bytes(fmt, layers)
        for b in batches:
            if args.deadline and time.time() - T0 > args.deadline:
                log(f"{fmt} batch {b}: skipped (deadline)")
                continue
            cfgs = {}
            if args.dispatch_only and fmt in FORMATS:
                rows = [(fmt + "_dispatch",) + bench_chain(fmt, layers, b, xs_by_batch[b], reps=args.reps,
                                                            cfg_for=dispatcher(b))]
                log_rows(results, rows, b, wb, bw)
                continue
            try:
                if fmt in FORMATS and b <= dispatch.DOT_MAX_BATCH:
                    best = tune(fmt, layers, b, xs_by_batch[b], reps=5)
                    cfgs = {shp: c for shp, (c, _) in best.items()}
                    results["tuned"].append(
                        dict(
                            fmt=fmt, batch=b, best={f"{o}x{i}": c.__dict__ for (o, i), (c, _) in best.items()}
                        )
                    )
                res, graphed = bench_chain(
                    fmt,
                    layers,
                    b,
                    xs_by_batch[b],
                    reps=args.reps,
                    cfg_for=lambda w, c=cfgs: c.get(tuple(w.shape)),
                )
            except Exception as e:  # noqa: BLE001 - a backend refusing a shape is a result too
                log(f"{fmt} batch {b}: failed: {type(e).__name__}: {str(e)[:160]}")
                results["rows"].append(dict(fmt=fmt, batch=b, error=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            rows = [(fmt, res, graphed)]
            if fmt in FORMATS and b <= dispatch.DOT_MAX_BATCH:  # the dispatcher's own choice, not tuned
                rows.append((fmt + "_dispatch",) + bench_chain(fmt, layers, b, xs_by_batch[b], reps=args.reps,
                                                               cfg_for=dispatcher(b)))
            log_rows(results, rows, b, wb, bw)
        del layers
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "gpu_kernels.json"), "w") as f:
            json.dump(results, f, indent=1)
    print_summary(results)
    return 0


def dispatcher(batch: int):
    """cfg_for of bench_chain: the dispatcher's own tile for each weight at this batch."""
    return lambda w: dispatch.default_config(w, batch, torch.device("cuda"))


def log_rows(results, rows, b, wb, bw):
    for name, res, graphed in rows:
        gbps = wb / (res["chain"] * 1e-3) / 1e9
        results["rows"].append(dict(fmt=name, batch=b, weight_bytes=wb, graphed=graphed, GBps=gbps, **res))
        log(
            f"{name:11s} b={b:4d} chain {res['chain']:7.3f} ms  {gbps:6.0f} GB/s "
            f"({gbps / bw:4.0%} of copy)  "
            + " ".join(f"{s} {res[s] * 1000:7.1f}us" for s in SHAPES)
            + ("" if graphed else "  (eager)")
        )


def print_summary(results):
    rows = [r for r in results["rows"] if "error" not in r]
    dense = {r["batch"]: r for r in rows if r["fmt"] == "dense"}
    print("\nchain time (ms) and speedup vs dense cuBLAS, same run")
    batches = sorted({r["batch"] for r in rows})
    print("format".ljust(28) + "".join(f"b={b}".rjust(18) for b in batches))
    for fmt in dict.fromkeys(r["fmt"] for r in results["rows"]):
        line = LABEL.get(fmt, fmt).ljust(28)
        for b in batches:
            r = next((r for r in rows if r["fmt"] == fmt and r["batch"] == b), None)
            if r is None:
                line += "failed".rjust(18)
            else:
                sp = dense[b]["chain"] / r["chain"] if b in dense else float("nan")
                line += f"{r['chain']:8.3f} {sp:5.2f}x".rjust(18)
        print(line)


if __name__ == "__main__":
    sys.exit(main())
