"""``sparsecraft finetune``: sparse fine-tuning that keeps the mask (CE, KD, SquareHead).

Several processes: ``accelerate launch [--use_fsdp --fsdp_version 2] -m sparsecraft.cli.finetune ...``
or ``torchrun --nproc_per_node N -m sparsecraft.cli.finetune ...`` (same arguments).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from ..errors import SparsecraftError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a sparse model keeping its zeros (SquareHead / KD / CE from a dense teacher)",
        description="Fine-tune a pruned model with its sparsity mask kept exactly. Loss = a_ce·CE + "
        "a_kd·T²·KL(teacher‖student) + a_sh·SquareHead. Writes OUT/model, OUT/report.json and "
        "OUT/checkpoints/.",
    )
    p.add_argument("sparse_dir", metavar="SPARSE_DIR", help="the pruned student (HF directory, "
        "alias, random:NAME)")
    p.add_argument("--teacher", help="the dense teacher (needed for kd and squarehead)")
    p.add_argument("--data", default="c4",
                   help="c4 (C4 documents 0-899) | gsm8k (train file, loss on answers) | a .txt/.jsonl path")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="windows per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per training window")
    p.add_argument("--max-train-windows", type=int, default=None, help="use only the first N "
        "training windows")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0, help="warmup steps")
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--loss-weights", default=None,
                   help="e.g. ce=1,kd=1,squarehead=1 (terms left out weigh 0); default "
                       "ce=1,kd=1,squarehead=1")
    p.add_argument("--loss", default=None, help="shorthand: squarehead,ce[,kd] (each with weight 1)")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--distill-mask", choices=["loss", "attention"], default="loss",
                   help="tokens for kd/squarehead: those CE is computed on, or all real tokens")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on a GPU that supports it, else fp32")
    p.add_argument("--teacher-dtype", default=None, help="load the teacher in this dtype (bf16 saves memory)")
    p.add_argument("--teacher-device", default=None,
                   help="device of the teacher (default: the training device), e.g. cpu to spare GPU memory")
    p.add_argument("--teacher-cache", choices=["none", "memory", "disk"], default="none",
                   help="cache teacher outputs per training window (disk: under OUT/teacher-cache)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--eval-every", type=int, default=0, help="validation perplexity every K steps "
        "(C4 900-999)")
    p.add_argument("--eval-windows", type=int, default=8, help="validation windows (0: no validation)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every K steps (0: none)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--json", metavar="PATH", help="also write the report to PATH")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _loss_weights(args):
    from ..finetune import LossWeights

    if args.loss_weights and args.loss:
        raise SparsecraftError("give either --loss-weights or --loss, not both")
    return LossWeights.parse(args.loss_weights or args.loss or "ce=1,kd=1,squarehead=1")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def run(args) -> int:
    from ..finetune import FinetuneConfig, finetune, training_data, validation_windows

    logging.getLogger("accelerate").setLevel(logging.WARNING)
    from ..models import load

    weights = _loss_weights(args)
    config = FinetuneConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        warmup_steps=args.warmup, schedule=args.schedule, min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, loss_weights=weights,
        kd_temperature=args.kd_temperature, distill_mask=args.distill_mask, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        teacher_cache=args.teacher_cache, seed=args.seed,
    )
    if weights.needs_teacher and not args.teacher:
        raise SparsecraftError("--teacher is required for the kd and squarehead losses (or use --loss ce)")
    student, tokenizer = load(args.sparse_dir, seed=args.seed)
    teacher = None
    if weights.needs_teacher:
        teacher, t_tok = load(args.teacher, dtype=args.teacher_dtype or "float32", seed=args.seed)
        if len(t_tok) != len(tokenizer):
            raise SparsecraftError(
                f"--teacher {args.teacher}: tokenizer has {len(t_tok)} tokens, the student's "
                f"{len(tokenizer)}; "
                "use the dense model the student was pruned from"
            )
    data = training_data(tokenizer, args.data, args.seqlen, args.max_train_windows)
    val = validation_windows(tokenizer, args.seqlen, args.eval_windows) if args.eval_windows > 0 else None
    out = Path(args.out)
    report = finetune(
        student, teacher, data, config, eval_windows=val, output_dir=out, resume=args.resume,
        teacher_cache_dir=out / "teacher-cache", teacher_device=args.teacher_device,
        progress=not args.no_progress,
        save_dir=out / "model", tokenizer=tokenizer,
    )
    report.update({"student": args.sparse_dir, "teacher": args.teacher, "data": args.data,
                   "argv": sys.argv})
    if report["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        _write_json(out / "report.json", report)
        if args.json:
            _write_json(Path(args.json), report)
        check = report["mask_check"]
        evals = report["evals"]
        ppl = f", validation ppl {evals[0]['val_ppl']:.3f} -> {evals[-1]['val_ppl']:.3f}" if evals else ""
        print(f"finetuned {report['steps']} steps ({report['tokens_this_run']} tokens this run, "
              f"{report['tokens_per_s'] or 0:.0f} tok/s){ppl}; mask "
              f"{'identical' if check['identical'] else 'kept' if check['pruned_still_zero'] else 'BROKEN'}"
              f" ({report['mask']['sparsity']:.1%} zeros); model in {out / 'model'}")
    return 0 if report["mask_check"]["pruned_still_zero"] else 1


if __name__ == "__main__":  # entry point for torchrun / accelerate launch -m
    from . import main

    sys.exit(main(["finetune", *sys.argv[1:]]))
