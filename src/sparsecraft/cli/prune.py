"""``sparsecraft prune``: one-shot pruning (magnitude, Wanda, SparseGPT; unstructured, N:M, OWL),
optionally refined with DSnoT. Writes a standard HF directory plus ``sparsecraft.json``.

The model is loaded on the CPU; the engine moves one decoder block at a time to ``--device``.
A checkpoint after every block lives in ``OUT.checkpoint`` until the output is complete, so a
crashed run continues with ``--resume`` and ends with exactly the masks of an uninterrupted one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..errors import SparsecraftError
from .common import write_json

log = logging.getLogger(__name__)


def add_calibration_options(p) -> None:
    p.add_argument("--calib", default="c4", help="calibration text: c4 (bundled) or a .txt/.jsonl PATH")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window offsets")
    p.add_argument(
        "--calib-dtype",
        default="model",
        help="dtype of the calibration forwards: model (default), float32, bfloat16 (CPU fast "
        "mode: ~2x faster with avx512_bf16), float16; solves are always float32",
    )
    p.add_argument(
        "--fast", action="store_true",
        help="CPU fast mode: bfloat16 calibration forwards and bf16 products for the Hessian (fp32 sums)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--inputs-on", choices=["auto", "cpu", "device"], default="auto",
                   help="where block inputs live between passes (auto: the device if they fit)")
    p.add_argument(
        "--offload-dtype", default=None, help="dtype of block inputs kept on the CPU (e.g. float16)"
    )


def calibration_config(args) -> dict:
    """PruneConfig fields set by the options of :func:`add_calibration_options`."""
    return dict(
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        device=args.device,
        calib_dtype="bfloat16" if args.fast else args.calib_dtype,
        bf16_hessian=args.fast,
        offload_dtype=args.offload_dtype,
        batch_size=args.batch_size,
        inputs_on=args.inputs_on,
    )


def add_dsnot_options(p) -> None:
    """DSnoT settings, shared by ``prune --refine dsnot`` and ``refine``."""
    p.add_argument("--dsnot-cycles", type=int, default=50, help="DSnoT maximum cycles")
    p.add_argument("--dsnot-threshold", type=float, default=0.1, help="DSnoT update threshold")
    p.add_argument("--dsnot-gamma", type=float, default=1.0, help="DSnoT: power of Var in the growth score")
    p.add_argument("--dsnot-skip", action="append", default=None, help="regex of layers DSnoT leaves alone")
    p.add_argument("--dsnot-without-same-sign", action="store_true", help="DSnoT: drop the same-sign check")
    p.add_argument(
        "--dsnot-variance-guard",
        action="store_true",
        help="DSnoT: refuse swaps that raise the expected squared error (mean and variance terms)",
    )


def dsnot_config(args):
    from ..prune.dsnot import DSnoTConfig

    return DSnoTConfig(
        max_cycles=args.dsnot_cycles,
        update_threshold=args.dsnot_threshold,
        pow_of_var_regrowing=args.dsnot_gamma,
        skip_layer=tuple(args.dsnot_skip) if args.dsnot_skip else None,
        without_same_sign=args.dsnot_without_same_sign,
        variance_guard=args.dsnot_variance_guard,
    )


def add_output_options(p) -> None:
    p.add_argument("--out", required=True, help="output directory (standard HF layout + sparsecraft.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", metavar="PATH", help="also write the report to PATH")
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint after a crash")
    p.add_argument("--no-checkpoint", action="store_true", help="no per-block checkpoint (no --resume later)")
    p.add_argument("--device", default="auto", help="compute device: auto (cuda if available), cpu, cuda:N")
    p.add_argument(
        "--dtype", default="float32", help="dtype the model is loaded and saved in (default float32)"
    )
    p.add_argument("--no-progress", action="store_true")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prune",
        help="one-shot pruning: magnitude, Wanda, SparseGPT; unstructured, N:M, OWL; optional DSnoT",
        description="Prune a causal LM layer by layer from calibration statistics.",
    )
    p.add_argument(
        "model", metavar="MODEL", help="HF directory, .gguf file, alias (smollm2-135m) or random:NAME"
    )
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--sparsity", type=float, help="unstructured sparsity in [0, 1), e.g. 0.5")
    group.add_argument("--pattern", help="N:M semi-structured pattern, e.g. 2:4 or 4:8")
    p.add_argument(
        "--profile",
        choices=["uniform", "owl"],
        default="uniform",
        help="per-layer sparsity: uniform, or OWL (outlier-weighted, mean exact)",
    )
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M (x mean score)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL spread: block sparsities in S±λ")
    p.add_argument("--refine", choices=["dsnot"], default=None, help="refine each mask with DSnoT")
    add_dsnot_options(p)
    p.add_argument("--magnitude-scope", choices=["layer", "row"], default="layer")
    p.add_argument("--wanda-variant", action="store_true", help="Wanda's adaptive per-row variant")
    p.add_argument(
        "--percdamp", type=float, default=0.01, help="SparseGPT dampening (fraction of mean diagonal)"
    )
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block")
    p.add_argument(
        "--exact-update",
        action="store_true",
        help="SparseGPT: keep its mask, re-solve each row's kept weights by exact least squares",
    )
    p.add_argument(
        "--true-sequential",
        action="store_true",
        help="solve the layers of a block group by group, each seeing the solved ones' outputs",
    )
    p.add_argument("--targets", action="append", default=None, help="regex: prune only matching layers")
    p.add_argument("--ignore", action="append", default=None, help="regex: leave matching layers dense")
    add_calibration_options(p)
    add_output_options(p)
    p.set_defaults(func=run)


def check_out(out: Path, overwrite: bool, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SparsecraftError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SparsecraftError(f"--out {out}: directory is not empty; pass --overwrite to replace it")


def checkpoint_dir(out: Path, args) -> Path | None:
    if args.no_checkpoint:
        if args.resume:
            raise SparsecraftError("--resume needs the per-block checkpoint; drop --no-checkpoint")
        return None
    ckpt = out.with_name(out.name + ".checkpoint")
    if ckpt.exists() and not args.resume:
        log.info("removing the old checkpoint %s (pass --resume to continue from it)", ckpt)
        shutil.rmtree(ckpt)
    if args.resume and not ckpt.exists():
        log.info("--resume: no checkpoint at %s, starting from the first block", ckpt)
    return ckpt


def print_table(report: dict) -> None:
    print(f"{'layer':<48} {'shape':>12} {'target':>7} {'sparsity':>8} {'rel.err':>8}")
    for r in report["layers"]:
        target = "" if r.get("target") is None else f"{r['target']:.4f}"
        print(
            f"{r['name']:<48} {r['shape'][0]:>5}x{r['shape'][1]:<6} {target:>7} {r['sparsity']:>8.4f} "
            f"{r['rel_error']:>8.4f}"
        )
    s, t = report["summary"], report["timing"]
    err = "n/a" if s["mean_rel_error"] is None else f"{s['mean_rel_error']:.4f}"
    print(
        f"total: {s['layers']} layers, sparsity {s['sparsity']:.4f}, "
        f"mean rel. error {err}; "
        f"time {t['total_s']:.1f} s (forward {t['forward_s']:.1f}, statistics {t['statistics_s']:.1f}, "
        f"solve {t['solve_s']:.1f}, checkpoint {t['checkpoint_s']:.1f}, owl {t['owl_profile_s']:.1f}); "
        f"peak host {report['memory']['peak_host_mib']:.0f} MiB"
        + (
            f", device {report['memory']['peak_device_mib']:.0f} MiB"
            if report["memory"]["peak_device_mib"]
            else ""
        )
    )


def run(args) -> int:
    from ..data import calibration_windows
    from ..models import load
    from ..prune import PruneConfig, prune

    out = Path(args.out)
    check_out(out, args.overwrite, args.resume)
    config = PruneConfig(
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        profile=args.profile,
        owl_m=args.owl_m,
        owl_lambda=args.owl_lambda,
        magnitude_scope=args.magnitude_scope,
        wanda_variant=args.wanda_variant,
        blocksize=args.blocksize,
        percdamp=args.percdamp,
        exact_update=args.exact_update,
        refine=args.refine,
        dsnot=dsnot_config(args),
        true_sequential=args.true_sequential,
        **calibration_config(args),
        targets=tuple(args.targets) if args.targets else None,
        ignore=tuple(args.ignore) if args.ignore else None,
    )
    model, tokenizer = load(args.model, dtype=args.dtype, device="cpu")
    calibration = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    ckpt = checkpoint_dir(out, args)
    report = prune(
        model,
        tokenizer,
        config,
        calibration,
        checkpoint_dir=ckpt,
        resume=args.resume,
        progress=not args.no_progress,
        model_name=args.model,
    )
    return finish(model, tokenizer, report, out, ckpt, args)


def finish(model, tokenizer, report: dict, out: Path, ckpt: Path | None, args) -> int:
    """Save the pruned model with its report, drop the block checkpoints, print the summary."""
    from ..models import save

    save(model, tokenizer, out, extra_files={"sparsecraft.json": report})
    if ckpt is not None and ckpt.exists():
        shutil.rmtree(ckpt)
    if args.json:
        write_json(args.json, report)
    print_table(report)
    print(f"wrote {out}")
    return 0
