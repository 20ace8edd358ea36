"""`sparsecraft eval MODEL... [--ppl wikitext2] [--tasks piqa,arc_easy,...] [--gsm8k N]`: one table,
models side by side (a thin layer over ``sparsecraft.eval.suite.run_eval``)."""

from __future__ import annotations

from ..data import NAMED
from ..errors import SparsecraftError
from .common import add_model_options, pick_device


def register(sub) -> None:
    from ..eval.tasks import TASKS

    p = sub.add_parser("eval", help="perplexity, zero-shot tasks and GSM8K of models, side by side")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="HF directory, compressed checkpoint, .gguf, smollm2-135m or random:NAME")
    p.add_argument("--ppl", default="wikitext2",
                   help=f"comma-separated perplexity sources: {', '.join(sorted(NAMED))} or a .txt/.jsonl "
                        "path; 'none' to skip")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40, help="first N windows (default 40)")
    p.add_argument("--batch-size", type=int, default=4, help="perplexity batch size")
    p.add_argument("--tasks", default="", help=f"comma-separated zero-shot tasks: {', '.join(TASKS)}, all, "
                                               "or NAME=PATH (e.g. hellaswag=FILE)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--task-batch-size", type=int, default=16)
    p.add_argument("--gsm8k", type=int, default=0, help="GSM8K test questions to generate for (0: none)")
    p.add_argument("--gsm8k-ppl", type=int, default=0,
                   help="GSM8K reference answers for perplexity (0: none)")
    p.add_argument("--json", dest="json_path", help="write the results as JSON")
    p.add_argument("--resume", action="store_true", help="keep the measurements already in --json")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.suite import print_table, run_eval

    if args.windows < 1:
        raise SparsecraftError(f"--windows {args.windows}: must be at least 1")
    sources = [] if args.ppl == "none" else [s.strip() for s in args.ppl.split(",") if s.strip()]
    results = run_eval(
        args.models, args.tasks, args.limit, args.task_batch_size, args.gsm8k, args.gsm8k_ppl,
        sources, args.seqlen, args.windows, ppl_batch_size=args.batch_size, json_path=args.json_path,
        resume=args.resume, dtype=args.dtype, device=pick_device(args.device),
    )
    print_table(results, markdown=args.markdown)
    return 0
