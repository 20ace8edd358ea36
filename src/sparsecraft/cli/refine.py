"""``sparsecraft refine``: DSnoT on an already pruned model.

Each layer's mask is taken from its zeros; the dense model supplies the values of regrown
weights and the reference output. The walk is sequential: each block's statistics come from the
already refined earlier blocks. N:M is read from the sparse model's ``sparsecraft.json`` (or
``--pattern``), so swaps stay inside their M-groups.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import SparsecraftError
from .prune import (
    add_calibration_options,
    add_dsnot_options,
    add_output_options,
    calibration_config,
    check_out,
    checkpoint_dir,
    dsnot_config,
    finish,
)

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "refine",
        help="training-free mask refinement (DSnoT) of a pruned model",
        description="Refine the masks of a pruned model with DSnoT prune-and-grow swaps.",
    )
    p.add_argument("sparse_dir", metavar="SPARSE_DIR", help="the pruned model (HF directory)")
    p.add_argument("--dense", required=True, metavar="MODEL", help="the dense model it was pruned from")
    p.add_argument("--method", choices=["dsnot"], default="dsnot")
    p.add_argument(
        "--pattern", default=None, help="N:M pattern of the masks (default: from sparsecraft.json)"
    )
    add_dsnot_options(p)
    add_calibration_options(p)
    add_output_options(p)
    p.set_defaults(func=run)


def _recorded_pattern(sparse_dir: str) -> str | None:
    meta = Path(sparse_dir) / "sparsecraft.json"
    if not meta.is_file():
        return None
    try:
        return (json.loads(meta.read_text()).get("recipe") or {}).get("pattern")
    except (OSError, ValueError):
        return None


def run(args) -> int:
    from ..data import calibration_windows
    from ..models import load
    from ..prune import PruneConfig
    from ..prune.api import refine_model
    from ..prune.masks import nm_valid, parse_pattern

    out = Path(args.out)
    check_out(out, args.overwrite, args.resume)
    if Path(args.sparse_dir).resolve() == out.resolve():
        raise SparsecraftError("--out: must differ from SPARSE_DIR (the output is written separately)")
    dsnot = dsnot_config(args)
    pattern = args.pattern or _recorded_pattern(args.sparse_dir)
    nm = parse_pattern(pattern) if pattern else None
    config = PruneConfig(
        method="magnitude",
        sparsity=0.0,
        refine="dsnot",
        dsnot=dsnot,
        **calibration_config(args),
    )
    sparse, tokenizer = load(args.sparse_dir, dtype=args.dtype, device="cpu")
    dense, _ = load(args.dense, dtype="float32", device="cpu")
    if nm is not None:
        from ..models import prunable_linears, weight_matrix

        bad = [n for n, la in prunable_linears(sparse).items() if not nm_valid(weight_matrix(la), *nm)]
        if bad:
            raise SparsecraftError(f"--pattern {pattern}: {SPARSE_DIR_HINT} {', '.join(bad[:3])}")
    calibration = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    ckpt = checkpoint_dir(out, args)
    report = refine_model(
        sparse,
        dense,
        calibration,
        dsnot,
        nm,
        config,
        checkpoint_dir=ckpt,
        resume=args.resume,
        progress=not args.no_progress,
        model_name=args.sparse_dir,
    )
    report["dense_model"] = args.dense
    del dense
    return finish(sparse, tokenizer, report, out, ckpt, args)


SPARSE_DIR_HINT = "the sparse model does not follow this N:M pattern in"
