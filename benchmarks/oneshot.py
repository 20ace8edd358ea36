"""One-shot pruning benchmark on SmolLM2-135M (issue 3): perplexity and prune time.

Rows (each a fresh model): dense; magnitude, Wanda, SparseGPT x {50%, 60%, 70%, 2:4, 4:8};
OWL+Wanda and OWL+SparseGPT at 70%, all with 128 x 512 C4 calibration windows (seed 0); and
the speed comparison with 64 x 512 calibration for SparseGPT and Wanda at 50% and 2:4... in
float32 and in the bf16 fast mode. Perplexity: WikiText-2, first 40 windows of 512 tokens.

Resumable: every finished row is appended to the JSONL file and skipped on the next start.
Each row takes the shared CPU lock (``/tmp/sparsecraft-cpu.lock``) while it runs, so its timing
is not disturbed by other locked jobs, and other jobs can run between rows.

    python benchmarks/oneshot.py --out runs/oneshot.jsonl [--rows KEY,KEY] [--list]
    python benchmarks/oneshot.py --out runs/oneshot.jsonl --markdown   # print the table
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

MODEL = "smollm2-135m"
LOCK = "/tmp/sparsecraft-cpu.lock"


MODES = {
    "fast": dict(calib_dtype="bfloat16", bf16_hessian=True),  # bf16 forwards and Hessian products
    "fast-h32": dict(calib_dtype="bfloat16"),  # bf16 forwards, float32 Hessian products
    "fp32": dict(calib_dtype="float32"),
}


def rows() -> list[dict]:
    out = [{"key": "dense", "method": None}]

    def row(method, spec, nsamples=128, profile="uniform", mode="fast", true_sequential=False, variant=False,
            exact=False):
        kw = {"sparsity": spec} if isinstance(spec, float) else {"pattern": spec}
        label = f"{int(spec * 100)}%" if isinstance(spec, float) else spec
        key = f"{'owl-' if profile == 'owl' else ''}{method}-{label}-n{nsamples}-{mode}"
        if true_sequential:
            kw["true_sequential"] = True
            key += "-ts"
        if variant:  # Wanda's adaptive per-row variant
            kw["wanda_variant"] = True
            key += "-variant"
        if exact:  # SparseGPT's mask, kept weights re-solved by exact least squares
            kw["exact_update"] = True
            key += "-exact"
        return {
            "key": key,
            "method": method,
            "profile": profile,
            "nsamples": nsamples,
            "mode": mode,
            "config": {**kw, **MODES[mode]},
        }

    for spec in (0.5, "2:4", 0.7):  # SparseGPT + exact update, float32 Hessian products
        out.append(row("sparsegpt", spec, mode="fast-h32", exact=True))
    out.append(row("sparsegpt", 0.5, nsamples=64, mode="fast-h32", exact=True))  # the timed config
    out.append(row("sparsegpt", 0.5, nsamples=64, mode="fp32", exact=True))
    for n in (128, 64):  # exact update on the bf16-product Hessian of the fast mode
        out.append(row("sparsegpt", 0.5, nsamples=n, mode="fast", exact=True))
    for spec in ("2:4", 0.7):
        out.append(row("sparsegpt", spec, mode="fast", exact=True))
    # most informative first: the accuracy targets, OWL, the speed comparison, then the rest
    for method, spec in [("sparsegpt", 0.5), ("wanda", 0.5), ("sparsegpt", "2:4"), ("sparsegpt", 0.7)]:
        out.append(row(method, spec))
    out.append(row("sparsegpt", 0.7, profile="owl"))
    for mode in ("fast", "fp32"):  # the speed comparison with the anchor (64 x 512)
        for method in ("sparsegpt", "wanda"):
            out.append(row(method, 0.5, nsamples=64, mode=mode))
    for method in ("sparsegpt", "wanda"):  # true-sequential order inside each block
        out.append(row(method, 0.5, true_sequential=True))
    out.append(row("magnitude", 0.5))
    for method, spec in [("wanda", 0.7), ("wanda", 0.6), ("sparsegpt", 0.6)]:
        out.append(row(method, spec))
    out.append(row("wanda", 0.7, profile="owl"))
    for method in ("wanda", "sparsegpt", "magnitude"):
        for spec in (0.5, 0.6, 0.7, "2:4", "4:8"):
            r = row(method, spec)
            if r["key"] not in {x["key"] for x in out}:
                out.append(r)
    for method, spec in [("wanda", "2:4"), ("sparsegpt", "2:4"), ("wanda", 0.7), ("sparsegpt", 0.7)]:
        out.append(row(method, spec, nsamples=64))  # the anchor's other rows, fast mode
    out.append(row("wanda", 0.5, variant=True))
    return list({r["key"]: r for r in out}.values())  # first occurrence order, no duplicates


class CpuLock:
    """The shared CPU lock, held across consecutive rows for at most ``hold_s`` seconds, then
    released so that other queued jobs run (and taken again for the next row)."""

    def __init__(self, hold_s: float = 1200.0, enabled: bool = True):
        self.hold_s, self.enabled = hold_s, enabled
        self.f = None
        self.since = 0.0

    def before_row(self):
        if not self.enabled:
            return
        if self.f is not None and time.monotonic() - self.since > self.hold_s:
            self.release()
        if self.f is None:
            self.f = open(LOCK, "a")
            fcntl.flock(self.f, fcntl.LOCK_EX)
            self.since = time.monotonic()

    def release(self):
        if self.f is not None:
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()
            self.f = None


@contextlib.contextmanager
def cpu_lock():
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def checks(model, report: dict, cfg) -> dict:
    """Per-layer sparsity within 1e-3 of target (per row for Wanda) and every N:M group valid."""
    from sparsecraft.models import prunable_linears, weight_matrix
    from sparsecraft.prune.masks import nm_valid

    layers = prunable_linears(model)
    targets = {r["name"]: r["target"] for r in report["layers"]}
    worst = 0.0
    nm_ok = True
    for name, layer in layers.items():
        w = weight_matrix(layer)
        t = targets.get(name)
        if cfg.nm is not None:
            nm_ok &= nm_valid(w, *cfg.nm)
            continue
        zeros = (w == 0).float()
        if cfg.method == "wanda" and not cfg.wanda_variant:
            dev = float((zeros.mean(1) - t).abs().max())
        else:
            dev = float((zeros.mean() - t).abs())
        worst = max(worst, dev)
    return {"max_sparsity_deviation": worst, "nm_valid": bool(nm_ok) if cfg.nm else None}


def run_row(spec: dict, model_name: str = MODEL) -> dict:
    from sparsecraft.data import calibration_windows
    from sparsecraft.eval import perplexity
    from sparsecraft.models import load
    from sparsecraft.prune import PruneConfig, prune

    model, tokenizer = load(model_name)
    result = {
        "key": spec["key"],
        "loadavg_start": os.getloadavg()[0],
        "model": model_name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
    }
    if spec["method"] is not None:
        cfg = PruneConfig(
            method=spec["method"],
            profile=spec["profile"],
            nsamples=spec["nsamples"],
            seqlen=512,
            seed=0,
            batch_size=8,
            **spec["config"],
        )
        # magnitude needs no data: pruned without calibration forwards
        calib = (
            False
            if spec["method"] == "magnitude"
            else calibration_windows(tokenizer, "c4", spec["nsamples"], 512, 0)
        )
        t0 = time.perf_counter()
        report = prune(model, tokenizer, cfg, calib, progress=False, model_name=model_name)
        result["prune_s"] = time.perf_counter() - t0
        result.update(
            method=spec["method"],
            profile=spec["profile"],
            nsamples=spec["nsamples"],
            mode=spec["mode"],
            sparsity=report["summary"]["sparsity"],
            timing=report["timing"],
            memory=report["memory"],
            recipe=cfg.to_dict(),
            mean_rel_error=report["summary"]["mean_rel_error"],
            **checks(model, report, cfg),
            damping_raised=sum(1 for x in report["layers"] if (x.get("damping") or 0) > cfg.percdamp),
        )
        if report.get("owl"):
            result["owl_block_sparsity"] = report["owl"]["block_sparsity"]
    result["loadavg_after_prune"] = os.getloadavg()[0]
    result["ppl"] = perplexity(
        model, tokenizer, "wikitext2", seqlen=512, max_windows=40, batch_size=8, progress=False
    )
    return result


def gpu_runs(model_name: str, nsamples: int, seqlen: int, cap_gib: float, device: str,
             out: Path, capped_only: bool = False) -> list[dict]:
    """The GPU target: SparseGPT 50% from loaded model to pruned model, (a) with the model on the
    GPU, (b) with the model on the host and the GPU memory capped below the model's size."""
    import copy

    import transformers

    from sparsecraft.data import calibration_windows
    from sparsecraft.models import load
    from sparsecraft.prune import PruneConfig, prune
    from sparsecraft.prune.sparsegpt import sparsegpt_prune
    from sparsecraft.prune.stats import LayerStats, relative_error

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dtype = "float16" if cuda else "float32"
    results = []
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(dev) if cuda else "cpu"}
    print(env, flush=True)

    # single-layer check: TF32 statistics vs fp32 give the same SparseGPT error
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(8192, 64, device=dev, generator=g) @ torch.randn(64, 1024, device=dev, generator=g)
    x += 0.3 * torch.randn(8192, 1024, device=dev, generator=g)
    w = torch.randn(1024, 1024, device=dev, generator=g)
    errs = {}
    for tf32 in (False, True):
        st = LayerStats(1024, with_hessian=True, device=dev, tf32=tf32)
        st.update(x)
        ref = LayerStats(1024, with_hessian=True, device=dev)
        ref.update(x)
        errs[tf32] = relative_error(w, sparsegpt_prune(w, st.hessian, 0.5)[0], ref)[0]
    results.append({"key": "gpu-tf32-check", "rel_error_fp32_stats": errs[False],
                    "rel_error_tf32_stats": errs[True]})
    print(results[-1], flush=True)

    def keep(r: dict) -> None:
        with open(out, "a") as f:
            f.write(json.dumps(r) + "\n")

    keep(results[-1])

    t0 = time.perf_counter()
    model, tok = load(model_name, dtype=dtype, device=device)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    if capped_only:
        dense_host, model = model.to("cpu"), None
    else:
        dense_host = copy.deepcopy(model).to("cpu") if cuda else copy.deepcopy(model)
    model_gib = sum(p.numel() * p.element_size() for p in dense_host.parameters()) / 2**30
    calib = calibration_windows(tok, "c4", nsamples, seqlen, 0)

    def one(label: str, m, inputs_on: str, cap: float | None) -> dict:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            total = torch.cuda.get_device_properties(dev).total_memory
            torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else cap * 2**30 / total, dev)
        cfg = PruneConfig(method="sparsegpt", sparsity=0.5, nsamples=nsamples, seqlen=seqlen, batch_size=8,
                          device=device, inputs_on=inputs_on)
        t = time.perf_counter()
        rep = prune(m, tok, cfg, calib, progress=False, model_name=model_name)
        if cuda:
            torch.cuda.synchronize()
        r = {"key": label, "model": model_name, "model_gib": model_gib, "load_s": load_s,
             "prune_s": time.perf_counter() - t, "timing": rep["timing"], "memory": rep["memory"],
             "gpu_cap_gib": cap, "inputs_on": inputs_on, "calibration": f"{nsamples}x{seqlen}",
             "sparsity": rep["summary"]["sparsity"], "mean_rel_error": rep["summary"]["mean_rel_error"],
             "max_rel_error": rep["summary"]["max_rel_error"],
             "max_layer_dev": max(abs(x["sparsity"] - 0.5) for x in rep["layers"]), **env}
        print({k: v for k, v in r.items() if k != "timing"}, r["timing"], flush=True)
        keep(r)
        return r

    if not capped_only:
        results.append(one("gpu-sparsegpt-50%-model-on-gpu", model, "auto", None))
    del model
    if cuda:
        torch.cuda.empty_cache()
    cap = cap_gib if cap_gib > 0 else max(1.0, model_gib * 0.75)
    results.append(one("gpu-sparsegpt-50%-capped", dense_host, "cpu", cap))
    return results


def load_done(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r
    return done


def markdown(done: dict[str, dict]) -> str:
    lines = [
        "| row | calib | mode | perplexity | prune time (s) | forward / stats / solve / error (s) | sparsity "
        "| check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in rows():
        r = done.get(spec["key"])
        if r is None:
            continue
        if spec["method"] is None:
            lines.append(f"| dense | | | {r['ppl']:.2f} | | | | |")
            continue
        t = r["timing"]
        check = (
            f"N:M valid: {r['nm_valid']}"
            if r.get("nm_valid") is not None
            else f"max dev {r['max_sparsity_deviation']:.1e}"
        )
        calib = "none" if r["method"] == "magnitude" else f"{r['nsamples']}x512"
        mode = "" if r["method"] == "magnitude" else r["mode"]
        if spec["key"].endswith("-ts"):
            mode += ", true sequential"
        if spec["key"].endswith("-variant"):
            mode += ", Wanda variant"
        if spec["config"].get("exact_update"):
            mode += ", exact update"
        lines.append(
            f"| {spec['key'].rsplit('-n', 1)[0]} | {calib} | {mode} | {r['ppl']:.2f} | "
            f"{r['prune_s']:.1f} | {t['forward_s']:.0f} / {t['statistics_s']:.0f} / {t['solve_s']:.0f} / "
            f"{t.get('error_s', float('nan')):.0f}"
            f"{' + owl ' + format(t['owl_profile_s'], '.0f') if t.get('owl_profile_s') else ''} | "
            f"{r['sparsity']:.4f} | {check} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/oneshot.jsonl")
    ap.add_argument("--rows", default=None, help="comma-separated row keys (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-lock", action="store_true")
    ap.add_argument("--hold-s", type=float, default=1200.0,
                    help="hold the CPU lock over consecutive rows for at most this long")
    ap.add_argument("--model", default=MODEL, help="(smoke tests only) another model")
    ap.add_argument("--gpu", action="store_true", help="run the GPU target (random:llama-7b, 128x2048)")
    ap.add_argument("--gpu-model", default="random:llama-7b")
    ap.add_argument("--gpu-nsamples", type=int, default=128)
    ap.add_argument("--gpu-seqlen", type=int, default=2048)
    ap.add_argument("--gpu-cap-gib", type=float, default=10.0, help="GPU memory cap of the second run")
    ap.add_argument("--gpu-capped-only", action="store_true", help="only the memory-capped GPU run")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    path = Path(args.out)
    done = load_done(path)
    if args.list:
        for spec in rows():
            print(("done " if spec["key"] in done else "todo ") + spec["key"])
        return 0
    if args.gpu:
        path.parent.mkdir(parents=True, exist_ok=True)
        print("command:", " ".join([sys.executable, *sys.argv]), flush=True)
        gpu_runs(args.gpu_model, args.gpu_nsamples, args.gpu_seqlen, args.gpu_cap_gib, args.device, path,
                 capped_only=args.gpu_capped_only)
        return 0
    if args.markdown:
        print(markdown(done))
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    print("command:", " ".join([sys.executable, *sys.argv]), flush=True)
    specs = rows()
    if args.rows:  # in the order given
        by_key = {spec["key"]: spec for spec in specs}
        unknown = [k for k in args.rows.split(",") if k not in by_key]
        if unknown:
            raise SystemExit(f"unknown rows: {unknown} (see --list)")
        specs = [by_key[k] for k in args.rows.split(",")]
    for spec in specs:
        if spec["key"] in done:
            continue
        with contextlib.nullcontext() if args.no_lock else cpu_lock():
            result = run_row(spec, args.model)
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(
            f"{spec['key']}: ppl {result['ppl']:.2f}"
            + (f", prune {result['prune_s']:.1f} s" if "prune_s" in result else ""),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
