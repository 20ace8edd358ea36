"""`sparsecraft quantize SRC --bits 8|4 --group-size 128 [--method rtn|gptq] [--asym] [--awq] --out DIR2`.

Weight-only quantization that keeps every zero: the result is written as a compressed
checkpoint (codes + scales, in the format chosen by --format; default: the smallest per layer).
`sparsecraft decompress DIR2 --out DIR3` turns it into a plain HF directory.
"""

from __future__ import annotations

from ..errors import SparsecraftError
from .common import write_json


def register(sub) -> None:
    p = sub.add_parser("quantize", help="int8/int4 weight-only quantization keeping the zeros (RTN or GPTQ)")
    p.add_argument(
        "source", metavar="SRC", help="HF directory, .gguf, alias, random:NAME or compressed checkpoint"
    )
    p.add_argument("--bits", type=int, required=True, choices=[4, 8])
    p.add_argument(
        "--group-size", type=int, default=128, help="columns per scale group (32, 64, 128; default 128)"
    )
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    p.add_argument("--asym", action="store_true", help="asymmetric grid with a uint8 zero point per group")
    p.add_argument(
        "--clip",
        action="store_true",
        help="search a clipped range per group instead of min/max (least squared error: of the weights "
        "for RTN, of the group's output for GPTQ)",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "bitmask", "nm", "dense"],
        help="storage of the codes (default auto: the smallest per layer)",
    )
    p.add_argument("--nm", default="2:4", help="N:M pattern for --format nm/auto (default 2:4)")
    p.add_argument("--calib", default="c4", help="GPTQ / AWQ calibration source (default c4)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ dampening (fraction of mean diag H)")
    p.add_argument(
        "--act-order",
        action="store_true",
        help="GPTQ: quantize columns in order of decreasing Hessian diagonal (static group grids)",
    )
    p.add_argument(
        "--refit-scales",
        action="store_true",
        help="GPTQ: re-solve each row's group scales for its output once the codes are fixed",
    )
    p.add_argument(
        "--awq",
        action="store_true",
        help="activation-aware scaling first (AWQ: per-input-channel scales searched on calibration "
        "data and folded into the preceding norm / linear), then --method quantizes",
    )
    p.add_argument("--awq-grid", type=int, default=20, help="AWQ: points of the α search in [0, 1)")
    p.add_argument("--blocksize", type=int, default=128, help="GPTQ column block")
    p.add_argument(
        "--calib-dtype",
        default="model",
        help="dtype of GPTQ calibration forwards: model | float32 | bfloat16",
    )
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--device", default="auto", help="GPTQ compute device (cpu, cuda; default auto)")
    p.add_argument(
        "--targets", nargs="*", default=None, help="regexes of layers to quantize (default: decoder linears)"
    )
    p.add_argument("--ignore", nargs="*", default=None, help="regexes of layers to leave unquantized")
    p.add_argument("--out", required=True, help="output compressed checkpoint directory (written atomically)")
    p.add_argument("--json", dest="json_path", help="write the quantization and size report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..formats import CompressConfig, describe, save_compressed
    from ..formats.meta import DTYPES
    from ..prune.engine import EngineOptions
    from ..quant import QuantConfig, quantize_model
    from .compress import load_source, parse_nm, print_summary

    n, m = parse_nm(args.nm)
    config = QuantConfig(
        bits=args.bits,
        group_size=args.group_size,
        symmetric=not args.asym,
        method=args.method,
        clip=args.clip,
        act_order=args.act_order,
        refit_scales=args.refit_scales,
        awq=args.awq,
        awq_grid=args.awq_grid,
        blocksize=args.blocksize,
        percdamp=args.percdamp,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        targets=tuple(args.targets) if args.targets else None,
        ignore=tuple(args.ignore) if args.ignore else None,
    )
    if args.calib_dtype != "model" and args.calib_dtype not in DTYPES:
        raise SparsecraftError(
            f"--calib-dtype {args.calib_dtype!r}: choose model or one of {', '.join(DTYPES)}"
        )
    options = EngineOptions(
        device=args.device,
        batch_size=args.batch_size,
        forward_dtype=None if args.calib_dtype == "model" else DTYPES[args.calib_dtype],
    )
    model, tokenizer, _ = load_source(args.source)
    if args.format == "nm":  # refuse before a long calibration, not after it
        from ..formats.checkpoint import _is_nm
        from ..models.discovery import prunable_linears, weight_matrix

        bad = [
            name
            for name, layer in prunable_linears(model, config.targets, config.ignore).items()
            if not _is_nm(weight_matrix(layer) != 0, n, m)
        ]
        if bad:
            raise SparsecraftError(
                f"--format nm: {len(bad)} layers are not {n}:{m} sparse (first: {bad[0]}); "
                "use --format bitmask or auto"
            )
    results, report = quantize_model(model, tokenizer, config, options=options)
    cfg = CompressConfig(format=args.format, n=n, m=m, targets=args.targets, ignore=args.ignore)
    out = save_compressed(
        model,
        tokenizer,
        args.out,
        cfg,
        quantized=results,
        extra_files={"sparsecraft_quant.json": {"source": args.source, **report}},
    )
    size = describe(out)
    print(
        f"quantized {report['layers']} layers ({config.method}, int{config.bits}, group {config.group_size}, "
        f"{'symmetric' if config.symmetric else 'asymmetric'}{', AWQ scales' if config.awq else ''}); "
        f"sparsity {report['sparsity_before']:.4f} -> "
        f"{report['sparsity_after']:.4f}"
    )
    print_summary(size, out)
    if args.json_path:
        write_json(args.json_path, {"source": args.source, **report, "size": size})
    return 0
