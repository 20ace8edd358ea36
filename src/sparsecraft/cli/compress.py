"""`sparsecraft compress SRC --format bitmask|nm --out DIR2` and `sparsecraft decompress DIR2 --out DIR3`.

SRC is anything ``sparsecraft.models.load`` reads (HF directory, .gguf, alias, random:NAME) or a
compressed checkpoint (re-encoded in the new format; quantized layers keep their exact codes).
"""

from __future__ import annotations

import logging

from ..errors import SparsecraftError
from .common import write_json

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("compress", help="store a (sparse, possibly quantized) model in a compressed format")
    p.add_argument(
        "source", metavar="SRC", help="HF directory, .gguf, alias, random:NAME or compressed checkpoint"
    )
    p.add_argument(
        "--format",
        default="bitmask",
        choices=["bitmask", "nm", "dense", "auto"],
        help="bitmask (any sparsity), nm (packed N:M; refuses other masks), dense (quantized "
        "codes only), auto (smallest per layer); default bitmask",
    )
    p.add_argument("--nm", default="2:4", help="N:M pattern for --format nm/auto (default 2:4)")
    p.add_argument(
        "--dtype", default=None, help="cast float weights first: float16 | bfloat16 | float32 (default: keep)"
    )
    p.add_argument(
        "--targets", nargs="*", default=None, help="regexes of layers to compress (default: decoder linears)"
    )
    p.add_argument("--ignore", nargs="*", default=None, help="regexes of layers to keep dense")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--json", dest="json_path", help="write the size report (describe) as JSON")
    p.set_defaults(func=run_compress)

    d = sub.add_parser("decompress", help="compressed checkpoint -> plain Hugging Face directory")
    d.add_argument("source", metavar="DIR", help="compressed checkpoint directory")
    d.add_argument("--out", required=True, help="output HF directory (written atomically)")
    d.set_defaults(func=run_decompress)


def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise SparsecraftError(f"--nm {text!r}: expected N:M such as 2:4") from None
    if not (1 <= n < m <= 16):
        raise SparsecraftError(f"--nm {text!r}: need 1 <= N < M <= 16")
    return n, m


def load_source(source: str, dtype=None):
    """(model, tokenizer, quantized layers) from a model source or a compressed checkpoint."""
    from ..formats import is_compressed_dir, load_compressed, load_tensors
    from ..formats.checkpoint import quantized_from_layers
    from ..models import load

    if is_compressed_dir(source):
        if dtype is not None:
            raise SparsecraftError(f"{source}: --dtype applies to plain models, not compressed checkpoints")
        model, tokenizer = load_compressed(source, dense=True)
        layers, _, _, _ = load_tensors(source, verify=False)
        return model, tokenizer, quantized_from_layers(layers)
    model, tokenizer = load(source, dtype=dtype or "float32")
    return model, tokenizer, {}


def print_summary(report: dict, out) -> None:
    t = report["total"]
    dense_mib = report["dense_bytes"] / 2**20
    disk = report["bytes_on_disk"]
    print(
        f"{out}: {t['layers']} layers, {t['bits_per_weight']:.3f} bits per weight "
        f"(dense {t['dense_bits_per_weight']:.0f}); weights file {disk / 2**20:.2f} MiB vs "
        f"{dense_mib:.2f} MiB dense"
    )


def run_compress(args) -> int:
    from ..formats import CompressConfig, describe, save_compressed
    from ..formats.meta import DTYPES

    if args.dtype is not None and args.dtype not in DTYPES:
        raise SparsecraftError(f"--dtype {args.dtype!r}: choose one of {', '.join(DTYPES)}")
    n, m = parse_nm(args.nm)
    cfg = CompressConfig(
        format=args.format,
        n=n,
        m=m,
        targets=args.targets,
        ignore=args.ignore,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )
    model, tokenizer, quantized = load_source(args.source)
    if quantized and cfg.dtype is not None:
        log.info("quantized layers keep their codes; --dtype casts only the other tensors")
    out = save_compressed(model, tokenizer, args.out, cfg, quantized=quantized)
    report = describe(out)
    print_summary(report, out)
    if args.json_path:
        write_json(args.json_path, {"source": args.source, "format": args.format, **report})
    return 0


def run_decompress(args) -> int:
    from ..formats import decompress, is_compressed_dir

    if not is_compressed_dir(args.source):
        raise SparsecraftError(
            f"{args.source}: not a compressed checkpoint (no compression_config in config.json)"
        )
    out = decompress(args.source, args.out)
    print(f"{out}: plain Hugging Face directory")
    return 0
