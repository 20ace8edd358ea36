"""`sparsecraft eval MODEL... --ppl wikitext2 --seqlen 512 --windows 40`."""

from __future__ import annotations

from ..data import NAMED
from ..errors import SparsecraftError
from .common import add_model_options, pick_device, write_json


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (and zero-shot tasks) of one or more models, side by side")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="HF directory, .gguf, smollm2-135m or random:NAME")
    p.add_argument("--ppl", default="wikitext2",
                   help=f"comma-separated perplexity sources: {', '.join(sorted(NAMED))} or a .txt/.jsonl "
                        "path; 'none' to skip")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40, help="first N windows (default 40)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", dest="json_path", help="write the results as JSON")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval import perplexity
    from ..models import load

    sources = [] if args.ppl == "none" else [s.strip() for s in args.ppl.split(",") if s.strip()]
    if args.windows < 1:
        raise SparsecraftError(f"--windows {args.windows}: must be at least 1")
    device = pick_device(args.device)
    results = {}
    for source_model in args.models:
        model, tokenizer = load(source_model, dtype=args.dtype, device=device)
        row = {}
        for source in sources:
            row[f"ppl_{source}"] = perplexity(model, tokenizer, source, args.seqlen, args.windows,
                                              args.batch_size)
        results[source_model] = row
        del model
    _print_table(results)
    if args.json_path:
        write_json(args.json_path, {"protocol": {"seqlen": args.seqlen, "windows": args.windows,
                                                 "dtype": args.dtype, "device": device},
                                    "results": results})
    return 0


def _print_table(results: dict) -> None:
    columns = sorted({k for row in results.values() for k in row})
    width = max([len("model")] + [len(m) for m in results])
    print(f"{'model':<{width}}  " + "  ".join(f"{c:>16}" for c in columns))
    for name, row in results.items():
        cells = "  ".join(f"{row[c]:>16.4f}" if c in row else f"{'-':>16}" for c in columns)
        print(f"{name:<{width}}  {cells}")
