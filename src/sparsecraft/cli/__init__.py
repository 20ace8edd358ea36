"""`sparsecraft` command line: a thin layer over the Python API.

Each subcommand lives in its own module here and defines ``register(subparsers)``, which adds
its parser and sets ``func`` to a handler ``handler(args) -> int``. Bad input raises
``SparsecraftError``; it is printed on one line (traceback only with ``--debug``), exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..allocator import keep_freed_memory
from ..errors import SparsecraftError

# Subcommand modules, in the order they appear in --help.
COMMAND_MODULES = [
    "prune", "refine", "finetune", "quantize", "compress", "eval", "bench", "inspect", "report", "run",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsecraft",
        description="Prune, refine, fine-tune, quantize, compress, evaluate and benchmark sparse LLMs.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:  # a stage not built yet in this checkout
            if e.name == f"{__name__}.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    keep_freed_memory()  # CPU passes re-allocate the same large buffers (sparsecraft.allocator)
    try:
        return int(args.func(args) or 0)
    except SparsecraftError as e:
        if args.debug:
            raise
        print(f"sparsecraft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
