"""CPU kernel and decode benchmarks for issue 7 (run it under the machine-wide lock):

    flock /tmp/sparsecraft-cpu.lock .venv/bin/python benchmarks/cpu_kernels.py --part chain --threads 2
    flock /tmp/sparsecraft-cpu.lock .venv/bin/python benchmarks/cpu_kernels.py --part e2e --threads 2

chain: 30 x (1536x576, 576x1536) fp32 matrices (212 MB, far beyond the 32 MB L3), applied in sequence
to a batch of 1 or 16 rows; torch fp32 dense (F.linear) against the compressed formats on the same
magnitude-pruned matrices. Variants are timed interleaved (one chain pass each, in turn, ``repeats``
times) so background load hits all of them alike; the table reports medians.

e2e: SmolLM2-135M pruned 70% by magnitude in place (per layer), greedy decode of ``--new-tokens``
after a ``--prompt-len`` prompt through transformers' ``generate`` (KV cache), dense vs the sparse
runtime with fp32 values, int8 values (fp32 lm_head on our dense kernel, and on torch's), and int8
values + int8 lm_head; plus the 64-token greedy
identity check of the sparse runtime against the same sparse model run densely.

Every row is printed and appended to ``--jsonl`` as it is measured.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsecraft.formats.checkpoint import compress_weight
from sparsecraft.kernels.cpu import bind, stream_bandwidth
from sparsecraft.prune.masks import layer_mask, nm_mask
from sparsecraft.quant import rtn_quantize

IN, HID = 576, 1536


def _emit(row: dict, jsonl: Path | None) -> None:
    print(json.dumps(row), flush=True)
    if jsonl is not None:
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


# ------------------------------------------------------------------------------------------ chain
def chain_weights(seed: int = 0, layers: int = 30) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ws = []
    for _ in range(layers):
        ws.append(torch.randn(HID, IN, generator=g) / IN**0.5)
        ws.append(torch.randn(IN, HID, generator=g) / HID**0.5)
    return ws


def _variant_tensor(w: torch.Tensor, fmt: str, sparsity: float, bits: int | None):
    if fmt == "nm":
        keep = nm_mask(w.abs(), 2, 4)
    else:
        keep = layer_mask(w.abs(), sparsity)
    w = w * keep
    qw = None
    if bits is not None:
        qw = rtn_quantize(w, keep, bits=bits, group_size=128)
        w = qw.dequantize()
    return compress_weight(w, fmt, 2, 4, qw)


CHAIN_VARIANTS = {
    # name: (format, sparsity, bits)
    "bitmask 50% fp32": ("bitmask", 0.5, None),
    "bitmask 70% fp32": ("bitmask", 0.7, None),
    "2:4 fp32": ("nm", 0.5, None),
    "bitmask 50% int8": ("bitmask", 0.5, 8),
    "bitmask 70% int8": ("bitmask", 0.7, 8),
    "2:4 int8": ("nm", 0.5, 8),
    "bitmask 70% int4": ("bitmask", 0.7, 4),
}


def run_chain(args, jsonl: Path | None) -> list[dict]:
    torch.set_num_threads(args.threads)
    ws = chain_weights()
    dense_bytes = sum(w.numel() * 4 for w in ws)
    kernels: dict[str, list] = {}
    nbytes: dict[str, int] = {"dense fp32 (torch)": dense_bytes}
    names = [n for n in CHAIN_VARIANTS if not args.variants or n in args.variants]
    for name in names:
        fmt, sp, bits = CHAIN_VARIANTS[name]
        cts = [_variant_tensor(w, fmt, sp, bits) for w in ws]
        kernels[name] = [bind(ct, threads=args.threads) for ct in cts]
        nbytes[name] = sum(ct.nbytes() for ct in cts)
    bw = stream_bandwidth(threads=args.threads)
    rows = []
    for batch in args.batches:
        x0 = torch.randn(batch, IN)

        def dense_pass(x=x0):
            for w in ws:
                x = F.linear(x, w)
            return x

        def sparse_pass(ks, x=x0):
            for k in ks:
                x = k(x)
            return x

        fns = {"dense fp32 (torch)": dense_pass}
        for name, ks in kernels.items():
            fns[name] = lambda ks=ks: sparse_pass(ks)
        times: dict[str, list[float]] = {n: [] for n in fns}
        for f in fns.values():  # warm-up
            f()
        for _ in range(args.repeats):
            for n, f in fns.items():
                t = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t)
        base = statistics.median(times["dense fp32 (torch)"])
        for n, ts in times.items():
            med = statistics.median(ts)
            row = {
                "part": "chain",
                "batch": batch,
                "threads": args.threads,
                "variant": n,
                "median_ms": round(med * 1e3, 3),
                "min_ms": round(min(ts) * 1e3, 3),
                "speedup_vs_dense": round(base / med, 3),
                "weight_mb": round(nbytes[n] / 1e6, 1),
                "byte_bound_speedup": round(dense_bytes / nbytes[n], 2),
                "gbs": round(nbytes[n] / med / 1e9, 1),
                "stream_read_gbs": round(bw["read_gbs"], 1),
                "stream_copy_gbs": round(bw["copy_gbs"], 1),
                "repeats": args.repeats,
            }
            rows.append(row)
            _emit(row, jsonl)
    return rows


# ------------------------------------------------------------------------------------------ layers
# SmolLM2-135M's decoder linears (out, in) in call order, and its tied lm_head
SMOLLM2_LAYERS = {
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}
SMOLLM2_HEAD = (49152, 576)
LAYER_VARIANTS = {"bitmask 70% fp32": None, "bitmask 70% int8": 8}


def run_layers(args, jsonl: Path | None) -> list[dict]:
    """Per-call time of each SmolLM2 linear, through the module a decode calls (nn.Linear or
    SparseLinear, Python included), over 30 blocks of random 70%-pruned weights so that the
    weights stream from memory as in a real decode; plus the dense fp32 lm_head."""
    from torch import nn

    from sparsecraft.runtime import SparseLinear

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    blocks = args.blocks
    mods: dict[str, list[tuple[str, nn.Module]]] = {"dense fp32 (torch)": []}
    for name in LAYER_VARIANTS:
        mods[name] = []
    for _ in range(blocks):
        for lname, (o, i) in SMOLLM2_LAYERS.items():
            w = torch.randn(o, i, generator=g) / i**0.5
            w = w * layer_mask(w.abs(), 0.7)
            lin = nn.Linear(i, o, bias=False)
            lin.weight.data.copy_(w)
            mods["dense fp32 (torch)"].append((lname, lin))
            for vname, bits in LAYER_VARIANTS.items():
                qw = rtn_quantize(w, w != 0, bits=bits, group_size=128) if bits else None
                ct = compress_weight(qw.dequantize() if qw else w, "bitmask", 2, 4, qw)
                mods[vname].append((lname, SparseLinear(ct, threads=args.threads)))
    head_w = torch.randn(*SMOLLM2_HEAD, generator=g) / SMOLLM2_HEAD[1] ** 0.5
    head = nn.Linear(SMOLLM2_HEAD[1], SMOLLM2_HEAD[0], bias=False)
    head.weight.data.copy_(head_w)
    heads = {"lm_head fp32 (torch F.linear)": head}
    dense_kernel = _dense_head_module(head, args.threads)
    if dense_kernel is not None:
        heads["lm_head fp32 (sparsecraft dense kernel)"] = dense_kernel
    times: dict[tuple[str, str], list[float]] = {}
    xs = {i: torch.randn(1, i, generator=g) for i in (576, 1536)}
    with torch.inference_mode():
        for rep in range(args.repeats + 1):
            for vname, ms in mods.items():
                per: dict[str, float] = {}
                for lname, mod in ms:
                    x = xs[mod.in_features]
                    t = time.perf_counter()
                    mod(x)
                    per[lname] = per.get(lname, 0.0) + time.perf_counter() - t
                if rep:
                    for lname, s in per.items():
                        times.setdefault((vname, lname), []).append(s / blocks)
            for hname, mod in heads.items():
                t = time.perf_counter()
                mod(xs[576])
                if rep:
                    times.setdefault((hname, "lm_head"), []).append(time.perf_counter() - t)
    rows = []
    for (vname, lname), ts in times.items():
        row = {
            "part": "layers",
            "threads": args.threads,
            "variant": vname,
            "layer": lname,
            "median_us": round(statistics.median(ts) * 1e6, 1),
            "min_us": round(min(ts) * 1e6, 1),
            "repeats": args.repeats,
            "blocks": blocks,
        }
        rows.append(row)
        _emit(row, jsonl)
    return rows


def _dense_head_module(head, threads: int):
    """Our dense fp32 kernel on the lm_head, where the runtime has one (None otherwise)."""
    try:
        from sparsecraft.runtime.linear import DenseKernelLinear
    except ImportError:
        return None
    return DenseKernelLinear(head.weight.detach(), None, threads=threads)


# ------------------------------------------------------------------------------------------ e2e
def prune_in_place(model, sparsity: float) -> None:
    """Per-layer magnitude pruning of the decoder linears (a stand-in for any pruning method:
    the runtime only sees zeros)."""
    from sparsecraft.models.discovery import prunable_linears, set_weight_matrix, weight_matrix

    with torch.no_grad():
        for layer in prunable_linears(model).values():
            w = weight_matrix(layer)
            set_weight_matrix(layer, w * layer_mask(w.abs().float(), sparsity))


def run_e2e(args, jsonl: Path | None) -> list[dict]:
    from sparsecraft.models import load
    from sparsecraft.runtime import convert, decode_speed, greedy_identity

    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    model.eval()
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(min(100, vocab // 2), vocab, (1, args.prompt_len), generator=gen)
    sp = int(args.sparsity * 100)
    sparse_dense = copy.deepcopy(model)
    prune_in_place(sparse_dense, args.sparsity)
    variants = {"dense fp32 (torch)": model, f"{sp}% sparse, run densely": sparse_dense}
    conv = {
        f"bitmask {sp}% fp32": {},
        f"bitmask {sp}% int8": {"bits": 8},
        # one kernel call per layer instead of one for q/k/v and one for gate/up (runtime.fuse)
        f"bitmask {sp}% int8, not fused": {"bits": 8, "fuse": False},
        # the fp32 lm_head through torch's F.linear instead of our dense kernel (the default)
        f"bitmask {sp}% int8, torch lm_head": {"bits": 8, "lm_head_kernel": False},
        f"bitmask {sp}% int8 + int8 lm_head": {"bits": 8, "lm_head_int8": True},
    }
    for name, kw in conv.items():
        variants[name] = convert(copy.deepcopy(sparse_dense), format="bitmask", threads=args.threads, **kw)
    # the same models with torch's own ops (norms, attention, rope) on one thread while the
    # sparse kernels keep args.threads: single-token ops are too small to gain from a second thread
    threads = {}
    for name in [
        n for n in variants if not any(k in n for k in ("run densely", "torch lm_head", "not fused"))
    ]:
        variants[f"{name} [torch 1 thread]"] = variants[name]
        threads[f"{name} [torch 1 thread]"] = 1
    rows = []
    ident = greedy_identity(sparse_dense, variants[f"bitmask {sp}% fp32"], prompt[:, :16], new_tokens=64)
    row = {"part": "e2e-identity", "new_tokens": 64, **ident}
    rows.append(row)
    _emit(row, jsonl)
    results = decode_speed(variants, prompt, args.new_tokens, repeats=args.repeats_e2e, torch_threads=threads)
    base = results["dense fp32 (torch)"]["tokens_per_s"]
    # where a decode step's time goes: the linear layers (timed by forward hooks, per call median
    # summed over layers) and everything else (norms, attention, rope, generate's own loop)
    from sparsecraft.runtime import layer_timer
    from sparsecraft.runtime.measure import _generate

    for name, r in results.items():
        torch.set_num_threads(threads.get(name, args.threads))
        with layer_timer(variants[name]) as times:
            _generate(variants[name], prompt, 17)
        lin = sum(statistics.median(ts[1:]) for ts in times.values() if len(ts) > 1) * 1e3
        head = statistics.median(times["lm_head"][1:]) * 1e3 if len(times.get("lm_head", [])) > 1 else None
        r["linear_ms_per_token"] = round(lin, 2)
        r["lm_head_ms"] = round(head, 2) if head is not None else None
        r["other_ms_per_token"] = round(r["ms_per_token"] - lin, 2)
    torch.set_num_threads(args.threads)
    for name, r in results.items():
        row = {
            "part": "e2e",
            "model": args.model,
            "batch": 1,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "variant": name,
            **r,
            "speedup_vs_dense": round(r["tokens_per_s"] / base, 3),
        }
        rows.append(row)
        _emit(row, jsonl)
    return rows


def markdown(jsonl: Path) -> str:
    """Markdown tables from a results file written by this script."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    out = []
    for meta in (r for r in rows if r["part"] == "meta"):
        out.append(f"- `{meta['command']}` — {meta['date']}, {meta['machine']}")
    chain = [r for r in rows if r["part"] == "chain"]
    if chain:
        r0 = chain[0]
        out += [
            "",
            f"Kernel chain, {r0['threads']} threads, {r0['repeats']} interleaved repeats (median; min in "
            f"brackets); STREAM read {r0['stream_read_gbs']} GB/s, copy {r0['stream_copy_gbs']} GB/s.",
            "",
            "| batch | variant | weights MB | byte bound | ms | speedup vs dense | GB/s |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in chain:
            out.append(
                f"| {r['batch']} | {r['variant']} | {r['weight_mb']} | {r['byte_bound_speedup']}x | "
                f"{r['median_ms']} ({r['min_ms']}) | **{r['speedup_vs_dense']}x** | {r['gbs']} |"
            )
    e2e = [r for r in rows if r["part"] == "e2e"]
    if e2e:
        r0 = e2e[0]
        out += [
            "",
            f"End to end: {r0['model']}, batch 1, prompt {r0['prompt_len']}, {r0['new_tokens']} new tokens, "
            f"kernels on {r0['threads']} threads, {r0['repeats']} interleaved repeats (median).",
            "",
            "| variant | torch threads | tokens/s | ms/token | linears ms (lm_head) | other ms | prefill ms "
            "| speedup vs dense |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in e2e:
            out.append(
                f"| {r['variant']} | {r.get('torch_threads', '')} | {r['tokens_per_s']} | "
                f"{r['ms_per_token']} | {r.get('linear_ms_per_token')} ({r.get('lm_head_ms')}) | "
                f"{r.get('other_ms_per_token')} | {r['prefill_ms']} | **{r['speedup_vs_dense']}x** |"
            )
    layers = [r for r in rows if r["part"] == "layers"]
    if layers:
        r0 = layers[0]
        variants = list(dict.fromkeys(r["variant"] for r in layers if r["layer"] != "lm_head"))
        cell = {(r["variant"], r["layer"]): r for r in layers}
        out += [
            "",
            f"Per call, µs (median; min in brackets), {r0['blocks']} blocks of SmolLM2-135M shapes, "
            f"batch 1, {r0['threads']} threads, {r0['repeats']} passes; module call incl. Python.",
            "",
            "| layer | " + " | ".join(variants) + " |",
            "|---|" + "---:|" * len(variants),
        ]
        for lname in SMOLLM2_LAYERS:
            vals = [cell.get((v, lname)) for v in variants]
            out.append(
                f"| {lname} | "
                + " | ".join(f"{c['median_us']} ({c['min_us']})" if c else "" for c in vals)
                + " |"
            )
        for r in (r for r in layers if r["layer"] == "lm_head"):
            out.append(f"\n{r['variant']}: {r['median_us']} µs ({r['min_us']}) per call")
    for r in (r for r in rows if r["part"] == "e2e-identity"):
        out.append(
            f"\nGreedy identity, sparse runtime vs the same sparse model run densely: "
            f"{r['tokens_compared']} tokens, identical = {r['identical']} "
            f"(first mismatch: {r['first_mismatch']})."
        )
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["chain", "layers", "e2e", "all"], default="all")
    p.add_argument("--blocks", type=int, default=30, help="layers part: decoder blocks of weights")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--variants", nargs="*", default=None, help="chain variants to run (default all)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats-e2e", type=int, default=5)
    p.add_argument("--jsonl", type=Path, default=None)
    p.add_argument(
        "--markdown", type=Path, nargs="+", default=None, help="print tables from result files, then exit"
    )
    args = p.parse_args(argv)
    if args.markdown:
        for path in args.markdown:
            print(markdown(path))
        return 0
    head = {
        "part": "meta",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    _emit(head, args.jsonl)
    if args.part in ("chain", "all"):
        run_chain(args, args.jsonl)
    if args.part in ("layers", "all"):
        run_layers(args, args.jsonl)
    if args.part in ("e2e", "all"):
        run_e2e(args, args.jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
