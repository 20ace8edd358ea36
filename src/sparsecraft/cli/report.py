"""`sparsecraft report RESULTS... --out DIR`: markdown tables and PNG plots from result files."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="result JSON/JSONL files or directories -> report.md + PNG plots",
        description="Build markdown tables and plots (perplexity vs sparsity per method, per-layer sparsity "
                    "and reconstruction error, speed vs batch per format) from result files: prune reports "
                    "(sparsecraft.json), eval --json results, benchmark JSONL rows, recipe summaries.")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="JSON/JSONL files or directories")
    p.add_argument("--out", required=True, help="output directory (report.md and *.png)")
    p.add_argument("--title", default="sparsecraft report")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report import build_report

    res = build_report(args.results, args.out, args.title)
    print(f"wrote {res['markdown']}")
    for f in res["figures"]:
        print(f"wrote {f}")
    return 0
