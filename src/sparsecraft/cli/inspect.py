"""`sparsecraft inspect MODEL`: per-layer shape, sparsity, 2:4 / 4:8 validity, totals, bytes."""

from __future__ import annotations

from pathlib import Path

from .common import write_json


def register(sub) -> None:
    p = sub.add_parser("inspect", help="per-layer sparsity and N:M validity, parameter bytes")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--json", dest="json_path")
    p.add_argument("--quiet", action="store_true", help="totals only")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..inspect import layer_report
    from ..models import load

    model, _ = load(args.model)
    report = layer_report(model)
    if Path(args.model).is_dir():  # storage: bytes on disk against dense, bits per weight
        from ..formats import describe

        storage = describe(args.model)
        report["storage"] = {k: storage[k] for k in ("bytes_on_disk", "dense_bytes", "total") if k in storage}
    if not args.quiet:
        print(f"{'layer':<48} {'shape':>12} {'sparsity':>9} {'2:4':>4} {'4:8':>4}")
        for row in report["layers"]:
            shape = "x".join(map(str, row["shape"]))
            print(f"{row['name']:<48} {shape:>12} {row['sparsity']:>9.4f} "
                  f"{'yes' if row['2:4'] else 'no':>4} {'yes' if row['4:8'] else 'no':>4}")
    print(f"{report['num_layers']} decoder linear layers, {report['linear_params']:,} weights, "
          f"sparsity {100 * report['linear_sparsity']:.1f}%, all 2:4: {report['all_2:4']}, "
          f"all 4:8: {report['all_4:8']}")
    print(f"{report['parameters']:,} parameters, {report['parameter_bytes'] / 2**20:.1f} MiB")
    if "storage" in report:
        total = report["storage"].get("total", {})
        print(f"on disk: {report['storage'].get('bytes_on_disk', 0) / 2**20:.1f} MiB, decoder linears "
              f"{total.get('bits_per_weight', float('nan')):.3f} bits per weight")
    if args.json_path:
        write_json(args.json_path, {"model": args.model, **report})
    return 0
