"""Argument helpers shared by subcommands."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def add_model_options(parser) -> None:
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")


def pick_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
