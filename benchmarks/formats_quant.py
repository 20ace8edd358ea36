"""Compressed formats and mask-preserving quantization on SmolLM2-135M.

Two measurements, each writing one JSON row per result to a JSONL file as it goes:

``bits``  bits per weight of the 210 decoder linears stored as bitmask / packed N:M, float16 or
          int8/int4 with group scales; the masks are magnitude masks with an exact per-row count
          (the byte count depends only on how many weights are kept). Every layer is checked to
          round-trip exactly, and the figures come from ``formats.describe`` on the saved checkpoint.
``ppl``   WikiText-2 perplexity (40 windows x 512) of a pruned model before and after int8 / int4
          quantization, RTN and GPTQ side by side (options: clipping, act-order, scale refit, AWQ
          scaling first); each quantized model is saved compressed and the perplexity is measured
          on the model loaded back from that checkpoint. Resumable: rows already in --out are skipped.
``table`` renders both JSONL files as markdown.

Run the heavy parts under the shared CPU lock::

    flock /tmp/sparsecraft-cpu.lock .venv/bin/python benchmarks/formats_quant.py bits --out OUT.jsonl
    flock /tmp/sparsecraft-cpu.lock .venv/bin/python benchmarks/formats_quant.py ppl \
        --sparse PRUNED_DIR --out OUT.jsonl
    .venv/bin/python benchmarks/formats_quant.py table --bits BITS.jsonl --ppl PPL.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from sparsecraft.formats import CompressConfig, describe, load_compressed, save_compressed
from sparsecraft.models import load, prunable_linears, weight_matrix
from sparsecraft.prune.masks import prune_count
from sparsecraft.quant import QuantConfig, quantize_model

TARGETS_BITS = {"bitmask-50-fp16": 9.1, "bitmask-70-fp16": 5.9, "nm24-fp16": 9.1, "nm24-int4-g128-sym": 3.2}


def _emit(path: Path, row: dict) -> None:
    row = {**row, "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": _machine()}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def _machine() -> str:
    return f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"


def _magnitude(model, sparsity: float | None, nm: tuple[int, int] | None) -> None:
    """Exact-count magnitude masks: per row (unstructured) or per M-group (N:M)."""
    for layer in prunable_linears(model).values():
        w = weight_matrix(layer)
        out_f, in_f = w.shape
        if nm is not None:
            n, m = nm
            g = w.abs().view(out_f, in_f // m, m)
            keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(n, -1).indices, True)
            w.mul_(keep.view(out_f, in_f))
        else:
            k = prune_count(in_f, sparsity)
            w.scatter_(1, w.abs().argsort(dim=1, stable=True)[:, :k], 0.0)


CONFIGS = [
    # name, sparsity, nm, format, quant (bits, group, sym) or None
    ("bitmask-50-fp16", 0.5, None, "bitmask", None),
    ("bitmask-70-fp16", 0.7, None, "bitmask", None),
    ("nm24-fp16", None, (2, 4), "nm", None),
    ("nm24-int4-g128-sym", None, (2, 4), "nm", (4, 128, True)),
    ("nm24-int4-g128-asym", None, (2, 4), "nm", (4, 128, False)),
    ("nm24-int8-g128-sym", None, (2, 4), "nm", (8, 128, True)),
    ("bitmask-50-int4-g128-sym", 0.5, None, "bitmask", (4, 128, True)),
    ("bitmask-50-int8-g128-sym", 0.5, None, "bitmask", (8, 128, True)),
    ("dense-int4-g128-sym", 0.0, None, "dense", (4, 128, True)),
]


def run_bits(args) -> None:
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="fq_bits_"))
    try:
        for name, sparsity, nm, fmt, quant in CONFIGS:
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            model, tok = load(args.model, dtype=torch.float32)
            _magnitude(model, sparsity, nm)
            quantized = None
            if quant is None:
                model.half()
            else:
                bits, gs, sym = quant
                quantized, _ = quantize_model(
                    model, tok, QuantConfig(bits=bits, group_size=gs, symmetric=sym)
                )
                model.half()  # scales are fp16 either way; other tensors stored fp16 like the float rows
            ref = {n: weight_matrix(m).clone() for n, m in prunable_linears(model).items()}
            if quantized is not None:  # the model is fp16 now: compare with the fp16 dequantized values
                ref = {n: q.dequantize().half() for n, q in quantized.items()}
                for n, m in prunable_linears(model).items():
                    weight_matrix(m).copy_(ref[n])
            ck = save_compressed(model, tok, tmp / name, CompressConfig(format=fmt), quantized=quantized)
            report = describe(ck)
            back, _ = load_compressed(ck)
            exact = all(torch.equal(weight_matrix(m), ref[n]) for n, m in prunable_linears(back).items())
            dense_file = sum(v.numel() * 2 for v in back.state_dict().values())  # fp16, tied once
            dense_file -= back.lm_head.weight.numel() * 2 if back.config.tie_word_embeddings else 0
            t = report["total"]
            _emit(
                out,
                {
                    "kind": "bits",
                    "config": name,
                    "format": fmt,
                    "sparsity": sparsity,
                    "nm": nm,
                    "quant": quant,
                    "layers": t["layers"],
                    "weights": t["weights"],
                    "bits_per_weight": t["bits_per_weight"],
                    "target": TARGETS_BITS.get(name),
                    "round_trip_exact": exact,
                    "disk_bytes": report["bytes_on_disk"],
                    "dense_fp16_bytes": dense_file,
                    "wall_s": round(time.perf_counter() - t0, 1),
                },
            )
            shutil.rmtree(tmp / name, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


PPL_RUNS = [  # bits, method, symmetric; most informative first
    (8, "rtn", True),
    (4, "rtn", True),
    (4, "gptq", True),
    (8, "gptq", True),
    (4, "rtn", False),
    (4, "gptq", False),
]


def run_ppl(args) -> None:
    from sparsecraft.data import calibration_windows
    from sparsecraft.eval import perplexity
    from sparsecraft.prune.engine import EngineOptions

    out = Path(args.out)
    done = set()
    if out.exists():  # resume: skip rows already measured
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add(r["run"])

    def ppl(model, tok) -> float:
        return perplexity(
            model.to(args.device), tok, "wikitext2", seqlen=512, max_windows=40, batch_size=4, progress=False
        )

    if args.dense_ref and "dense" not in done:
        t0 = time.perf_counter()
        model, tok = load(args.dense_ref, dtype=torch.float32)
        _emit(
            out,
            {
                "kind": "ppl",
                "run": "dense",
                "ppl": ppl(model, tok),
                "wall_s": round(time.perf_counter() - t0, 1),
            },
        )
    if "sparse" not in done:
        t0 = time.perf_counter()
        model, tok = load(args.sparse, dtype=torch.float32)
        ws = [weight_matrix(m) for m in prunable_linears(model).values()]
        sp = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
        _emit(
            out,
            {
                "kind": "ppl",
                "run": "sparse",
                "model": args.sparse,
                "sparsity": sp,
                "ppl": ppl(model, tok),
                "wall_s": round(time.perf_counter() - t0, 1),
            },
        )
    tmp = Path(tempfile.mkdtemp(prefix="fq_ppl_"))
    calib = None
    try:
        for bits, method, sym in PPL_RUNS:
            act_order = args.act_order and method == "gptq"
            refit = args.refit_scales and method == "gptq"
            run = (
                f"int{bits}-g{args.group_size}-{'sym' if sym else 'asym'}-{method}"
                + ("-clip" if args.clip else "") + ("-ao" if act_order else "")
                + ("-refit" if refit else "") + ("-awq" if args.awq else "")
            )
            if run in done or (args.only and run not in args.only):
                continue
            t0 = time.perf_counter()
            model, tok = load(args.sparse, dtype=torch.float32)
            zeros_before = {n: weight_matrix(m) == 0 for n, m in prunable_linears(model).items()}
            needs_calib = method == "gptq" or args.awq
            if needs_calib and calib is None:
                calib = calibration_windows(tok, "c4", args.nsamples, args.seqlen, seed=0)
            cfg = QuantConfig(
                clip=args.clip,
                act_order=act_order,
                refit_scales=refit,
                awq=args.awq,
                bits=bits,
                group_size=args.group_size,
                symmetric=sym,
                method=method,
                nsamples=args.nsamples,
                seqlen=args.seqlen,
            )
            results, rep = quantize_model(
                model,
                tok,
                cfg,
                calibration=calib if needs_calib else None,
                options=EngineOptions(device=args.device, progress=False),
            )
            model.cpu()
            t_quant = time.perf_counter() - t0
            ck = save_compressed(model, tok, tmp / run, CompressConfig(format="auto"), quantized=results)
            size = describe(ck)
            back, _ = load_compressed(ck)
            zeros_kept = all(
                bool((weight_matrix(m)[zeros_before[n]] == 0).all())
                for n, m in prunable_linears(back).items()
            )
            _emit(
                out,
                {
                    "kind": "ppl",
                    "run": run,
                    "bits": bits,
                    "group_size": args.group_size,
                    "symmetric": sym,
                    "method": method,
                    "clip": args.clip,
                    "act_order": act_order,
                    "refit_scales": refit,
                    "awq": args.awq,
                    "ppl": ppl(back, tok),
                    "zeros_kept": zeros_kept,
                    "sparsity_after": rep["sparsity_after"],
                    "bits_per_weight": size["total"]["bits_per_weight"],
                    "formats": sorted({r["format"] for r in size["layers"].values()}),
                    "calibration": rep.get("calibration"),
                    "max_rel_error": rep.get("max_rel_error"),
                    "awq_report": (
                        {k: v for k, v in rep["awq"].items() if k != "groups"} if "awq" in rep else None
                    ),
                    "device": args.device,
                    "quant_s": round(t_quant, 1),
                    "wall_s": round(time.perf_counter() - t0, 1),
                },
            )
            shutil.rmtree(tmp / run, ignore_errors=True)
            del model, back
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rows(path: str | None) -> list[dict]:
    if not path or not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_table(args) -> None:
    bits = _rows(args.bits)
    if bits:
        print(
            "| configuration | bits / weight | target | met | round trip exact "
            "| checkpoint MiB (fp16 dense MiB) |"
        )
        print("|---|---:|---:|:-:|:-:|---:|")
        for r in bits:
            tgt = r["target"]
            met = "" if tgt is None else ("yes" if r["bits_per_weight"] <= tgt else "**no**")
            print(
                f"| {r['config']} | {r['bits_per_weight']:.3f} | {'' if tgt is None else f'≤ {tgt}'} "
                f"| {met} | "
                f"{'yes' if r['round_trip_exact'] else '**no**'} | {r['disk_bytes'] / 2**20:.1f} "
                f"({r['dense_fp16_bytes'] / 2**20:.1f}) |"
            )
        print()
    ppl = _rows(args.ppl)
    if ppl:
        base = next((r["ppl"] for r in ppl if r["run"] == "sparse"), None)
        print("| model | method | ppl | Δ vs sparse | target | met | bits / weight (linears) | zeros kept |")
        print("|---|---|---:|---:|---:|:-:|---:|:-:|")
        for r in ppl:
            if r["run"] in ("dense", "sparse"):
                label = (
                    "dense (reference)"
                    if r["run"] == "dense"
                    else f"sparse {r.get('sparsity', 0):.1%}, unquantized"
                )
                d = "" if base is None or r["run"] == "sparse" else f"{100 * (r['ppl'] / base - 1):+.2f}%"
                print(f"| {label} | – | {r['ppl']:.3f} | {d} | | | | |")
                continue
            d = 100 * (r["ppl"] / base - 1)
            tgt = 1.0 if r["bits"] == 8 else 10.0
            label = f"int{r['bits']} g{r['group_size']} {'sym' if r['symmetric'] else 'asym'}"
            method = (
                # "awq_clip": session 5's AWQ search with the clipping RTN (option removed since)
                ("AWQ (search with clip) + " if r.get("awq_clip") else "AWQ + " if r.get("awq") else "")
                + r["method"].upper()
                + (" + act-order" if r.get("act_order") else "")
                + (" + clip" if r.get("clip") else "")  # GPTQ rows before b0c54f3: the weight-error clip
                + (" + refit" if r.get("refit_scales") else "")
            )
            print(
                f"| {label} | {method} | {r['ppl']:.3f} | {d:+.2f}% | ≤ {tgt:g}% | "
                f"{'yes' if d <= tgt else '**no**'} | {r['bits_per_weight']:.3f} | "
                f"{'yes' if r['zeros_kept'] else '**no**'} |"
            )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    b = sub.add_parser("bits")
    b.add_argument("--out", required=True)
    b.add_argument("--only", nargs="*")
    b.add_argument("--model", default="smollm2-135m")
    q = sub.add_parser("ppl")
    q.add_argument(
        "--sparse", required=True, help="pruned model directory (e.g. sparsecraft prune ... --out DIR)"
    )
    q.add_argument("--out", required=True)
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--nsamples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--dense-ref", default=None, help="also measure this dense model (e.g. smollm2-135m)")
    q.add_argument("--only", nargs="*")
    q.add_argument("--clip", action="store_true", help="clipping search for the grids (run names get -clip)")
    q.add_argument("--act-order", action="store_true",
                   help="GPTQ act-order, static groups (run names get -ao)")
    q.add_argument("--refit-scales", action="store_true",
                   help="GPTQ: re-solve the group scales for the output (run names get -refit)")
    q.add_argument("--awq", action="store_true",
                   help="activation-aware scaling before the quantizer (run names get -awq)")
    q.add_argument("--device", default="cpu", help="calibration and evaluation device (cpu, cuda)")
    t = sub.add_parser("table")
    t.add_argument("--bits")
    t.add_argument("--ppl")
    args = p.parse_args(argv)
    print("command:", " ".join(sys.argv), file=sys.stderr)
    {"bits": run_bits, "ppl": run_ppl, "table": run_table}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
